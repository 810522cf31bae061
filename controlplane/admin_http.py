"""Admin HTTP API (FastAPI): status, decisions, policy dry-run and apply behind a bearer token."""
from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from baton.controlplane.service import ControlPlane, decision_dict


def token_ok(header: str | None, token: str | None) -> bool:
    """`token=None` only when the operator passed --insecure."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


def create_app(cp: ControlPlane, token: str | None) -> FastAPI:
    app = FastAPI(title="baton control plane", docs_url=None, redoc_url=None)

    def auth(authorization: str | None = Header(default=None)) -> None:
        if not token_ok(authorization, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/status", dependencies=[Depends(auth)])
    def status() -> dict:
        return cp.status()

    @app.get("/v1/decisions", dependencies=[Depends(auth)])
    def decisions(limit: int = 100) -> dict:
        items = list(cp.decisions)[-max(0, limit):] if limit > 0 else []
        return {"decisions": [decision_dict(d) for d in items]}

    @app.post("/v1/policy/dry-run", dependencies=[Depends(auth)])
    async def dry_run(request: Request) -> JSONResponse:
        errors, out = cp.dry_run((await request.body()).decode("utf-8", "replace"))
        return JSONResponse({"ok": not errors, "errors": errors, "decisions": [decision_dict(d) for d in out]},
                            status_code=422 if errors else 200)

    @app.post("/v1/policy/apply", dependencies=[Depends(auth)])
    async def apply(request: Request) -> JSONResponse:
        errors = cp.apply((await request.body()).decode("utf-8", "replace"))
        return JSONResponse({"ok": not errors, "errors": errors}, status_code=422 if errors else 200)

    return app
