"""The GPU runtime (Triton attention, fused ops, CUDA-graph decode, GPU sampling) against transformers and
against itself run eagerly. Needs a CUDA device: skipped, not faked, without one."""
from __future__ import annotations

import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint
from tests.engine.test_parity import NEW_TOKENS, PROMPT_LENGTHS, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama3", True), ("mistral", False),
                                      ("qwen2", True), ("qwen3", False)])
def test_greedy_on_the_gpu_matches_transformers_at_fp32(tmp_path, arch, tie):
    model_dir = make_hf_checkpoint(tmp_path / arch, arch, seed=7, tie=tie)
    rng = random.Random(arch)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    engine = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=256,
                                    max_num_batched_tokens=256, max_num_seqs=8, show_progress=False))
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs  # decode steps replay graphs
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    seqs = engine.generate(prompts, params)
    for prompt, seq in zip(prompts, seqs):
        assert seq.output_ids == hf_greedy(str(model_dir), prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
    stats = engine.stats().blocks
    assert stats.in_use == 0 and stats.free + stats.cached == stats.total


def test_prefix_hits_and_chunked_prefill_on_the_gpu_match_one_shot(tmp_path):
    # The second request reuses the first one's cached blocks: its chunk attends to paged prefix blocks.
    model_dir = make_hf_checkpoint(tmp_path / "m", "llama", seed=3)
    shared = [random.Random(1).randrange(3, 256) for _ in range(96)]
    prompts = [shared + [5, 6, 7], shared + [9, 10, 11, 12]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    gpu = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=128,
                                 max_num_batched_tokens=40, show_progress=False))
    first = gpu.generate([prompts[0]], params)[0].output_ids
    second = gpu.generate([prompts[1]], params)[0]
    assert second.num_cached_tokens >= 80
    assert first == hf_greedy(str(model_dir), prompts[0], 24)
    assert second.output_ids == hf_greedy(str(model_dir), prompts[1], 24)


def test_graph_replay_equals_eager_and_seeded_sampling_repeats(tmp_path):
    # float32: the graph buckets split contexts differently from an eager step of the same batch, which in
    # bf16 rounds differently and can flip near-ties of a random model.
    model_dir = make_hf_checkpoint(tmp_path / "m", "qwen2", seed=5)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(1, 200))] for _ in range(11)]
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    runs = {}
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="float32", num_kv_blocks=256,
                                        max_num_seqs=16,
                                        enforce_eager=eager, show_progress=False))
        runs[eager] = [s.output_ids for s in engine.generate(prompts, greedy)]
    assert runs[False] == runs[True]
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=20, seed=11, ignore_eos=True)
    a = [s.output_ids for s in engine.generate(prompts[:3], seeded)]
    b = [s.output_ids for s in engine.generate(prompts[:3], seeded)]
    assert a == b and len(set(map(tuple, a))) > 1


def test_kv_pool_is_sized_from_gpu_memory_utilization(tmp_path):
    model_dir = make_hf_checkpoint(tmp_path / "m", "llama", seed=1)
    small = LLMEngine(EngineConfig(str(model_dir), device="cuda", gpu_memory_utilization=0.05, show_progress=False))
    large = LLMEngine(EngineConfig(str(model_dir), device="cuda", gpu_memory_utilization=0.1, show_progress=False))
    total = torch.cuda.get_device_properties(0).total_memory
    assert len(small.block_manager.blocks) < len(large.block_manager.blocks)
    assert small.kv_cache.numel() * small.kv_cache.element_size() < 0.05 * total


def test_fp8_kv_cache_on_the_gpu_scores_like_the_cpu_fp8_engine_and_replays_graphs(tmp_path):
    """The GPU's FP8 path (fused RoPE + FP8 write, paged prefill and decode kernels, CUDA graphs) against the CPU's
    torch FP8 path and the GPU's model-dtype cache. A fresh prompt's own attention reads unquantized k and v on
    the GPU (FlashAttention) but the cache on the CPU, so the two FP8 engines agree within FP8's error only."""
    model_dir = make_hf_checkpoint(tmp_path / "m", "qwen2", seed=5)
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (7, 40, 90, 130)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)

    def run(device, kv_cache_dtype, eager=False):
        engine = LLMEngine(EngineConfig(str(model_dir), device=device, dtype="float32", num_kv_blocks=128,
                                        kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64, max_num_seqs=8,
                                        enforce_eager=eager, show_progress=False))
        seqs = engine.generate(prompts, params)
        stats = engine.stats().blocks
        assert stats.in_use == 0 and stats.free + stats.cached == stats.total
        return (torch.tensor([lp for s in seqs for lp in s.prompt_logprobs if lp is not None]),
                [s.output_ids for s in seqs])

    gpu, gpu_eager, cpu, auto = (run("cuda", "fp8"), run("cuda", "fp8", eager=True), run("cpu", "fp8"),
                                 run("cuda", "auto"))
    assert gpu[1] == gpu_eager[1]  # graph replay equals eager steps
    assert (gpu[0] - cpu[0]).abs().max() < 0.05
    assert (gpu[0] - auto[0]).abs().max() < 0.05


def test_fp8_kv_pool_from_gpu_memory_utilization_holds_twice_the_bf16_blocks(tmp_path):
    model_dir = make_hf_checkpoint(tmp_path / "m", "llama", seed=1)
    engines = [LLMEngine(EngineConfig(str(model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.05,
                                      kv_cache_dtype=kv, show_progress=False)) for kv in ("auto", "fp8")]
    bf16, fp8 = (len(e.block_manager.blocks) for e in engines)
    assert engines[1].kv_cache.dtype == torch.float8_e4m3fn
    assert 1.9 < fp8 / bf16 < 2.1


def test_calculated_kv_scales_on_the_gpu_match_the_cpu_and_reach_the_graphs(tmp_path):
    """--calculate-kv-scales on the GPU: the same scales as the CPU engine's, and decode through CUDA graphs reads
    them (K/V at 1e-3: under scale 1.0 nearly every value would be stored as zero), equal to eager steps."""
    from tests.engine.test_kv_cache_fp8 import _kv_magnitudes_times

    model_dir = _kv_magnitudes_times(make_hf_checkpoint(tmp_path / "m", "llama", seed=5), tmp_path / "small", 1e-3)
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 256) for _ in range(n)] for n in (9, 50, 100)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)

    def run(device, kv_cache_dtype="fp8", eager=False):
        engine = LLMEngine(EngineConfig(str(model_dir), device=device, dtype="float32", num_kv_blocks=128,
                                        kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=kv_cache_dtype == "fp8",
                                        max_num_seqs=8, enforce_eager=eager, show_progress=False))
        seqs = engine.generate(prompts, params)
        return (engine.model.kv_scales.cpu() if kv_cache_dtype == "fp8" else None,
                torch.tensor([lp for s in seqs for lp in s.prompt_logprobs if lp is not None]),
                [s.output_ids for s in seqs])

    (gpu_scales, gpu_lp, gpu_tokens), (_, _, eager_tokens) = run("cuda"), run("cuda", eager=True)
    cpu_scales, _, _ = run("cpu")
    _, auto_lp, _ = run("cuda", "auto")
    torch.testing.assert_close(gpu_scales, cpu_scales, rtol=1e-3, atol=0)
    assert gpu_tokens == eager_tokens
    assert (gpu_lp - auto_lp).abs().max() < 0.05


def test_greedy_ngram_speculation_on_the_gpu_equals_plain_decoding(tmp_path):
    """Verification rows replay the decode graphs and take the GPU greedy path: the same tokens and logprobs as
    plain decoding, with drafts really accepted, and no block left behind."""
    from baton.devtools.make_model import make_model
    from baton.engine.sampling_params import SpeculationParams
    from tests.engine.test_speculation import loopy_prompts

    model_dir = str(make_model(tmp_path / "m", arch="llama", vocab=300, seed=5))
    prompts = loopy_prompts(6)

    def run(spec):
        engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="float32", num_kv_blocks=256, block_size=4,
                                        max_num_seqs=8, show_progress=False, speculative_method="ngram",
                                        num_speculative_tokens=4))
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True, speculation=spec)
        seqs = engine.generate(prompts, params)
        stats = engine.stats()
        assert stats.blocks.in_use == 0
        return [s.output_ids for s in seqs], [s.output_logprobs for s in seqs], stats.spec

    plain, plain_lp, _ = run(SpeculationParams("off"))
    specced, spec_lp, stats = run(SpeculationParams("ngram", 4))
    assert specced == plain
    for a, b in zip(spec_lp, plain_lp):
        assert a == pytest.approx(b, abs=1e-4)
    assert stats.num_accepted_tokens > 0, stats


def test_bf16_verification_rows_round_as_one_row_steps(tmp_path):
    """With row_invariant_verification, a bf16 batch-1 verification step (1 + 7 rows) computes each row's logits as the
    one-row decode step at that position, so greedy output with n-gram speculation equals plain decoding token for
    token, logprobs included, over long copies (multi-row tensor-core GEMMs would round differently)."""
    from baton.devtools.make_model import make_model
    from baton.engine.sampling_params import SpeculationParams
    from tests.engine.test_speculation import loopy_prompts

    model_dir = str(make_model(tmp_path / "m", arch="llama", vocab=300, seed=5, hidden=256, heads=4, kv_heads=2))
    prompts = loopy_prompts(4, seed=8)

    def run(spec):
        engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256, block_size=16,
                                        max_num_seqs=1, show_progress=False, speculative_method="ngram",
                                        num_speculative_tokens=7, row_invariant_verification=True))
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=True, speculation=spec)
        seqs = engine.generate(prompts, params)
        assert engine.stats().blocks.in_use == 0
        return [s.output_ids for s in seqs], [s.output_logprobs for s in seqs], engine.stats().spec

    plain, plain_lp, _ = run(SpeculationParams("off"))
    specced, spec_lp, stats = run(SpeculationParams("ngram", 7))
    assert stats.num_accepted_tokens > 0, stats
    assert specced == plain
    for a, b in zip(spec_lp, plain_lp):
        assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_pdl_and_weight_prefetch_decode_the_same_tokens(tmp_path, quantization):
    """Programmatic dependent launch and the gemv weight prefetch (bench/pdl.py measures them) only move when kernels
    start and bytes are read: bf16 greedy output and logprobs are the same bit for bit with them as without, at
    batch 1 (gemv) and batch 6 (gemv row groups), from CUDA graphs captured for each setting."""
    from baton.devtools.make_model import make_model
    from baton.kernels import gemv
    from baton.kernels.pdl import set_pdl

    model_dir = str(make_model(tmp_path / "m", arch="llama", vocab=300, seed=4, layers=4, hidden=512, heads=8,
                               kv_heads=2))
    engine = LLMEngine(EngineConfig(model_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256, max_num_seqs=8,
                                    show_progress=False, quantization=quantization))
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 300) for _ in range(40 + 9 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)

    def run(prefetch: bool, pdl: bool):
        gemv.PREFETCH = prefetch
        set_pdl(pdl)
        engine.runner.graphs.graphs.clear()
        engine.runner.graphs.capture()
        seqs = engine.generate(prompts[:1], params) + engine.generate(prompts, params)
        return [s.output_ids for s in seqs], [s.output_logprobs for s in seqs]

    try:
        plain = run(False, False)
        assert run(True, False) == plain
        assert run(True, True) == plain
    finally:
        gemv.PREFETCH = False
        set_pdl(False)
    assert engine.stats().blocks.in_use == 0
