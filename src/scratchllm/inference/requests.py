"""What a request to the engine is: its sampling settings, its finished samples and streamed
pieces, and the `Request` object the stepping thread reports to.

`SamplingParams.logprobs` asks for the log-probability of every generated token (and the `k` most
likely tokens at each step): log_softmax of the model's raw logits, before repetition penalty,
temperature, top-k and top-p, i.e. the model's own distribution, not the sampling one (what
scoring and lm-evaluation-harness need; greedy decoding picks its argmax either way).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scratchllm.errors import InputError

log = logging.getLogger("scratchllm.inference.engine")


@dataclass
class TokenLogprob:
    """One position's log-probability: the token there, and the `k` most likely ones."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, log-probability), most likely first


@dataclass
class SamplingParams:
    """How to continue one prompt. Temperature 0 is greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_ids: tuple[int, ...] | None = None  # None: the tokenizer's `stop_ids`
    n: int = 1  # samples of the same prompt (they share one prefill)
    logprobs: int | None = None  # k: record each token's log-probability and the k likeliest

    def validate(self) -> None:
        """Raise `InputError` naming the first setting out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if self.temperature < 0:
            raise InputError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not isinstance(self.n, int) or self.n < 1:
            raise InputError(f"n must be a positive integer, got {self.n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop: every stop string must be a non-empty string")
        k = self.logprobs
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise InputError(f"logprobs must be None or an integer ≥ 0, got {k!r}")


@dataclass
class Completion:
    """One finished sample: its text (cut at a stop string), token ids and why it ended.

    `logprobs` (with `SamplingParams.logprobs`): one entry per generated token, in order, and one
    more for the stop id that ended the sample, if one did (it is not in `token_ids`)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop id or stop string) | "length" | "cancelled"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Event:
    """A streamed piece of sample `index`; the last piece of a sample carries `finish_reason`."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


_request_ids = itertools.count()


class Request:
    """A prompt in the engine. Events reach `on_event` from the stepping thread; `None` last."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Event | None], Any] | None = None,
    ) -> None:
        self.id = next(_request_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.cancelled = False
        self.error: BaseException | None = None
        self.completions: list[Completion | None] = [None] * params.n
        self.done = threading.Event()
        self._open = params.n

    def cancel(self) -> None:
        """Stop generating for this request; its rows leave the batch at the next step."""
        self.cancelled = True

    def _send(self, event: Event | None) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a consumer that went away (closed event loop): stop working for it
            log.debug("request %d: event consumer failed; cancelling", self.id, exc_info=True)
            self.cancelled = True

    def _complete(self, completion: Completion) -> None:
        self.completions[completion.index] = completion
        self._open -= 1
        if self._open == 0:
            self._finish()

    def _fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self._finish()

    def _finish(self) -> None:
        self.done.set()
        self._send(None)
