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

    def on_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.step,
            desc="train",
            unit="step",
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
        self.bar.update(record["step"] - self.bar.n)
        fields = {
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
            self.bar.update(trainer.step - self.bar.n)
            self.bar.close()
