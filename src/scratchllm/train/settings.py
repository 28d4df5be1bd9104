"""The settings of a training run, each declared once (see `scratchllm.settings`).

`OptimSettings` holds what pretraining and every fine-tuning task set alike; `TrainConfig` adds
the rest of what `Trainer` reads; `RunSettings` what a recipe run from the command line adds.
Recipes extend them: `PretrainOptions` (train/pretrain.py) is a `TrainConfig`, `FinetuneOptions`
(finetune/) an `OptimSettings` with its own defaults. Every numeric setting declares its range
here (`ge=`, `gt=`, `le=`, `lt=`); `Settings.validate` checks them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from scratchllm.settings import Settings, setting
from scratchllm.train.schedule import SCHEDULES

SEED_LIMIT = 2**63  # torch.manual_seed takes 64 bits; one rank's seed is `seed` + its rank
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)")


def parse_duration(value: Any) -> float:
    """Seconds in `value`: a number (seconds) or text such as "90", "90s", "10m", "1.5h".

    The sign is kept, so that the setting's range reports "-5" (must be > 0); text that is not
    a duration is a ValueError naming the forms accepted."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.fullmatch(str(value).strip().lower())
    if match is None or match[2] not in _UNITS:
        raise ValueError(f"must be a duration such as 90, 90s, 10m or 1.5h, got {value!r}")
    return float(match[1]) * _UNITS[match[2]]


@dataclass
class OptimSettings(Settings):
    """Optimisation settings every training run has (the defaults are pretraining's)."""

    epochs: float | None = setting(None, help="passes over the training split", gt=0)
    batch_size: int = setting(8, help="sequences (examples) per micro-batch", ge=1)
    lr: float = setting(4e-4, help="peak learning rate", gt=0)
    warmup_steps: int | None = setting(
        None, help="linear warmup steps (default 5% of steps, ≤200; or of a time budget)", ge=0
    )
    weight_decay: float = setting(0.1, help="AdamW weight decay on ≥2-D weights", ge=0)
    grad_clip: float | None = setting(1.0, help="clip the global gradient norm (0 = off)", ge=0)
    seed: int = setting(
        123, help="random seed: data split and order, initialisation", ge=0, lt=SEED_LIMIT
    )
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N | mps")
    eval_batches: int = setting(20, help="batches per split at each evaluation", ge=1)
    max_steps: int | None = setting(
        None, help="optimizer steps (with `epochs`, the smaller wins)", ge=1
    )


@dataclass
class TrainConfig(OptimSettings):
    """Optimisation and bookkeeping settings of one run: everything `Trainer` reads."""

    grad_accum_steps: int = setting(1, help="micro-batches per optimizer step", ge=1)
    time_budget: float | None = setting(
        None,
        help="train for this long (90, 90s, 10m, 1.5h; seconds of training steps, evaluation "
        "and saving not counted); the schedule follows the share used; with `max_steps` the "
        "first reached ends the run",
        metavar="DURATION",
        gt=0,
        parse=parse_duration,
    )
    min_lr: float | None = setting(
        None, help="floor the cosine or wsd decay ends at (default `lr`/10)", ge=0
    )
    schedule: str = setting(
        "cosine",
        help="learning-rate schedule (wsd: warmup, stable at the peak, linear decay; "
        "wsd-sqrt: the decay 1 − √progress)",
        choices=SCHEDULES,
    )
    decay_fraction: float = setting(
        0.2, help="wsd, wsd-sqrt: the last fraction of training spent decaying", gt=0, le=1
    )
    beta1: float = setting(0.9, help="AdamW β1", ge=0, lt=1, flag=False)
    beta2: float = setting(0.95, help="AdamW β2", ge=0, lt=1, flag=False)
    eval_every: int = setting(100, help="evaluate and save every N steps", ge=1)
    save_every: int = setting(
        0, help="also save every N steps between evaluations (0 = only at them)", ge=0
    )
    log_every: int = setting(10, help="write a metrics line every N steps", ge=1)
    dtype: str = setting("float32", help="autocast precision", choices=("float32", "bfloat16"))
    sample_tokens: int = setting(40, help="tokens in each evaluation sample (0 = none)", ge=0)
    keep_last: int = setting(2, help="step snapshots kept in OUT/checkpoints/ (0 = none)", ge=0)
    optimizer: str = setting(
        "adamw",
        help="adamw | muon (Muon on hidden 2-D weights, AdamW on the rest)",
        choices=("adamw", "muon"),
    )
    muon_lr: float = setting(0.02, help="peak learning rate of the Muon weights", gt=0)
    muon_weight_decay: float = setting(
        0.0, help="decoupled weight decay of the Muon weights: p ← p·(1 − lr·wd) each step", ge=0
    )
    muon_split_qkv: bool = setting(
        False,
        help="orthogonalise the fused query/key/value weight's three parts apart (as "
        "modded-nanogpt's separate projections) instead of as one matrix",
    )
    embedding_lr: float | None = setting(
        None,
        help="peak learning rate of untied embedding tables, without weight decay "
        "(default: lr, as the other AdamW weights)",
        gt=0,
    )
    optimizer_impl: str = setting(
        "auto", help="AdamW kernel (auto: fused)", choices=("auto", "fused", "foreach")
    )
    compile: bool = setting(False, help="torch.compile the training step")
    activation_checkpointing: bool = setting(
        False, help="recompute block activations in backward: less memory, ~30% more compute"
    )
    fsdp: bool = setting(False, help="under torchrun: shard with FSDP2")
    measure_mfu: bool = True  # time a matmul at start to have a peak for MFU
    tensorboard: bool = setting(False, help="log to OUT/tensorboard too")
    vocab_multiple: int | None = setting(
        None,
        help="pad the output matmul to a multiple of N rows (default 64 on CUDA, 1 on CPU)",
        ge=1,
    )


@dataclass
class RunSettings(Settings):
    """What a recipe run from the command line adds to its training settings."""

    resume: bool = setting(False, help="continue the run in `out` (with its run.json settings)")
