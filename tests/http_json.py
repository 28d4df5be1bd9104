"""A raw HTTP POST for the server tests (no client library between the test and the wire)."""

from __future__ import annotations

import http.client
import json
from typing import Any


def post(server: Any, path: str, body: bytes | str | dict, headers: dict | None = None):
    """POST `body` (a dict is sent as JSON) to the server; (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = json.dumps(body) if isinstance(body, dict) else body
    conn.request(
        "POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    raw = resp.read().decode("utf-8")
    conn.close()
    try:
        return resp.status, json.loads(raw)
    except json.JSONDecodeError:
        return resp.status, raw
