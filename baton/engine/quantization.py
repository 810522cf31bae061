"""FP8 (e4m3) weights: quantized at load with one float32 scale per output channel (`--quantization fp8`).

Decode is a stream of weight bytes, so halving them is worth up to 2x at small batches. Which kernel runs:
- GPU, a few rows (decode): kernels/gemv.py reads the FP8 weight and applies the scale after the dot product;
- GPU, larger batches and prefill: `torch._scaled_mm` (Hopper FP8 tensor cores) with the activations quantized
  per token on the fly (row-wise scales on both sides); or, `fp8_weight_only`, kernels/fp8_gemm.py, which widens
  the FP8 weight tiles to the activations' dtype on the 16-bit tensor cores (no activation rounding);
- CPU: the weight dequantized to the activations' dtype (correctness and quality checks, not speed).
Norms, embeddings, the LM head and attention stay in the model dtype; so do the first and last decoder layers
(the most sensitive ones) unless `all_layers`. `quantize_lm_head_fp8_` puts the LM head in FP8 too (`fp8_lm_head`):
at batch 1 it is the largest single read of a step (1 GB of Llama-3-8B's 15 in bf16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Decode kernel configs, timed once per (rows bucket, shape, ...) and shared by every layer of that shape: timing
# each layer's own copy would take minutes at start-up (32 layers x 4 projections x 4 row buckets).
_PLANS: dict[tuple, tuple | None] = {}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
QUANTIZATIONS = ("fp8",)


class Fp8Linear(nn.Module):
    """y = x @ (weight * scale[:, None])^T + bias, weight in FP8 e4m3 [N, K], scale float32 [N]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        # Weight-only (EngineConfig.fp8_weight_only): steps of more than a few rows keep the activations in the model
        # dtype too (kernels/fp8_gemm.py) instead of quantizing them per token for the FP8 tensor cores.
        self.weight_only = False

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "Fp8Linear":
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def _scaled_mm(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """Per-token FP8 activations (one quantizing kernel, SwiGLU fused) times per-channel FP8 weights on the
        tensor cores."""
        from baton.kernels.fp8_quant import quantize_rows

        xq, x_scale = quantize_rows(x, silu_mul)
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.scale.view(1, -1),
                               out_dtype=x.dtype)
        return out if self.bias is None else out + self.bias

    def _w8a16(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        from baton.kernels.fp8_gemm import w8a16_gemm

        if silu_mul:
            from baton.kernels.silu_mul import silu_mul as act

            x = act(x)
        return w8a16_gemm(x, self.weight, self.scale, self.bias)

    def _many_rows(self, x: torch.Tensor, silu_mul: bool) -> torch.Tensor:
        return self._w8a16(x, silu_mul) if self.weight_only else self._scaled_mm(x, silu_mul)

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        if not x.is_cuda:
            if silu_mul:
                gate, up = x.split(x.shape[-1] // 2, dim=-1)
                x = F.silu(gate) * up
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        from baton.kernels.gemv import MAX_ROWS, cached_plan, gemv, pick_config

        from baton.engine import model

        m = x.shape[0]
        if 0 < m <= MAX_ROWS and x.stride(-1) == 1:
            alike = model.rows_alike()  # one config for 1..MAX_ROWS rows (model.row_invariant)
            key = self._plan_key(m, silu_mul, alike)
            if key not in _PLANS and not torch.cuda.is_current_stream_capturing():
                _PLANS[key] = cached_plan(("fp8", *key[:-1]), lambda: pick_config(
                    max(1, key[0]), self.weight, self.bias, silu_mul, scale=self.scale,
                    baseline=lambda h: self._many_rows(h, silu_mul), alike=alike))
            plan = _PLANS.get(key)
            if plan is not None:
                return gemv(x, self.weight, self.bias, silu_mul=silu_mul, config=plan, scale=self.scale)
        return self._many_rows(x, silu_mul)

    def _plan_key(self, m: int, silu_mul: bool, alike: bool = False) -> tuple:
        return (0 if alike else 1 << (m - 1).bit_length(), silu_mul, *self.weight.shape, self.bias is not None,
                self.weight_only, self.weight.device)

    def plan(self, m: int, silu_mul: bool = False, alike: bool = False) -> tuple | None:
        """The gemv config steps of m rows use (timed at the first such step), None where the tensor cores do."""
        return _PLANS.get(self._plan_key(m, silu_mul, alike))


def quantize_lm_head_fp8_(model: nn.Module) -> None:
    """Gives the model an FP8 LM head (model.fp8_head), which its forward then uses. A tied head gets an FP8 copy
    of the embedding matrix (the lookup keeps the original); an untied one is replaced, freeing its bytes."""
    from types import SimpleNamespace

    head = model.lm_head if model.lm_head is not None else \
        SimpleNamespace(weight=model.model.embed_tokens.weight, bias=None)
    model.fp8_head = Fp8Linear.quantize(head)
    model.lm_head = None


PROJECTIONS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


def quantize_fp8_(model: nn.Module, all_layers: bool = False, only: set[str] | None = None) -> int:
    """Replaces the decoder layers' projections with Fp8Linear in place; returns how many were quantized.
    only: the module names (e.g. "model.layers.3.mlp.down_proj") to replace, whatever `all_layers` says."""
    layers = model.model.layers
    keep = set() if all_layers or len(layers) <= 2 else {0, len(layers) - 1}
    count = 0
    for i, layer in enumerate(layers):
        for owner_name, name in PROJECTIONS:
            full = f"model.layers.{i}.{owner_name}.{name}"
            if (only is not None and full not in only) or (only is None and i in keep):
                continue
            owner = getattr(layer, owner_name)
            setattr(owner, name, Fp8Linear.quantize(getattr(owner, name)))
            count += 1
    return count


def checkpoint_fp8(raw_config: dict, source: str) -> bool:
    """Whether config.json declares FP8 weights Baton loads as they are: compressed-tensors' float-quantized
    8-bit weights with per-channel or per-tensor scales. Other quantization schemes are refused by name."""
    from baton.engine.errors import ModelFilesError

    qc = raw_config.get("quantization_config")
    if not qc:
        return False
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ModelFilesError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                              "(compressed-tensors FP8 is; or load the unquantized model with --quantization fp8)")
    for group, spec in (qc.get("config_groups") or {}).items():
        w = spec.get("weights") or {}
        if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("strategy") not in ("channel", "tensor"):
            raise ModelFilesError(f"{source}: quantization_config.config_groups.{group}.weights {w!r}: only FP8 "
                                  "(type float, 8 bits) with channel or tensor scales is supported")
    return True
