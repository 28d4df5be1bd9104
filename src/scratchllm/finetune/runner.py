"""One fine-tuning run from start to end: the sequence that classify, instruct and DPO share.

    check the options* and the run directory, read the data* (before the model, so bad data
    fails fast), load the checkpoint, encode and split the data*, seed, set dropout, adapt the
    model* (a classification head, DPO's frozen reference), apply LoRA or `train`, build the
    task*, write run.json, train with the one `Trainer` (or continue the run: `resume`), final
    metrics, plots and outputs*, the final evaluation into checkpoint/ (with LoRA: the adapters
    also into adapters/), write results.json.

A task fills in the starred steps by subclassing `FinetuneRun`; everything else happens here once.
Every save is a loadable, resumable checkpoint, with LoRA too (`finetune.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from scratchllm.finetune import (
    FinetuneOptions,
    epoch_history,
    prepare_model,
    run_trainer,
    save_final,
    set_dropout,
    write_results,
)
from scratchllm.finetune.tasks import ShuffledTask
from scratchllm.settings import SettingError


class FinetuneRun(ABC):
    """A fine-tuning run; `run()` is the shared sequence, the methods below are a task's steps.

    During `run()` the steps can read `opts`, `out`, `device`, `model`, `tokenizer` and
    `max_length` (tokens per example: --max-length, capped at the model's context length).
    """

    kind: str  # "classify", "instruct", "dpo": the "task" of checkpoint.json and results.json
    default_train: str = "all"  # what --train means when it is not given
    head: tuple[str, ...] = ()  # modules trained in full next to LoRA adapters

    def __init__(self, opts: FinetuneOptions) -> None:
        self.opts = opts
        self.out = Path(opts.out)

    def check(self) -> None:
        """Check the options and the run directory; a task checks its own after calling this."""
        from scratchllm.checkpoint import recover_interrupted_save
        from scratchllm.fs import file_in_the_way

        self.opts.validate()
        out = self.out
        if (blocker := file_in_the_way(out)) is not None:  # before any work, not at the save
            raise SettingError("out", f"{out}: {blocker} is a file; expected a folder")
        if self.opts.resume:
            recover_interrupted_save(out)
            if not (out / "checkpoint" / "train_state.pt").exists():
                raise SettingError("resume", f"{out} holds no checkpoint to continue")
        elif (out / "results.json").exists() or (out / "checkpoint").exists():
            raise SettingError(
                "out",
                f"{out} already holds a run; pass `resume` to continue it or pick a new `out`",
            )

    @abstractmethod
    def load_data(self) -> None:
        """Read and check the data file; runs before the checkpoint is loaded."""

    @abstractmethod
    def encode(self) -> dict[str, Any]:
        """Tokenize and split the data; returns the first entries of results.json."""

    def adapt(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional: most tasks don't)
        """Change the model before LoRA or --train selects what trains."""

    @abstractmethod
    def build_task(self) -> ShuffledTask:
        """The trainer task over the encoded splits."""

    def meta(self) -> dict[str, Any]:
        """The task's own fields of checkpoint.json."""
        return {}

    def eval_every(self, steps_per_epoch: int) -> int:
        return max(1, min(steps_per_epoch, 50))

    def sample_tokens(self) -> int:
        return 0

    @abstractmethod
    def finish(
        self,
        model: torch.nn.Module,
        records: list[dict[str, Any]],
        results: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        """After training (model in eval mode): final metrics into `results`, plots and other
        outputs, what checkpoint.json should keep (`meta["eval"]`)."""

    def run(self, callback: Any = None) -> dict[str, Any]:
        """Train, save out/checkpoint and out/results.json; returns the results. A run stopped by
        SIGTERM returns at once: {"interrupted": "SIGTERM", "step": N, "checkpoint": PATH}."""
        from scratchllm.checkpoint import load_checkpoint
        from scratchllm.finetune.checkpoints import weights_fingerprint
        from scratchllm.fs import atomic_write_text
        from scratchllm.utils import pick_device, seed_everything

        opts = self.opts
        self.check()
        self.device = pick_device(opts.device)
        self.load_data()
        ckpt = load_checkpoint(opts.checkpoint)
        self.model, self.tokenizer = ckpt.model, ckpt.tokenizer
        context = self.model.config.context_length
        self.max_length = min(opts.max_length or context, context)
        info = self.encode()
        seed_everything(opts.seed)
        if opts.dropout is not None:
            set_dropout(self.model, opts.dropout)
        self.adapt(self.model)
        # Which base weights LoRA factors belong to: kept in lora.json, checked on resume.
        fingerprint = weights_fingerprint(ckpt.path) if opts.lora_rank else None
        info.update(prepare_model(self.model, opts, self.default_train, self.head, fingerprint))
        task = self.build_task()
        spe = task.steps_per_epoch()
        meta: dict[str, Any] = {
            "task": self.kind,
            **self.meta(),
            "base_checkpoint": str(ckpt.path),
            "title": f"{self.kind} {Path(opts.data).name}",
        }
        if fingerprint is not None:
            meta["base_fingerprint"] = fingerprint
        run = json.dumps(dataclasses.asdict(opts), indent=2) + "\n"
        atomic_write_text(self.out / "run.json", run)  # what `resume` continues with
        trainer, result, seconds = run_trainer(
            self.model,
            task,
            opts,
            self.out,
            self.tokenizer,
            meta,
            info,
            callback,
            self.device,
            self.eval_every(spe),
            self.sample_tokens(),
        )
        if result.interrupted:
            return {
                "interrupted": result.interrupted,
                "step": trainer.step,
                "checkpoint": str(result.checkpoint),
            }
        model = trainer.model
        records = trainer.metrics.read()
        results: dict[str, Any] = {"task": self.kind, **info}
        results["first_eval"] = trainer.first_eval
        results["epochs"] = epoch_history(records, spe)
        results["steps"] = trainer.step
        results["train_seconds"] = seconds
        self.finish(model, records, results, meta)
        results["checkpoint"] = str(save_final(self.out, meta))
        write_results(self.out, results)
        return results
