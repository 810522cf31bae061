"""KV-cache transfer between engines: one `KVTransport` interface, backends picked by name."""
from baton.engine.kv_transfer.base import (
    CacheGeometry,
    Endpoint,
    KVTransferError,
    KVTransport,
    TransferResult,
    block_runs,
)
from baton.engine.kv_transfer.registry import TRANSPORTS, create_transport

__all__ = ["CacheGeometry", "Endpoint", "KVTransferError", "KVTransport", "TRANSPORTS", "TransferResult",
           "block_runs", "create_transport"]
