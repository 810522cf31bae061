"""Structured logs: one JSON object per line, with the request id and other extras as fields."""
from __future__ import annotations

import json as jsonlib
import logging

from baton.contracts.logs import setup_logging


def test_json_logs_carry_the_request_id(capsys):
    setup_logging(json_lines=True)
    try:
        logging.getLogger("baton.test").info("request %s done", "r-1", extra={"request_id": "r-1", "tokens": 3})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        logging.getLogger().handlers.clear()
    doc = jsonlib.loads(line)
    assert doc["request_id"] == "r-1" and doc["tokens"] == 3 and doc["msg"] == "request r-1 done"
    assert doc["level"] == "info" and doc["ts"].endswith("Z")
