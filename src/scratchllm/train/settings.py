"""The settings of a training run, each declared once (see `scratchllm.settings`).

`OptimSettings` holds what pretraining and every fine-tuning task set alike; `TrainConfig` adds
the rest of what `Trainer` reads. Recipes extend them: `PretrainOptions` (train/pretrain.py) is a
`TrainConfig`, `FinetuneOptions` (finetune/) an `OptimSettings` with its own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from scratchllm.settings import SettingError, setting


@dataclass
class OptimSettings:
    """Optimisation settings every training run has (the defaults are pretraining's)."""

    epochs: float | None = setting(None, help="passes over the training split")
    batch_size: int = setting(8, help="sequences (examples) per micro-batch")
    lr: float = setting(4e-4, help="peak learning rate")
    warmup_steps: int | None = setting(None, help="linear warmup steps (default 5% of steps, ≤200)")
    weight_decay: float = setting(0.1, help="AdamW weight decay on ≥2-D weights")
    grad_clip: float | None = setting(1.0, help="clip the global gradient norm (0 = off)")
    seed: int = setting(123, help="random seed: data split and order, initialisation")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N | mps")
    eval_batches: int = setting(20, help="batches per split at each evaluation")

    def validate(self) -> None:
        for name in ("batch_size", "eval_batches"):
            _at_least(self, name, 1)
        if self.epochs is not None and not self.epochs > 0:
            raise SettingError("epochs", f"must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise SettingError("lr", f"must be > 0, got {self.lr}")


@dataclass
class TrainConfig(OptimSettings):
    """Optimisation and bookkeeping settings of one run: everything `Trainer` reads."""

    max_steps: int | None = setting(None, help="optimizer steps (with `epochs`, the smaller wins)")
    grad_accum_steps: int = setting(1, help="micro-batches per optimizer step")
    min_lr: float | None = setting(None, help="cosine floor (default `lr`/10)")
    schedule: str = setting("cosine", help="learning-rate schedule", choices=("cosine", "constant"))
    beta1: float = 0.9
    beta2: float = 0.95
    eval_every: int = setting(100, help="evaluate and save every N steps")
    save_every: int = setting(
        0, help="also save every N steps between evaluations (0 = only at them)"
    )
    log_every: int = setting(10, help="write a metrics line every N steps")
    dtype: str = setting("float32", help="autocast precision", choices=("float32", "bfloat16"))
    sample_tokens: int = setting(40, help="tokens in each evaluation sample (0 = none)")
    keep_last: int = setting(2, help="step snapshots kept in OUT/checkpoints/ (0 = none)")
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
        None, help="pad the output matmul to a multiple of N rows (default 64 on CUDA, 1 on CPU)"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("grad_accum_steps", "eval_every", "log_every"):
            _at_least(self, name, 1)
        if self.max_steps is not None:
            _at_least(self, "max_steps", 1)
        if self.dtype not in ("float32", "bfloat16"):
            raise SettingError("dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise SettingError("schedule", f"must be cosine or constant, got {self.schedule!r}")
        _at_least(self, "keep_last", 0)
        if self.vocab_multiple is not None:
            _at_least(self, "vocab_multiple", 1)
        if self.optimizer_impl not in ("auto", "fused", "foreach"):
            raise SettingError(
                "optimizer_impl", f"must be auto, fused or foreach, got {self.optimizer_impl!r}"
            )


def _at_least(obj: object, name: str, low: int) -> None:
    value = getattr(obj, name)
    if value < low:
        raise SettingError(name, f"must be ≥ {low}, got {value}")
