"""--model as a Hugging Face Hub id. huggingface_hub itself downloads a small checkpoint into a cache directory from a
local stand-in for the Hub (the few endpoints snapshot_download calls); then, with the stand-in gone and
HF_HUB_OFFLINE=1, the id resolves from that cache for `baton generate`, the router and the workers. Each step runs in
its own interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at import."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.process_settings import ConfigError
from baton.router.config import RouterConfig
from baton.worker.settings import WorkerSettings

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves one repository: its info, its file tree and its files (HEAD and GET), as the Hub's API does."""

    def __init__(self, repo: str, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repo, self.files, self.requests = repo, files, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        hub, path = self.server, self.path.split("?")[0]
        hub.requests.append(path)
        etag = {name: hashlib.sha1(data).hexdigest() for name, data in hub.files.items()}
        headers = {"Content-Type": "application/json"}
        if path == f"/api/models/{hub.repo}/revision/main":
            body = json.dumps({"id": hub.repo, "sha": SHA, "siblings": [{"rfilename": n} for n in hub.files]})
        elif path == f"/api/models/{hub.repo}/tree/{SHA}":
            body = json.dumps([{"type": "file", "path": n, "size": len(d), "oid": etag[n]} for n, d in hub.files.items()])
        elif path.startswith(f"/{hub.repo}/resolve/{SHA}/") and path.rsplit("/", 1)[1] in hub.files:
            name = path.rsplit("/", 1)[1]
            body = hub.files[name]
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": SHA, "ETag": f'"{etag[name]}"'}
        else:
            body = json.dumps({"error": "not found"})
            headers["X-Error-Code"] = "RepoNotFound"
        data = body.encode() if isinstance(body, str) else body
        self.send_response(404 if "X-Error-Code" in headers else 200)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(data)


def run_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, env=env, capture_output=True, text=True, timeout=120)


def baton(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_python(env, "-m", "baton.cli", *args)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HOME with org/tiny in its cache, put there by huggingface_hub's snapshot_download; and the source dir."""
    tmp_path = tmp_path_factory.mktemp("hub")
    source = make_model(tmp_path / "tiny", arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, vocab=512,
                        max_position=512, seed=5)
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"a copy of the weights serving never reads"
    hub = FakeHub("org/tiny", files)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf")
    env["HF_ENDPOINT"] = hub.url
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / SHA
    try:
        # Online. The router takes configs and tokenizer only; then what serving reads (not the .bin copy), as the
        # chart's init container does.
        router = run_python(env, "-c", "from baton.router.config import RouterConfig; "
                                       "print(RouterConfig.load(model='org/tiny').model_dir)")
        assert router.returncode == 0, router.stderr
        assert router.stdout.strip() == str(snapshot) and (snapshot / "tokenizer.json").is_file()
        assert not (snapshot / "model.safetensors").exists()
        fetched = baton(env, "fetch-model", "org/tiny")
    finally:
        hub.shutdown()
        hub.server_close()
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == str(snapshot)
    assert (tmp_path / "hf" / "hub" / "models--org--tiny" / "refs" / "main").read_text() == SHA
    assert not (snapshot / "pytorch_model.bin").exists() and (snapshot / "model.safetensors").is_file()
    assert any(p.startswith("/api/models/org/tiny") for p in hub.requests)
    offline = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    return source, snapshot, offline


@pytest.mark.slow  # fresh interpreters
def test_a_cached_hub_id_serves_offline(hub_cache):
    source, snapshot, offline = hub_cache
    from_hub = baton(offline, "generate", "org/tiny", "--prompt-ids", "5,6,7,8", "--max-tokens", "6", "--ignore-eos",
                     "--device", "cpu", "--json")
    assert from_hub.returncode == 0, from_hub.stderr
    engine = LLMEngine(EngineConfig(str(source), device="cpu", num_kv_blocks=16, show_progress=False))
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    want = []
    while engine.has_unfinished():
        want += [t for out in engine.step() for t in out.new_token_ids]
    assert json.loads(from_hub.stdout)["token_ids"] == want
    settings = run_python(offline, "-c",
        "import json; from baton.router.config import RouterConfig; from baton.worker.settings import WorkerSettings\n"
        "r = RouterConfig.load(model='org/tiny'); w = WorkerSettings.load(pool='decode', model='org/tiny')\n"
        "print(json.dumps([str(r.model_dir), r.model_name, r.context_length(), str(w.model_dir), "
        "w.served_model_name]))")
    assert settings.returncode == 0, settings.stderr
    assert json.loads(settings.stdout) == [str(snapshot), "org/tiny", 512, str(snapshot), "org/tiny"]


@pytest.mark.slow
def test_an_id_missing_from_the_cache_fails_offline_with_a_message(hub_cache):
    _, _, offline = hub_cache
    gen = baton(offline, "generate", "org/absent", "--prompt-ids", "1", "--device", "cpu")
    assert gen.returncode == 2 and "'org/absent' (revision main) is not in the Hugging Face cache" in gen.stderr
    worker = baton(offline, "decode-worker", "--model", "org/tiny", "--revision", "v2")
    assert worker.returncode == 2 and "'org/tiny' (revision v2) is not in the Hugging Face cache" in worker.stderr
    assert "Traceback" not in gen.stderr + worker.stderr


def test_a_path_that_is_neither_a_directory_nor_an_id_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="setting 'model' .flag --model.: .*nor a Hugging Face Hub id"):
        WorkerSettings.load(pool="decode", model="./no/such/dir")
    with pytest.raises(ConfigError, match="setting 'model' .flag --model.: .*not a Hugging Face Hub id"):
        RouterConfig.load(model="no such/dir")
