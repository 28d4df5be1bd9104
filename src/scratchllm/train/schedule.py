"""Learning-rate schedules (appendix D): linear warmup, then cosine decay to a floor, constant, or
warmup–stable–decay ("wsd": the peak until the last `decay_fraction` of training, then linear to
the floor; "wsd-sqrt": the same with a 1 − √progress decay, which Hägele et al. 2024, "Scaling Laws
and Compute-Optimal Training Beyond Fixed Training Durations", found to beat the linear one).

`lr_at` reads the schedule by optimizer step; `lr_at_fraction` by the fraction of training done
(0..1), which is what a time budget provides: seconds used over seconds allowed.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "wsd", "wsd-sqrt")


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def lr_at(
    step: int,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Warmup rises linearly from peak/warmup to peak over `warmup_steps`; "cosine" then decays to
    `min_lr` at `total_steps`; "constant" stays at the peak (the book's chapter 5 run); "wsd"
    stays at the peak until `(1 - decay_fraction)·total_steps`, then falls linearly to `min_lr`
    at `total_steps`.
    """
    _check(schedule)
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    cosine_progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    fraction = step / max(1, total_steps)
    return _after_warmup(schedule, fraction, cosine_progress, peak_lr, min_lr, decay_fraction)


def lr_at_fraction(
    fraction: float,
    peak_lr: float,
    warmup_fraction: float = 0.0,
    min_lr: float = 0.0,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate when `fraction` (0..1, clamped) of training is done.

    Warmup rises linearly from 0 to the peak over the first `warmup_fraction`; then "cosine"
    decays to `min_lr` at 1, "constant" stays at the peak, "wsd" holds the peak until
    `1 - decay_fraction` and falls linearly to `min_lr` at 1.
    """
    _check(schedule)
    fraction = min(1.0, max(0.0, fraction))
    if warmup_fraction > 0 and fraction < warmup_fraction:
        return peak_lr * fraction / warmup_fraction
    cosine_progress = (fraction - warmup_fraction) / max(1e-12, 1.0 - warmup_fraction)
    return _after_warmup(schedule, fraction, cosine_progress, peak_lr, min_lr, decay_fraction)


def _after_warmup(
    schedule: str,
    fraction: float,
    cosine_progress: float,
    peak_lr: float,
    min_lr: float,
    decay_fraction: float,
) -> float:
    """The schedule past warmup: `fraction` of all training done, `cosine_progress` of the
    decay that follows warmup (both 0..1; larger values are clamped)."""
    if schedule == "constant":
        return peak_lr
    if schedule in ("wsd", "wsd-sqrt"):
        return _wsd(fraction, peak_lr, min_lr, decay_fraction, sqrt=schedule == "wsd-sqrt")
    progress = min(1.0, cosine_progress)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _wsd(
    fraction: float, peak_lr: float, min_lr: float, decay_fraction: float, sqrt: bool = False
) -> float:
    start = 1.0 - decay_fraction
    if fraction <= start or decay_fraction <= 0:
        return peak_lr
    progress = min(1.0, (fraction - start) / decay_fraction)
    if sqrt:  # 1 − √progress: half the way down a quarter into the decay, then a long tail
        progress = math.sqrt(progress)
    return peak_lr + (min_lr - peak_lr) * progress
