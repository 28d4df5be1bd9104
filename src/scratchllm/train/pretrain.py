"""Pretraining (ch. 5): tokenize a corpus, build (or resume) a GPT and run the one `Trainer` on it.

`pretrain(PretrainOptions(...), callback)` is the recipe that `scratchllm pretrain`, the quickstart
and the benchmarks run. Progress goes to the `TrainerCallback` passed in (the CLI passes its
progress bar); under torchrun every rank calls it and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchllm.config import PRESETS, ModelConfig, resolve_model_config
from scratchllm.errors import CheckpointError, InputError
from scratchllm.settings import SettingError, project, setting
from scratchllm.tokenizers import Tokenizer, load_tokenizer
from scratchllm.train.settings import TrainConfig
from scratchllm.train.trainer import TrainerCallback

log = logging.getLogger(__name__)


@dataclass
class PretrainOptions(TrainConfig):
    """A pretraining run: data, model and tokenizer, plus every `TrainConfig` setting."""

    data: list[str] = setting(
        default_factory=lambda: ["builtin:python-docs"],
        help="text files, folders, globs or builtin:python-docs",
        metavar="PATH",
    )
    model: str = setting(
        "gpt-micro", help="preset name (gpt-nano, gpt-micro, gpt2-small, ...) or a config JSON file"
    )
    tokenizer: str = setting("bytes", help="bytes | gpt2 | gpt2:DIR | a tokenizer directory")
    out: str = setting("runs/pretrain", help="run directory: checkpoint/, metrics.jsonl, loss.png")
    context_length: int | None = setting(None, help="tokens per window (default: the model's)")
    dropout: float | None = setting(None, help="override the model's dropout rate")
    val_fraction: float = setting(0.1, help="tail of the corpus held out")
    sampling: str = setting("sliding", help="window sampling", choices=("sliding", "random"))
    stride: int | None = setting(None, help="sliding-window stride (default: context length)")
    strip_gutenberg: bool = setting(False, help="drop Gutenberg boilerplate")
    sample_prompt: str | None = setting(
        None, help="prompt for the sample printed at each evaluation"
    )
    resume: bool = setting(False, help="continue the run in `out` (with its run.json settings)")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.val_fraction < 1.0:
            raise SettingError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")


def with_saved_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """On resume the run's saved settings (OUT/run.json) are the base; `values` still win."""
    if not values.get("resume"):
        return dict(values)
    saved = Path(values.get("out", PretrainOptions.out)) / "run.json"
    if not saved.exists():
        return dict(values)  # the checkpoint check in `pretrain` names what is missing
    try:
        raw = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{saved}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    names = {f.name for f in dataclasses.fields(PretrainOptions)}
    return {**{k: v for k, v in raw.items() if k in names}, **values}


def build_model_config(opts: PretrainOptions, tokenizer: Tokenizer) -> ModelConfig:
    """The model `opts.model` names, sized for `tokenizer` and `opts`' overrides."""
    config = resolve_model_config(opts.model)
    explicit_vocab = False
    if opts.model not in PRESETS:
        path = Path(opts.model)
        raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        explicit_vocab = "vocab_size" in raw
    changes: dict[str, Any] = {}
    if explicit_vocab:
        if tokenizer.vocab_size > config.vocab_size:
            raise SettingError(
                "tokenizer",
                f"{opts.tokenizer}: its {tokenizer.vocab_size} ids do not fit the "
                f"model's vocab_size {config.vocab_size} (from {opts.model})",
            )
    else:  # the vocabulary follows the tokenizer unless the config sets it
        changes["vocab_size"] = tokenizer.vocab_size
    if opts.context_length is not None:
        changes["context_length"] = opts.context_length
    if opts.dropout is not None:
        changes["drop_rate"] = opts.dropout
    try:
        return ModelConfig.from_dict({**config.to_dict(), **changes}, source=opts.model)
    except InputError as exc:
        raise SettingError("model", str(exc)) from None


def _saved_model(out: Path) -> tuple[ModelConfig, Tokenizer]:
    """The run's model config and tokenizer, without its weights: `Trainer.resume` reads those
    (once) together with the optimizer state."""
    from scratchllm.checkpoint import (
        check_tokenizer_fits,
        recover_interrupted_save,
        resolve_checkpoint_dir,
    )

    recover_interrupted_save(out)
    path = resolve_checkpoint_dir(out)
    try:
        config = ModelConfig.from_json(path / "config.json")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad config.json: {exc}") from None
    if not (path / "tokenizer").exists():
        raise CheckpointError(f"checkpoint {path}: tokenizer/ is missing")
    try:
        tokenizer = load_tokenizer(path / "tokenizer")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad tokenizer: {exc}") from None
    check_tokenizer_fits(tokenizer, config, str(path))
    return config, tokenizer


def pretrain(opts: PretrainOptions, callback: TrainerCallback | None = None) -> dict[str, Any]:
    """Run pretraining; returns a summary (steps, tokens, seconds, evaluations, checkpoint, ...).

    `callback` receives the trainer's progress (None: nothing is reported). Under torchrun
    (RANK/WORLD_SIZE set) every rank runs this; rank 0 alone writes."""
    from scratchllm.train import distributed as D
    from scratchllm.utils import pick_device

    opts.validate()
    # Under torchrun: join the process group; each rank trains on its own GPU / data part.
    info = D.env_dist_info()
    device = D.device_for_rank(pick_device(opts.device), info)
    info = D.init_distributed(device)
    try:
        return _pretrain(opts, callback, Path(opts.out), device, info)
    finally:
        D.cleanup()


def _pretrain(opts: PretrainOptions, callback, out: Path, device, info) -> dict[str, Any]:
    import torch

    from scratchllm.data.loader import split_tokens
    from scratchllm.data.shards import token_file_for
    from scratchllm.fs import atomic_write_text
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train import distributed as D
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import Trainer
    from scratchllm.utils import seed_everything

    if opts.resume:
        config, tokenizer = _saved_model(out)
    else:
        if (out / "checkpoint" / "train_state.pt").exists():
            raise SettingError(
                "out",
                f"{out} already holds a run; pass `resume` to continue it or pick a new `out`",
            )
        tokenizer = load_tokenizer(opts.tokenizer)
        config = build_model_config(opts, tokenizer)
        # Same seed on every rank: FSDP does not broadcast, so all ranks must build equal weights.
        seed_everything(opts.seed)
    model = GPTModel(config)
    D.barrier()  # every rank has checked the run directory before rank 0 writes into it
    # Rank 0 tokenizes (and caches); the other ranks then read its cached token file.
    if info.is_main:
        token_file = token_file_for(opts.data, tokenizer, out / "data", opts.strip_gutenberg)
    D.barrier()
    if not info.is_main:
        token_file = token_file_for(opts.data, tokenizer, out / "data", opts.strip_gutenberg)
    train_tokens, val_tokens = split_tokens(token_file.tokens, opts.val_fraction)
    task = LMTask(
        train_tokens,
        val_tokens if opts.val_fraction > 0 else None,
        tokenizer,
        opts.batch_size,
        config.context_length,
        device=device,
        seed=opts.seed,
        mode=opts.sampling,
        stride=opts.stride,
        sample_prompt=opts.sample_prompt,
        rank=info.rank,
        world_size=info.world_size,
    )
    # Neither a step count nor epochs: one pass over the data.
    epochs = 1.0 if opts.max_steps is None and opts.epochs is None else opts.epochs
    train_config = project(opts, TrainConfig, device=str(device), epochs=epochs)
    meta = {"title": f"{config.name} on {', '.join(opts.data)}"[:80], "data": opts.data}
    if not info.is_main or callback is None:
        callback = TrainerCallback()  # one progress report, from rank 0
    trainer = Trainer(model, task, train_config, out, tokenizer, meta, callback)
    if info.is_main:
        atomic_write_text(out / "run.json", json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
    log.info("model %s: %s parameters", config.name, f"{model.num_parameters():,}")
    torch.manual_seed(opts.seed)
    result = trainer.fit(resume=opts.resume)
    return {
        "step": trainer.step,
        "interrupted": result.interrupted,
        "world_size": info.world_size,
        "rank": info.rank,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "first_eval": result.first_eval,
        "last_eval": result.last_eval,
        "checkpoint": str(result.checkpoint),
        "parameters": model.num_parameters(),
        "ppl": math.exp(min(result.last_eval.get("val_loss", 0.0), 50.0)),
    }
