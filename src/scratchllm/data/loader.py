"""Training batches from token ids (book chapter 2's dataset, plus a resumable loader).

`SlidingWindowDataset` is the book's `GPTDatasetV1` over ids that are already tokenized.
`BatchLoader` is what the trainer uses: deterministic given a seed, split across ranks, and
resumable mid-epoch from `state_dict()`. Both take one array or a `ConcatTokens`, the shards of
a prepared folder read as one stream by memory map: the windows, and so the batches, are those
of the concatenated file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from scratchllm.errors import InputError

log = logging.getLogger(__name__)

MODES = ("sliding", "random")


class ConcatTokens:
    """Token arrays (memory-mapped shards) read as one: `len`, slices and integer-array indexing
    as on their concatenation, without concatenating. A slice within one part is that part's
    view; one across parts is a ConcatTokens (no copy either way)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [np.asarray(p).reshape(-1) for p in parts if len(p)]
        sizes = [len(p) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def locate(self, index: int) -> tuple[int, int]:
        """(part, offset in it) of token `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"token {index} out of range for {len(self)} tokens")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return part, int(index - self.starts[part])

    def _slice(self, start: int, stop: int) -> np.ndarray | ConcatTokens:
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first, a = self.locate(start)
        last, b = self.locate(stop - 1)
        if first == last:
            return self.parts[first][a : b + 1]
        middle = self.parts[first + 1 : last]
        return ConcatTokens([self.parts[first][a:], *middle, self.parts[last][: b + 1]])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("ConcatTokens: slices with a step are not supported")
            return self._slice(start, stop)
        if isinstance(key, int | np.integer):
            i = int(key) + (len(self) if key < 0 else 0)
            part, offset = self.locate(i)
            return self.parts[part][offset]
        index = np.asarray(key, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        flat = index.reshape(-1)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for part in np.unique(which).tolist():  # a batch touches one or two shards
            mask = which == part
            out[mask] = self.parts[part][flat[mask] - self.starts[part]]
        return out.reshape(index.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __repr__(self) -> str:
        return f"ConcatTokens(parts={len(self.parts)}, tokens={len(self)}, dtype={self.dtype})"


Tokens = np.ndarray | ConcatTokens


def as_tokens(tokens: Any) -> Tokens:
    """A flat array, or the ConcatTokens given (its shards stay on disk)."""
    if isinstance(tokens, ConcatTokens):
        return tokens.parts[0] if len(tokens.parts) == 1 else tokens
    return np.asarray(tokens).reshape(-1)


def split_tokens(tokens: Tokens, val_fraction: float) -> tuple[Tokens, Tokens]:
    """Contiguous split: the first (1 - f) of the tokens train, the last f validate (views)."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction}: expected a number in [0, 1)")
    tokens = as_tokens(tokens)
    n_val = int(len(tokens) * val_fraction)
    n_train = len(tokens) - n_val
    return tokens[:n_train], tokens[n_train:]


def num_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """Windows in `range(0, n_tokens - context_length, stride)`, the book's loop."""
    return len(range(0, n_tokens - context_length, stride))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise InputError(f"{name} {value!r}: expected a positive integer")


class SlidingWindowDataset(Dataset):
    """The book's GPTDatasetV1 over token ids: window i is tokens[i*stride : i*stride + C].

    The book builds its windows with
        for i in range(0, len(token_ids) - max_length, stride):
            input_chunk = token_ids[i : i + max_length]
            target_chunk = token_ids[i + 1 : i + max_length + 1]
    and this class gives exactly those windows, in that order: ceil((N - C) / stride) of them
    (none when N <= C). Windows are sliced on access, so a memory-mapped array stays on disk.
    """

    def __init__(self, tokens: Tokens, context_length: int, stride: int) -> None:
        _check_positive("context_length", context_length)
        _check_positive("stride", stride)
        self.tokens = as_tokens(tokens)
        self.context_length = int(context_length)
        self.stride = int(stride)
        self._len = num_windows(len(self.tokens), self.context_length, self.stride)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range for {self._len} windows")
        start = index * self.stride
        chunk = np.array(self.tokens[start : start + self.context_length + 1], dtype=np.int64)
        x = torch.from_numpy(chunk[:-1].copy())
        y = torch.from_numpy(chunk[1:].copy())
        return x, y


class BatchLoader:
    """Endless, resumable (x, y) batches of shape (batch_size, context_length) for training.

    mode "sliding": the windows of `SlidingWindowDataset` (stride defaults to context_length);
    each epoch visits them in an order drawn from `default_rng((seed, epoch))` (or in order with
    shuffle=False). Rank r of world_size takes windows r, r + world_size, ... of that order, so
    ranks read disjoint data; every rank gets the same number of windows (the few left over
    when the count does not divide are skipped that epoch) so they stay in step.

    mode "random": each batch takes batch_size random start offsets, drawn from
    `default_rng((seed, epoch, step, rank))`; for corpora too big to walk window by window. An
    epoch is then len(tokens) // (batch_size * context_length * world_size) batches.

    The position advances with every batch and rolls into the next epoch on its own; after
    `load_state_dict(state_dict())` the batches continue exactly as if never interrupted.
    """

    def __init__(
        self,
        tokens: Tokens,
        batch_size: int,
        context_length: int,
        mode: str = "sliding",
        stride: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("context_length", context_length)
        _check_positive("world_size", world_size)
        if stride is not None:
            _check_positive("stride", stride)
        if mode not in MODES:
            raise InputError(f"loader mode {mode!r}: expected one of {', '.join(MODES)}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank}: expected 0 <= rank < world_size ({world_size})")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise InputError(f"seed {seed!r}: expected a non-negative integer")
        self.tokens = as_tokens(tokens)
        n = len(self.tokens)
        if n < context_length + 1:
            raise InputError(
                f"corpus has {n} tokens, fewer than one context window of "
                f"{context_length}+1 = {context_length + 1} (context_length + 1 target)"
            )
        self.batch_size = int(batch_size)
        self.context_length = int(context_length)
        self.mode = mode
        self.stride = int(stride if stride is not None else context_length)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

        if mode == "sliding":
            self.num_windows = num_windows(n, self.context_length, self.stride)
            self.windows_per_rank = self.num_windows // self.world_size
            if drop_last:
                batches = self.windows_per_rank // self.batch_size
            else:
                batches = -(-self.windows_per_rank // self.batch_size)
            if batches == 0:
                raise InputError(
                    f"batch size {batch_size} is too large for the data: {n} tokens give "
                    f"{self.num_windows} windows of {context_length} tokens (stride {self.stride})"
                    f", {self.windows_per_rank} per rank over {world_size} rank(s); lower "
                    "batch_size or context_length, or add data"
                )
        else:
            self.num_windows = n - self.context_length  # possible start offsets
            self.windows_per_rank = self.num_windows
            per_batch = self.batch_size * self.context_length * self.world_size
            batches = n // per_batch
            if batches == 0 and not drop_last:
                batches = 1
            if batches == 0:
                raise InputError(
                    f"batch size {batch_size} x context length {context_length} x "
                    f"{world_size} rank(s) = {per_batch} tokens per step is too large for the "
                    f"data's {n} tokens; lower batch_size or context_length, or add data"
                )
        self._batches_per_epoch = int(batches)

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def __len__(self) -> int:
        return self._batches_per_epoch

    # -- batch selection ---------------------------------------------------------------------------
    def _rank_order(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch` (cached: one permutation per epoch)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                order = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            self._order = order[self.rank :: self.world_size][: self.windows_per_rank]
            self._order_epoch = epoch
        return self._order

    def _starts(self, epoch: int, step: int) -> np.ndarray:
        if self.mode == "sliding":
            lo = step * self.batch_size
            return self._rank_order(epoch)[lo : lo + self.batch_size] * self.stride
        rng = np.random.default_rng((self.seed, epoch, step, self.rank))
        # Start offsets 0 .. N-C-1, so the shifted target still ends inside the array.
        return rng.integers(0, self.num_windows, size=self.batch_size)

    def _gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # A fresh int64 array per batch: nothing aliases the (possibly memory-mapped) tokens.
        index = starts.astype(np.int64)[:, None] + np.arange(self.context_length + 1)
        block = np.array(self.tokens[index], dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(block[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(block[:, 1:]))
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) int64 batch; y is x shifted by one token. Rolls over epochs."""
        batch = self._gather(self._starts(self.epoch, self.position))
        self.position += 1
        if self.position >= self._batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The remaining batches of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    # -- resuming ----------------------------------------------------------------------------------
    def next_location(self) -> tuple[int, int]:
        """(shard, offset in it) where the next batch's first window starts (shard 0 of one)."""
        starts = self._starts(self.epoch, self.position)
        first = int(starts[0]) if len(starts) else 0
        if isinstance(self.tokens, ConcatTokens):
            return self.tokens.locate(first)
        return 0, first

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is: epoch and batch position, which fix every later batch, and the
        (shard, offset) of the next window as a check. Plain ints and strings only (safe for
        weights_only loading)."""
        shard, offset = self.next_location()
        return {
            "epoch": self.epoch,
            "position": self.position,
            "shard": shard,
            "offset": offset,
            "seed": self.seed,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "context_length": self.context_length,
            "stride": self.stride,
            "world_size": self.world_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`. A changed configuration is allowed but logged: the position
        then no longer names the same data."""
        try:
            epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                "loader state: expected integer 'epoch', 'position' and 'seed' entries, got "
                f"keys {sorted(state)}"
            ) from None
        if epoch < 0 or position < 0 or seed < 0:
            raise InputError(
                f"loader state: epoch {epoch}, position {position}, seed {seed}; expected >= 0"
            )
        current = self.state_dict()
        changed = [
            f"{key} {state[key]} -> {current[key]}"
            for key in (
                "mode",
                "batch_size",
                "context_length",
                "stride",
                "world_size",
                "num_tokens",
            )
            if key in state and state[key] != current[key]
        ]
        if changed:
            log.warning("resuming the data loader with a changed setup: %s", ", ".join(changed))
        self.epoch, self.position, self.seed = epoch, position, seed
        self._order_epoch = -1  # the seed may have changed
        if self.position >= self._batches_per_epoch:
            self.epoch += 1
            self.position = 0
        saved = (state.get("shard"), state.get("offset"))
        if not changed and None not in saved and saved != self.next_location():
            log.warning(
                "resuming the data loader: the next window was at shard %s offset %s, now at "
                "%s offset %s; the data changed",
                *saved,
                *self.next_location(),
            )

    def __repr__(self) -> str:
        return (
            f"BatchLoader(mode={self.mode!r}, tokens={len(self.tokens)}, "
            f"batch_size={self.batch_size}, context_length={self.context_length}, "
            f"batches_per_epoch={self._batches_per_epoch}, epoch={self.epoch}, "
            f"position={self.position}, rank={self.rank}/{self.world_size})"
        )
