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
