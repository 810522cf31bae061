"""Conversions between baton.v1 protobuf messages and engine types, in one place for both workers."""
from __future__ import annotations

from baton.engine.sampling_params import SamplingParams
from baton.proto.v1 import inference_pb2


def sampling_from_proto(p: inference_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (a ValueError) for values the engine cannot serve."""
    return SamplingParams(
        max_tokens=int(p.max_tokens),
        temperature=float(p.temperature),
        top_p=float(p.top_p) if p.top_p > 0 else 1.0,
        top_k=max(0, int(p.top_k)),
        seed=int(p.seed) if p.HasField("seed") else None,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=bool(p.ignore_eos),
        logprobs=bool(p.logprobs),
    )
