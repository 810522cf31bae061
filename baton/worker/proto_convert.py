"""Conversions between baton.v1 protobuf messages and engine types, in one place for both workers."""
from __future__ import annotations

from baton.engine.grammar import StructuredOutput
from baton.engine.sampler import TopLogprobs
from baton.engine.sampling_params import SamplingParams, SpeculationParams
from baton.proto.v1 import inference_pb2


def sampling_from_proto(p: inference_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (a ValueError) for values the engine cannot serve."""
    return SamplingParams(
        max_tokens=int(p.max_tokens),
        temperature=float(p.temperature),
        top_p=float(p.top_p) if p.top_p > 0 else 1.0,
        top_k=max(0, int(p.top_k)),
        min_p=float(p.min_p),
        seed=int(p.seed) if p.HasField("seed") else None,
        presence_penalty=float(p.presence_penalty),
        frequency_penalty=float(p.frequency_penalty),
        repetition_penalty=float(p.repetition_penalty) if p.repetition_penalty > 0 else 1.0,
        logit_bias={int(k): float(v) for k, v in p.logit_bias.items()},
        min_tokens=int(p.min_tokens),
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        include_stop_str_in_output=bool(p.include_stop_str_in_output),
        ignore_eos=bool(p.ignore_eos),
        logprobs=bool(p.logprobs),
        top_logprobs=int(p.top_logprobs) if p.logprobs else 0,
        prompt_logprobs=int(p.prompt_logprobs) if p.HasField("prompt_logprobs") else None,
        structured_output=structured_from_proto(p.structured_output) if p.HasField("structured_output") else None,
        speculation=SpeculationParams(p.speculative.method, int(p.speculative.num_tokens) or None)
        if p.HasField("speculative") else None,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
        kept_special_token_ids=frozenset(p.kept_special_token_ids),
    )


def structured_from_proto(s: inference_pb2.StructuredOutput) -> StructuredOutput:
    return StructuredOutput(s.kind, schema=s.json_schema, regex=s.regex, choices=tuple(s.choice))


def top_logprobs_to_proto(tops: list[TopLogprobs]) -> list[inference_pb2.TopLogprobs]:
    return [inference_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[lp for _, lp in top]) for top in tops]
