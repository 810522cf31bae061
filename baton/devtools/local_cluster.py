"""`baton up`: a whole Baton cluster on this machine — Redis, router, control plane, and the prefill and
decode (and embedding) workers that the control plane's local backend starts — stopped cleanly on Ctrl-C or SIGTERM."""
from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import redis
import yaml
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from baton.contracts.keys import WORKER_KEY_PREFIX
from baton.contracts.worker_registry import EMBED_POOL, WORKER_POOLS, WorkerRecord
from baton.controlplane.backends.local import WORKER_ARGV, WorkerProcess, stop_processes
from baton.devtools.fetch_model import DEFAULT_MODEL, models_cache_dir, resolve_any_model

# Benchmarks that measure serving, not the model, use a small random-weight Llama.
TINY_MODEL = dict(arch="llama", layers=4, hidden=256, heads=8, kv_heads=4, vocab=4096, max_position=4096)


def ensure_tiny_model() -> pathlib.Path:
    path = models_cache_dir() / "baton-tiny-llama"
    if not (path / "config.json").is_file():
        from baton.devtools.make_model import make_model

        print(f"[baton] making a small random-weight model at {path} (first run only)", flush=True)
        make_model(path, **TINY_MODEL)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class UpOptions:
    model: str | pathlib.Path = DEFAULT_MODEL
    revision: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"  # the router's bind address
    chat_template: str | None = None
    tool_call_parser: str | None = None  # the router's --tool-call-parser (default hermes)
    block_size: int = 16
    max_model_len: int | None = None
    # Worker settings by field name, e.g. {"device": "cuda", "dtype": "bfloat16", "enable_prefix_caching": False};
    # gpu_memory_utilization defaults to an equal share of 0.9 for every worker the pools may grow to.
    worker_settings: dict = field(default_factory=dict)
    prefill: int = 1
    decode: int = 1
    embed: int = 0  # embedding workers; with `embed` or `max_embed` above 0 the policy has an embed pool
    max_prefill: int | None = None
    max_decode: int | None = None
    max_embed: int | None = None
    port: int = 8000
    grpc_port: int = 50051
    controlplane_port: int = 8090
    redis_url: str | None = None
    routing: str = "kv_aware"
    kv_transport: str = "auto"  # workers' transports in order of preference; auto = ipc (same host), then tcp
    local_prefill_threshold: int = 64
    num_kv_blocks: int | None = None  # None: the workers' default (kv_cache_memory_gb on CPU, the GPU's share)
    torch_threads: int = 1
    ray: bool = False
    ray_address: str | None = None
    run_dir: pathlib.Path | None = None
    ready_timeout_s: float = 180.0
    extra_worker_args: list[str] = field(default_factory=list)
    # Policy fields to override, e.g. {"tick_s": 1, "decode": {"capacity_tokens_per_s": 30}}.
    policy_overrides: dict = field(default_factory=dict)


STOP_TIMEOUT_S = 40.0  # per component; the control plane stops its workers within it
WORKER_STOP_TIMEOUT_S = 15.0  # for workers that outlived the control plane


class LocalCluster:
    """Starts the processes in dependency order and stops them in reverse."""

    def __init__(self, opts: UpOptions) -> None:
        self.opts = opts
        self.run_dir = opts.run_dir or pathlib.Path(tempfile.mkdtemp(prefix="baton-up-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._commands: dict[str, tuple[list[str], dict | None]] = {}
        self.model_dir, name = resolve_any_model(str(opts.model), opts.revision)
        self.model_name = opts.served_model_name or name
        self.redis_url = opts.redis_url
        self.admin_token = secrets.token_urlsafe(24)
        self.http_port = opts.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.opts.host in ("0.0.0.0", "::", "") else self.opts.host
        return f"http://{host}:{self.http_port}"

    def _spawn(self, name: str, argv: list[str], env: dict | None = None, at: int | None = None) -> subprocess.Popen:
        self._commands[name] = (argv, env)
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
        log.close()
        if at is None:
            self.procs.append((name, proc))
        else:
            self.procs[at] = (name, proc)  # a restart keeps the component's place in the stop order
        return proc

    def _baton(self) -> list[str]:
        return [sys.executable, "-m", "baton.cli"]

    def start(self) -> None:
        if self.redis_url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise RuntimeError("redis-server is not installed (run `make setup`) and no --redis-url was given")
            port = free_port()
            self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(self.run_dir)])
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._wait_redis()
        policy = self.write_policy()
        self._spawn("controlplane", [*self._baton(), "controlplane", "--policy", str(policy), "--redis-url",
                                     self.redis_url, "--http-port", str(self.opts.controlplane_port),
                                     "--grpc-port", "0", "--worker-log-dir", str(self.run_dir),
                                     *([] if self.opts.ray else ["--keep-workers"])],
                    env={"BATON_CONTROLPLANE_TOKEN": self.admin_token})
        self._spawn("router", [*self._baton(), "router", *self.router_args()])
        self.wait_ready()

    def router_args(self) -> list[str]:
        o = self.opts
        args = ["--model", str(self.model_dir), "--redis-url", self.redis_url, "--host", o.host,
                "--http-port", str(o.port), "--grpc-port", str(o.grpc_port), "--policy", o.routing,
                "--local-prefill-threshold", str(o.local_prefill_threshold), *self._shared_args()]
        args += ["--tool-call-parser", o.tool_call_parser] if o.tool_call_parser else []
        return args + (["--chat-template", o.chat_template] if o.chat_template else [])

    def _shared_args(self) -> list[str]:
        """Flags the router and the workers must agree on."""
        args = ["--served-model-name", self.model_name, "--block-size", str(self.opts.block_size)]
        if self.opts.max_model_len is not None:
            args += ["--max-model-len", str(self.opts.max_model_len)]
        return args

    def worker_args(self) -> list[str]:
        o = self.opts
        most = max(o.prefill, o.max_prefill or 0) + max(o.decode, o.max_decode or 0) + max(o.embed, o.max_embed or 0)
        settings = {"gpu_memory_utilization": round(0.9 / most, 3), "num_kv_blocks": o.num_kv_blocks,
                    "torch_threads": o.torch_threads, "kv_transport": o.kv_transport, **o.worker_settings}
        args = self._shared_args()
        for name, value in settings.items():
            flag = name.replace("_", "-")
            if isinstance(value, bool):
                args.append(f"--{flag}" if value else f"--no-{flag}")
            elif value is not None:
                args += [f"--{flag}", str(value)]
        return [*args, *o.extra_worker_args]

    def write_policy(self) -> pathlib.Path:
        o = self.opts
        worker = [*WORKER_ARGV, *self.worker_args()]
        cluster = {"name": "local", "region": "local", "backend": "ray" if o.ray else "local",
                   "gpus": 1024, "worker_command": worker}
        if o.ray:
            cluster["ray_address"] = o.ray_address or "local"  # "local": start a Ray cluster on this machine
        pool = dict(capacity_tokens_per_s=2000, startup_s=15)
        doc = {
            "version": 1, "tick_s": 5, "signals": {"window_s": 20, "stale_after_s": 30},
            "clusters": [cluster],
            "models": [{
                "name": self.model_name, "model_dir": str(self.model_dir),
                "regions": {"local": {
                    "prefill": {**pool, "min_replicas": o.prefill, "max_replicas": max(o.prefill, o.max_prefill or 0),
                                "ttft_p90_ms": 2000},
                    "decode": {**pool, "min_replicas": o.decode, "max_replicas": max(o.decode, o.max_decode or 0),
                               "capacity_tokens_per_s": 200, "itl_p90_ms": 200},
                }},
            }],
        }
        over = dict(o.policy_overrides)
        pools = doc["models"][0]["regions"]["local"]
        if max(o.embed, o.max_embed or 0) > 0:
            pools[EMBED_POOL] = {"min_replicas": o.embed, "max_replicas": max(o.embed, o.max_embed or 0),
                                 "capacity_inputs_per_s": 200, "queue_time_p90_ms": 500, "startup_s": 15}
        for name in pools:
            pools[name].update(over.pop(name, {}))
        doc.update(over)
        path = self.run_dir / "policy.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def _wait_redis(self) -> None:
        client = redis.Redis.from_url(self.redis_url, retry=Retry(ConstantBackoff(0.05), retries=300))  # ~15 s
        try:
            client.ping()
        except redis.ConnectionError:
            raise RuntimeError(f"Redis at {self.redis_url} did not answer") from None
        finally:
            client.close()

    def workers(self) -> list[WorkerRecord]:
        """The worker records in Redis now (a stopped worker deletes its own)."""
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        records = []
        try:
            for key in client.scan_iter(match=WORKER_KEY_PREFIX + "*"):
                try:
                    records.append(WorkerRecord.from_hash(client.hgetall(key)))
                except (ValueError, TypeError):
                    continue  # expired between SCAN and HGETALL, or not a worker record
        finally:
            client.close()
        return records

    def registered(self) -> dict[str, int]:
        counts = dict.fromkeys(WORKER_POOLS, 0)
        for record in self.workers():
            counts[record.pool] += 1
        return counts

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.ready_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.run_dir / name}.log")
            try:  # the router's own view: Redis may list a worker the router has not scanned yet
                reply = httpx.get(f"{self.url}/ready", timeout=1)
                body = reply.json() if reply.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                body = {}
            if body.get("ready") and all(body.get(f"{p}_workers", 0) >= n for p, n in (
                    ("prefill", self.opts.prefill), ("decode", self.opts.decode), (EMBED_POOL, self.opts.embed))):
                return
            time.sleep(0.3)
        raise RuntimeError(f"cluster not ready after {self.opts.ready_timeout_s:.0f}s; logs in {self.run_dir}")

    def restart(self, name: str) -> None:
        """Stops one component ("router", "controlplane", "redis") and starts it again with the same
        command line, then waits until the cluster is ready: for recovery tests and drills."""
        if name not in self._commands:
            raise ValueError(f"no component {name!r}; known: {sorted(self._commands)}")
        at = [n for n, _ in self.procs].index(name)
        stop_processes([self.procs[at][1]], STOP_TIMEOUT_S)
        self._spawn(name, *self._commands[name], at=at)
        if name == "redis":
            self._wait_redis()
        self.wait_ready()

    def _local_workers(self) -> list[WorkerProcess]:
        if self.redis_url is None:
            return []
        try:
            records = self.workers()
        except (redis.RedisError, OSError):
            return []
        host = socket.gethostname()
        return [WorkerProcess(r.pid) for r in records if r.host == host and r.pid > 0]

    def _unregistered_workers(self, known: set[int]) -> list[WorkerProcess]:
        """Worker processes on this machine serving this cluster's Redis that have no record (yet): the control
        plane leaves its workers running when it exits, including one still loading its model."""
        if self.redis_url is None:
            return []
        found = []
        for entry in pathlib.Path("/proc").glob("[0-9]*"):
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker-id" in argv and self.redis_url.encode() in argv and int(entry.name) not in known:
                found.append(WorkerProcess(int(entry.name)))
        return found

    def stop(self) -> None:
        """Router first (no new requests), then the control plane, then the workers of this machine (the control
        plane leaves its local workers running so that a restarted one adopts them; a Ray actor's stop may time
        out), then Redis, so that none outlives this call."""
        workers = self._local_workers()  # read first: a worker deletes its record when it stops
        for name, proc in reversed(self.procs):
            stop_processes([proc], STOP_TIMEOUT_S)
            if name == "controlplane":
                workers += self._unregistered_workers({w.pid for w in workers})
                stop_processes(workers, WORKER_STOP_TIMEOUT_S)
        self.procs.clear()
