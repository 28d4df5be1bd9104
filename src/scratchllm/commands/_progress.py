"""Progress display for training: a tqdm bar with loss, tokens/s, MFU (and the peak it is a share
of), peak memory and ETA, plus eval lines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scratchllm.train.trainer import Trainer, TrainerCallback, TrainResult


class ProgressCallback(TrainerCallback):
    def __init__(self, show_samples: bool = True) -> None:
        self.bar: tqdm | None = None
        self.show_samples = show_samples
        self.peak_label = ""  # " of 157 GFLOP/s fp32 peak" once the trainer has found its peak
        self.budget: float | None = None  # seconds, when the run has a time budget

    def on_start(self, trainer: Trainer) -> None:
        # A time budget: the bar counts training seconds (the steps it will take are unknown).
        self.budget = trainer.config.time_budget
        self.bar = tqdm(
            total=round(self.budget) if self.budget else trainer.total_steps,
            initial=round(trainer.train_seconds) if self.budget else trainer.step,
            desc="train",
            unit="s" if self.budget else "step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        peak = getattr(trainer, "peak", None)
        if peak is not None:
            self.peak_label = f" of {peak.label}"
            self.bar.write(f"MFU is a share of the {peak.label}: {peak.source}")

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(self._position(record["step"], record.get("train_s", 0.0)) - self.bar.n)
        fields = {"step": str(record["step"])} if self.budget else {}
        fields |= {
            "loss": f"{record['loss']:.3f}",
            "tok_s": f"{record['tokens_per_s']:.0f}",
        }
        if "mfu" in record:
            fields["mfu"] = f"{record['mfu']:.1%}{self.peak_label}"
        if "peak_mem_gib" in record:
            fields["mem"] = f"{record['peak_mem_gib']:.1f}G"
        fields["lr"] = f"{record['lr']:.2e}"
        self.bar.set_postfix(fields, refresh=False)

    def on_eval(self, trainer: Trainer, record: dict[str, Any], sample: str | None) -> None:
        parts = [f"step {record['step']:>6}"]
        keys = ("train_loss", "val_loss", "val_ppl", "val_bpb", "train_accuracy", "val_accuracy")
        for key in (*keys, "core"):
            if key in record:
                parts.append(f"{key} {record[key]:.4f}")
        write = self.bar.write if self.bar is not None else print
        write("  ".join(parts))
        if sample and self.show_samples:
            write("  sample: " + sample.replace("\n", " ")[:300])

    def on_save(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.bar is not None:
            self.bar.update(self._position(trainer.step, trainer.train_seconds) - self.bar.n)
            self.bar.close()

    def _position(self, step: int, train_s: float) -> int:
        return min(round(train_s), round(self.budget)) if self.budget else step
