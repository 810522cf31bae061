"""The FP8 KV cache (kv_cache_dtype="fp8") on the CPU path: scores and tokens close to the model-dtype cache, twice
the blocks of a bf16 pool in the same bytes, per-layer scales from the checkpoint, no leaked blocks."""
from __future__ import annotations

import logging
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from baton.engine.config import EngineConfig
from baton.engine.errors import ModelFilesError
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint

SCORED = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
# A prompt token's logprob under the FP8 cache vs the model-dtype (float32) cache on these random tiny models
# (logprobs spread ~0.16 nats around uniform): measured largest differences 0.009 (llama) to 0.015 nats (qwen3).
LOGPROB_TOL = 0.05


def new_engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(str(model_dir), show_progress=False, **kw))


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


def scored(engine: LLMEngine, prompts) -> tuple[torch.Tensor, list[list[int]]]:
    """Every prompt's prompt logprobs (one flat tensor) and greedy tokens, in one batch."""
    seqs = engine.generate(prompts, SCORED)
    logprobs = torch.tensor([lp for s in seqs for lp in s.prompt_logprobs if lp is not None])
    return logprobs, [s.output_ids for s in seqs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of greedy tokens equal up to each sequence's first difference (after it, contexts differ)."""
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
    return same / sum(map(len, a))


def assert_all_free(engine: LLMEngine) -> None:
    s = engine.stats().blocks
    assert s.in_use == 0 and s.free + s.cached == s.total, s


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv8")
    return {arch: make_hf_checkpoint(root / arch, arch, seed=5, max_position=512)
            for arch in ("llama", "qwen3", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2"])
def test_fp8_cache_scores_and_decodes_close_to_the_model_dtype_cache(models, arch):
    # prompts longer than a step's token budget: chunked prefill reads earlier chunks back from the FP8 cache
    prompts = prompts_of([5, 17, 40, 70, 33, 9, 120, 64])
    auto_lp, auto_tokens = scored(new_engine(models[arch], max_num_batched_tokens=48), prompts)
    fp8 = new_engine(models[arch], max_num_batched_tokens=48, kv_cache_dtype="fp8")
    assert fp8.kv_cache.dtype == torch.float8_e4m3fn
    fp8_lp, fp8_tokens = scored(fp8, prompts)
    diff = (fp8_lp - auto_lp).abs()
    print(f"{arch}: prompt logprobs max |diff| {diff.max():.4f} mean {diff.mean():.5f}; greedy agreement "
          f"{agreement(auto_tokens, fp8_tokens):.2f}, {sum(a == b for a, b in zip(auto_tokens, fp8_tokens))}/"
          f"{len(prompts)} sequences equal")
    assert diff.max() < LOGPROB_TOL
    assert agreement(auto_tokens, fp8_tokens) >= 0.6
    assert_all_free(fp8)


def test_fp8_alias_and_bad_values(models):
    assert new_engine(models["llama"], kv_cache_dtype="fp8_e4m3").kv_cache.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'int8'"):
        EngineConfig(str(models["llama"]), kv_cache_dtype="int8")


def test_pool_counts_bytes_fp8_holds_twice_the_blocks_of_bf16(models):
    """Same kv_cache_memory_gb, a bfloat16 model: the FP8 pool has twice the blocks in the same bytes, and serves
    more requests at once than the bf16 one before it must preempt; nothing leaks either way."""
    kw = dict(num_kv_blocks=None, kv_cache_memory_gb=64 * 2**10 / 2**30, dtype="bfloat16", max_num_batched_tokens=64)
    bf16, fp8 = new_engine(models["llama"], **kw), new_engine(models["llama"], kv_cache_dtype="fp8", **kw)
    assert bf16.kv_cache.dtype == torch.bfloat16
    nbytes = [e.kv_cache.numel() * e.kv_cache.element_size() for e in (bf16, fp8)]
    assert fp8.kv_cache.shape[0] == 2 * bf16.kv_cache.shape[0]
    assert abs(nbytes[0] - nbytes[1]) <= fp8.kv_cache[0].numel()  # one bf16 block's rounding at most
    prompts = prompts_of([40] * 6, seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for engine in (bf16, fp8):
        outs = engine.generate(prompts, params)
        assert all(len(s.output_ids) == 12 for s in outs)
        assert_all_free(engine)
    print(f"blocks: bf16 {bf16.kv_cache.shape[0]}, fp8 {fp8.kv_cache.shape[0]}; preemptions: bf16 "
          f"{bf16.stats().preemptions}, fp8 {fp8.stats().preemptions}")
    assert fp8.stats().preemptions < bf16.stats().preemptions


def test_no_block_leaks_through_prefix_hits_aborts_and_preemption(models):
    engine = new_engine(models["llama"], kv_cache_dtype="fp8", num_kv_blocks=12, max_num_batched_tokens=32)
    shared = prompts_of([48], seed=4)[0]
    prompts = [shared + p for p in prompts_of([5, 20, 9], seed=5)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = engine.generate(prompts[:1], greedy)[0]
    again = engine.generate(prompts[:1], greedy)[0]  # its prompt blocks come from the prefix cache
    assert again.num_cached_tokens > 0 and again.output_ids == first.output_ids
    engine.add_request("gone", prompts[1], SCORED)
    engine.step()
    assert engine.abort("gone")
    engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert engine.stats().preemptions > 0  # 12 blocks cannot hold three 70-token requests at once
    assert_all_free(engine)


def _with_kv_scales(model_dir, tmp_path, scales: dict[str, float]):
    """A copy of the checkpoint with extra scalar tensors (vLLM's KV-scale names)."""
    out = tmp_path / "scaled"
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    tensors |= {name: torch.tensor(value) for name, value in scales.items()}
    save_file(tensors, out / "model.safetensors")
    return out


def test_per_layer_scales_come_from_the_checkpoint(models, tmp_path):
    """Scales calibrated per layer (absmax / 448 of what the model-dtype cache held) score within the tolerance;
    scales far too small saturate every value, and that shows far beyond FP8's own error: so they are read and
    used, under every name vLLM reads."""
    prompts = prompts_of([60, 30])
    auto = new_engine(models["llama"], kv_cache_dtype="auto")
    auto_lp, _ = scored(auto, prompts)
    amax = auto.kv_cache.float().abs().amax(dim=(0, 3, 4, 5))  # [layers, K|V]
    calibrated = {f"model.layers.{i}.self_attn.{kind}_scale": float(amax[i, j] / 448)
                  for i in range(amax.shape[0]) for j, kind in enumerate("kv")}
    engine = new_engine(_with_kv_scales(models["llama"], tmp_path, calibrated), kv_cache_dtype="fp8")
    assert torch.allclose(engine.model.model.layers[1].self_attn.kv_scale, amax[1] / 448)
    lp, _ = scored(engine, prompts)
    assert (lp - auto_lp).abs().max() < LOGPROB_TOL

    tiny = {f"model.layers.{i}.self_attn.k_proj.output_scale": 1e-6 for i in range(2)}  # compressed-tensors name
    tiny |= {"model.layers.0.self_attn.kv_scale": 1e-6, "model.layers.1.self_attn.v_scale": 1e-6}
    (tmp_path / "tiny").mkdir()
    path = _with_kv_scales(models["llama"], tmp_path / "tiny", tiny)
    saturated = new_engine(path, kv_cache_dtype="fp8")
    assert saturated.model.model.layers[0].self_attn.kv_scale.tolist() == pytest.approx([1e-6, 1e-6])
    lp, _ = scored(saturated, prompts)
    unit_lp, _ = scored(new_engine(models["llama"], kv_cache_dtype="fp8"), prompts)  # every scale 1.0
    assert (lp - auto_lp).abs().max() > 10 * (unit_lp - auto_lp).abs().max()
    # The scales are the checkpoint's whatever the cache dtype; a model-dtype cache never reads them.
    lp, _ = scored(new_engine(path), prompts)
    assert torch.equal(lp, auto_lp)


def test_a_malformed_kv_scale_is_refused(models, tmp_path):
    bad = _with_kv_scales(models["llama"], tmp_path, {})
    tensors = load_file(bad / "model.safetensors") | {"model.layers.0.self_attn.k_scale": torch.ones(4)}
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ModelFilesError, match="'model.layers.0.self_attn.k_scale' must be one positive finite"):
        new_engine(bad, kv_cache_dtype="fp8")


def _kv_magnitudes_times(model_dir, out, factor: float):
    """The same function with every layer's K and V `factor` times larger: k_proj and v_proj scaled by factor,
    q_proj and o_proj by 1 / factor, so q.k and the attention output are unchanged. Only the cache sees it."""
    out.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(model_dir / "model.safetensors")
    for name in tensors:
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name] * factor
        elif name.endswith(("q_proj.weight", "o_proj.weight")):
            tensors[name] = tensors[name] / factor
    save_file(tensors, out / "model.safetensors")
    return out


# 1e-3: K/V ~1e-3, below e4m3's smallest subnormal (2^-9) at scale 1.0, so nearly all of it is stored as zero.
# 1e4: K/V in the thousands, far past e4m3's 448 at scale 1.0, so most of it saturates. (1e2 still fits e4m3.)
@pytest.mark.parametrize("factor", [1e-3, 1e4])
def test_calculated_scales_fix_kv_magnitudes_far_from_one(models, tmp_path, factor):
    """With --calculate-kv-scales, an FP8 cache scores like the model-dtype cache whatever the K/V magnitudes;
    without it (scales 1.0) it is far off. Measured (llama, seed 5): with 0.0064 nats at both factors (the
    unscaled model's FP8 error), without 0.38 (1e-3) and 0.34 (1e4)."""
    path = _kv_magnitudes_times(models["llama"], tmp_path / "scaled", factor)
    prompts = prompts_of([60, 30, 90])
    kw = dict(max_num_batched_tokens=48)
    auto_lp, _ = scored(new_engine(path, **kw), prompts)
    unit_lp, _ = scored(new_engine(path, kv_cache_dtype="fp8", **kw), prompts)
    engine = new_engine(path, kv_cache_dtype="fp8", calculate_kv_scales=True, **kw)
    calc_lp, _ = scored(engine, prompts)
    with_flag, without = (calc_lp - auto_lp).abs().max(), (unit_lp - auto_lp).abs().max()
    print(f"x{factor:g}: prompt logprobs max |diff| with the flag {with_flag:.4f}, without {without:.4f}")
    assert with_flag < 0.02
    assert without > 0.2 and without > 20 * with_flag
    # The scales follow the magnitudes: those of the unscaled model times the factor.
    base = new_engine(models["llama"], kv_cache_dtype="fp8", calculate_kv_scales=True, **kw).model.kv_scales
    torch.testing.assert_close(engine.model.kv_scales, base * factor, rtol=1e-3, atol=0)
    assert_all_free(engine)


def test_calculated_scales_are_set_before_serving_and_frozen(models, caplog):
    """Calculated in the constructor (nothing stored yet), in place (every layer reads the model's one tensor,
    as a captured graph would), logged once, the same for every engine of the model (a disaggregated pair reads
    each other's blocks), and never changed by serving: prefill, chunked prefill, prefix hits, decode."""
    caplog.set_level(logging.INFO, logger="baton.engine.kv_calibration")
    engine = new_engine(models["qwen2"], kv_cache_dtype="fp8", calculate_kv_scales=True, max_num_batched_tokens=32)
    scales = engine.model.kv_scales
    first = scales.clone()
    assert not torch.equal(first, torch.ones_like(first)) and (first > 0).all()
    for i, layer in enumerate(engine.model.model.layers):
        assert layer.self_attn.kv_scale.data_ptr() == scales[i].data_ptr()
    # A worker of another size (step budget, pool, context) calculates the same scales.
    twin = new_engine(models["qwen2"], kv_cache_dtype="fp8", calculate_kv_scales=True, max_num_batched_tokens=512,
                      num_kv_blocks=64, max_model_len=300)
    assert torch.equal(twin.model.kv_scales, first)
    shared = prompts_of([40], seed=7)[0]
    prompts = [shared + p for p in prompts_of([3, 50, 20], seed=8)]
    for _ in range(2):  # the second time, prompts start from prefix-cached blocks
        engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert engine.stats().prefix_cache_hits > 0
    assert engine.model.kv_scales is scales and torch.equal(scales, first)
    logged = [r for r in caplog.records if getattr(r, "kv_scales_source", None) == "calculated"]
    assert len(logged) == 2  # one line per engine (this one and its twin), none while serving
    assert logged[0].k_scales == first[:, 0].tolist() and logged[0].v_scales == first[:, 1].tolist()


def test_calibration_text_runs_as_a_chat_request_and_as_plain_text(tmp_path):
    from baton.devtools.make_model import make_model
    from baton.engine.kv_calibration import CALIBRATION_TEXT, calibration_prompts
    from baton.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(make_model(tmp_path / "m", layers=1, hidden=32, heads=2, kv_heads=1, vocab=300))
    chat, plain = calibration_prompts(tokenizer, 300, 2048)
    assert chat == tokenizer.encode_chat([{"role": "user", "content": CALIBRATION_TEXT}])[:256]
    assert plain == tokenizer.encode(CALIBRATION_TEXT)[:256]
    assert [len(p) for p in calibration_prompts(tokenizer, 300, 100)] == [100, 100]  # within the model's positions
    assert calibration_prompts(None, 300, 2048) == calibration_prompts(None, 300, 2048)  # fixed ids, no tokenizer


def test_calculate_kv_scales_keeps_a_checkpoints_scales_and_needs_fp8(models, tmp_path):
    given = {f"model.layers.{i}.self_attn.{kind}_scale": 0.01 * (i + 1) for i in range(2) for kind in "kv"}
    engine = new_engine(_with_kv_scales(models["llama"], tmp_path, given), kv_cache_dtype="fp8",
                        calculate_kv_scales=True)
    assert engine.model.kv_scales.flatten().tolist() == pytest.approx([0.01, 0.01, 0.02, 0.02])
    with pytest.raises(ValueError, match="calculate_kv_scales needs kv_cache_dtype fp8 .*got 'auto'"):
        EngineConfig(str(models["llama"]), calculate_kv_scales=True)
