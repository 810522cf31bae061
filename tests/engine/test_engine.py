"""Engine behaviour: continuous batching, prefix cache, preemption, aborts, accounting, bad input, P/D halves."""
from __future__ import annotations

import random

import pytest

from baton.engine.config import EngineConfig
from baton.engine.errors import InvalidRequestError
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from tests.engine.checkpoints import make_hf_checkpoint

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("m") / "llama", "llama", seed=3, max_position=2048))


def new_engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(model_dir, show_progress=False, **kw))


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in lengths]


def alone(model_dir, prompts, params=GREEDY):
    engine = new_engine(model_dir, enable_prefix_caching=False)
    return [engine.generate([p], params)[0].output_ids for p in prompts]


def assert_all_free(engine):
    s = engine.stats().blocks
    assert s.in_use == 0, s
    assert s.free + s.cached + s.in_use == s.total


def test_batch_of_8_equals_each_alone(model_dir):
    prompts = prompts_of([3, 9, 16, 33, 48, 70, 5, 121])
    engine = new_engine(model_dir, max_num_batched_tokens=64)
    batched = [s.output_ids for s in engine.generate(prompts, GREEDY)]
    assert batched == alone(model_dir, prompts)
    assert_all_free(engine)


def test_requests_joining_mid_batch(model_dir):
    prompts = prompts_of([12, 40, 7, 64, 25], seed=1)
    engine = new_engine(model_dir)
    outputs: dict[str, list[int]] = {}
    engine.add_request("r0", prompts[0], GREEDY)
    steps = 0
    pending = list(enumerate(prompts))[1:]
    while engine.has_unfinished() or pending:
        if pending and steps % 5 == 4:  # a new request joins every few steps while others decode
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    assert [outputs[f"r{i}"] for i in range(len(prompts))] == alone(model_dir, prompts)
    assert_all_free(engine)


def test_prefix_cache_prefills_only_new_tokens(model_dir):
    shared = prompts_of([200], seed=2)[0]
    first, second = shared + [5, 6, 7], shared + [9, 10, 11, 12, 13]
    engine = new_engine(model_dir)
    engine.generate([first], GREEDY)
    before = engine.stats().prefill_tokens_computed
    seq = engine.generate([second], GREEDY)[0]
    computed = engine.stats().prefill_tokens_computed - before
    cached = (200 // 16) * 16  # whole 16-token blocks of the shared prefix
    assert seq.num_cached_tokens == cached
    assert computed == len(second) - cached
    assert seq.output_ids == alone(model_dir, [second])[0]


def test_preemption_with_tiny_pool_still_correct(model_dir):
    prompts = prompts_of([30, 45, 20, 60, 38, 50], seed=4)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = new_engine(model_dir, num_kv_blocks=12, max_num_batched_tokens=128)
    got = [s.output_ids for s in engine.generate(prompts, params)]
    assert engine.stats().preemptions > 0, "the pool was meant to be too small for all requests at once"
    assert got == alone(model_dir, prompts, params)
    assert_all_free(engine)


def test_no_leak_after_random_requests_and_aborts(model_dir):
    rng = random.Random(5)
    engine = new_engine(model_dir, num_kv_blocks=48, max_num_batched_tokens=96)
    live: list[str] = []
    for i in range(1000):
        n = rng.randrange(1, 40)
        params = SamplingParams(max_tokens=rng.randrange(1, 6), temperature=rng.choice([0.0, 0.8]),
                                top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(100))
        engine.add_request(f"q{i}", [rng.randrange(3, 256) for _ in range(n)], params)
        live.append(f"q{i}")
        if rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        if rng.random() < 0.5:
            for out in engine.step():
                if out.finished:
                    live.remove(out.request_id)
        s = engine.stats().blocks
        assert s.free + s.cached + s.in_use == s.total
    while engine.has_unfinished():
        engine.step()
    assert_all_free(engine)
    assert engine.stats().waiting == engine.stats().running == 0


@pytest.mark.parametrize("prompt,kwargs,match", [
    ([], {}, "prompt is empty"),
    ([5] * 3000, {}, "maximum context length"),
    ([5, 6], {"max_tokens": 0}, "max_tokens"),
    ([5, 6], {"max_tokens": -3}, "max_tokens"),
    ([5, 6], {"temperature": -0.1}, "temperature"),
    ([5, 6], {"top_p": 0.0}, "top_p"),
    ([5, 6], {"top_p": 1.5}, "top_p"),
    ([5, 99999], {}, "outside the vocabulary"),
])
def test_bad_input_is_rejected_cleanly(model_dir, prompt, kwargs, match):
    engine = new_engine(model_dir)
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", prompt, SamplingParams(**{"max_tokens": 4, **kwargs}))
    assert not engine.has_unfinished()
    assert_all_free(engine)
    engine.add_request("bad", [5, 6], SamplingParams(max_tokens=2))  # the id was not consumed


def test_sampling_is_reproducible_per_seed(model_dir):
    engine = new_engine(model_dir)
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = engine.generate(prompts_of([10]), p)[0]
    b = engine.generate(prompts_of([10]), p)[0]
    c = engine.generate(prompts_of([10]), SamplingParams(max_tokens=16, temperature=1.0, seed=124,
                                                          ignore_eos=True))[0]
    assert a.output_ids == b.output_ids
    assert a.output_ids != c.output_ids
    assert all(lp <= 0.0 for lp in a.output_logprobs) and len(a.output_logprobs) == 16


def test_prefill_on_a_then_decode_on_b_equals_one_engine(model_dir):
    prompts = prompts_of([1, 37, 64, 150], seed=6)
    a = new_engine(model_dir)
    b = new_engine(model_dir)
    b.generate([prompts[2][:40] + [7]], GREEDY)  # B already caches part of one prompt: only the rest moves
    finished = []
    b.finish_listeners.append(finished.append)
    for i, prompt in enumerate(prompts):
        rid = f"pd{i}"
        a.add_request(rid, prompt, GREEDY, prefill_only=True)
        first = None
        while first is None:
            first = next((o for o in a.step() if o.request_id == rid), None)
        assert first.finished and first.block_ids
        reservation = b.reserve_remote(rid, prompt, GREEDY)
        skip = reservation.num_cached_tokens // 16
        src, dst = first.block_ids[skip:], reservation.block_ids[skip:]
        b.kv_cache[dst] = a.kv_cache[src]
        a.release(rid)
        tokens = b.commit_remote(rid, first.new_token_ids[0], first.new_logprobs[0]).new_token_ids
        while b.has_unfinished():
            for out in b.step():
                tokens += out.new_token_ids
        assert tokens == alone(model_dir, [prompt])[0], f"prompt {i}"
    # The decode side reports no prefill span of its own (the prefill worker does), never a negative one.
    assert len(finished) == len(prompts)
    assert all(r.prefill_s is None and r.queue_s >= 0 and r.decode_s >= 0 for r in finished), finished
    assert_all_free(a)
    assert_all_free(b)


def test_abort_releases_pinned_and_reserved_blocks(model_dir):
    a = new_engine(model_dir)
    a.add_request("p", prompts_of([50])[0], GREEDY, prefill_only=True)
    while a.has_unfinished():
        a.step()
    assert a.stats().blocks.in_use > 0
    assert a.abort("p")
    a.reserve_remote("d", prompts_of([70])[0], GREEDY)
    assert a.abort("d")
    assert not a.abort("unknown")
    assert_all_free(a)


def test_stop_strings_and_text_with_real_tokenizer(tmp_path):
    from baton.devtools.make_model import make_model

    model_dir = make_model(tmp_path / "tok", arch="qwen2", vocab=512, seed=1)
    engine = new_engine(str(model_dir))
    prompt = engine.tokenizer.encode("def main():\n    return")
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    text = engine.tokenizer.decode(full.output_ids)
    assert len(text) > 6
    stop = text[3:6]  # stop on text generated mid-stream, possibly across token boundaries
    engine.add_request("s", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    pieces, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.text)
            reason = out.finish_reason or reason
    assert reason == "stop"
    assert "".join(pieces) == text[: text.index(stop)]
    assert_all_free(engine)


def test_ids_past_the_tokenizer_are_never_sampled(tmp_path):
    """Checkpoints whose embedding is padded past the tokenizer (common for Qwen) must not emit those ids."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from baton.devtools.make_model import make_model

    model_dir = make_model(tmp_path / "padded", arch="qwen2", vocab=512, seed=2)
    weights = load_file(model_dir / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = torch.cat([w, torch.zeros(88, w.shape[1])])
    weights["lm_head.weight"][590] = 50.0  # the padded id would win every argmax
    save_file(weights, model_dir / "model.safetensors")
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = 600
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = new_engine(str(model_dir))
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.output_ids) == 8 and max(out.output_ids) < 512


def test_detached_remote_blocks_stay_held_until_freed(model_dir):
    """For one-sided transports a failed hand-off keeps its blocks (a late write must not hit reused ones)."""
    engine = new_engine(model_dir)
    reservation = engine.reserve_remote("x", prompts_of([70])[0], GREEDY)
    seq = engine.detach_remote("x")
    assert engine.stats().blocks.in_use == len(reservation.block_ids)
    engine.reserve_remote("x", prompts_of([70])[0], GREEDY)  # the id is free for a retry meanwhile
    assert engine.abort("x")
    engine.free_detached(seq)
    assert_all_free(engine)
