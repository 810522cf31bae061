"""Model and engine configuration: HF config.json parsed into small validated dataclasses."""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from baton.engine.errors import ModelFilesError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's spellings of --dtype: "auto" is the checkpoint's own dtype.
DTYPE_ALIASES = {"auto": None, "half": "float16", "float": "float32"}
DTYPE_CHOICES = (*DTYPE_ALIASES, *DTYPES)
# --kv-cache-dtype, as vLLM spells it: "auto" stores keys and values in the model's dtype; "fp8" (alias "fp8_e4m3")
# in float8 e4m3 with a per-layer scale for K and one for V.
FP8_KV_DTYPE = torch.float8_e4m3fn
KV_CACHE_DTYPES = {"auto": None, "fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}
# Every dtype a KV pool may be stored in, by the name CacheGeometry carries between processes.
KV_STORAGE_DTYPES = {**DTYPES, str(FP8_KV_DTYPE).removeprefix("torch."): FP8_KV_DTYPE}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face config.json that the runtime needs."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position: int
    tie_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope: RopeConfig
    sliding_window: int | None
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: str | pathlib.Path) -> "ModelConfig":
        path = pathlib.Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelFilesError(f"{path}: missing (a model directory needs config.json)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFilesError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelFilesError(
                f"{source}: field 'architectures' = {archs!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ModelFilesError(f"{source}: required field '{key}' is missing")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim") or hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = raw.get("sliding_window")
        if arch == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        if arch == "qwen3" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
            rope=_parse_rope(raw, source),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # Newer configs nest everything under rope_parameters; older ones use rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type") or merged.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ModelFilesError(f"{source}: field 'rope_type' = {kind!r} is not supported (default, linear, llama3)")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))),
    )


@dataclass
class EngineConfig:
    """How one engine instance runs: device, dtype, KV pool size and batching limits."""

    model_dir: str
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu
    dtype: str | None = None  # None or "auto": the checkpoint's dtype (float32 on cpu if it is half precision)
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: on the GPU from gpu_memory_utilization, on the CPU kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory this engine may take (weights + KV + work)
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    kv_cache_dtype: str = "auto"  # auto: the model dtype; fp8 / fp8_e4m3: float8 e4m3 with per-layer K and V scales
    # FP8 KV cache whose checkpoint has no K/V scales: measure them at start-up (absmax / 448, kv_calibration.py).
    calculate_kv_scales: bool = False
    quantization: str | None = None  # fp8: decoder projections in FP8 e4m3, per-channel scales, quantized at load
    fp8_all_layers: bool = False  # also the first and last decoder layers (kept in the model dtype by default)
    fp8_lm_head: bool = False  # also the LM head (kept in the model dtype by default)
    # FP8 layers keep the activations in the model dtype in steps of more than a few rows too (W8A16 on the 16-bit
    # tensor cores), instead of quantizing them per token for the FP8 ones (torch._scaled_mm, vLLM's W8A8 default):
    # quality over prefill speed. Decode steps of up to 8 rows are weight-only either way (kernels/gemv.py).
    fp8_weight_only: bool = False
    # Queue the next decode step before the host has the last sampled ids. None: on when decode runs CUDA graphs.
    async_scheduling: bool | None = None
    load_format: str = "auto"  # auto: the safetensors files; dummy: random weights (benchmarks; needs config.json)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    seed: int = 0
    show_progress: bool = True
    # Speculative decoding for requests that don't choose: ngram (prompt lookup), draft (speculative_model) or off.
    speculative_method: str = "off"
    num_speculative_tokens: int = 4
    speculative_model: str | None = None  # a smaller checkpoint with the target's vocabulary (the draft proposer)
    ngram_max: int = 4  # prompt lookup matches the last ngram_max..ngram_min tokens, longest first
    ngram_min: int = 2
    # Steps of a batch of more running requests than this do not speculate (vLLM's disable_by_batch_size): there a
    # synchronous verification step costs more than its extra tokens bring. None: any batch speculates.
    speculative_disable_by_batch_size: int | None = None
    # GPU: steps of up to 8 rows (decode batches of up to 8, batch-1 verification of up to 7 proposed tokens) compute
    # each row alike whatever the row count (model.row_invariant), so that greedy output with speculation equals
    # greedy output without it token for token in bf16 too. Off by default: one-row steps then run the config best
    # over 1 and 8 rows, not the best for 1 row (H200, SmolLM2: the one-row graph 0.71 -> 0.76 ms). Off, multi-row
    # GEMMs may round differently from one-row ones, and a bf16 greedy token may differ where two are near-tied.
    row_invariant_verification: bool = False

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.speculative_method not in ("ngram", "draft", "off"):
            raise ValueError(f"speculative_method must be ngram, draft or off, got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method draft needs speculative_model (a draft checkpoint directory)")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.speculative_disable_by_batch_size is not None and self.speculative_disable_by_batch_size < 1:
            raise ValueError("speculative_disable_by_batch_size must be at least 1, got "
                             f"{self.speculative_disable_by_batch_size}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.quantization in ("none", ""):
            self.quantization = None
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be fp8 or none, got {self.quantization!r}")
        if self.fp8_lm_head and self.quantization != "fp8":
            raise ValueError("fp8_lm_head needs quantization fp8 (it quantizes the LM head at load, as the projections)")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.calculate_kv_scales and KV_CACHE_DTYPES[self.kv_cache_dtype] != FP8_KV_DTYPE:
            raise ValueError(f"calculate_kv_scales needs kv_cache_dtype fp8 (scales are for an FP8 KV cache), "
                             f"got {self.kv_cache_dtype!r}")
        self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")

    def resolve_dtype(self, model: ModelConfig) -> torch.dtype:
        name = self.dtype or model.torch_dtype
        if name not in DTYPES:
            name = "float32"
        if self.dtype is None and self.device == "cpu" and name != "float32":
            name = "float32"  # half-precision matmuls on CPU are slow and less exact
        return DTYPES[name]

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's storage dtype for a model running in model_dtype."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype
