"""Speculative decoding through the wire: the OpenAI `speculative` extra reaches the engine's SamplingParams, and
real prefill + decode worker processes (remote prefill, speculation on the decode side only) return the same greedy
tokens as one plain engine, counting proposed and accepted tokens on /metrics."""
from __future__ import annotations

import asyncio

import pydantic
import pytest

from baton.devtools.make_model import make_model
from baton.engine.sampling_params import SpeculationParams
from baton.proto.v1 import inference_pb2, worker_pb2
from baton.router.generation_defaults import GenerationDefaults
from baton.router.openai_protocol import ChatCompletionRequest
from baton.worker.proto_convert import sampling_from_proto
from tests.cluster import start_worker
from tests.workers.test_disaggregated import decode, metric, reference

PROMPTS = [[5, 9, 13, 200, 7] * 9, [40, 41, 42, 43, 44, 45] * 6 + [46]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_model(tmp_path_factory.mktemp("spec") / "model", arch="llama", vocab=300, seed=5))


def chat(**extra):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 8, **extra})


def test_the_speculative_extra_reaches_the_engine():
    wire = chat(speculative={"method": "draft", "num_tokens": 3}).wire_sampling(GenerationDefaults())
    assert sampling_from_proto(wire).speculation == SpeculationParams("draft", 3)
    wire = chat(speculative={"method": "ngram"}).wire_sampling(GenerationDefaults())
    assert sampling_from_proto(wire).speculation == SpeculationParams("ngram", None)  # the worker's default count
    assert sampling_from_proto(chat().wire_sampling(GenerationDefaults())).speculation is None
    for bad, field in (({"method": "medusa"}, "method"), ({"num_tokens": 0}, "num_tokens"),
                       ({"num_tokens": 4, "depth": 2}, "depth")):
        with pytest.raises(pydantic.ValidationError, match=field):
            chat(speculative=bad)


@pytest.mark.slow
def test_remote_prefill_then_speculative_decode_equals_one_engine(model_dir, redis_url):
    p = start_worker("prefill", model_dir, redis_url, "p-spec")
    d = start_worker("decode", model_dir, redis_url, "d-spec", "--speculative-method", "ngram",
                     "--num-speculative-tokens", "3", "--speculative-model", model_dir)
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = reference(model_dir, prompt, max_tokens=20)
            for method in (None, "draft", "off"):  # None: the worker's default (ngram)
                sampling = inference_pb2.SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
                if method is not None:
                    sampling.speculative.CopyFrom(inference_pb2.SpeculativeDecoding(method=method, num_tokens=4))
                chunks, stats = asyncio.run(decode(d.grpc_address, f"r{i}-{method}", prompt, prefill=p,
                                                   sampling=sampling))
                assert not any(c.HasField("error") for c in chunks), chunks[-1]
                assert [t for c in chunks for t in c.token_ids] == expected, (i, method)
                assert chunks[0].prefill.kv_bytes > 0  # the prompt was prefilled remotely
                assert stats.kv_blocks_used == 0
        draft_tokens = sum(metric(d, "baton_worker_spec_decode_num_draft_tokens_total").values())
        accepted = sum(metric(d, "baton_worker_spec_decode_num_accepted_tokens_total").values())
        assert draft_tokens > accepted > 0
        assert sum(metric(p, "baton_worker_spec_decode_num_draft_tokens_total").values()) == 0
        # A decode worker without a draft model refuses a request for one, naming it.
        sampling = inference_pb2.SamplingParams(max_tokens=4, temperature=0.0)
        sampling.speculative.CopyFrom(inference_pb2.SpeculativeDecoding(method="draft"))
        plain = start_worker("decode", model_dir, redis_url, "d-plain")
        try:
            chunks, _ = asyncio.run(decode(plain.grpc_address, "nodraft", PROMPTS[0], sampling=sampling))
            assert chunks[-1].error.kind == worker_pb2.DecodeError.KIND_INVALID_REQUEST
            assert "speculative method 'draft' is not served here" in chunks[-1].error.message
        finally:
            plain.stop()
    finally:
        p.stop()
        d.stop()


def test_speculative_flags_reach_the_decode_engine_only(model_dir):
    from typer.testing import CliRunner

    from baton.cli import app
    from baton.worker.settings import WorkerSettings

    flags = dict(model=model_dir, speculative_method="draft", num_speculative_tokens=6, speculative_model=model_dir)
    config = WorkerSettings.load(pool="decode", **flags).engine_config()
    assert (config.speculative_method, config.num_speculative_tokens, config.speculative_model) == \
        ("draft", 6, model_dir)
    config = WorkerSettings.load(pool="prefill", **flags).engine_config()  # prefill-only requests never speculate
    assert (config.speculative_method, config.speculative_model) == ("off", None)
    result = CliRunner().invoke(app, ["decode-worker", "--model", model_dir, "--speculative-method", "draft"])
    assert result.exit_code == 2 and "--speculative-method draft needs --speculative-model" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["decode-worker", "--model", model_dir, "--speculative-method", "medusa"])
    assert result.exit_code == 2 and "speculative_method" in result.output
