"""Settings of a prefill or decode worker process: flags > env (BATON_WORKER_*) > the --config YAML > defaults."""
from __future__ import annotations

import os
import pathlib
import socket
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from baton.engine.model_source import is_hub_id, resolve_model, served_name
from baton.process_settings import ProcessSettings

if TYPE_CHECKING:
    from baton.engine.config import EngineConfig

# (gRPC, HTTP) ports of each pool when none is given, so one prefill and one decode worker fit on a host.
DEFAULT_PORTS = {"prefill": (50061, 8081), "decode": (50062, 8082), "embed": (50063, 8083)}


def _pool_ports(validated: dict[str, Any]) -> tuple[int, int]:
    return DEFAULT_PORTS.get(validated.get("pool", ""), (0, 0))


class WorkerSettings(ProcessSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_WORKER_")

    pool: Literal["prefill", "decode", "embed"] = Field(
        description="set by the command: prefill-worker / decode-worker / embed-worker")
    model: str = Field(description="Hugging Face-format model directory, or a Hugging Face Hub id (org/name)")
    revision: str | None = Field(None, description="Hub branch, tag or commit of a Hub id (default: main)")
    model_name: str | None = Field(None, description="name served to clients, also --served-model-name "
                                                     "(default: the Hub id, or the directory name)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for registration and KV events")
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
                           description="unique id (default: hostname-pid)")
    region: str = Field("local", description="region label for routing and autoscaling")
    host: str = Field("127.0.0.1", description="bind address")
    advertise_host: str | None = Field(None, description="address others reach this worker at (default: --host)")
    grpc_port: int = Field(default_factory=lambda data: _pool_ports(data)[0], ge=0, le=65535,
                           description="gRPC port, 0 = any free port (default: 50061 prefill, 50062 decode)")
    http_port: int = Field(default_factory=lambda data: _pool_ports(data)[1], ge=0, le=65535,
                           description="HTTP port of /health, /ready, /metrics, 0 = any free port "
                                       "(default: 8081 prefill, 8082 decode)")
    device: str = Field("auto", description="auto (cuda when a GPU is visible) | cpu | cuda | cuda:N")
    # The names EngineConfig takes (engine.config is not imported here: it pulls in torch).
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = Field(
        "auto", description="auto (the checkpoint's) | half | float16 | bfloat16 | float | float32")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto", description="KV cache storage: auto (the model's dtype) | fp8 / fp8_e4m3 (float8 e4m3, per-layer "
                            "K and V scales from the checkpoint, else 1.0 or --calculate-kv-scales; half the bytes "
                            "of bf16 per token)")
    calculate_kv_scales: bool = Field(False, description="with --kv-cache-dtype fp8 and a checkpoint without K/V "
                                      "scales: measure each layer's at start-up on a built-in calibration text "
                                      "(absmax / 448), then keep them")
    max_model_len: int | None = Field(None, gt=0, description="context length in tokens (default: the model's)")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of prompts that share a prefix")
    block_size: int = Field(16, ge=1, description="KV block size in tokens; must match the router's")
    num_kv_blocks: int | None = Field(None, gt=0, description="KV pool size in blocks")
    kv_cache_memory_gb: float = Field(0.5, gt=0, description="KV pool size on the CPU when --num-kv-blocks is unset")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of the GPU this worker may take "
                                          "(weights + KV pool + work); two workers on one GPU: e.g. 0.45 each")
    enforce_eager: bool = Field(False, description="no CUDA graphs for decode steps")
    quantization: Literal["none", "fp8"] = Field("none", description="fp8: decoder projections in FP8 e4m3 with "
                                                 "per-channel scales, quantized at load (first and last layers kept)")
    fp8_all_layers: bool = Field(False, description="with --quantization fp8: the first and last decoder layers in FP8 "
                                                    "too (kept in the model dtype by default: the most sensitive)")
    fp8_lm_head: bool = Field(False, description="with --quantization fp8: the LM head in FP8 too (batch 1 reads it "
                                                 "every token: about 1 GB of Llama-3-8B's 15)")
    fp8_weight_only: bool = Field(False, description="FP8 layers (--quantization fp8 or an FP8 checkpoint) keep the "
                                                     "activations in the model dtype in prefill and larger batches "
                                                     "too (W8A16): better quality, 16-bit tensor-core prefill")
    max_num_seqs: int = Field(64, gt=0, description="max requests in a batch")
    max_num_batched_tokens: int = Field(2048, gt=0, description="token budget per step (chunked prefill)")
    speculative_method: Literal["ngram", "draft", "off"] = Field(
        "off", description="decode: speculative decoding for requests that don't choose (their `speculative` extra): "
                           "ngram (prompt lookup), draft (--speculative-model) or off")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="decode: tokens proposed per step")
    speculative_model: str | None = Field(None, description="decode: a smaller model directory with the same "
                                                            "tokenizer, the draft proposer")
    speculative_disable_by_batch_size: int | None = Field(
        None, ge=1, description="decode: steps of a batch of more running requests than this do not speculate "
                                "(where a synchronous verification step costs more than its extra tokens bring)")
    row_invariant_verification: bool = Field(
        False, description="decode, GPU: steps of up to 8 rows compute each row alike, so that bf16 greedy output with "
                           "speculation equals greedy output without it token for token (slower decode at batches "
                           "2-8 and slower verification)")
    kv_transport: str = Field("auto", description="KV hand-off transports in order of preference, comma-separated: "
                              "ipc (same host: CUDA IPC / shared memory), tcp, nixl; auto = ipc,tcp")

    @field_validator("fp8_all_layers", "fp8_lm_head")
    @classmethod
    def _fp8_weights(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("quantization", "none") != "fp8":
            raise ValueError("needs --quantization fp8")
        return value

    @field_validator("calculate_kv_scales")
    @classmethod
    def _fp8_cache(cls, value: bool, info: ValidationInfo) -> bool:
        kv_cache_dtype = info.data.get("kv_cache_dtype", "auto")
        if value and kv_cache_dtype == "auto":
            raise ValueError(f"needs --kv-cache-dtype fp8 (the scales are an FP8 KV cache's), got {kv_cache_dtype!r}")
        return value

    @field_validator("kv_transport")
    @classmethod
    def _transports(cls, value: str) -> str:
        from baton.engine.kv_transfer.registry import TRANSPORTS

        names = [n.strip() for n in value.split(",") if n.strip()] if value != "auto" else ["ipc", "tcp"]
        unknown = [n for n in names if n not in TRANSPORTS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(f"{value!r}: give distinct names of {', '.join(sorted(TRANSPORTS))}, or auto")
        return ",".join(names)

    @property
    def kv_transports(self) -> list[str]:
        return self.kv_transport.split(",")
    transfer_timeout_s: float = Field(30.0, gt=0, description="deadline of one KV hand-off")
    kv_layerwise: bool = Field(False, description="prefill: copy each layer's KV into the decode worker as soon as "
                               "it is computed, beside the later layers (ipc transport; others send at the end)")
    prefill_timeout_s: float = Field(60.0, gt=0, description="how long a decode worker waits for a remote "
                                     "prefill (queueing and compute) on top of the KV hand-off's deadline")
    torch_threads: int | None = Field(None, gt=0, description="CPU threads for torch")
    drain_timeout_s: float = Field(30.0, ge=0, description="how long running requests may finish on shutdown")
    # Embedding workers: --max-num-batched-tokens and --max-num-seqs bound one forward's tokens and inputs.
    max_batch_delay_ms: float = Field(5.0, ge=0, description="embed: how long a forward may wait for more inputs "
                                                             "once the first is queued")
    dynamic_batching: bool = Field(True, description="embed: pack the inputs of many requests into one forward "
                                                     "(off: one request per forward, in arrival order)")

    @field_validator("speculative_model")
    @classmethod
    def _draft_dir(cls, value: str | None) -> str | None:
        if value is not None and not (pathlib.Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} is not a model directory (no config.json)")
        return value

    @model_validator(mode="after")
    def _draft_given(self) -> WorkerSettings:
        if self.speculative_method == "draft" and self.speculative_model is None:
            raise ValueError("--speculative-method draft needs --speculative-model")
        return self

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        if not is_hub_id(value) and not (pathlib.Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} is not a model directory (no config.json) nor a Hugging Face Hub id")
        return value

    @property
    def served_model_name(self) -> str:
        return self.model_name or served_name(self.model)

    @cached_property
    def model_dir(self) -> pathlib.Path:
        """The model's directory; a Hub id is downloaded into the Hub cache first (raises ModelFilesError)."""
        return resolve_model(self.model, self.revision)

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host

    def engine_config(self) -> EngineConfig:
        # Imported here: engine.config pulls in torch, and `baton --help` builds these flags.
        from baton.engine.config import EngineConfig

        return EngineConfig(
            model_dir=str(self.model_dir), device=self.device, dtype=self.dtype, kv_cache_dtype=self.kv_cache_dtype,
            calculate_kv_scales=self.calculate_kv_scales,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks, kv_cache_memory_gb=self.kv_cache_memory_gb,
            gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager,
            quantization=None if self.quantization == "none" else self.quantization,
            fp8_all_layers=self.fp8_all_layers, fp8_lm_head=self.fp8_lm_head, fp8_weight_only=self.fp8_weight_only,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_prefix_caching=self.enable_prefix_caching, show_progress=True,
            # Prefill-only requests never speculate: a prefill worker loads no draft model.
            speculative_method=self.speculative_method if self.pool == "decode" else "off",
            num_speculative_tokens=self.num_speculative_tokens,
            speculative_model=self.speculative_model if self.pool == "decode" else None,
            speculative_disable_by_batch_size=self.speculative_disable_by_batch_size,
            row_invariant_verification=self.row_invariant_verification,
        )
