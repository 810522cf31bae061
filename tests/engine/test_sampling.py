"""Request fields the engine applies: logit bias, min_tokens, penalties, min-p, top logprobs, prompt logprobs,
stop strings kept in the output, and the per-request timings and prefix-cache counters that metrics read."""
from __future__ import annotations

import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampler import PromptScoring, Sampler
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Sequence
from tests.engine.checkpoints import make_hf_checkpoint

EOS = 2  # make_hf_checkpoint's eos_token_id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("s") / "llama", "llama", seed=5, max_position=1024))


@pytest.fixture(scope="module")
def engine(model_dir):
    return LLMEngine(EngineConfig(model_dir, num_kv_blocks=256, max_num_batched_tokens=64, show_progress=False))


def run(engine, prompt, **params):
    return engine.generate([prompt], SamplingParams(**params))[0]


def greedy(**kw):
    return {"max_tokens": 8, "temperature": 0.0, **kw}


PROMPT = [random.Random(1).randrange(3, 256) for _ in range(21)]


def test_logit_bias_moves_the_greedy_token(engine):
    plain = run(engine, PROMPT, **greedy(ignore_eos=True)).output_ids
    banned = run(engine, PROMPT, **greedy(ignore_eos=True, logit_bias={plain[0]: -100.0})).output_ids
    assert banned[0] != plain[0]
    forced = run(engine, PROMPT, **greedy(ignore_eos=True, logit_bias={77: 100.0})).output_ids
    assert forced == [77] * 8


def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    eager = run(engine, PROMPT, **greedy(max_tokens=12, logit_bias={EOS: 100.0}))
    assert eager.output_ids == [EOS] and eager.finish_reason == "stop"
    held = run(engine, PROMPT, **greedy(max_tokens=12, logit_bias={EOS: 100.0}, min_tokens=5))
    assert len(held.output_ids) == 6 and EOS not in held.output_ids[:5] and held.output_ids[5] == EOS
    assert held.finish_reason == "stop"
    stop_id = run(engine, PROMPT, **greedy(ignore_eos=True)).output_ids[0]
    assert run(engine, PROMPT, **greedy(ignore_eos=True, stop_token_ids=[stop_id])).output_ids == [stop_id]
    held = run(engine, PROMPT, **greedy(ignore_eos=True, stop_token_ids=[stop_id], min_tokens=3)).output_ids
    assert stop_id not in held[:3] and len(held) > 3


def reference_logits(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """vLLM's order and formulas, one row and one token at a time."""
    p, out = seq.params, logits.clone()
    for token, bias in p.logit_bias.items():
        out[token] += bias
    if len(seq.output_ids) < p.min_tokens:
        for token in {EOS, *p.stop_token_ids}:
            out[token] = float("-inf")
    for token in range(out.numel()):
        count = seq.output_ids.count(token)
        if p.repetition_penalty != 1 and (count or token in seq.prompt_ids):
            out[token] = out[token] / p.repetition_penalty if out[token] > 0 else out[token] * p.repetition_penalty
        out[token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def test_processing_matches_a_per_token_reference():
    rng = random.Random(3)
    vocab = 64
    cases = [dict(repetition_penalty=1.7), dict(frequency_penalty=1.5, presence_penalty=-0.5),
             dict(presence_penalty=2.0, repetition_penalty=0.6, logit_bias={5: 3.0, 9: -2.0}),
             dict(min_tokens=9, stop_token_ids=[7], logit_bias={EOS: 4.0}), dict()]
    seqs = []
    for i, kw in enumerate(cases):
        seq = Sequence(f"r{i}", [rng.randrange(vocab) for _ in range(12)], SamplingParams(temperature=0.0, **kw))
        seq.token_ids += [rng.randrange(vocab) for _ in range(6)]
        seqs.append(seq)
    sampler = Sampler(eos_token_ids=[EOS])
    for trial in range(20):
        logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(trial)) * 3
        got = sampler.sample(logits, seqs).tokens
        want = [int(reference_logits(logits[i], s).argmax()) for i, s in enumerate(seqs)]
        assert got == want, f"trial {trial}"


def test_top_and_prompt_logprobs_come_back_sorted_with_the_chosen_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=0.0, logprobs=True, top_logprobs=k))
            for i, k in enumerate((0, 3, 20))]
    prompt_logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    result = Sampler().sample(logits, seqs, PromptScoring(prompt_logits, [4, 5, 6, 7], 2))
    reference = torch.log_softmax(logits, -1)
    assert result.tokens == reference.argmax(-1).tolist()
    assert result.logprobs == pytest.approx(reference.max(-1).values.tolist(), abs=1e-6)
    assert [len(t) for t in result.top_logprobs] == [0, 3, 20]
    for row, top in enumerate(result.top_logprobs[1:], start=1):
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True) and top[0][0] == result.tokens[row]
        assert [t for t, _ in top] == reference[row].topk(len(top)).indices.tolist()
    scored = torch.log_softmax(prompt_logits, -1)
    assert result.prompt_logprobs == pytest.approx([scored[i, t].item() for i, t in enumerate([4, 5, 6, 7])],
                                                   abs=1e-6)
    assert [[t for t, _ in top] for top in result.prompt_top_logprobs] == scored.topk(2).indices.tolist()


def test_min_p_of_one_keeps_only_the_most_likely_token(engine):
    plain = run(engine, PROMPT, **greedy(ignore_eos=True)).output_ids
    sampled = run(engine, PROMPT, max_tokens=8, temperature=1.5, min_p=1.0, seed=4, ignore_eos=True).output_ids
    assert sampled == plain


@pytest.mark.parametrize("penalty", [dict(presence_penalty=2.0), dict(frequency_penalty=2.0),
                                     dict(repetition_penalty=1.5)])
def test_penalties_break_a_greedy_loop_and_sample_reproducibly(engine, penalty):
    plain = run(engine, PROMPT, **greedy(max_tokens=16, ignore_eos=True)).output_ids
    assert len(set(plain)) < 8, "this model's greedy output repeats itself"
    assert len(set(run(engine, PROMPT, **greedy(max_tokens=16, ignore_eos=True, **penalty)).output_ids)) > 8
    sampled = dict(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True, **penalty)
    assert run(engine, PROMPT, **sampled).output_ids == run(engine, PROMPT, **sampled).output_ids


def test_prompt_logprobs_match_transformers_even_over_a_cached_prefix(model_dir, engine):
    import transformers

    prompt = [random.Random(2).randrange(3, 256) for _ in range(150)]  # 3 chunks of the 64-token budget
    run(engine, prompt, **greedy(max_tokens=1))  # its blocks are in the prefix cache now
    engine.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == "p"]
    first = outputs[0]
    assert outputs[1].prompt_logprobs is None, "prompt logprobs come once, with the first token"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    want = ref.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert len(first.prompt_logprobs) == len(prompt) - 1
    assert first.prompt_logprobs == pytest.approx(want.tolist(), abs=2e-3)
    top_ids = [[t for t, _ in top] for top in first.prompt_top_logprobs]
    agree = sum(a == b for a, b in zip(top_ids, ref.topk(3).indices.tolist()))
    assert agree >= len(top_ids) - 2  # near-ties may swap places between two implementations
    assert first.num_cached_tokens == 0, "prompt logprobs compute the whole prompt"


def test_include_stop_str_in_output(tmp_path):
    from baton.devtools.make_model import make_model

    model_dir = make_model(tmp_path / "tok", arch="qwen2", vocab=512, seed=1)
    engine = LLMEngine(EngineConfig(str(model_dir), num_kv_blocks=128, show_progress=False))
    prompt = engine.tokenizer.encode("def main():\n    return")
    full = engine.tokenizer.decode(run(engine, prompt, **greedy(max_tokens=40, ignore_eos=True)).output_ids)
    stop = full[3:6]

    def text(**kw):
        engine.add_request("s", prompt, SamplingParams(**greedy(max_tokens=40, ignore_eos=True, stop=[stop], **kw)))
        pieces = []
        while engine.has_unfinished():
            pieces += [o.text for o in engine.step()]
        return "".join(pieces)

    assert text() == full[:full.index(stop)]
    assert text(include_stop_str_in_output=True) == full[:full.index(stop) + len(stop)]


def test_finished_requests_report_their_phases_and_prefix_cache_lookups(model_dir):
    engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=128, show_progress=False))
    seen = []
    engine.finish_listeners.append(seen.append)
    prompt = PROMPT * 2  # 42 tokens: 2 whole blocks of 16
    run(engine, prompt, **greedy(ignore_eos=True))
    run(engine, prompt, **greedy(ignore_eos=True))
    assert [(r.finish_reason, r.num_prompt_tokens, r.num_output_tokens) for r in seen] == [("length", 42, 8)] * 2
    assert all(r.queue_s >= 0 and r.prefill_s > 0 and r.decode_s > 0 for r in seen)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (84, 32)
    engine.add_request("gone", prompt, SamplingParams(max_tokens=4))
    engine.abort("gone")
    assert seen[-1].finish_reason == "abort" and seen[-1].queue_s is None
