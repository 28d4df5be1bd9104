"""Request bodies of the OpenAI-compatible API and its error format.

Every sampling field is checked here, at the boundary: numbers finite and in range, seeds within
the 64 bits a generator takes, text valid Unicode (a lone surrogate such as "\\ud800" is legal
JSON but no UTF-8 text). A body that passes cannot make the engine fail.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DEFAULT_CHAT_MAX_TOKENS = 512
MAX_TOP_LOGPROBS = 20  # the most alternatives per position (OpenAI: 5 legacy, 20 chat)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, as every 4xx/5xx answer of this server carries it."""

    error: ErrorDetail


# What the generation routes may answer besides 200 (listed in the OpenAPI schema).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a field out of range, bad JSON, over a limit"},
    401: {"model": ErrorBody, "description": "missing or wrong API key"},
    404: {"model": ErrorBody, "description": "unknown model"},
    413: {"model": ErrorBody, "description": "request body larger than the server allows"},
}


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(f"contains a lone surrogate \\u{ord(bad):04x}, not Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """A prompt as OpenAI takes it: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return [_unicode(p) for p in value]
    if _is_ids(value) or (isinstance(value, list) and all(_is_ids(p) for p in value)):
        return value
    raise ValueError(
        "expected a string, a list of strings, a list of token ids (integers) or a list of "
        "such lists"
    )


class _Sampling(BaseModel):
    """Settings shared by both generation routes; unknown fields are ignored as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    # CTRL's penalty divides or multiplies scores: beyond 1e±4 it only reorders what it already
    # has, so a wider range serves nobody.
    repetition_penalty: float = Field(1.0, ge=1e-4, le=1e4, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    # Text, texts, token ids, or lists of token ids (as OpenAI accepts); ids are checked
    # against the vocabulary by the route.
    prompt: Annotated[Any, AfterValidator(_prompt)]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(t, int) for t in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    role: Text
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop strings", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: stop strings must be non-empty", "stop")
    return tuple(stops)
