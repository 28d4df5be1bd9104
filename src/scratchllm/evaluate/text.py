"""Held-out text: loss (nats per token), perplexity and bits per byte.

The text is encoded with its special tokens (a `<|endoftext|>` between documents is one) and
the end-of-text token is put before it, so that every token of the text is predicted, the first
one included. Texts longer than the model's window are read in windows of `context_length`
tokens that start `stride` tokens apart (transformers' perplexity guide): each token is scored
once, in the first window that holds it with as much left context as the window allows
(`stride` = window: no overlap, every window's first tokens see little; smaller strides cost
more and see more).

Bits per byte = total nats over the scored tokens / (ln 2 × UTF-8 bytes of the text they spell).
Special tokens are left out of both sums: they are no text. Since every text byte is scored,
the byte count is the text's own, whatever the tokenizer, which is what makes bpb the number to
compare across tokenizers (loss per token is not: a token is a different amount of text in each
vocabulary). A tokenizer without an end-of-text token cannot predict the first token; that token
and its bytes are then left out (logged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.errors import InputError
from scratchllm.evaluate.logprobs import DEFAULT_BATCH_TOKENS, Span, score_spans
from scratchllm.tokenizers import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class TextResult:
    """Sums over one text (or several: `combine`); the rates are derived from them."""

    name: str
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes those tokens spell
    nats: float  # total negative log-likelihood

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def combine(results: list[TextResult], name: str = "all") -> TextResult:
    """One result over several texts: sums of sums (not a mean of rates)."""
    return TextResult(
        name,
        sum(r.tokens for r in results),
        sum(r.bytes for r in results),
        sum(r.nats for r in results),
    )


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window over `n` tokens whose first is context
    only: tokens 1..n-1 are scored, each once (transformers' perplexity guide)."""
    if stride < 1 or stride > window:
        raise InputError(f"--stride {stride}: expected 1..{window} (the model's window)")
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window + 1, n)  # a window reads `window` tokens, predicts the next
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


def evaluate_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    text: str,
    *,
    name: str = "text",
    stride: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> TextResult:
    """Loss, perplexity and bits per byte of `text` (sliding windows of the model's context,
    `stride` apart; default half the window). `progress(n)` as `n` more windows finish."""
    window = model.config.context_length
    stride = stride if stride is not None else max(1, window // 2)
    specials = tokenizer.special_tokens
    ids = tokenizer.encode(text, allow_special=True)
    eot = specials.get(tokenizer.eot_token)
    skipped_bytes = 0
    if eot is not None:
        ids = [eot, *ids]
    elif ids:
        log.warning(
            "%s: tokenizer %r has no %s token; the first token is not scored",
            name,
            tokenizer.name,
            tokenizer.eot_token,
        )
        skipped_bytes = len(tokenizer.decode_bytes(ids[:1]))
    special_ids = set(specials.values())
    nbytes = len(text.encode("utf-8")) - skipped_bytes
    for special in specials:
        nbytes -= text.count(special) * len(special.encode("utf-8"))
    spans = [[Span(ids[b:e], first - b)] for b, e, first in windows(len(ids), window, stride)]
    was_training = model.training
    model.eval()
    try:
        scored = score_spans(
            model, spans, batch_tokens=batch_tokens, autocast=autocast, progress=progress
        )
    finally:
        model.train(was_training)
    nats, tokens = 0.0, 0
    for (span,), (score,) in zip(spans, scored.groups, strict=True):
        targets = np.asarray(span.ids[span.first :])
        keep = ~np.isin(targets, list(special_ids)) if special_ids else np.ones(len(targets), bool)
        nats -= float(score.logprobs[keep].sum())
        tokens += int(keep.sum())
    return TextResult(name, tokens, nbytes, nats)


def read_utf8(path: str | Path, what: str, expected: str) -> str:
    """A UTF-8 file's text (a BOM dropped); `InputError` naming `what` and the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory, expected {expected}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"{what} {path}:{line}: not valid UTF-8") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a BOM is dropped, line ends kept as they are)."""
    text = read_utf8(path, "--text", "a text file")
    if not text.strip():
        raise InputError(f"--text {path}: the file is empty")
    return text
