"""uvicorn inside a process that owns its event loop and handles SIGINT/SIGTERM itself (router, worker host,
control plane): uvicorn must not take the signals over while it serves."""
from __future__ import annotations

import contextlib

import uvicorn


class EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield
