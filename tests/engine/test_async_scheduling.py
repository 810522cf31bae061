"""Async scheduling (the next decode step queued before the host has the last sampled ids) changes nothing a
client sees: same tokens, logprobs, text, finish reasons and usage as the synchronous engine, no leaked block.
Runs on the CPU through the same code path as on the GPU (the engine turns it on by default only with CUDA graphs)."""
from __future__ import annotations

import pytest

from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import PLACEHOLDER
from tests.engine.test_engine import assert_all_free, new_engine, prompts_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from baton.devtools.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("m") / "qwen2", arch="qwen2", vocab=512, seed=4))


def run(engine, requests, abort_at=None):
    """requests: (id, prompt, params, step it joins at). Returns per request (ids, logprobs, text, reason,
    usage) and the number of steps whose outputs came back empty (the pipelined first step of a decode run)."""
    outputs = {rid: ([], [], [], None, None) for rid, *_ in requests}
    pending = sorted(requests, key=lambda r: r[3])
    step = 0
    while engine.has_unfinished() or pending:
        while pending and pending[0][3] <= step:
            rid, prompt, params, _ = pending.pop(0)
            engine.add_request(rid, prompt, params)
        if abort_at is not None and step == abort_at[1]:
            engine.abort(abort_at[0])
        for out in engine.step():
            ids, lps, text, _, _ = outputs[out.request_id]
            ids += out.new_token_ids
            lps += out.new_logprobs
            text.append(out.text)
            if out.finished:
                outputs[out.request_id] = (ids, lps, text, out.finish_reason,
                                           (out.num_prompt_tokens, out.num_output_tokens))
        step += 1
    return {rid: (ids, [round(x, 4) for x in lps], "".join(text), reason, usage)
            for rid, (ids, lps, text, reason, usage) in outputs.items()}


def both(model_dir, requests, abort_at=None, **kw):
    sync = new_engine(model_dir, async_scheduling=False, **kw)
    pipelined = new_engine(model_dir, async_scheduling=True, **kw)
    a, b = run(sync, requests, abort_at), run(pipelined, requests, abort_at)
    assert_all_free(sync)
    assert_all_free(pipelined)
    assert not pipelined.has_unfinished() and pipelined._inflight is None
    return a, b


def test_pipelined_decode_equals_synchronous(model_dir):
    prompts = prompts_of([5, 17, 33, 9, 60, 12], seed=7)
    engine = new_engine(model_dir)
    text = engine.tokenizer.decode(engine.generate([prompts[0]], SamplingParams(max_tokens=30, temperature=0.0,
                                                                              ignore_eos=True))[0].output_ids)
    stop = text[4:7]
    requests = [
        ("greedy", prompts[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), 0),
        ("stop", prompts[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop]), 0),
        ("short", prompts[1], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), 0),
        ("seeded", prompts[2], SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=11,
                                              ignore_eos=True, logprobs=True, top_logprobs=3), 2),
        ("eos", prompts[3], SamplingParams(max_tokens=40, temperature=0.0), 6),
        ("late", prompts[4], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, min_tokens=5), 9),
        ("penalized", prompts[5], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                 frequency_penalty=0.5), 4),
    ]
    a, b = both(model_dir, requests)
    assert a == b
    assert a["stop"][3] == "stop" and a["short"][3] == "length" and len(a["short"][0]) == 3
    assert all(PLACEHOLDER not in ids for ids, *_ in b.values())


def test_abort_while_a_step_is_in_flight(model_dir):
    prompts = prompts_of([8, 20, 30], seed=3)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, greedy, 0) for i, p in enumerate(prompts)]
    a, b = both(model_dir, requests, abort_at=("r1", 6))
    assert a["r0"] == b["r0"] and a["r2"] == b["r2"]
    assert len(b["r0"][0]) == 20
    # The aborted request stops early in both, wherever its in-flight token was.
    assert len(a["r1"][0]) < 20 and len(b["r1"][0]) < 20


def test_pipelining_really_runs_and_stays_exact_with_the_limits(model_dir):
    """max_model_len and max_tokens end requests exactly; the engine did pipeline (outputs lag one step)."""
    prompt = prompts_of([40], seed=9)[0]
    engine = new_engine(model_dir, async_scheduling=True, max_model_len=64)
    engine.add_request("r", prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    empty_steps, tokens = 0, []
    while engine.has_unfinished():
        outs = engine.step()
        empty_steps += not outs
        tokens += [t for o in outs for t in o.new_token_ids]
    seq_tokens = new_engine(model_dir, async_scheduling=False, max_model_len=64).generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].output_ids
    assert tokens == seq_tokens and len(tokens) == 24
    assert empty_steps >= 1  # the first pipelined step returned nothing: its ids came with the next call
    assert_all_free(engine)
