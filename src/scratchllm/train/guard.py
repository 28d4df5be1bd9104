"""Which checkpoint a run keeps as its latest and its best when an evaluation goes bad.

The trainer saves before it evaluates (a crash in evaluation then loses nothing). Before such a
save, `keep_latest` hard-links the current latest checkpoint aside; when the evaluation of the
new one has a NaN or infinite loss, `judge_eval` puts the kept one back as the latest (and drops
the new step's snapshot), so `--resume` and `load_checkpoint(OUT)` read the last good weights.
Like a NaN training loss, the trainer then stops with `TrainingDiverged`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path

from scratchllm.checkpoint import link_checkpoint

KEPT = ".checkpoint.good"  # the latest checkpoint before a save that an evaluation will judge


def bad_loss(metrics: Mapping[str, float]) -> str | None:
    """The first loss of an evaluation that is NaN or infinite ("val_loss nan"), or None."""
    for key, value in metrics.items():
        if key.endswith("loss") and isinstance(value, float) and not math.isfinite(value):
            return f"{key} {value}"
    return None


def keep_latest(out_dir: Path) -> None:
    """Hard links to `out_dir/checkpoint` in `out_dir/.checkpoint.good` (none there: nothing)."""
    latest, kept = out_dir / "checkpoint", out_dir / KEPT
    if (latest / "config.json").exists():
        link_checkpoint(latest, kept)
    else:
        shutil.rmtree(kept, ignore_errors=True)


def judge_eval(out_dir: Path, snapshot: Path, metrics: Mapping[str, float]) -> str | None:
    """After evaluating the checkpoint just saved: with a NaN or infinite loss, the kept one is
    the latest again (no kept one: there is no latest) and `snapshot` goes; returns what was bad.
    Otherwise the kept copy is dropped and None returned."""
    bad = bad_loss(metrics)
    latest, kept = out_dir / "checkpoint", out_dir / KEPT
    if bad is not None:
        if (kept / "config.json").exists():
            link_checkpoint(kept, latest)
        else:
            shutil.rmtree(latest, ignore_errors=True)
        shutil.rmtree(snapshot, ignore_errors=True)
    shutil.rmtree(kept, ignore_errors=True)
    return bad


def best_val_on_disk(out_dir: Path) -> float:
    """The val_loss that `out_dir/best` records (inf: none). Its checkpoint.json is rewritten
    after the evaluation that follows a save, so it can know a better val_loss than the
    train_state.pt saved just before it."""
    try:
        meta = json.loads((out_dir / "best" / "checkpoint.json").read_text())
        return float(meta["eval"]["val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf
