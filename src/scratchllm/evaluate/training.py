"""Evaluation during pretraining: in-context tasks and bits per byte at each evaluation.

`pretrain --eval-tasks core --eval-limit N` builds a `TrainingEvaluation`; the LM task calls it
from its `evaluate`, so the numbers land in metrics.jsonl, the progress line and the loss plot
beside the losses. The task files are read (and checked) when it is built, before training
starts, and each evaluation runs the same seeded subset of items, so that the curve compares
like with like.

Bits per byte of the validation windows (the ones the validation loss reads): nats of the
targets over ln 2 × their UTF-8 bytes, special tokens counting neither (nanochat's
`evaluate_bpb`); each token's byte length comes from the tokenizer once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scratchllm.evaluate.core import core_score, core_suite
from scratchllm.evaluate.scoring import evaluate_tasks
from scratchllm.evaluate.tasks import DEFAULT_SEED, load_items
from scratchllm.tokenizers import Tokenizer


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each id spells; 0 for special tokens and for ids the tokenizer lacks."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    specials = set(tokenizer.special_tokens.values())
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if i in specials:
            continue
        try:
            lengths[i] = len(tokenizer.decode_bytes([i]))
        except Exception:  # an id with no bytes of its own (a gap in a vocabulary)
            lengths[i] = 0
    return lengths


class TrainingEvaluation:
    """CORE tasks (`names`: core or task names, `limit` items each) and validation bpb."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        names: Sequence[str],
        limit: int | None,
        seed: int = DEFAULT_SEED,
    ) -> None:
        self.tokenizer = tokenizer
        self.limit, self.seed = limit, seed
        self.tasks = [(spec, load_items(spec)) for spec in core_suite(names)]
        self.token_bytes = torch.from_numpy(token_byte_lengths(tokenizer, vocab_size))
        self.runs = 0

    def bits_per_byte(
        self, model: torch.nn.Module, windows: Any, batch_size: int, max_batches: int
    ) -> float:
        """bpb over the first `max_batches` batches of `windows` ((x, y) pairs)."""
        device = next(model.parameters()).device
        nats, nbytes = 0.0, 0
        n = min(len(windows), max_batches * batch_size)
        for start in range(0, n, batch_size):
            items = [windows[i] for i in range(start, min(n, start + batch_size))]
            x = torch.stack([a for a, _ in items]).to(device)
            y = torch.stack([b for _, b in items]).flatten()
            nll = F.cross_entropy(model(x).flatten(0, 1).float(), y.to(device), reduction="none")
            weight = self.token_bytes[y]
            nats += float(nll.cpu().double()[weight > 0].sum())
            nbytes += int(weight.sum())
        return nats / (math.log(2) * nbytes) if nbytes else math.nan

    def run(
        self, model: torch.nn.Module, val_windows: Any, batch_size: int, max_batches: int
    ) -> dict[str, float]:
        """{"val_bpb", "core", "core_<task>": centred score} for this evaluation."""
        out: dict[str, float] = {}
        if val_windows is not None:
            out["val_bpb"] = self.bits_per_byte(model, val_windows, batch_size, max_batches)
        results = evaluate_tasks(
            model,
            self.tokenizer,
            self.tasks,
            limit=self.limit,
            seed=self.seed,
            warn=self.runs == 0,  # the same prompts each time: say it once per run
        )
        self.runs += 1
        out["core"] = core_score([r.centered for r in results])
        out.update({f"core_{r.spec.name}": r.centered for r in results})
        return out
