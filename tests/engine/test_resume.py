"""Resuming a request on another engine (request migration): the tokens and text that follow the ones already
generated are those of an undisturbed run, with limits and stop strings counted over the whole output."""
from __future__ import annotations

import pytest

from baton.devtools.make_model import make_model
from baton.engine.errors import InvalidRequestError
from baton.engine.sampling_params import SamplingParams
from tests.engine.test_engine import assert_all_free, new_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return new_engine(str(make_model(tmp_path_factory.mktemp("m") / "tok", arch="qwen2", vocab=512, seed=1)))


def run(engine, rid, prompt, params, generated=(), stop_after=None):
    """Streams one request; returns (token ids, text pieces joined, finish reason, last output). With
    `stop_after`, aborts it after that many outputs, as a dying worker would stop."""
    engine.add_request(rid, prompt, params, generated_ids=list(generated))
    tokens, text, reason, last = [], "", None, None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.text
            reason, last = out.finish_reason or reason, out
            if stop_after is not None and len(tokens) == stop_after:
                engine.abort(rid)
                return tokens, text, reason, last
    return tokens, text, reason, last


def resumed(engine, prompt, params, cut):
    """Output of a request that ran `cut` tokens on one engine and finished on another (the same engine under a
    new id: the first attempt's state is gone, only its blocks may remain as a prefix hit)."""
    head, head_text, _, _ = run(engine, f"a{cut}", prompt, params, stop_after=cut)
    tail, tail_text, reason, last = run(engine, f"b{cut}", prompt, params, generated=head)
    return head + tail, head_text + tail_text, reason, last


def test_resumed_greedy_run_equals_undisturbed_tokens_text_and_usage(engine):
    prompt = engine.tokenizer.encode("def main():\n    return")
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    tokens, text, reason, last = run(engine, "whole", prompt, params)
    assert len(tokens) == 30 and reason == "length"
    for cut in (1, 2, 7, 15, 29):
        assert resumed(engine, prompt, params, cut)[:3] == (tokens, text, "length"), cut
    *_, last = resumed(engine, prompt, params, 11)
    assert last.num_output_tokens == 30 and last.num_prompt_tokens == len(prompt)
    assert last.num_cached_tokens <= len(prompt)
    assert_all_free(engine)


def test_stop_string_spanning_the_cut_is_found_and_held_back_text_not_lost(engine):
    prompt = engine.tokenizer.encode("class A:\n    def")
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    _, text, _, _ = run(engine, "whole", prompt, greedy)
    stop = text[10:14]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    expected = run(engine, "stopped", prompt, params)[:3]
    assert expected[2] == "stop" and expected[1] == text[: text.index(stop)]
    for cut in range(1, len(expected[0])):
        assert resumed(engine, prompt, params, cut)[:3] == expected, cut
    assert_all_free(engine)


def test_min_tokens_counts_tokens_generated_before_the_cut(engine):
    prompt = engine.tokenizer.encode("x = 1")
    eos = next(iter(engine.eos_token_ids))
    # The bias makes EOS win every step once min_tokens allows it.
    params = SamplingParams(max_tokens=20, temperature=0.0, min_tokens=6, logit_bias={eos: 100.0})
    tokens, _, reason, _ = run(engine, "whole", prompt, params)
    assert len(tokens) == 7 and tokens[-1] == eos and reason == "stop"
    assert resumed(engine, prompt, params, 4)[0] == tokens


def test_resume_with_nothing_left_to_generate_is_refused(engine):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("full", [5, 6], SamplingParams(max_tokens=2), generated_ids=[7, 8])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("bad", [5, 6], SamplingParams(max_tokens=4), generated_ids=[10**6])
