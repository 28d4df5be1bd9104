"""What the trainer talks to: the `Task` it runs, the `TrainResult` it returns and the
`TrainingDiverged` error it raises (re-exported by `train/trainer.py`, where they are usually
imported from, beside the `TrainerCallback` it reports to)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from scratchllm.errors import ScratchLLMError

if TYPE_CHECKING:
    from scratchllm.model.gpt import GPTModel


class TrainingDiverged(ScratchLLMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Task(Protocol):
    """What a training task provides. Batches are whatever `loss` understands.

    Under torchrun `loss` receives the wrapped (DDP/FSDP/compiled) model; `evaluate` and
    `sample` receive the plain module.

    `tokens_in` is the tokens the model processes: the batch's non-padding input tokens (both
    sequences of a DPO pair), whatever the loss masks, so tokens/s and MFU compare across tasks."""

    def steps_per_epoch(self) -> int: ...  # micro-batches in one pass over the training data

    def next_batch(self) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def tokens_in(self, batch: Any) -> int: ...

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]: ...

    def sample(self, model: GPTModel, max_new_tokens: int) -> str | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    interrupted: str | None = None  # "SIGTERM"/"SIGINT" when a signal stopped the run early
