"""What the server bounds before any work: body size, prompts and tokens per request, the Host
header (DNS rebinding), and the API key's sources.

A request over a bound is answered at once with OpenAI's error body (413 for the body, 400 for
the rest), so one client cannot take the engine, the event loop or memory from the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException

from scratchllm.errors import InputError

# Names under which a loopback server is reached; anything else in a Host header is a page on
# another origin whose DNS now points here (rebinding), unless --host or --allow-host says so.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
ANY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
API_KEY_ENV = "SCRATCHLLM_API_KEY"


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on one request. Defaults allow any normal OpenAI-style use of a small model."""

    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_request_tokens: int = 1 << 17  # Σ over prompts of n × (prompt + max_tokens)

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_prompts", "max_request_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """Host names the server answers to; None (any) when it is bound to every address."""
    if bind in ANY_ADDRESS:
        return None
    return LOOPBACK_HOSTS | {bind.lower(), f"[{bind.lower()}]"} | {h.lower() for h in extra}


def host_of(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" → "[::1]")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    """The API key from --api-key, else --api-key-file, else $SCRATCHLLM_API_KEY; None: none."""
    if key:
        return key
    if key_file:
        try:
            text = Path(key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--api-key-file {key_file}: cannot read it ({exc})") from None
        if not text:
            raise InputError(f"--api-key-file {key_file}: the file is empty; expected the key")
        return text
    return os.environ.get(API_KEY_ENV) or None


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def _send_error(send: Send, status: int, message: str, code: str) -> None:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    body["error"]["code"] = code
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """ASGI middleware: the Host check and the body-size bound, before the app reads a byte.

    The body bound holds for chunked uploads too: bytes are counted as they arrive, and the
    request is answered 413 as soon as they pass the limit (never read into memory whole).
    """

    def __init__(self, app: Any, max_body_bytes: int, hosts: frozenset[str] | None) -> None:
        self.app, self.max_body_bytes, self.hosts = app, max_body_bytes, hosts

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None and host_of(headers.get("host", "")) not in self.hosts:
            await _send_error(
                send,
                400,
                f"Host header {headers.get('host', '')!r} is not a name of this server "
                "(serve --host or --allow-host adds one)",
                "host_not_allowed",
            )
            return
        limit = self.max_body_bytes
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _send_error(send, 413, _too_large(limit), "request_too_large")
            return
        seen = 0

        async def counted() -> dict[str, Any]:
            # A chunked upload has no Content-Length: count the bytes as they arrive. FastAPI
            # passes an HTTPException raised while it reads the body through unchanged.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> str:
    return f"request body is larger than this server's limit of {limit:,} bytes"
