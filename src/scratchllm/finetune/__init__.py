"""Fine-tuning tasks (ch. 6, ch. 7, appendix E): each adds data, a head or a loss to the one Trainer.

  classify.py    a `num_classes` head on the last real token's hidden state
  instruct.py    Alpaca-style instruction data, masked next-token loss, responses for the test split
  preference.py  DPO against a frozen reference model
  judge.py       scores responses through an OpenAI-compatible chat endpoint
  runner.py      `FinetuneRun`: the one start-to-end sequence of a run, which each task fills in
  tasks.py       `ShuffledTask`: the epoch-shuffled, resumable batches each task subclasses
  checkpoints.py `FinetuneTrainer`: saves that load and resume, with LoRA too (merged + adapters)

This module holds what the tasks share: options, choosing what trains, LoRA bookkeeping, saving.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchllm.data.instruction import TEMPLATES
from scratchllm.errors import InputError
from scratchllm.fs import atomic_write_text
from scratchllm.settings import SettingError, setting
from scratchllm.train.settings import OptimSettings, RunSettings

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FinetuneOptions(OptimSettings, RunSettings):
    """Options every fine-tuning task takes (the flags of `scratchllm finetune TASK`)."""

    checkpoint: str = setting(help="base checkpoint (or run) directory")
    data: str = setting(help="training data file")
    out: str = setting(help="run directory for checkpoint/, metrics, results.json")
    lora_rank: int = setting(0, help="LoRA rank (0 = no LoRA: `train` picks whole layers)", ge=0)
    lora_alpha: float = setting(16.0, help="LoRA alpha; updates scale by alpha/rank", gt=0)
    lora_targets: str = setting("attn,ff", help="layers LoRA wraps: attn, ff or attn,ff")
    adapter: str | None = setting(
        None,
        help="start LoRA from this PEFT adapter folder (adapter_config.json + "
        "adapter_model.safetensors, e.g. from `scratchllm convert --to peft`) made for the "
        "base `checkpoint`; needs `lora_rank` (at least the adapter's r)",
        metavar="DIR",
    )
    train: str | None = setting(
        None,
        help="what trains: head | last-N (the last N blocks + final norm + head) | all "
        "(default: last-1 for classify, all for instruct and dpo)",
    )
    max_length: int | None = setting(
        None, help="tokens per example (default: the model's context length)", ge=2
    )
    dropout: float | None = setting(None, help="override the checkpoint's dropout rate", ge=0, lt=1)
    eval_every: int | None = setting(
        None,
        help="evaluate and save every N steps (default: each epoch; for instruct and dpo at "
        "least every 50 steps)",
        ge=1,
    )
    split: tuple[float, float, float] = setting(
        (0.7, 0.1, 0.2), help="train, val and test shares of the data", ge=0, le=1, flag=False
    )
    # Fine-tuning's own defaults for the shared optimisation settings (their help is shared);
    # each task class sets its own epochs (and DPO its lr, instruct and DPO their split) so.
    epochs: float | None = 3.0
    lr: float = 5e-5
    eval_batches: int = 50

    def validate(self) -> None:
        super().validate()
        if self.adapter is not None and not self.lora_rank:
            raise SettingError(
                "adapter", "needs `lora_rank` ≥ 1: the rank to train (at least the adapter's r)"
            )
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6:
            raise SettingError(
                "split", f"must be 3 shares (train, val, test) adding up to 1, got {self.split}"
            )


@dataclass
class PromptSettings:
    """The prompt template of the tasks that train on instructions (instruct, DPO)."""

    template: str = setting("alpaca", help="prompt style", choices=TEMPLATES)


def select_trainable(model: torch.nn.Module, spec: str) -> None:
    """'all', 'head' (the output head only) or 'last-N' (last N blocks + final norm + head)."""
    for p in model.parameters():
        p.requires_grad_(spec == "all")
    if spec == "all":
        return
    parts: list[torch.nn.Module] = [model.out_head]
    if spec.startswith("last-"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = -1
        if not 1 <= n <= len(model.trf_blocks):
            raise SettingError(
                "train", f"{spec}: N must be 1..{len(model.trf_blocks)} (the model's blocks)"
            )
        parts += [model.final_norm, *list(model.trf_blocks)[-n:]]
    elif spec != "head":
        raise SettingError("train", f"{spec!r}: expected head, last-N (e.g. last-2) or all")
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)


def prepare_model(
    model: torch.nn.Module,
    opts: FinetuneOptions,
    default_train: str,
    head: tuple[str, ...],
    base_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Apply LoRA (started from `opts.adapter` when given) or the --train selection; return a
    description for results.json. `base_fingerprint` (of the base's weights) is compared with
    the one an adapter exported by scratchllm records."""
    from scratchllm.model.lora import apply_lora, parameter_counts

    info: dict[str, Any] = {}
    if opts.lora_rank:
        wrapped = apply_lora(model, opts.lora_rank, opts.lora_alpha, opts.lora_targets, head)
        info["lora"] = {
            "rank": opts.lora_rank,
            "alpha": opts.lora_alpha,
            "targets": opts.lora_targets,
            "layers": len(wrapped),
        }
        if opts.adapter is not None and not opts.resume:  # a resume reads the trained factors
            from scratchllm.hub.peft import load_peft_into

            notes = load_peft_into(model, opts.adapter, opts.checkpoint, base_fingerprint)
            for note in notes:
                log.warning("%s", note)
            info["lora"]["adapter"] = str(Path(opts.adapter).resolve())
        info["train"] = "lora" + ("+head" if head else "")
    else:
        spec = opts.train or default_train
        select_trainable(model, spec)
        info["train"] = spec
    counts = parameter_counts(model)
    info["trainable_parameters"] = counts["trainable"]
    info["total_parameters"] = counts["total"]
    if counts["trainable"] == 0:
        raise SettingError("train", "left no parameter to train")
    log.info("trainable parameters: %s of %s", f"{counts['trainable']:,}", f"{counts['total']:,}")
    return info


def set_dropout(model: torch.nn.Module, rate: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = rate


def save_final(out: Path, meta: dict[str, Any]) -> Path:
    """After training: the trainer's last save is the final checkpoint (with LoRA: merged
    weights, the adapters and lora.json, see `finetune.checkpoints`). Its checkpoint.json gets
    the task's final evaluation, and a LoRA run's adapters are also copied to out/adapters/."""
    from scratchllm.checkpoint import update_meta
    from scratchllm.finetune.checkpoints import ADAPTER_FILES
    from scratchllm.fs import atomic_write_bytes

    path = out / "checkpoint"
    if "eval" in meta:
        update_meta([path], {"eval": meta["eval"]})
    if (path / "lora.json").exists():
        for name in ADAPTER_FILES:
            atomic_write_bytes(out / "adapters" / name, (path / name).read_bytes())
    return path


def load_with_adapters(adapters_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild an unmerged LoRA model: the base checkpoint named in lora.json plus the adapters.
    `adapters_dir` is a LoRA run's adapters/ or any of its checkpoints (they hold both files)."""
    from safetensors.torch import load_file

    from scratchllm.checkpoint import load_checkpoint, resolve_checkpoint_dir
    from scratchllm.model.lora import apply_lora, load_adapter_state_dict

    adapters_dir = Path(adapters_dir)
    if not (adapters_dir / "lora.json").exists() and (adapters_dir / "checkpoint").exists():
        adapters_dir = resolve_checkpoint_dir(adapters_dir)  # a run directory
    spec_path = adapters_dir / "lora.json"
    if not spec_path.exists():
        raise InputError(f"{adapters_dir}: lora.json is missing; expected an adapters directory")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    ckpt = load_checkpoint(spec["base_checkpoint"], device=device)
    model = ckpt.model
    meta = spec.get("meta", {})
    head: tuple[str, ...] = ()
    if meta.get("num_classes"):
        model.set_classification_head(int(meta["num_classes"]))
        head = ("out_head",)
    apply_lora(model, int(spec["rank"]), float(spec["alpha"]), spec["targets"], head)
    state = load_file(str(adapters_dir / "adapters.safetensors"))
    load_adapter_state_dict(model, state, str(adapters_dir / "adapters.safetensors"))
    model.eval()
    return model, ckpt.tokenizer, meta


def plot_eval_metrics(
    records: list[dict[str, Any]], keys: list[str], path: Path, ylabel: str, title: str = ""
) -> None:
    """Eval metrics (accuracy, reward margin, ...) against step, one line per key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchllm.fs import atomic_write

    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in evals if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts, strict=True), "-o", markersize=3, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path


def epoch_history(records: list[dict[str, Any]], steps_per_epoch: int) -> list[dict[str, Any]]:
    """Eval records of metrics.jsonl with the epoch each one closed."""
    out = []
    for r in records:
        if r.get("kind") == "eval":
            row = {k: v for k, v in r.items() if k not in ("kind", "sample")}
            row["epoch"] = round(r["step"] / max(steps_per_epoch, 1), 3)
            out.append(row)
    return out


def run_trainer(
    model: torch.nn.Module,
    task: Any,
    opts: FinetuneOptions,
    out: Path,
    tokenizer: Any,
    meta: dict[str, Any],
    info: dict[str, Any],
    callback: Any,
    device: torch.device,
    eval_every: int,
    sample_tokens: int = 0,
) -> tuple[Any, Any, float]:
    """Configure and run the project's one `Trainer` (its fine-tuning kind, whose checkpoints
    load and resume with LoRA too) for a fine-tuning task; `opts.resume` continues `out`.

    Returns the trainer (its model left in eval mode), the `TrainResult` (`interrupted` set when
    SIGTERM stopped the run after a save) and the training seconds.
    """
    import time

    from scratchllm.finetune.checkpoints import FinetuneTrainer
    from scratchllm.settings import project
    from scratchllm.train.settings import TrainConfig

    spe = max(1, task.steps_per_epoch())
    # The shared optimisation settings come from `opts`; the task decides the bookkeeping.
    config = project(
        opts,
        TrainConfig,
        eval_every=opts.eval_every or eval_every,
        log_every=max(1, min(10, spe)),
        device=str(device),
        sample_tokens=sample_tokens,
    )
    if "lora" in info:
        meta["lora"] = info["lora"]
    trainer = FinetuneTrainer(model, task, config, out, tokenizer, meta, callback)
    start = time.perf_counter()
    result = trainer.fit(resume=opts.resume)
    seconds = time.perf_counter() - start
    trainer.model.eval()
    return trainer, result, seconds
