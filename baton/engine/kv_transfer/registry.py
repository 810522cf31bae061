"""Maps a transport name to its backend class, imported only when asked for (nixl pulls in native libraries)."""
from __future__ import annotations

import importlib
from typing import Any

from baton.engine.kv_transfer.base import KVTransferError, KVTransport

TRANSPORTS: dict[str, str] = {
    "tcp": "baton.engine.kv_transfer.tcp:TcpTransport",
    "nixl": "baton.engine.kv_transfer.nixl:NixlTransport",
    "ipc": "baton.engine.kv_transfer.ipc:IpcTransport",
}


def create_transport(name: str, **options: Any) -> KVTransport:
    """A new transport of backend `name`; options go to the backend's constructor."""
    if name not in TRANSPORTS:
        raise KVTransferError(f"unknown KV transport {name!r}; known: {', '.join(sorted(TRANSPORTS))}")
    module_name, class_name = TRANSPORTS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise KVTransferError(f"KV transport {name!r} is unavailable here: {e}") from None
    try:
        return getattr(module, class_name)(**options)
    except TypeError as e:
        raise KVTransferError(f"bad options for KV transport {name!r}: {e}") from None
