"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both stream as
server-sent events with `stream: true`, ending with `data: [DONE]`), `GET /health`, and `GET /`,
a self-contained chat page. Requests are batched by the engine's background thread; a client
that disconnects (streaming or not) cancels its request, which frees its rows at the next step.
Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}, for every status,
500 included. What one request may ask is bounded (`serve/guards.py`); prompts are tokenized off
the event loop, so a large one never stalls other clients or `/health`. Prompts may be token ids;
log-probabilities (`logprobs`, `echo`, `max_tokens: 0` to score only) are in `serve/logprobs.py`,
and vLLM's `/tokenize`, `/detokenize`, `/tokenizer_info` (for lm-eval) in `serve/tokenize.py`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scratchllm.errors import InputError
from scratchllm.inference.chat import chat_prompt
from scratchllm.inference.engine import Completion, Engine, Event, SamplingParams
from scratchllm.inference.scoring import check_prompt
from scratchllm.serve.guards import RequestGuard, ServerLimits, allowed_hosts
from scratchllm.serve.logprobs import chat_logprobs, legacy_logprobs, score_prompts
from scratchllm.serve.schemas import (
    DEFAULT_CHAT_MAX_TOKENS,
    ERROR_RESPONSES,
    APIError,
    ChatRequest,
    CompletionRequest,
    _Sampling,
    _stops,
    error_body,
)
from scratchllm.serve.tokenize import TOKENIZER_PATHS, add_tokenizer_routes

log = logging.getLogger(__name__)


def create_app(
    engine: Engine,
    model_name: str = "scratchllm",
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    hosts: frozenset[str] | None = allowed_hosts("127.0.0.1"),
) -> FastAPI:
    """The ASGI app. Starts the engine's background thread on startup and stops it on shutdown.

    `hosts`: the Host header names it answers to (None: any; the default: loopback names)."""
    from contextlib import asynccontextmanager

    limits = limits or ServerLimits()
    limits.validate()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owner = not engine.running  # an engine shared with another app keeps running
        engine.start()
        try:
            yield
        finally:
            if owner:
                engine.stop()

    app = FastAPI(title="scratchllm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, hosts=hosts)
    created = int(time.time())
    context = engine.context_length

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            param = None
        elif first.get("type") == "missing" and not loc:
            message = "request body is missing: expected a JSON object"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(
            error_body(message.strip(), "invalid_request_error", param, None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return JSONResponse(
            error_body(str(exc.detail), kind, None, code), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Whatever slipped past validation still gets OpenAI's body, never a plain-text page.
        log.exception("request failed: %s %s", request.method, request.url.path)
        message = f"internal error: {type(exc).__name__}"
        return JSONResponse(error_body(message, "server_error", None, None), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        if api_key and (path.startswith("/v1/") or path in TOKENIZER_PATHS):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(
                    error_body(
                        "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                        "invalid_request_error",
                        None,
                        "invalid_api_key",
                    ),
                    status_code=401,
                )
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )

    def sampling(body: _Sampling, prompt_len: int, default_max: int | None) -> SamplingParams:
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(default_max or DEFAULT_CHAT_MAX_TOKENS, context - prompt_len))
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be ≥ 1, got {max_tokens}", "max_tokens")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=body.seed,
            stop=_stops(body.stop),
            n=body.n,
        )
        return params

    def engine_error(exc: InputError) -> APIError:
        message = str(exc)
        param = "max_tokens" if "max_tokens" in message else None
        code = "context_length_exceeded" if "context length" in message else None
        return APIError(400, message, param, code)

    def submit(ids: list[int], params: SamplingParams, on_event=None):
        try:
            return engine.submit(ids, params, on_event)
        except InputError as exc:
            raise engine_error(exc) from None

    async def run(ids: list[int], params: SamplingParams, client: Request) -> list[Completion]:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def on_event(event: Event | None) -> None:
            if event is None:
                loop.call_soon_threadsafe(done.set)

        request = submit(ids, params, on_event)

        async def watch() -> None:
            # The body is read: the next message is the client hanging up (as StreamingResponse
            # listens). A client gone mid-generation frees its rows at the next step.
            while (await client.receive())["type"] != "http.disconnect":
                pass
            request.cancel()
            loop.call_soon(done.set)

        watcher = asyncio.create_task(watch())
        try:
            await done.wait()
        finally:
            watcher.cancel()
            request.cancel()
        if request.cancelled and request.error is None and not all(request.completions):
            raise APIError(499, "client disconnected before the answer was ready")
        if request.error is not None:
            raise APIError(500, f"generation failed: {request.error}", None, None, "server_error")
        return [c for c in request.completions if c is not None]

    async def events(ids: list[int], params: SamplingParams) -> AsyncIterator[Event | None]:
        """The request's events; leaving early (client gone) cancels it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        request = submit(ids, params, lambda e: loop.call_soon_threadsafe(q.put_nowait, e))

        async def gen() -> AsyncIterator[Event | None]:
            try:
                while True:
                    event = await q.get()
                    if event is None:
                        if request.error is not None:
                            raise RuntimeError(str(request.error))
                        return
                    yield event
            finally:
                request.cancel()

        return gen()

    def usage(prompt: int, completions: list[Completion]) -> dict[str, int]:
        n = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}

    def sse(payload: dict[str, Any] | str) -> str:
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        return f"data: {data}\n\n"

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.load}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("scratchllm.serve").joinpath("static/chat.html").read_text("utf-8")
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "scratchllm",
            "context_length": context,
        }
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def model_card(name: str) -> dict[str, Any]:
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "scratchllm"}

    add_tokenizer_routes(app, engine, check_model)

    def check_tokens(encoded: list[list[int]], params: list[SamplingParams]) -> None:
        for ids, p in zip(encoded, params, strict=True):
            try:
                engine.check(ids, p)  # each prompt on its own first: the context is the limit
            except InputError as exc:
                raise engine_error(exc) from None
        check_budget(
            sum(p.n * (len(i) + p.max_tokens) for i, p in zip(encoded, params, strict=True))
        )

    def check_budget(total: int) -> None:
        if total > limits.max_request_tokens:
            raise APIError(
                400,
                f"request asks for {total:,} tokens (n × (prompt + max_tokens), summed over "
                f"prompts); this server allows {limits.max_request_tokens:,} per request",
                "max_tokens",
                "request_too_large",
            )

    def encode_all(prompts: list[str | list[int]]) -> list[list[int]]:
        encoded = []
        for n, prompt in enumerate(prompts):
            try:
                if isinstance(prompt, str):
                    ids = engine.encode(prompt)
                else:  # token ids: in the vocabulary and within the context, else 400
                    where = "prompt" if len(prompts) == 1 else f"prompt[{n}]"
                    check_prompt(prompt, engine.config.vocab_size, context, where)
                    ids = prompt
            except InputError as exc:
                message = str(exc) if str(exc).startswith("prompt") else f"prompt: {exc}"
                raise APIError(400, message, "prompt") from None
            if not ids:
                raise APIError(400, "prompt: empty prompt; give some text", "prompt")
            encoded.append(ids)
        return encoded

    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, client: Request):
        check_model(body.model)
        prompts = body.prompts()
        if not prompts or (len(prompts) > 1 and body.stream):
            raise APIError(400, "prompt: give one prompt (a list only without stream)", "prompt")
        if len(prompts) > limits.max_prompts:
            raise APIError(
                400,
                f"prompt: {len(prompts):,} prompts in one request; this server allows "
                f"{limits.max_prompts}",
                "prompt",
                "too_many_prompts",
            )
        if body.stream and body.logprobs is not None:
            raise APIError(400, "logprobs: not available with stream; ask without", "logprobs")
        score_only = body.max_tokens == 0 and not body.max_completion_tokens
        if score_only and (not body.echo or body.stream):
            message = "max_tokens: 0 only scores the prompt: give echo: true, without stream"
            raise APIError(400, message, "max_tokens")
        encoded = await asyncio.to_thread(encode_all, prompts)
        tok = engine.tokenizer
        texts = [
            p if isinstance(p, str) else tok.decode(i)
            for p, i in zip(prompts, encoded, strict=True)
        ]
        rid = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time())}
        head["model"] = model_name
        if score_only:
            check_budget(sum(body.n * len(ids) for ids in encoded))
        else:
            params_list = [sampling(body, len(ids), 16) for ids in encoded]
            for p in params_list:
                p.logprobs = body.logprobs
            check_tokens(encoded, params_list)
        if body.stream:
            params = params_list[0]
            stream = await events(encoded[0], params)
            echo = texts[0] if body.echo else ""

            async def body_iter() -> AsyncIterator[str]:
                sent_echo = set()
                async for e in stream:
                    text = e.text
                    if echo and e.index not in sent_echo:
                        text, _ = echo + text, sent_echo.add(e.index)
                    choice = {"index": e.index, "text": text, "logprobs": None}
                    choice["finish_reason"] = e.finish_reason
                    yield sse({**head, "choices": [choice]})
                yield sse("[DONE]")

            return StreamingResponse(body_iter(), media_type="text/event-stream")
        scores: list[Any] = [None] * len(encoded)
        if body.echo and body.logprobs is not None:
            scores = await score_prompts(engine, encoded, body.logprobs)
        if score_only:
            empty = [Completion(j, "", [], "length", []) for j in range(body.n)]
            results = [empty] * len(encoded)
        else:
            results = await asyncio.gather(
                *(run(ids, p, client) for ids, p in zip(encoded, params_list, strict=True))
            )
        choices, total_usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i, (text, ids, done) in enumerate(zip(texts, encoded, results, strict=True)):
            echo = text if body.echo else ""
            for c in done:
                logprobs = None
                if body.logprobs is not None:
                    prompt = (ids, scores[i]) if body.echo else (None, None)
                    logprobs = legacy_logprobs(tok, c, *prompt, echo_length=len(echo))
                choices.append(
                    {
                        "index": i * body.n + c.index,
                        "text": echo + c.text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                )
            for k, v in usage(len(ids), done).items():
                total_usage[k] += v
        return {**head, "choices": choices, "usage": total_usage}

    def encode_chat(messages: list[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
        try:
            return chat_prompt(engine.tokenizer, messages)
        except InputError as exc:
            raise APIError(400, str(exc), "messages") from None

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat(body: ChatRequest, client: Request):
        check_model(body.model)
        if not body.messages:
            raise APIError(400, "messages: give at least one message", "messages")
        messages = [m.model_dump() for m in body.messages]
        ids, template_stops = await asyncio.to_thread(encode_chat, messages)
        params = sampling(body, len(ids), None)
        check_tokens([ids], [params])
        params.stop = (*params.stop, *template_stops)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: give logprobs: true with it", "top_logprobs")
        if body.logprobs:
            if body.stream:
                raise APIError(400, "logprobs: not available with stream; ask without", "logprobs")
            params.logprobs = body.top_logprobs or 0
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "chat.completion", "created": int(time.time())}
        head["model"] = model_name
        if body.stream:
            stream = await events(ids, params)
            chunk = {**head, "object": "chat.completion.chunk"}
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def body_iter() -> AsyncIterator[str]:
                for i in range(params.n):
                    delta = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": delta, "finish_reason": None}
                    yield sse({**chunk, "choices": [choice]})
                produced = 0
                async for e in stream:
                    produced += len(e.token_ids)
                    if e.text:
                        choice = {"index": e.index, "delta": {"content": e.text}}
                        choice["finish_reason"] = None
                        yield sse({**chunk, "choices": [choice]})
                    if e.finish_reason is not None:
                        choice = {"index": e.index, "delta": {}}
                        choice["finish_reason"] = e.finish_reason
                        yield sse({**chunk, "choices": [choice]})
                if include_usage:
                    total = {"prompt_tokens": len(ids), "completion_tokens": produced}
                    total["total_tokens"] = len(ids) + produced
                    yield sse({**chunk, "choices": [], "usage": total})
                yield sse("[DONE]")

            return StreamingResponse(body_iter(), media_type="text/event-stream")
        done = await run(ids, params, client)
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(engine.tokenizer, c) if body.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in done
        ]
        return {**head, "choices": choices, "usage": usage(len(ids), done)}

    return app


def bind(host: str, port: int):
    """A listening-ready socket on host:port; `InputError` naming them when it cannot be had."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"failed: {exc.strerror}"
        raise InputError(f"--host {host} --port {port}: binding the address {reason}") from None
    return sock


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "scratchllm",
    api_key: str | None = None,
    log_level: str = "warning",
    limits: ServerLimits | None = None,
    extra_hosts: tuple[str, ...] = (),
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    sock = bind(host, port)
    app = create_app(engine, model_name, api_key, limits, allowed_hosts(host, extra_hosts))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """The server in a background thread on an already bound socket (tests, notebooks).

    `port=0` picks a free port; `url` is the base address, e.g. http://127.0.0.1:PORT.
    """

    def __init__(
        self,
        engine: Engine,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "scratchllm",
        api_key: str | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        import threading

        import uvicorn

        self.socket = bind(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        app = create_app(engine, model_name, api_key, limits, allowed_hosts(host))
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()
