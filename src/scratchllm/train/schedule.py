"""Learning-rate schedule (appendix D): linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup rises linearly from peak/warmup to peak over `warmup_steps`; "cosine" then decays to
    `min_lr` at `total_steps`; "constant" stays at the peak (the book's chapter 5 run).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine or constant")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
