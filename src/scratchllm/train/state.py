"""Run state that exact resume needs beyond weights and optimizer: RNG streams; stop requests."""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    # Plain Python for all_gather_object (it cannot ship the CPU byte tensors themselves).
    out = dict(state)
    name, keys, *rest = state["numpy"]
    out["numpy"] = [name, keys.tolist(), *rest]
    out["torch"] = state["torch"].tolist()
    if "cuda" in state:
        out["cuda"] = [t.tolist() for t in state["cuda"]]
    return out


def _rng_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    name, keys, *rest = state["numpy"]
    out["numpy"] = [name, torch.from_numpy(np.array(keys, dtype=np.uint32)), *rest]
    out["torch"] = torch.tensor(state["torch"], dtype=torch.uint8)
    if "cuda" in state:
        out["cuda"] = [torch.tensor(t, dtype=torch.uint8) for t in state["cuda"]]
    return out


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, list | tuple) else x


# -- signals -----------------------------------------------------------------------------------
class _StopRequest:
    """SIGTERM/SIGINT set a flag that the loop checks at the next optimizer-step boundary;
    a second SIGINT raises KeyboardInterrupt at once, except inside `held()` (the optimizer
    update), where it waits for the block to end: weights and step counter move together."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}
        self._holding = False
        self._deferred = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers live in the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            if self._holding:
                self._deferred = True
                return
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    @contextmanager
    def held(self) -> Iterator[None]:
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self._deferred:
            self._deferred = False
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()
