"""Log-probabilities of chosen tokens, many sequences per forward pass: the engine every
evaluation here runs on.

A request is a `Span`: token ids and the index of the first token to score; the answer, per
span, is the log-probability of each scored token given everything before it and whether it is
the model's greedy (argmax) choice there. Requests come in groups (the options of one item).

- **Left truncation.** A span longer than the model's window keeps its last `context_length + 1`
  tokens (the model reads all but the last), as lm-eval's HF backend does; `Scores.truncated`
  counts them so the caller can say so once.
- **Shared prefixes.** The options of an item usually share a long prefix (few-shot examples
  and the question); a group is packed into one row, `prefix | option 1 | option 2 | ...`, each
  option attending to the prefix and to itself only, with its own positions, so the prefix is
  computed once instead of once per option. A group whose packed row would not fit the window
  is scored as one row per span.
- **Bins.** Short rows (most 0-shot prompts) are joined, first fit longest first, into bins of
  up to `BIN_TOKENS` tokens, each keeping its own positions and attending only to itself: padding
  a batch of 20-token prompts to its longest would waste about a third of the work. (Bins are
  kept short because attention over a bin costs its length squared, masked parts included.)
- **Batching.** Rows, sorted by length, are right-padded into batches of at most `batch_tokens`
  tokens. Causal attention keeps the padding out of the real tokens; only packed rows (shared
  prefixes, bins) need a mask.
- **Only the scored positions** go through the output head and the log-softmax: with a 50k
  vocabulary that is most of the work a full-logits pass would do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from scratchllm.errors import InputError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]  # called with the number of groups just finished
DEFAULT_BATCH_TOKENS = 8192
BIN_TOKENS = 256  # short rows are joined into rows of up to this many tokens


@dataclass(frozen=True)
class Span:
    """Token ids and the index of the first of them to score (≥ 1: a token needs a context)."""

    ids: Sequence[int]
    first: int


@dataclass
class SpanScore:
    """Per scored token: its log-probability and whether it is the argmax there. A span cut on
    the left may have lost some of its first scored tokens; the arrays then hold the rest."""

    logprobs: np.ndarray
    greedy: np.ndarray

    def tail(self, n: int) -> SpanScore:
        """The scores of the last `n` tokens."""
        return SpanScore(self.logprobs[-n:], self.greedy[-n:]) if n else self._empty()

    def _empty(self) -> SpanScore:
        return SpanScore(self.logprobs[:0], self.greedy[:0])


@dataclass
class Scores:
    groups: list[list[SpanScore]]
    truncated: int = 0  # spans cut on the left to fit the window
    rows: int = 0  # rows actually run (fewer than spans where prefixes were shared)
    tokens: int = 0  # tokens the model read


@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared prefix (or the only segment), k: option k
    blocks: list[int] = field(default_factory=list)  # which joined row a token is of (bins)
    # (group, span, hidden index of each scored token's context, target ids)
    outputs: list[tuple[int, int, list[int], list[int]]] = field(default_factory=list)


def resolve_autocast(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `--dtype`: auto = bf16 where it is fast (a CUDA GPU with bf16, a
    CPU with native bf16 kernels), else none (float32)."""
    from scratchllm.train.throughput import cpu_has_native_bf16

    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        raise InputError(f"--dtype {dtype!r}: expected auto, float32 or bfloat16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


def _fit(span: Span, window: int) -> tuple[list[int], int, bool]:
    ids, first = list(span.ids), span.first
    if len(ids) - 1 <= window:
        return ids, first, False
    cut = len(ids) - 1 - window
    return ids[cut:], max(1, first - cut), True


def _common_prefix(seqs: list[list[int]]) -> int:
    shortest = min(len(s) for s in seqs)
    for i in range(shortest):
        token = seqs[0][i]
        if any(s[i] != token for s in seqs[1:]):
            return i
    return shortest


def _plain_row(g: int, s: int, ids: list[int], first: int) -> _Row:
    n = len(ids) - 1  # the last token is only ever a target
    row = _Row(ids[:n], list(range(n)), [0] * n)
    row.outputs.append((g, s, list(range(first - 1, n)), ids[first:]))
    return row


def _packed_row(g: int, spans: list[tuple[list[int], int]], shared: int) -> _Row:
    """`prefix | option 1 | ...`: option k's tokens after the shared `prefix` sit in segment k."""
    base = spans[0][0][:shared]
    row = _Row(list(base), list(range(shared)), [0] * shared)
    for k, (ids, first) in enumerate(spans):
        own = ids[shared:-1]  # the option's tokens the model reads
        offset = len(row.tokens)
        row.tokens += own
        row.positions += range(shared, shared + len(own))
        row.segments += [k + 1] * len(own)
        # the context of target t is token t - 1: in the prefix, or in this option's segment
        hidden = [
            t - 1 if t - 1 < shared else offset + t - 1 - shared for t in range(first, len(ids))
        ]
        row.outputs.append((g, k, hidden, ids[first:]))
    return row


def _rows(
    groups: Sequence[Sequence[Span]], window: int, share_prefix: bool
) -> tuple[list[_Row], int]:
    rows: list[_Row] = []
    truncated = 0
    for g, group in enumerate(groups):
        fitted = []
        for span in group:
            if span.first < 1 or span.first >= len(span.ids):
                raise ValueError(f"span scores from {span.first} of {len(span.ids)} tokens")
            ids, first, cut = _fit(span, window)
            truncated += cut
            fitted.append((ids, first))
        shared = _common_prefix([ids for ids, _ in fitted]) if len(fitted) > 1 else 0
        # the prefix may not swallow an option whole: each keeps at least its last token
        shared = min([shared] + [len(ids) - 1 for ids, _ in fitted])
        packed = shared + sum(len(ids) - 1 - shared for ids, _ in fitted)
        if share_prefix and shared > 0 and packed <= window:
            rows.append(_packed_row(g, fitted, shared))
        else:
            rows.extend(_plain_row(g, s, ids, first) for s, (ids, first) in enumerate(fitted))
    return rows, truncated


def _bins(rows: list[_Row], capacity: int) -> list[_Row]:
    """Rows shorter than `capacity` joined, first fit longest first, into rows of at most it."""
    bins: list[_Row] = [r for r in rows if len(r.tokens) >= capacity]  # already full
    open_bins: list[_Row] = []
    for row in sorted(rows, key=lambda r: len(r.tokens), reverse=True):
        size = len(row.tokens)
        if size >= capacity:
            continue
        home = next((b for b in open_bins if len(b.tokens) + size <= capacity), None)
        if home is None:
            home = _Row([], [], [], [])
            open_bins.append(home)
        offset, block = len(home.tokens), (home.blocks[-1] + 1 if home.blocks else 0)
        home.tokens += row.tokens
        home.positions += row.positions
        home.segments += row.segments
        home.blocks += [block] * size
        home.outputs += [(g, s, [h + offset for h in hid], t) for g, s, hid, t in row.outputs]
    return bins + open_bins


def _batches(rows: list[_Row], batch_tokens: int) -> list[list[_Row]]:
    """Rows longest first, cut into batches of at most `batch_tokens` padded tokens."""
    order = sorted(rows, key=lambda r: len(r.tokens), reverse=True)
    batches: list[list[_Row]] = []
    for row in order:
        if batches and len(batches[-1][0].tokens) * (len(batches[-1]) + 1) <= batch_tokens:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _mask(blocks: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) True where a query may attend: causally, within its own joined row, to the
    shared prefix or its own segment (padding, block and segment -1, attends to padding only)."""
    t = segments.shape[1]
    idx = torch.arange(t, device=segments.device)
    causal = idx[:, None] >= idx[None, :]
    q, k = segments[:, :, None], segments[:, None, :]
    same_block = blocks[:, :, None] == blocks[:, None, :]
    return (causal[None] & same_block & ((k == 0) | (k == q)))[:, None]


@torch.no_grad()
def _run_batch(
    model: torch.nn.Module, batch: list[_Row], device: torch.device, amp: torch.dtype | None
) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor, list[int]]:
    width = len(batch[0].tokens)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    for i, row in enumerate(batch):
        tokens[i, : len(row.tokens)] = torch.tensor(row.tokens)
    packed = any(max(row.segments + row.blocks, default=0) > 0 for row in batch)
    positions = mask = None
    if packed:
        positions = torch.zeros(len(batch), width, dtype=torch.long)
        segments = torch.full((len(batch), width), -1, dtype=torch.long)
        blocks = torch.full((len(batch), width), -1, dtype=torch.long)
        for i, row in enumerate(batch):
            positions[i, : len(row.positions)] = torch.tensor(row.positions)
            segments[i, : len(row.segments)] = torch.tensor(row.segments)
            blocks[i, : len(row.tokens)] = torch.tensor(row.blocks or [0] * len(row.tokens))
        positions, mask = positions.to(device), _mask(blocks.to(device), segments.to(device))
    keys, row_index, hidden_index, targets, sizes = [], [], [], [], []
    for i, row in enumerate(batch):
        for g, s, hidden, target in row.outputs:
            keys.append((g, s))
            row_index += [i] * len(hidden)
            hidden_index += hidden
            targets += target
            sizes.append(len(hidden))
    amp_ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with amp_ctx:
        states = model(tokens.to(device), positions=positions, attn_mask=mask, return_hidden=True)
        picked = states[
            torch.tensor(row_index, device=device), torch.tensor(hidden_index, device=device)
        ]
        logits = model.head_logits(picked).float()
    target_t = torch.tensor(targets, device=device)
    logprobs = logits.log_softmax(-1).gather(1, target_t[:, None])[:, 0]
    greedy = logits.argmax(-1) == target_t
    return keys, logprobs.double().cpu(), greedy.cpu(), sizes


def score_spans(
    model: torch.nn.Module,
    groups: Sequence[Sequence[Span]],
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast: torch.dtype | None = None,
    pack: bool = True,
    progress: ProgressFn | None = None,
) -> Scores:
    """Score every span of every group; `groups[g][s]` ↔ `Scores.groups[g][s]`. `pack=False`
    runs one plain row per span (no shared prefixes, no bins): the reference the tests use."""
    if getattr(model.config, "num_classes", None):
        raise InputError("checkpoint is a classifier (its head predicts classes, not tokens)")
    window = model.config.context_length
    device = next(model.parameters()).device
    rows, truncated = _rows(groups, window, pack)
    if pack:
        rows = _bins(rows, min(window, BIN_TOKENS))
    out: list[list[SpanScore | None]] = [[None] * len(g) for g in groups]
    pending = [len(g) for g in groups]
    tokens = 0
    for batch in _batches(rows, max(batch_tokens, window)):
        keys, logprobs, greedy, sizes = _run_batch(model, batch, device, autocast)
        tokens += sum(len(r.tokens) for r in batch)
        start, finished = 0, 0
        for (g, s), n in zip(keys, sizes, strict=True):
            lp, gr = logprobs[start : start + n].numpy(), greedy[start : start + n].numpy()
            out[g][s] = SpanScore(lp, gr)
            start += n
            pending[g] -= 1
            finished += pending[g] == 0
        if progress is not None and finished:
            progress(finished)
    return Scores([list(g) for g in out], truncated, len(rows), tokens)  # type: ignore[arg-type]
