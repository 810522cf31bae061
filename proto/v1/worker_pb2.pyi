from baton.proto.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVHandoffVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_HANDOFF_VERSION_UNSPECIFIED: _ClassVar[KVHandoffVersion]
    KV_HANDOFF_VERSION_1: _ClassVar[KVHandoffVersion]
    KV_HANDOFF_VERSION_2: _ClassVar[KVHandoffVersion]
KV_HANDOFF_VERSION_UNSPECIFIED: KVHandoffVersion
KV_HANDOFF_VERSION_1: KVHandoffVersion
KV_HANDOFF_VERSION_2: KVHandoffVersion

class KVOffer(_message.Message):
    __slots__ = ("transport", "endpoint")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    transport: str
    endpoint: bytes
    def __init__(self, transport: _Optional[str] = ..., endpoint: _Optional[bytes] = ...) -> None: ...

class KVDestination(_message.Message):
    __slots__ = ("version", "transport", "endpoint", "dst_block_ids", "num_cached_tokens", "transfer_id", "block_size", "decode_worker_id", "offers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    version: KVHandoffVersion
    transport: str
    endpoint: bytes
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    transfer_id: str
    block_size: int
    decode_worker_id: str
    offers: _containers.RepeatedCompositeFieldContainer[KVOffer]
    def __init__(self, version: _Optional[_Union[KVHandoffVersion, str]] = ..., transport: _Optional[str] = ..., endpoint: _Optional[bytes] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., transfer_id: _Optional[str] = ..., block_size: _Optional[int] = ..., decode_worker_id: _Optional[str] = ..., offers: _Optional[_Iterable[_Union[KVOffer, _Mapping]]] = ...) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("computed_tokens", "cached_tokens", "kv_bytes", "prefill_seconds", "transfer_seconds")
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    computed_tokens: int
    cached_tokens: int
    kv_bytes: int
    prefill_seconds: float
    transfer_seconds: float
    def __init__(self, computed_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ...) -> None: ...

class PrefillTarget(_message.Message):
    __slots__ = ("worker_id", "grpc_address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    grpc_address: str
    def __init__(self, worker_id: _Optional[str] = ..., grpc_address: _Optional[str] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "prefill", "generated_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    prefill: PrefillTarget
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., prefill: _Optional[_Union[PrefillTarget, _Mapping]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeError(_message.Message):
    __slots__ = ("kind", "message", "prefill_worker_id", "retryable")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[DecodeError.Kind]
        KIND_PREFILL_FAILED: _ClassVar[DecodeError.Kind]
        KIND_KV_TRANSFER_FAILED: _ClassVar[DecodeError.Kind]
        KIND_OUT_OF_CAPACITY: _ClassVar[DecodeError.Kind]
        KIND_INVALID_REQUEST: _ClassVar[DecodeError.Kind]
        KIND_INTERNAL: _ClassVar[DecodeError.Kind]
    KIND_UNSPECIFIED: DecodeError.Kind
    KIND_PREFILL_FAILED: DecodeError.Kind
    KIND_KV_TRANSFER_FAILED: DecodeError.Kind
    KIND_OUT_OF_CAPACITY: DecodeError.Kind
    KIND_INVALID_REQUEST: DecodeError.Kind
    KIND_INTERNAL: DecodeError.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    kind: DecodeError.Kind
    message: str
    prefill_worker_id: str
    retryable: bool
    def __init__(self, kind: _Optional[_Union[DecodeError.Kind, str]] = ..., message: _Optional[str] = ..., prefill_worker_id: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "usage", "prefill", "error", "text", "top_logprobs", "prompt_logprobs", "prompt_top_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _inference_pb2.FinishReason
    usage: _inference_pb2.Usage
    prefill: PrefillStats
    error: DecodeError
    text: str
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TopLogprobs]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prompt_top_logprobs: _containers.RepeatedCompositeFieldContainer[_inference_pb2.TopLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_inference_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_inference_pb2.Usage, _Mapping]] = ..., prefill: _Optional[_Union[PrefillStats, _Mapping]] = ..., error: _Optional[_Union[DecodeError, _Mapping]] = ..., text: _Optional[str] = ..., top_logprobs: _Optional[_Iterable[_Union[_inference_pb2.TopLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., prompt_top_logprobs: _Optional[_Iterable[_Union[_inference_pb2.TopLogprobs, _Mapping]]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "kv")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _inference_pb2.SamplingParams
    kv: KVDestination
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_inference_pb2.SamplingParams, _Mapping]] = ..., kv: _Optional[_Union[KVDestination, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "stats", "transport")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: float
    stats: PrefillStats
    transport: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[float] = ..., stats: _Optional[_Union[PrefillStats, _Mapping]] = ..., transport: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "pool", "num_requests_running", "num_requests_waiting", "kv_blocks_total", "kv_blocks_free", "kv_blocks_used", "kv_blocks_cached", "block_size", "prompt_tokens_computed_total", "prompt_tokens_cached_total", "generation_tokens_total")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_COMPUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_CACHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    pool: str
    num_requests_running: int
    num_requests_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_used: int
    kv_blocks_cached: int
    block_size: int
    prompt_tokens_computed_total: int
    prompt_tokens_cached_total: int
    generation_tokens_total: int
    def __init__(self, worker_id: _Optional[str] = ..., pool: _Optional[str] = ..., num_requests_running: _Optional[int] = ..., num_requests_waiting: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., block_size: _Optional[int] = ..., prompt_tokens_computed_total: _Optional[int] = ..., prompt_tokens_cached_total: _Optional[int] = ..., generation_tokens_total: _Optional[int] = ...) -> None: ...

class EmbedInput(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "inputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[EmbedInput]
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[EmbedInput, _Mapping]]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("dimensions", "vectors", "prompt_tokens", "queue_seconds")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    dimensions: int
    vectors: bytes
    prompt_tokens: int
    queue_seconds: float
    def __init__(self, dimensions: _Optional[int] = ..., vectors: _Optional[bytes] = ..., prompt_tokens: _Optional[int] = ..., queue_seconds: _Optional[float] = ...) -> None: ...
