"""vLLM's tokenizer routes, so that clients can count and split tokens with the served model's own
tokenizer: `GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`.

lm-evaluation-harness's `local-completions` model uses them with `tokenizer_backend=remote` (and
picks them by itself with its default `auto`): it then tokenizes contexts and continuations
exactly as the server does, whatever the tokenizer, with no Hugging Face files on the client.

- `/tokenize` `{"prompt": str}` → `{"tokens": [int], "count": int, "max_model_len": int}`
  (special-token strings in the text become special tokens, as in completions prompts)
- `/detokenize` `{"tokens": [int]}` → `{"prompt": str}` (ids outside the vocabulary: 400)
- `/tokenizer_info` → `{"eos_token", "bos_token", "pad_token", "chat_template",
  "tokenizer_class", "model_max_length"}`

With `--api-key` they need it as the `/v1/` routes do (`TOKENIZER_PATHS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictInt

from scratchllm.errors import InputError
from scratchllm.inference.engine import Engine
from scratchllm.inference.scoring import check_prompt
from scratchllm.serve.schemas import ERROR_RESPONSES, APIError, Text

TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    prompt: Text
    add_special_tokens: bool = True  # accepted for vLLM's clients; nothing is ever prepended


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    tokens: list[StrictInt]


def add_tokenizer_routes(
    app: FastAPI, engine: Engine, check_model: Callable[[str | None], None]
) -> None:
    tokenizer, context = engine.tokenizer, engine.context_length

    def encode(text: str) -> list[int]:
        try:
            return engine.encode(text)
        except InputError as exc:
            raise APIError(400, f"prompt: {exc}", "prompt") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        eos = tokenizer.eot_token if tokenizer.eot_token in tokenizer.special_tokens else None
        return {
            "eos_token": eos,
            "bos_token": getattr(tokenizer, "bos_token", None),
            "pad_token": None,
            "chat_template": tokenizer.chat_template,
            "tokenizer_class": type(tokenizer).__name__,
            "model_max_length": context,
        }

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        ids = await asyncio.to_thread(encode, body.prompt)
        return {"count": len(ids), "max_model_len": context, "tokens": ids}

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if body.tokens:
            try:
                check_prompt(body.tokens, engine.config.vocab_size, len(body.tokens), "tokens")
            except InputError as exc:
                raise APIError(400, str(exc), "tokens") from None
        return {"prompt": tokenizer.decode(body.tokens)}
