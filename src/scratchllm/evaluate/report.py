"""Evaluation results: one JSON document, a table for the terminal and a bar chart.

`results.json` holds the checkpoint, the settings, each text's loss / perplexity / bits per byte,
each task's accuracy and centred score (and lm-eval's acc, acc_norm, acc_bytes for multiple
choice), and CORE. `centered.png` draws the centred scores, CORE last. Every file is written
atomically; `samples/NAME.jsonl` (optional) holds the per-item records.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scratchllm.evaluate.core import core_score
from scratchllm.evaluate.scoring import TaskResult
from scratchllm.evaluate.text import TextResult, combine
from scratchllm.fs import atomic_write, atomic_write_text

RESULTS_FILE = "results.json"
CHART_FILE = "centered.png"


def build_results(
    texts: Sequence[TextResult],
    tasks: Sequence[TaskResult],
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document: `meta` (checkpoint, settings, ...), texts, tasks and CORE."""
    out: dict[str, Any] = dict(meta or {})
    if texts:
        out["text"] = [t.summary() for t in texts]
        if len(texts) > 1:
            out["text_total"] = combine(list(texts)).summary()
    if tasks:
        out["tasks"] = [t.summary() for t in tasks]
        out["core"] = core_score([t.centered for t in tasks])
        out["core_tasks"] = len(tasks)
    return out


def _num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def format_table(results: dict[str, Any]) -> str:
    """The results as aligned plain-text tables (texts, then tasks and CORE)."""
    lines: list[str] = []
    texts = list(results.get("text", []))
    if "text_total" in results:
        texts.append(results["text_total"])
    if texts:
        rows = [
            [
                t["name"],
                str(t["tokens"]),
                str(t["bytes"]),
                _num(t["loss"]),
                _num(t["perplexity"], 2),
                _num(t["bits_per_byte"]),
            ]
            for t in texts
        ]
        lines += _grid(["text", "tokens", "bytes", "loss", "ppl", "bpb"], rows)
    tasks = results.get("tasks", [])
    if tasks:
        if lines:
            lines.append("")
        rows = [
            [
                t["name"],
                t["type"].replace("_", " "),
                str(t["shots"]),
                str(t["items"]),
                _num(t["accuracy"]),
                _num(t["baseline"] / 100, 2),
                _num(t["centered"]),
                _num(t.get("acc")),
                _num(t.get("acc_norm")),
            ]
            for t in tasks
        ]
        header = ["task", "type", "shots", "items", "acc(CORE)", "chance", "centred"]
        lines += _grid([*header, "lm-eval acc", "acc_norm"], rows)
        lines.append(f"CORE {_num(results['core'])}  (mean centred score over {len(tasks)} tasks)")
    return "\n".join(lines)


def plot_centered(results: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Bar chart of each task's centred score and CORE (matplotlib Agg, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results.get("tasks", [])
    names = [t["name"] for t in tasks] + ["CORE"]
    values = [t["centered"] for t in tasks] + [results["core"]]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(names) + 1)))
    colors = ["C0"] * len(tasks) + ["C3"]
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("centred score: (acc − chance) / (1 − chance)")
    ax.set_title(title or "in-context tasks")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_results(
    out_dir: str | Path,
    results: dict[str, Any],
    tasks: Sequence[TaskResult] = (),
    samples: bool = False,
    title: str = "",
) -> list[Path]:
    """results.json, the chart (when tasks ran) and, with `samples`, samples/NAME.jsonl."""
    out_dir = Path(out_dir)
    written = []
    if samples:
        for task in tasks:
            path = out_dir / "samples" / f"{task.spec.name}.jsonl"
            text = "".join(json.dumps(i.to_dict()) + "\n" for i in task.items)
            atomic_write_text(path, text)
            written.append(path)
    if results.get("tasks"):
        plot_centered(results, out_dir / CHART_FILE, title)
        written.append(out_dir / CHART_FILE)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    written.append(out_dir / RESULTS_FILE)
    return written
