"""Training to a time budget, and the learning rate of each step.

`--time-budget 10m` gives training a number of seconds instead of (or as well as) a number of
steps. `parse_duration` (train/settings.py, where the setting is) reads what a user writes
(90, 90s, 10m, 1.5h) into seconds. Only the seconds inside training steps count against the
budget: evaluation, sampling and saving do not, so a run that evaluates often gets as much
training as one that does not. The trainer measures
each step with an injectable clock (tests pass a fake one) and keeps the seconds used in the
checkpoint's train state, so `--resume` continues with what is left.

`LRPlan` is the schedule of one run: by step (`lr_at`) without a budget; with one, by the
fraction of training done (`lr_at_fraction`) — the larger of the budget's share used and the
steps' share done, so whichever of `time_budget` and `max_steps` ends training also ends the
decay.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchllm.train.schedule import lr_at, lr_at_fraction
from scratchllm.train.settings import TrainConfig

# Without `warmup_steps`, a budgeted run warms up over this share of its budget: the steps'
# default (5% of them) carried over to seconds.
BUDGET_WARMUP_FRACTION = 0.05
NO_STEP_LIMIT = 2**62  # total steps of a run only its time budget ends


def format_duration(seconds: float) -> str:
    """A short reading of `seconds`: "45s", "10m", "1.5h"."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


@dataclass(frozen=True)
class LRPlan:
    """When training ends and the learning rate on the way there."""

    peak_lr: float
    min_lr: float
    schedule: str
    decay_fraction: float
    total_steps: int
    warmup_steps: int
    time_budget: float | None = None  # seconds of training steps; None: steps alone
    warmup_fraction: float = 0.0  # of the budget (budgeted runs without `warmup_steps`)

    @classmethod
    def for_config(cls, config: TrainConfig, total_steps: int) -> LRPlan:
        budgeted = config.time_budget is not None
        if config.warmup_steps is not None:
            warmup, warmup_fraction = config.warmup_steps, 0.0
        elif budgeted:
            warmup, warmup_fraction = 0, BUDGET_WARMUP_FRACTION
        else:
            warmup, warmup_fraction = min(200, int(0.05 * total_steps)), 0.0
        return cls(
            peak_lr=config.lr,
            min_lr=config.min_lr if config.min_lr is not None else config.lr / 10,
            schedule=config.schedule,
            decay_fraction=config.decay_fraction,
            total_steps=total_steps,
            warmup_steps=warmup,
            time_budget=config.time_budget,
            warmup_fraction=warmup_fraction,
        )

    def fraction(self, step: int, seconds: float) -> float:
        """Share of training done after `step` steps and `seconds` of them (0..1)."""
        done = step / max(1, self.total_steps) if self.total_steps < NO_STEP_LIMIT else 0.0
        if self.time_budget is not None:
            done = max(done, seconds / self.time_budget)
        return min(1.0, done)

    def done(self, step: int, seconds: float) -> bool:
        """Whether training is over: the steps are all taken or the budget is spent."""
        return step >= self.total_steps or (
            self.time_budget is not None and seconds >= self.time_budget
        )

    def lr(self, step: int, seconds: float) -> float:
        """The learning rate of step `step` (0-based), begun after `seconds` of training."""
        if self.time_budget is None:
            return lr_at(
                step,
                self.peak_lr,
                self.total_steps,
                self.warmup_steps,
                self.min_lr,
                self.schedule,
                self.decay_fraction,
            )
        fraction = self.fraction(step, seconds)
        lr = lr_at_fraction(
            fraction,
            self.peak_lr,
            self.warmup_fraction,
            self.min_lr,
            self.schedule,
            self.decay_fraction,
        )
        if self.warmup_fraction > 0 and fraction == 0.0:
            # The very first step, at fraction 0: a small step rather than a wasted one.
            lr = self.peak_lr * 1e-3
        if self.warmup_steps > 0 and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr

    def describe(self) -> str:
        """One line for the log: how the run ends and how its rate moves."""
        ends = []
        if self.time_budget is not None:
            ends.append(f"{format_duration(self.time_budget)} of training steps")
        if self.total_steps < NO_STEP_LIMIT:
            ends.append(f"{self.total_steps} steps")
        warm = (
            f"{self.warmup_steps} warmup steps"
            if self.warmup_steps
            else f"warmup over {self.warmup_fraction:.0%} of the budget"
        )
        return f"{self.schedule} schedule, {warm}, ends at {' or '.join(ends)}"
