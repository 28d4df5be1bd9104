"""THE training loop. Pretraining and every fine-tuning task run through `Trainer`.

A task supplies batches, a loss and an evaluation (see `Task`); the trainer owns everything
else: AdamW with decoupled weight decay on ≥2-D weights only, warmup + cosine schedule,
gradient accumulation and clipping, optional bf16 autocast, periodic evaluation with a text
sample, `metrics.jsonl` + a loss-curve PNG, atomic checkpoints and `--resume`.
The trainer never prints: it reports to a `TrainerCallback` (the CLI draws a progress bar).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from scratchllm.errors import InputError, ScratchLLMError
from scratchllm.model.gpt import GPTModel
from scratchllm.tokenizer import Tokenizer
from scratchllm.train.checkpoint import load_train_state, save_checkpoint
from scratchllm.train.metrics import MetricsLog, plot_losses
from scratchllm.train.schedule import lr_at
from scratchllm.utils import parse_dtype, pick_device, seed_everything

log = logging.getLogger(__name__)


class TrainingDiverged(ScratchLLMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one run."""

    max_steps: int | None = None  # optimizer steps; with `epochs` the smaller one wins
    epochs: float | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 4e-4
    min_lr: float | None = None  # cosine floor; defaults to lr / 10
    warmup_steps: int | None = None  # defaults to 5% of the steps (at most 200)
    schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0  # 0: save at each evaluation and at the end
    log_every: int = 10
    dtype: str = "float32"  # autocast dtype: float32 (off) or bfloat16
    device: str = "auto"
    seed: int = 123
    sample_tokens: int = 40

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise InputError(
                    f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}"
                )
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be ≥ 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise InputError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise InputError(f"--lr must be > 0, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InputError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"schedule must be cosine or constant, got {self.schedule!r}")


class Task(Protocol):
    """What a training task provides. Batches are whatever `loss` understands."""

    def steps_per_epoch(self) -> int: ...  # micro-batches in one pass over the training data

    def next_batch(self) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def tokens_in(self, batch: Any) -> int: ...

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]: ...

    def sample(self, model: GPTModel, max_new_tokens: int) -> str | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainerCallback:
    """Hooks the trainer calls; the default does nothing."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Trainer, record: dict[str, Any], sample: str | None) -> None: ...

    def on_save(self, trainer: Trainer, path: Path) -> None: ...

    def on_end(self, trainer: Trainer, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device):
    """AdamW; weight decay only on ≥2-D weights (matmuls, embeddings), not on norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **extra)


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


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, list | tuple) else x


class Trainer:
    """Runs `task` on `model` under `config`, writing everything into `out_dir`."""

    def __init__(
        self,
        model: GPTModel,
        task: Task,
        config: TrainConfig,
        out_dir: str | Path,
        tokenizer: Tokenizer,
        meta: dict[str, Any] | None = None,
        callback: TrainerCallback | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.task = task
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.callback = callback or TrainerCallback()
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.step = 0
        self.tokens = 0
        self.best_val = math.inf
        self.total_steps = self._total_steps()
        self.warmup_steps = (
            config.warmup_steps
            if config.warmup_steps is not None
            else min(200, int(0.05 * self.total_steps))
        )
        self.min_lr = config.min_lr if config.min_lr is not None else config.lr / 10
        autocast_dtype = parse_dtype(config.dtype)
        self.autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype)
            if autocast_dtype != torch.float32
            else nullcontext()
        )
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _total_steps(self) -> int:
        per_epoch = max(1, self.task.steps_per_epoch() // self.config.grad_accum_steps)
        candidates = []
        if self.config.epochs is not None:
            candidates.append(max(1, math.ceil(self.config.epochs * per_epoch)))
        if self.config.max_steps is not None:
            candidates.append(self.config.max_steps)
        return min(candidates) if candidates else per_epoch

    def steps_per_epoch(self) -> int:
        return max(1, self.task.steps_per_epoch() // self.config.grad_accum_steps)

    # -- state ---------------------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "best_val": self.best_val,
            "optimizer": self.optimizer.state_dict(),
            "task": self.task.state_dict(),
            "rng": rng_state(),
            "train_config": dataclasses.asdict(self.config),
            "first_eval": self.first_eval,
        }

    def save(self) -> Path:
        meta = {**self.meta, "step": self.step, "tokens": self.tokens}
        if self.last_eval:
            meta["eval"] = self.last_eval
        path = save_checkpoint(
            self.checkpoint_dir, self.model, self.tokenizer, meta, self.train_state()
        )
        self.callback.on_save(self, path)
        return path

    def resume(self) -> None:
        """Continue from `out_dir/checkpoint`: weights, optimizer, step, data position, RNG."""
        from scratchllm.train.checkpoint import (
            load_state_dict,
            load_weights_into,
            resolve_checkpoint_dir,
        )

        path = resolve_checkpoint_dir(self.checkpoint_dir)
        state = load_train_state(path)
        if state is None:
            raise InputError(f"--resume: {path} has no train_state.pt to resume from")
        load_weights_into(self.model, load_state_dict(path), str(path / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_val = float(state["best_val"])
        self.first_eval = dict(state.get("first_eval", {}))
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast:
                result = self.task.evaluate(self.model, self.config.eval_batches)
        finally:
            self.model.train()
        return result

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        if resume:
            self.resume()
        else:
            seed_everything(cfg.seed)
        self.model.train()
        self.callback.on_start(self)
        if self.step == 0 and not self.first_eval:
            self.first_eval = self._eval_and_log()
        start_time, start_tokens = time.perf_counter(), self.tokens
        window_time, window_tokens = start_time, self.tokens
        try:
            while self.step < self.total_steps:
                lr = lr_at(
                    self.step,
                    cfg.lr,
                    self.total_steps,
                    self.warmup_steps,
                    self.min_lr,
                    cfg.schedule,
                )
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=self.device)
                for _ in range(cfg.grad_accum_steps):
                    batch = self.task.next_batch()
                    with self.autocast:
                        loss = self.task.loss(self.model, batch)
                    (loss / cfg.grad_accum_steps).backward()
                    loss_sum += loss.detach()
                    self.tokens += self.task.tokens_in(batch)
                loss_value = float(loss_sum) / cfg.grad_accum_steps
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"loss became {loss_value} at step {self.step + 1}; stopping. The last "
                        f"good checkpoint is in {self.checkpoint_dir} (try a lower --lr)"
                    )
                grad_norm = None
                if cfg.grad_clip:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    rate = (self.tokens - window_tokens) / max(now - window_time, 1e-9)
                    window_time, window_tokens = now, self.tokens
                    record = {
                        "kind": "train",
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": loss_value,
                        "lr": lr,
                        "tokens_per_s": rate,
                        "elapsed_s": now - start_time,
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self.metrics.write(record)
                    self.callback.on_step(self, record)
                last = self.step == self.total_steps
                if self.step % cfg.eval_every == 0 or last:
                    self._eval_and_log()
                    self.save()
                elif cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            log.warning("interrupted at step %d: saving a checkpoint before stopping", self.step)
            self.save()
            raise
        elapsed = time.perf_counter() - start_time
        result = TrainResult(
            steps=self.step,
            tokens=self.tokens - start_tokens,
            seconds=elapsed,
            first_eval=self.first_eval,
            last_eval=self.last_eval,
            checkpoint=self.checkpoint_dir,
        )
        self.callback.on_end(self, result)
        return result

    def _eval_and_log(self) -> dict[str, float]:
        metrics = self.evaluate()
        sample = None
        if self.config.sample_tokens > 0:
            self.model.eval()
            try:
                sample = self.task.sample(self.model, self.config.sample_tokens)
            finally:
                self.model.train()
        record = {"kind": "eval", "step": self.step, "tokens": self.tokens, **metrics}
        if sample is not None:
            record["sample"] = sample
        self.metrics.write(record)
        self.last_eval = metrics
        if metrics.get("val_loss", math.inf) < self.best_val:
            self.best_val = metrics["val_loss"]
        plot_losses(
            self.metrics.read(), self.out_dir / "loss.png", title=self.meta.get("title", "")
        )
        self.callback.on_eval(self, record, sample)
        return metrics
