"""The one mapping between the engine's finish reasons ("stop", "length", ...) and the wire's FinishReason."""
from __future__ import annotations

from baton.proto.v1 import inference_pb2

_TO_WIRE = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
    "error": inference_pb2.FINISH_REASON_ERROR,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}


def finish_reason_to_wire(name: str | None) -> int:
    """None (still running) is UNSPECIFIED; an unknown name is a stop."""
    if name is None:
        return inference_pb2.FINISH_REASON_UNSPECIFIED
    return _TO_WIRE.get(name, inference_pb2.FINISH_REASON_STOP)


def finish_reason_name(value: int) -> str | None:
    """The OpenAI-style name of a wire value; None for UNSPECIFIED (the request goes on)."""
    if value == inference_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return _FROM_WIRE.get(value, "stop")
