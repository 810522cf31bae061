"""Shared checks for kernel tests: NaN-poisoned outputs, dtype tolerances, the GPU-only marker."""
from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: real shapes are far too slow in the Triton interpreter"
)


def poisoned(*shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so that any element a kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    assert not actual.isnan().any(), "NaN left in the output: an element was not written, or the kernel made NaN"
    rtol, atol = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
                  torch.bfloat16: (2e-2, 2e-2)}[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def random_paged_cache(
    context_lens: list[int], num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str, spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache and int32 block tables whose block ids are shuffled across the pool (never in order).

    Table entries past a request's last page point at other requests' blocks, so reading them would show.
    """
    pages = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(pages) + spare_blocks
    kv_cache = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    ids = torch.randperm(num_blocks).tolist()
    width = max(pages) + 1
    tables, used = [], 0
    for n in pages:
        own = ids[used: used + n]
        used += n
        tables.append(own + [ids[(used + i) % num_blocks] for i in range(width - n)])
    return kv_cache, torch.tensor(tables, dtype=torch.int32, device=device)


def paged_cache(
    context_lens: list[int], num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: str, fp8_scales: tuple[float, float] | None = None, gain: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A random cache in dtype, its block tables and kv_scale None; or, with fp8_scales (k_scale, v_scale), an FP8
    cache quantized from a random one times gain, its block tables and its float32 (K, V) scales.

    gain 4 with small scales saturates some values at e4m3's 448 (the small tests check that). The Llama-3-8B
    shaped tests take gain 1: saturated keys of std ~3.6 give logits of std ~3.6, and then rounding the query to
    bf16 (which every bf16 attention kernel does) moves outputs by up to 0.05, 2.5x the bf16 tolerance, against a
    float32 reference (emulated in torch on the CPU; at gain 1 the worst error is 4% of the tolerance).
    """
    if fp8_scales is None:
        return (*random_paged_cache(context_lens, num_layers, block_size, num_kv_heads, head_dim, dtype, device), None)
    from baton.engine.attention import quantize_kv

    kv_cache, tables = random_paged_cache(context_lens, num_layers, block_size, num_kv_heads, head_dim,
                                          torch.float32, device)
    kv_scale = torch.tensor(fp8_scales, dtype=torch.float32, device=device)
    return quantize_kv(kv_cache * gain, kv_scale.view(1, 1, 2, 1, 1, 1)), tables, kv_scale
