"""What one router takes in: a request body size limit (413) and admission control, a bound on the generation
requests in flight beyond which new ones get 429 with Retry-After instead of waiting in an unbounded queue."""
from __future__ import annotations

from starlette.responses import JSONResponse

from baton.router.metrics import RouterMetrics
from baton.router.openai_protocol import APIError

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class Admission:
    """Counts generation requests in flight on both fronts (HTTP, gRPC)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def enter(self) -> bool:
        """Takes a slot; False when all are taken (the caller answers 429 / RESOURCE_EXHAUSTED)."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def refusal(self) -> APIError:
        return APIError(429, f"this router has {self.limit} requests in flight, its limit "
                             f"(max_inflight_requests); retry after {self.retry_after_s}s",
                        type="rate_limit_error", code="too_many_requests", headers=self._retry_after())

    def out_of_capacity(self, reason: str) -> APIError:
        """The 429 of a request that every decode worker refused for lack of free KV blocks: full, not broken."""
        return APIError(429, f"no decode worker has free KV blocks for this request ({reason}); retry after "
                             f"{self.retry_after_s}s", type="rate_limit_error", code="capacity",
                        headers=self._retry_after())

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestLimits:
    """ASGI middleware: reads a POST body up to `max_body_bytes` (413 beyond), then admits generation requests
    while `admission` has a slot, holding it until the response (streamed or not) has ended."""

    def __init__(self, app, *, max_body_bytes: int, admission: Admission, metrics: RouterMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.admission = admission
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        declared = dict(scope["headers"]).get(b"content-length", b"")
        too_big = declared.isdigit() and int(declared) > self.max_body_bytes
        body = None if too_big else await self._read_body(receive)
        if body is None:
            await self._refuse(scope, receive, send, APIError(
                413, f"the request body exceeds this router's limit of {self.max_body_bytes} bytes (max_body_bytes)",
                code="request_too_large"))
            return
        generating = path in GENERATE_PATHS
        if generating and not self.admission.enter():
            await self._refuse(scope, receive, send, self.admission.refusal())
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect that stops a stream
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            await self.app(scope, replay, send)
        finally:
            if generating:
                self.admission.leave()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None past the limit; a client that leaves mid-body sends an empty one on."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _refuse(self, scope, receive, send, error: APIError) -> None:
        self.metrics.request_done(scope["path"], error.status)
        await JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)(scope, receive,
                                                                                                 send)
