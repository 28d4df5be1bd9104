"""The shuffled-task base that the fine-tuning tasks subclass (classify, instruct, DPO).

It owns what a fine-tuning task shares with every other: the training split is read in an order
shuffled anew each epoch by a generator seeded from (seed, epoch), cut into batches, and the
task's state is just (epoch, batch position), so a resumed run continues with exactly the batch it
would have taken next. A subclass adds its dataset (`collate`) and its loss and evaluation.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sized
from typing import Any, Generic, TypeVar

import torch

from scratchllm.errors import InputError
from scratchllm.settings import SettingError

S = TypeVar("S", bound=Sized)  # a split: examples, pairs, labelled ids
B = TypeVar("B")  # a collated batch, whatever the task's loss reads


class ShuffledTask(ABC, Generic[S, B]):
    """Trainer task over `splits["train"]`, in batches of `batch_size`, reshuffled each epoch.

    Subclasses implement `collate`, `loss`, `tokens_in` and `evaluate`; `sample` says nothing
    unless overridden.
    """

    def __init__(
        self,
        splits: Mapping[str, S],
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        what: str = "data",
    ) -> None:
        train = splits.get("train")
        if train is None or not len(train):
            raise InputError(f"{what}: the training split is empty")
        if batch_size < 1:
            raise SettingError("batch_size", f"must be ≥ 1, got {batch_size}")
        self.splits = splits
        self.train = train
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self.position = 0  # batches of this epoch already taken
        self._batches = self._epoch_batches()

    def epoch_batches(self, rng: random.Random) -> list[list[int]]:
        """One epoch's batches of training indices: a shuffled order cut every `batch_size`."""
        order = list(range(len(self.train)))
        rng.shuffle(order)
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _epoch_batches(self) -> list[list[int]]:
        # A generator of its own per epoch: the order depends on (seed, epoch) alone, not on how
        # much of the global RNG the model or earlier epochs used, which makes resuming exact.
        return self.epoch_batches(random.Random(self.seed * 1_000_003 + self.epoch))

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def next_batch(self) -> B:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        indices = self._batches[self.position]
        self.position += 1
        return self.collate(self.train, indices)

    def eval_batches(
        self, name: str, max_batches: int | None = None, key: Callable[[int], Any] | None = None
    ) -> list[list[int]]:
        """Indices of a split's first `max_batches` batches (all when None), in a fixed order:
        the split's own, or sorted by `key` (e.g. length, for little padding)."""
        split = self.splits.get(name)
        size = 0 if split is None else len(split)
        n = size if max_batches is None else min(size, max_batches * self.batch_size)
        order = list(range(n)) if key is None else sorted(range(n), key=key)
        return [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]

    @abstractmethod
    def collate(self, split: S, indices: list[int]) -> B:
        """The batch of `split`'s items at `indices`, on the task's device."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: B) -> torch.Tensor: ...

    @abstractmethod
    def tokens_in(self, batch: B) -> int:
        """The batch's non-padding input tokens (see `train.trainer.Task`)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]: ...

    def sample(self, model: torch.nn.Module, max_new_tokens: int) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = self._epoch_batches()
