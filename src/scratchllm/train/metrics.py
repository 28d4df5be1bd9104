"""Run metrics: one JSON object per line in `metrics.jsonl`, and loss curves as PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from scratchllm.fs import atomic_write


class MetricsLog:
    """Append-only JSONL log. On resume, lines past the resumed step are dropped so the curve
    continues exactly from the checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda p: p.write_text(text, encoding="utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: skip it
        return records


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training and validation loss against step (and tokens seen on a second axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r for r in records if r.get("kind") == "train"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(
            [r["step"] for r in steps],
            [r["loss"] for r in steps],
            alpha=0.35,
            label="train (batch)",
        )
    for key, style in (("train_loss", "-o"), ("val_loss", "-s"), ("val_bpb", "--^")):
        pts = [(r["step"], r[key]) for r in evals if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    core = [(r["step"], r["core"]) for r in evals if "core" in r and math.isfinite(r["core"])]
    if core:  # pretrain --eval-tasks: CORE on its own scale, on the right
        right = ax.twinx()
        right.plot(*zip(*core, strict=True), "-D", color="black", markersize=3, label="CORE")
        right.set_ylabel("CORE (mean centred score)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    if evals and "tokens" in evals[-1] and evals[-1]["step"]:
        per_step = evals[-1]["tokens"] / evals[-1]["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
