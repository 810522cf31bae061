"""Speculative decoding changes nothing a client sees: greedy output equals plain decoding token for token (n-gram
lookup and draft model; across block boundaries; max_tokens, stop token ids and stop strings landing inside an
accepted run; preemption; async scheduling), no KV block leaks, prefix-cache hashes cover accepted tokens only,
and sampled output keeps its distribution (chi-square with fixed seeds, plus a negative control showing the test
catches a wrong acceptance rule)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import safetensors.torch
import torch

from baton.contracts.block_hash import ROOT_HASH, hash_block
from baton.engine import speculation
from baton.engine.errors import InvalidRequestError
from baton.engine.sampling_params import SamplingParams, SpeculationParams
from baton.engine.speculation import ngram_lookup
from tests.engine.test_engine import assert_all_free, new_engine

NGRAM = SpeculationParams("ngram", 4)
DRAFT = SpeculationParams("draft", 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from baton.devtools.make_model import make_model

    # A small vocabulary: random greedy output falls into loops that prompt lookup can copy.
    return str(make_model(tmp_path_factory.mktemp("spec") / "target", arch="llama", vocab=300, seed=5))


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    from baton.devtools.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("spec") / "draft", arch="llama", vocab=300, seed=6, layers=1))


def loopy_prompts(n, seed=0):
    """Prompts that repeat a phrase, as code edits do: lookup has something to copy from the first step."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [rng.randrange(3, 290) for _ in range(rng.randrange(3, 9))]
        out.append([rng.randrange(3, 290) for _ in range(i)] + phrase * rng.randrange(2, 5))
    return out


def check_blocks(engine):
    """Every running request holds exactly the blocks its computed tokens need, and its prefix-cache hashes are
    those of its own (accepted) tokens."""
    bm = engine.block_manager
    inflight = engine._inflight  # a verification queued behind the previous step holds its drafts' slots
    pending = {item.seq.request_id: item.num_tokens for item in inflight.scheduled} \
        if inflight is not None and inflight.verifying else {}
    for seq in engine.scheduler.running:
        queued = pending.get(seq.request_id, 0)
        assert seq.num_draft == 0 or queued
        assert len(seq.block_table) == bm.num_blocks_for(seq.num_computed_tokens + queued), seq.request_id
        parent = ROOT_HASH
        for i, h in enumerate(seq.block_hashes):
            parent = hash_block(parent, seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size])
            assert h == parent
        assert len(seq.block_hashes) * bm.block_size <= seq.num_computed_tokens


def run(engine, prompts, params):
    """Per request (token ids, text, finish reason, output tokens) and the logprobs (with the top alternatives' ids
    and logprobs); checks blocks every step."""
    ids = [f"r{i}" for i in range(len(prompts))]
    outs = {rid: [[], ""] for rid in ids}
    logprobs = {rid: [] for rid in ids}
    reasons = {}
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            o = outs[out.request_id]
            o[0] += out.new_token_ids
            o[1] += out.text
            for lp, top in zip(out.new_logprobs, out.new_top_logprobs or [[]] * len(out.new_logprobs), strict=True):
                logprobs[out.request_id] += [lp, *(x for t in top for x in t)]
            if out.finished:
                reasons[out.request_id] = (out.finish_reason, out.num_output_tokens)
        check_blocks(engine)
    assert_all_free(engine)
    return [(*outs[rid], reasons[rid]) for rid in ids], [logprobs[rid] for rid in ids]


def same_as_plain(model_dir, prompts, spec, params=None, **kw):
    params = params or SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    plain, plain_logprobs = run(new_engine(model_dir, **kw), prompts, params)
    engine = new_engine(model_dir, **kw)
    specced, logprobs = run(engine, prompts, dataclasses.replace(params, speculation=spec))
    assert specced == plain
    for a, b in zip(logprobs, plain_logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    return engine.stats().spec


def test_ngram_lookup_takes_the_latest_longest_match_and_copies_periodic_text():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 3, 1, 4) == [7, 5, 2]  # "2 3" last seen before 7
    assert ngram_lookup([5, 6, 5, 6, 5, 6], 5, 2, 4) == [5, 6, 5, 6, 5]  # the copy runs on over its own proposal
    assert ngram_lookup([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_lookup([4, 8, 4], 2, 2, 3) == []  # shorter than min_n: nothing


@pytest.mark.parametrize("min_n", [1, 2, 3])
def test_expects_proposal_agrees_with_the_lookup_as_tokens_grow_and_are_cut(min_n):
    """The incremental check the async scheduler runs every step says yes exactly when ngram_lookup would propose,
    with ids still being sampled (placeholders) at the end, and after the tokens were cut back and regrown."""
    from types import SimpleNamespace

    from baton.engine.sequence import PLACEHOLDER
    from baton.engine.speculation import NgramProposer

    rng = random.Random(min_n)
    proposer = NgramProposer(min_n, 4)
    seq = SimpleNamespace(request_id="r", token_ids=[])
    said = []
    for step in range(600):
        if step % 97 == 96:
            del seq.token_ids[rng.randrange(len(seq.token_ids) + 1):]  # cut back, then regrown differently
        seq.token_ids.append(rng.randrange(6))
        known = list(seq.token_ids)
        if step % 5 == 0:
            seq.token_ids.append(PLACEHOLDER)  # the id the step in flight samples
        said.append(proposer.expects_proposal(seq))
        assert said[-1] == bool(ngram_lookup(known, 1, min_n, 4)), (step, known[-6:])
        if seq.token_ids[-1] == PLACEHOLDER:
            seq.token_ids.pop()
    assert any(said) and not all(said)
    proposer.forget("r")
    assert not proposer._grams


def test_greedy_ngram_equals_plain_across_block_boundaries(model_dir):
    stats = same_as_plain(model_dir, loopy_prompts(5), NGRAM, block_size=4)
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens, stats


def test_greedy_draft_model_equals_plain(model_dir, other_dir):
    # Its own weights as the draft: long accepted runs. A different model: mostly rejections.
    stats = same_as_plain(model_dir, loopy_prompts(4, seed=1), DRAFT, block_size=4, speculative_model=model_dir)
    assert stats.num_accepted_tokens >= 0.9 * stats.num_draft_tokens > 0, stats
    stats = same_as_plain(model_dir, loopy_prompts(4, seed=2), DRAFT, block_size=4, speculative_model=other_dir)
    assert stats.num_draft_tokens > stats.num_accepted_tokens, stats


@pytest.mark.parametrize("max_tokens", [2, 5, 7, 13])
def test_max_tokens_lands_inside_an_accepted_run(model_dir, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    same_as_plain(model_dir, loopy_prompts(3, seed=3), SpeculationParams("draft", 8), params,
                  speculative_model=model_dir)


def test_stop_token_and_stop_string_inside_an_accepted_run(model_dir):
    prompts = loopy_prompts(2, seed=4)
    engine = new_engine(model_dir)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outputs = [s.output_ids for s in engine.generate(prompts, greedy)]
    stop_ids = [out[9] for out in outputs]
    text = engine.tokenizer.decode(outputs[0])
    for params in (SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=stop_ids),
                   SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[text[12:15]]),
                   SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=stop_ids[:1])):
        same_as_plain(model_dir, prompts, SpeculationParams("draft", 8), params, speculative_model=model_dir)


def test_preemption_and_mixed_batches_equal_plain(model_dir):
    # 24 blocks of 4 tokens for 6 requests: preemptions (drafts dropped with them); half the requests speculate.
    prompts = loopy_prompts(6, seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain, _ = run(new_engine(model_dir, block_size=4, num_kv_blocks=24), prompts, params)
    engine = new_engine(model_dir, block_size=4, num_kv_blocks=24, speculative_method="ngram")
    off = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, speculation=SpeculationParams("off"))
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params if i % 2 else off)
    ids = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
        check_blocks(engine)
    assert_all_free(engine)
    assert engine.stats().preemptions > 0 and engine.stats().spec.num_drafts > 0
    assert list(ids.values()) == [p[0] for p in plain]


def test_async_scheduling_with_speculation_equals_plain(model_dir):
    stats = same_as_plain(model_dir, loopy_prompts(4, seed=6), NGRAM, async_scheduling=True)
    assert stats.num_drafts > 0
    # The draft model needs every id on the host before it proposes: its verification steps run synchronously.
    assert same_as_plain(model_dir, loopy_prompts(2, seed=6), DRAFT, async_scheduling=True,
                         speculative_model=model_dir).num_drafts > 0


@pytest.mark.parametrize("max_tokens", [2, 5, 7, 13])
def test_queued_verification_when_the_step_before_it_finishes_the_request(model_dir, max_tokens):
    """Async scheduling queues an n-gram verification behind the step still sampling the id before it; that id can
    end the request (max_tokens, a stop token, a stop string, EOS): the queued verification is then dropped, its
    blocks freed with the request's, and the output is plain decoding's."""
    prompts = loopy_prompts(3, seed=4)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outputs = [s.output_ids for s in new_engine(model_dir).generate(prompts, greedy)]
    text = new_engine(model_dir).tokenizer.decode(outputs[0])
    for params in (SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                  stop_token_ids=[out[max_tokens] for out in outputs]),
                   SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=[text[max_tokens:max_tokens + 3]]),
                   SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[outputs[0][max_tokens]])):
        same_as_plain(model_dir, prompts, NGRAM, params, async_scheduling=True, block_size=4)


def test_preemption_and_aborts_with_queued_verifications(model_dir):
    """Async scheduling with verifications queued ahead, under block pressure (preemptions) and with requests
    aborted between steps: the survivors' output is plain decoding's and every block comes back."""
    prompts = loopy_prompts(6, seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain, _ = run(new_engine(model_dir, block_size=4, num_kv_blocks=24), prompts, params)
    engine = new_engine(model_dir, block_size=4, num_kv_blocks=24, async_scheduling=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, dataclasses.replace(params, speculation=NGRAM))
    ids = {f"r{i}": [] for i in range(len(prompts))}
    queued = steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
        steps += 1
        if engine._inflight is not None and engine._inflight.verifying:
            queued += 1
            if queued in (1, 2):  # a request the queued verification covers
                victim = engine._inflight.seqs[-1].request_id
                assert engine.abort(victim)
                ids.pop(victim)
        check_blocks(engine)
    assert_all_free(engine)
    assert queued >= 2 and engine.stats().preemptions > 0 and len(ids) == 4
    assert ids == {f"r{i}": plain[i][0] for i in range(len(prompts)) if f"r{i}" in ids}


def test_ngram_steps_stay_pipelined(model_dir):
    """With async scheduling, n-gram speculation keeps steps queued ahead: a request whose output copies nothing
    decodes pipelined, and once its tokens end in a match its verification step is queued behind the step still in
    flight (the proposal guesses past the id being sampled); only what it accepts is waited for. Same output."""
    import random

    rng = random.Random(11)
    prompts = [[rng.randrange(3, 290) for _ in range(40)] for _ in range(2)] + loopy_prompts(2, seed=7)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain, _ = run(new_engine(model_dir), prompts, params)
    engine = new_engine(model_dir, async_scheduling=True)
    step, modes = engine.step, []

    def recording_step():
        outputs = step()
        inflight = engine._inflight  # a step left queued on the device, plain or verifying: pipelined
        modes.append(None if inflight is None else inflight.verifying)
        return outputs

    engine.step = recording_step
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, dataclasses.replace(params, speculation=NGRAM))
        while engine.has_unfinished():
            engine.step()  # one request at a time: its own steps' mode, not the batch's
    assert engine.stats().spec.num_drafts > 0 and {None, False, True} <= set(modes)
    engine.step = step
    specced, _ = run(engine, prompts, dataclasses.replace(params, speculation=NGRAM))
    assert specced == plain


def test_batches_above_disable_by_batch_size_do_not_speculate(model_dir):
    """Four requests at once: a limit of 3 turns speculation off for their steps (same output, no drafts), a limit
    of 4 leaves it on."""
    prompts = loopy_prompts(4, seed=8)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain, _ = run(new_engine(model_dir), prompts, params)
    for limit, speculates in ((3, False), (4, True)):
        engine = new_engine(model_dir, speculative_method="ngram", speculative_disable_by_batch_size=limit)
        out, _ = run(engine, prompts, params)
        assert out == plain
        assert (engine.stats().spec.num_drafts > 0) is speculates, (limit, engine.stats().spec)
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size"):
        new_engine(model_dir, speculative_method="ngram", speculative_disable_by_batch_size=0)


def test_requests_needing_host_state_decode_without_speculation(model_dir):
    engine = new_engine(model_dir, speculative_method="ngram")
    for params in (SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.5),
                   SamplingParams(max_tokens=12, temperature=0.0, logit_bias={7: 1.0}),
                   SamplingParams(max_tokens=12, temperature=0.0, min_tokens=12, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, prompt_logprobs=1)):
        engine.generate(loopy_prompts(2, seed=7), params)
    assert engine.stats().spec.num_drafts == 0
    with pytest.raises(InvalidRequestError, match="speculative method 'draft' is not served here"):
        engine.add_request("d", [5, 6, 7], SamplingParams(speculation=SpeculationParams("draft")))
    with pytest.raises(InvalidRequestError, match="num_tokens must be in"):
        SpeculationParams("ngram", 0)


# ---- sampling keeps the distribution ----------------------------------------------------------------------------
VOCAB = 12


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    """A 12-token model whose next-token distributions are far from uniform (a scaled-up LM head)."""
    from tests.engine.checkpoints import make_hf_checkpoint

    out = make_hf_checkpoint(tmp_path_factory.mktemp("chi") / "m", "llama", seed=3, vocab=VOCAB, layers=1)
    path = out / "model.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 10
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return str(out)


def sample_counts(model_dir, spec, n=600, **kw):
    """Counts of each output position's token over n seeded requests (position 0 comes from the prompt's step)."""
    engine = new_engine(model_dir, max_num_seqs=600, block_size=4, num_kv_blocks=2048, **kw)
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    params = [SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, seed=i, speculation=spec)
              for i in range(n)]
    seqs = engine.generate([prompt] * n, params)
    counts = torch.zeros(4, VOCAB)
    for seq in seqs:
        for pos, token in enumerate(seq.output_ids):
            counts[pos, token] += 1
    assert_all_free(engine)
    return counts, engine.stats().spec


def chi_square(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square statistic over the bins either sample hit."""
    na, nb = a.sum(), b.sum()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    return float((((a * (nb / na).sqrt() - b * (na / nb).sqrt()) ** 2) / (a + b)).sum())


@pytest.fixture(scope="module")
def plain_counts(peaked_dir):
    return sample_counts(peaked_dir, SpeculationParams("off"))[0]


# 11 degrees of freedom: P(chi2 > 45) ~ 5e-6 when the distributions are equal. Seeds are fixed, so no flake.
SAME = 45.0


def test_sampling_with_ngram_keeps_the_distribution(peaked_dir, plain_counts):
    counts, stats = sample_counts(peaked_dir, SpeculationParams("ngram", 3), ngram_min=1)
    assert stats.num_draft_tokens > 300 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
    for pos in range(1, 4):
        assert chi_square(counts[pos], plain_counts[pos]) < SAME, (pos, counts[pos], plain_counts[pos])


def test_sampling_with_a_draft_model_keeps_the_distribution(peaked_dir, plain_counts, tmp_path_factory):
    from tests.engine.checkpoints import make_hf_checkpoint

    draft = make_hf_checkpoint(tmp_path_factory.mktemp("chi") / "d", "llama", seed=9, vocab=VOCAB, layers=1)
    counts, stats = sample_counts(peaked_dir, SpeculationParams("draft", 3), speculative_model=str(draft))
    assert stats.num_draft_tokens > 1000 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens, stats
    for pos in range(1, 4):
        assert chi_square(counts[pos], plain_counts[pos]) < SAME, (pos, counts[pos], plain_counts[pos])


def test_the_chi_square_check_catches_a_wrong_acceptance_rule(peaked_dir, plain_counts, monkeypatch):
    """Negative control: accepting every proposed token (no rejection) must fail the same check by far."""
    def accept_all(logits, drafts, draft_probs, params, generator):
        probs = torch.softmax(logits[-1].float() / params.temperature, dim=-1)
        return drafts + [int(torch.multinomial(probs, 1, generator=generator)[0])]

    monkeypatch.setattr(speculation, "rejection_sample", accept_all)
    counts, _ = sample_counts(peaked_dir, SpeculationParams("ngram", 3), ngram_min=1)
    assert max(chi_square(counts[pos], plain_counts[pos]) for pos in range(1, 4)) > 2 * SAME


# ---- the real SmolLM2 model ---------------------------------------------------------------------------------------
CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)
'''


@pytest.mark.slow
def test_smollm2_greedy_output_is_unchanged_by_either_proposer():
    from baton.devtools.fetch_model import models_cache_dir

    model = models_cache_dir() / "SmolLM2-135M-Instruct"
    if not (model / "model.safetensors").is_file():
        pytest.skip("SmolLM2-135M-Instruct is not in the model cache (baton up fetches it)")
    engine = new_engine(str(model))
    prompts = [engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))
               for text in (f"Add type hints to this function and repeat it:\n{CODE}",
                            "What is the capital of France?")]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    plain = [s.output_ids for s in engine.generate(prompts, params)]
    for spec, kw in ((NGRAM, {}), (DRAFT, {"speculative_model": str(model)})):
        specced = new_engine(str(model), **kw)
        assert [s.output_ids for s in specced.generate(prompts, dataclasses.replace(params, speculation=spec))] \
            == plain, spec
        stats = specced.stats().spec
        assert stats.num_accepted_tokens > 0, (spec, stats)
        assert_all_free(specced)
