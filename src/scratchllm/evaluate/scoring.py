"""Scoring in-context tasks: which tokens are an answer's, and the rules that pick the answer.

**Tokenization.** An option is a (context, continuation) pair of strings. The text is encoded
whole, `encode(context + continuation)`, and the continuation is every token after the longest
common prefix of that and `encode(context)`: the model reads exactly the tokens the full text
has, and the scored tokens are those the context alone does not fix. (nanochat does the same;
lm-eval takes the tokens after `len(encode(context))`, equal whenever the context's tokens are a
prefix of the whole text's, as they are after a trailing space is moved, below.) Encoding the
two parts separately would feed the model a split no tokenizer produces (`"Answer:"`, `" "`,
`"Paris"` instead of `"Answer:"`, `" Paris"`). A context that encodes to nothing gets the
end-of-text token before it, as lm-eval's prefix token, so that the first answer token has
something to be predicted from.

**The rules** (the data README; DCLM, nanochat `core_eval.py`):

- multiple choice: the option with the lowest mean loss over its tokens; schema: the context
  option under which the shared continuation has the lowest mean loss; language modelling:
  correct when greedy decoding after the context reproduces every continuation token. That is
  the same as each continuation token being the argmax given the true tokens before it, which
  is what is checked, in one forward pass.
- multiple choice also reports lm-eval's metrics, computed on lm-eval's continuation: the
  context's trailing whitespace moves to the continuation (lm-eval's `_encode_pair`). `acc`
  picks the highest summed log-probability; `acc_norm` divides it by the length of the option's
  text in characters, `len(choice)`; lm-eval (`api/task.py`, `process_results`) divides by
  characters, not bytes, and reports the byte-normalised pick as `acc_bytes`, reported here
  under that name too.

nanochat differs from this in two ways worth knowing: it prepends a BOS token to every prompt,
and for multiple choice it scores the tokens after the common prefix of all the options, so
options that begin alike (`"she poured ..."`, `"she lost ..."`) are scored without their shared
first tokens. DCLM's (llm-foundry's) scoring, followed here, averages over each option whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from scratchllm.errors import InputError
from scratchllm.evaluate.core import centered
from scratchllm.evaluate.logprobs import DEFAULT_BATCH_TOKENS, Span, SpanScore, score_spans
from scratchllm.evaluate.tasks import DEFAULT_SEED, Choice, TaskSpec, load_items, render, subset
from scratchllm.tokenizers import Tokenizer

log = logging.getLogger(__name__)
CHUNK_ITEMS = 256  # items tokenized and scored together (longest rows first within a chunk)


@dataclass
class ItemResult:
    """One item: its index in the file, whether CORE's rule got it right, and why."""

    index: int
    correct: bool
    pred: int | None = None  # CORE's pick (multiple choice, schema)
    gold: int | None = None
    mean_logprobs: list[float] = field(default_factory=list)  # CORE's criterion, per option
    loglikelihoods: list[float] = field(default_factory=list)  # lm-eval's sums (multiple choice)
    acc_pred: int | None = None
    acc_norm_pred: int | None = None
    acc_bytes_pred: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != []}


@dataclass
class TaskResult:
    spec: TaskSpec
    items: list[ItemResult]
    seconds: float = 0.0
    truncated: int = 0  # prompts cut on the left to fit the window

    @property
    def accuracy(self) -> float:
        return sum(i.correct for i in self.items) / len(self.items)

    @property
    def centered(self) -> float:
        return centered(self.accuracy, self.spec.baseline)

    def _rate(self, attr: str) -> float | None:
        if self.spec.type != "multiple_choice":
            return None
        return sum(getattr(i, attr) == i.gold for i in self.items) / len(self.items)

    @property
    def acc(self) -> float | None:
        """lm-eval's `acc` (multiple choice only)."""
        return self._rate("acc_pred")

    @property
    def acc_norm(self) -> float | None:
        """lm-eval's `acc_norm`: summed log-probability / characters of the option."""
        return self._rate("acc_norm_pred")

    @property
    def acc_bytes(self) -> float | None:
        """lm-eval's `acc_bytes`: summed log-probability / UTF-8 bytes of the option."""
        return self._rate("acc_bytes_pred")

    def summary(self) -> dict[str, Any]:
        s = self.spec
        out: dict[str, Any] = {
            "name": s.name,
            "file": str(s.path),
            "type": s.type,
            "shots": s.shots,
            "delimiter": s.delimiter,
            "baseline": s.baseline,
            "items": len(self.items),
            "accuracy": self.accuracy,
            "centered": self.centered,
        }
        if s.type == "multiple_choice":
            out.update(acc=self.acc, acc_norm=self.acc_norm, acc_bytes=self.acc_bytes)
        out["seconds"] = round(self.seconds, 3)
        out["items_per_s"] = len(self.items) / self.seconds if self.seconds > 0 else None
        out["truncated"] = self.truncated
        return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _Encoder:
    """Encodings of the contexts an item's options share, made once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}
        self.prefix_id = tokenizer.special_tokens.get(tokenizer.eot_token)

    def encode(self, text: str) -> list[int]:
        ids = self.cache.get(text)
        if ids is None:
            ids = self.cache[text] = self.tokenizer.encode_ordinary(text)
        return ids

    def span(self, choice: Choice) -> tuple[Span, int, int]:
        """The option's span and how many of its last tokens each rule scores: (span, CORE's,
        lm-eval's)."""
        full = self.tokenizer.encode_ordinary(choice.context + choice.continuation)
        core = _common_prefix(self.encode(choice.context), full)
        stripped = choice.context.rstrip()
        lm = core if stripped == choice.context else _common_prefix(self.encode(stripped), full)
        if min(core, lm) == 0:  # nothing to predict the first token from
            if self.prefix_id is None:
                raise InputError(
                    f"tokenizer {self.tokenizer.name!r} has no {self.tokenizer.eot_token} token "
                    "to put before an empty context"
                )
            full, core, lm = [self.prefix_id, *full], core + 1, lm + 1
        core = min(core, len(full) - 1)  # a continuation the tokenizer merged away: its last
        lm = min(lm, len(full) - 1)  # token still counts
        return Span(full, min(core, lm)), len(full) - core, len(full) - lm


def _decide(
    task_type: str,
    index: int,
    item: dict[str, Any],
    choices: list[Choice],
    scores: list[SpanScore],
    counts: list[tuple[int, int]],
) -> ItemResult:
    core = [s.tail(n_core) for s, (n_core, _) in zip(scores, counts, strict=True)]
    if task_type == "language_modeling":
        return ItemResult(index, bool(core[0].greedy.all()))
    means = [float(np.mean(s.logprobs)) for s in core]
    pred = int(np.argmax(means))  # the first of equals, as nanochat's min(...) index
    result = ItemResult(index, pred == item["gold"], pred, item["gold"], means)
    if task_type == "multiple_choice":
        sums = np.array(
            [
                float(s.tail(n_lm).logprobs.sum())
                for s, (_, n_lm) in zip(scores, counts, strict=True)
            ]
        )
        chars = np.array([float(len(c.answer)) for c in choices])
        nbytes = np.array([float(len(c.answer.encode("utf-8"))) for c in choices])
        result.loglikelihoods = sums.tolist()
        result.acc_pred = int(np.argmax(sums))
        result.acc_norm_pred = int(np.argmax(sums / chars))
        result.acc_bytes_pred = int(np.argmax(sums / nbytes))
    return result


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    spec: TaskSpec,
    items: list[dict[str, Any]] | None = None,
    *,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast: torch.dtype | None = None,
    pack: bool = True,
    progress: Callable[[int], None] | None = None,
) -> TaskResult:
    """Run one task: `items` (read from `spec.path` when None), or `limit` of them drawn with
    `seed`, which also draws the few-shot examples. `progress(n)` is called as `n` more items
    finish. Prompts longer than the model's window lose their left end (counted, and logged once
    by `evaluate_tasks`)."""
    items = items if items is not None else load_items(spec)
    indices = subset(len(items), limit, seed)
    encoder = _Encoder(tokenizer)
    results: list[ItemResult] = []
    truncated = 0
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(indices), CHUNK_ITEMS):
            chunk = indices[lo : lo + CHUNK_ITEMS]
            rendered, groups, counts = [], [], []
            for index in chunk:
                choices = render(spec, items, index, seed)
                spans = [encoder.span(c) for c in choices]
                rendered.append(choices)
                groups.append([s for s, _, _ in spans])
                counts.append([(a, b) for _, a, b in spans])
            encoder.cache.clear()
            scored = score_spans(
                model,
                groups,
                batch_tokens=batch_tokens,
                autocast=autocast,
                pack=pack,
                progress=progress,
            )
            truncated += scored.truncated
            for index, choices, scores, count in zip(
                chunk, rendered, scored.groups, counts, strict=True
            ):
                results.append(_decide(spec.type, index, items[index], choices, scores, count))
    finally:
        model.train(was_training)
    return TaskResult(spec, results, time.perf_counter() - started, truncated)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    tasks: Sequence[tuple[TaskSpec, list[dict[str, Any]] | None]],
    *,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast: torch.dtype | None = None,
    progress: Callable[[str, int], None] | None = None,
    warn: bool = True,
) -> list[TaskResult]:
    """`evaluate_task` for each (spec, items); `progress(task name, n)` as items finish. One
    warning line (unless `warn` is False), at the end, if any prompt was longer than the
    model's window."""
    results = []
    for spec, items in tasks:
        step = (lambda n, name=spec.name: progress(name, n)) if progress else None
        results.append(
            evaluate_task(
                model,
                tokenizer,
                spec,
                items,
                limit=limit,
                seed=seed,
                batch_tokens=batch_tokens,
                autocast=autocast,
                progress=step,
            )
        )
    cut = {r.spec.name: r.truncated for r in results if r.truncated}
    if cut and warn:
        log.warning(
            "%d prompts were longer than the model's window of %d tokens and lost their left "
            "end (%s)",
            sum(cut.values()),
            model.config.context_length,
            ", ".join(f"{k}: {v}" for k, v in cut.items()),
        )
    return results
