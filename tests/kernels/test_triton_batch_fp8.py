"""The GPU engine's attention path (attention_triton.TritonBatch: the KV write, paged prefill and paged decode
kernels) on an FP8 KV cache, run under the Triton interpreter through a real model, against the CPU path
(attention.AttentionBatch) on the same cache: same logits, same cache bytes."""
from __future__ import annotations

import random

import pytest
import torch

from baton.engine.attention import allocate_kv_cache, build_batch
from baton.engine.attention_triton import build_triton_batch
from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.loader import load_model
from tests.engine.checkpoints import make_hf_checkpoint

BLOCK = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("tb8") / "qwen2", "qwen2", seed=9, max_position=256)
    mc = ModelConfig.from_dir(path)
    m = load_model(EngineConfig(str(path), device="cpu", show_progress=False), mc)
    # Unequal, non-unit scales per layer, as a calibrated checkpoint has them.
    for i, layer in enumerate(m.model.layers):
        layer.self_attn.kv_scale.copy_(torch.tensor([0.004 * (i + 1), 0.003 * (i + 2)]))
    return m


def _step(model, cache, queries, ids, triton: bool) -> torch.Tensor:
    """One engine step: queries (first position, tokens, block table) per request; logits of every token."""
    mc = model.config
    if triton:
        batch = build_triton_batch(queries, BLOCK, mc.head_dim ** -0.5, cache.device, 1, mc.num_kv_heads)
    else:
        batch = build_batch(queries, cache, mc.sliding_window)
    positions = torch.tensor([p for start, n, _ in queries for p in range(start, start + n)])
    return model(torch.tensor(ids), positions, cache, batch, torch.arange(len(ids)))


def test_triton_path_on_an_fp8_cache_equals_the_torch_path(model):
    mc = model.config
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (29, 13)]
    tables = [[5, 2, 9, 0, 7], [3, 8, 1]]
    caches = [allocate_kv_cache(10, mc.num_layers, BLOCK, mc.num_kv_heads, mc.head_dim, torch.float8_e4m3fn, "cpu")
              for _ in range(2)]
    # First chunks through the torch path on both caches (a fresh prompt's own attention differs by design).
    first = [(0, 20, tables[0]), (0, 9, tables[1])]
    for cache in caches:
        _step(model, cache, first, prompts[0][:20] + prompts[1][:9], triton=False)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))
    # A chunk after cached tokens (paged prefill kernel), then decode rows (paged decode kernel).
    steps = [([(20, 9, tables[0]), (9, 4, tables[1])], prompts[0][20:] + prompts[1][9:]),
             ([(29, 1, tables[0]), (13, 1, tables[1])], [17, 23]),
             ([(30, 1, tables[0]), (14, 1, tables[1])], [40, 41])]
    for queries, ids in steps:
        expected = _step(model, caches[0], queries, ids, triton=False)
        got = _step(model, caches[1], queries, ids, triton=True)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        # The caches agree to the byte but where float rounding lands a value on an e4m3 rounding boundary.
        same = caches[0].view(torch.uint8) == caches[1].view(torch.uint8)
        assert same.float().mean() > 0.999


def test_kv_scale_calibration_measures_the_same_absmax_on_the_triton_path(model):
    """--calculate-kv-scales on the GPU runs its calibration prompt through TritonBatch (KV write and prefill
    kernels; not the fused RoPE + KV write, whose K the observer could not see): the same per-layer absmax of K
    (after RoPE) and V as the torch path, so GPU and CPU engines of a model get the same scales."""
    from baton.engine.kv_calibration import measure_kv_absmax

    ids = [random.Random(1).randrange(3, 256) for _ in range(37)]
    torch_path = measure_kv_absmax(model, [ids, ids[:20]], BLOCK, triton=False)
    triton_path = measure_kv_absmax(model, [ids, ids[:20]], BLOCK, triton=True)
    assert (torch_path > 0).all()
    torch.testing.assert_close(triton_path, torch_path, rtol=1e-5, atol=0)
