"""Llama-family decoder (Llama, Llama-3, Mistral, Qwen2, Qwen3) over a flat token batch and a paged KV cache."""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from baton.engine.config import FP8_KV_DTYPE, ModelConfig, RopeConfig
from baton.engine.quantization import Fp8Linear

# oneDNN's linear (the one torch.compile's CPU backend calls) on the same dense weights; bench/engine_cpu.py
# measures it well ahead of F.linear's default at decode batch sizes on CPU. Results differ from F.linear
# only in float rounding (the parity tests hold).
_ONEDNN_LINEAR = (os.environ.get("BATON_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# Decode GEMMs of a few rows on the GPU: kernels/gemv.py where it measured faster than cuBLAS on this shape.
_GEMV = os.environ.get("BATON_GEMV", "1") != "0"
_gemv_plans: dict[tuple, tuple | None] = {}
# Row-invariant mode (speculative verification, see row_invariant()): each of up to MAX_ROWS rows is computed as a
# one-row step computes it, so that verifying k tokens at once rounds exactly as decoding them one at a time.
_row_invariant = False


@contextmanager
def row_invariant(on: bool = True):
    """Within: linear layers of up to MAX_ROWS (8) rows on the GPU all run one gemv or tensor-core config per shape
    (kernels.gemv.pick_config's `alike`), so a row's result does not depend on how many rows share the step: a
    verification step's rows round as one-row steps do. Attention's split count is the caller's part."""
    global _row_invariant
    was, _row_invariant = _row_invariant, on
    try:
        yield
    finally:
        _row_invariant = was


def rows_alike() -> bool:
    """Whether steps of up to MAX_ROWS rows run row-invariantly here (row_invariant)."""
    return _row_invariant


def _gemv_plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool):
    if not (_GEMV and x.is_cuda and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1):
        return None
    from baton.kernels.gemv import MAX_ROWS, cached_plan, pick_config

    m = x.shape[0]
    if not 0 < m <= MAX_ROWS:
        return None
    rows = 1 << (m - 1).bit_length()
    key = (0 if _row_invariant else rows, *weight.shape, weight.dtype, weight.device, bias is not None, silu_mul)
    if key not in _gemv_plans:
        if torch.cuda.is_current_stream_capturing():
            return None  # timed on the warm-up run before each capture; never inside one
        _gemv_plans[key] = cached_plan(("dense", *key[:3], str(weight.dtype), *key[5:]),
                                       lambda: pick_config(rows, weight, bias, silu_mul, alike=_row_invariant))
    return _gemv_plans[key]


def linear(x: torch.Tensor, layer: nn.Linear | Fp8Linear | torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
    """x @ W^T (+ b). silu_mul: x holds gate||up and the layer takes silu(gate) * up (SwiGLU's down proj)."""
    if isinstance(layer, Fp8Linear):
        return layer(x, silu_mul)
    weight, bias = (layer, None) if isinstance(layer, torch.Tensor) else (layer.weight, layer.bias)
    plan = _gemv_plan(x, weight, bias, silu_mul)
    if plan is not None:
        from baton.kernels.gemv import gemv

        return gemv(x, weight, bias, silu_mul=silu_mul, config=plan)
    if silu_mul:
        if x.is_cuda:
            from baton.kernels.silu_mul import silu_mul as silu_mul_kernel

            x = silu_mul_kernel(x)
        else:
            gate, up = x.split(x.shape[-1] // 2, dim=-1)
            x = F.silu(gate) * up
    if _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual (norm(x + residual), x + residual): one fused kernel on the GPU."""
        if x.is_cuda:
            from baton.kernels.rms_norm import fused_add_rms_norm, rms_norm

            flat = x.reshape(-1, x.shape[-1])
            if residual is None:
                return rms_norm(flat, self.weight, self.eps).view(x.shape)
            out, res = fused_add_rms_norm(flat, residual.reshape(-1, x.shape[-1]), self.weight, self.eps)
            return out.view(x.shape), res.view(x.shape)
        if residual is not None:
            x = x + residual
            residual = x
        # Same op order as the reference implementation: normalise in float32, cast, then scale.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """Rotary embedding. On the GPU one kernel rotates q and k in place from float32 cos/sin tables built once;
    elsewhere the reference formula per step (the two agree to float rounding)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config.rope, config.head_dim), persistent=False)
        self.max_position = config.max_position
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_tables(self) -> None:
        """Called when inv_freq is replaced (the loader builds it after the weights)."""
        self._tables = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        if positions.is_cuda:
            if self._tables is None:
                from baton.kernels.rope import rope_cos_sin

                self._tables = rope_cos_sin(self.inv_freq, self.max_position)
            return ("cuda", positions, *self._tables)
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return ("torch", emb.cos().to(dtype), emb.sin().to(dtype))


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim]; rope: what Rotary returned for this step."""
    if rope[0] == "cuda":
        from baton.kernels.rope import apply_rope as rope_kernel

        _, positions, cos, sin = rope
        rope_kernel(q, k, positions, cos, sin)
        return q, k
    _, cos, sin = rope
    return (q * cos[:, None, :] + _rotate_half(q) * sin[:, None, :],
            k * cos[:, None, :] + _rotate_half(k) * sin[:, None, :])


class Attention(nn.Module):
    """q, k and v come out of one merged projection (the loader fills its three row blocks from q/k/v_proj)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.sliding_window = config.sliding_window
        # float32 [2]: this layer's K and V scales (the loader's: the checkpoint's, else 1.0); an FP8 cache uses them.
        self.kv_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope, kv_cache: torch.Tensor, batch) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = linear(x, self.qkv_proj).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        kv_scale = self.kv_scale if kv_cache is not None and kv_cache.dtype == FP8_KV_DTYPE else None
        slots = getattr(batch, "slot_mapping", None)
        if rope[0] == "cuda" and slots is not None:  # one kernel rotates q, k and writes k, v into the cache
            from baton.kernels.rope import apply_rope as rope_kernel

            _, positions, cos, sin = rope
            rope_kernel(q, k, positions, cos, sin, kv=(v, kv_cache, self.layer_idx, slots, kv_scale))
        else:
            q, k = apply_rope(q, k, rope)
            batch.write_kv(kv_cache, self.layer_idx, k, v, kv_scale)
        out = batch.attend(q, k, v, kv_cache, self.layer_idx, self.sliding_window, kv_scale)
        return linear(out.reshape(n, self.q_size), self.o_proj)


class MLP(nn.Module):
    """gate and up come out of one merged projection; silu(gate) * up is fused into the down projection (decode
    on the GPU) or one kernel before it (larger GPU batches)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.gate_up_proj), self.down_proj, silu_mul=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, batch):
        """x: the previous layer's output; residual: the stream before it (None at the first layer)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names match Hugging Face checkpoints, so safetensors load by name."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.rotary = Rotary(config)
        # float32 [layers, 2]: every layer's K and V scales of an FP8 KV cache (each Attention.kv_scale is a row
        # view, so an update in place reaches the layers and any captured graph); set by the loader.
        self.kv_scales: torch.Tensor | None = None
        self.kv_scales_from_checkpoint = False
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.fp8_head: Fp8Linear | None = None  # an FP8 LM head, used in place of the above (quantize_lm_head_fp8_)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        batch,
        logits_indices: torch.Tensor,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Runs the flat token batch; returns float32 logits only at logits_indices. `layer_done(i)` is called
        after layer i (its KV written): the layer-wise KV hand-off starts copying it."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, rope, kv_cache, batch)
            if layer_done is not None:
                layer_done(i)
        x, _ = self.model.norm(x[logits_indices], residual[logits_indices])
        if self.fp8_head is not None:
            return linear(x, self.fp8_head).float()
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(x, weight).float()
