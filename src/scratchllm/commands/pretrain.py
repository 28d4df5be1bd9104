"""`scratchllm pretrain`: tokenize a corpus and pretrain a GPT on it (ch. 5)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchllm.errors import InputError

HELP = "pretrain a GPT on text files (next-token prediction)"
DESCRIPTION = """Pretrain a GPT on your own text.

examples:
  scratchllm pretrain --data notes/ --model gpt-micro --tokenizer bytes --out runs/notes
  scratchllm pretrain --data 'books/*.txt' --model gpt2-small --tokenizer gpt2:gpt2_files \\
      --context-length 256 --max-steps 2000 --dtype bfloat16 --out runs/books
  scratchllm pretrain --out runs/books --resume      # continue where it stopped
  torchrun --nproc_per_node=4 -m scratchllm pretrain --model gpt2-small ... --out runs/big
      # data-parallel (DDP) on 4 GPUs or CPU processes; add --fsdp to shard the model
"""
log = logging.getLogger(__name__)


@dataclass
class PretrainOptions:
    """Every pretrain option with its default; YAML (--config) and flags override these."""

    data: list[str] = field(default_factory=lambda: ["builtin:python-docs"])
    model: str = "gpt-micro"
    tokenizer: str = "bytes"
    out: str = "runs/pretrain"
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    context_length: int | None = None
    lr: float = 4e-4
    min_lr: float | None = None
    warmup_steps: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float | None = None
    seed: int = 123
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0
    log_every: int = 10
    dtype: str = "float32"
    device: str = "auto"
    val_fraction: float = 0.1
    sampling: str = "sliding"
    stride: int | None = None
    strip_gutenberg: bool = False
    sample_prompt: str | None = None
    sample_tokens: int = 40
    resume: bool = False
    keep_last: int = 2
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    tensorboard: bool = False
    optimizer_impl: str = "auto"
    vocab_multiple: int | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None here so that a YAML --config can fill what the command line leaves out.
    a = p.add_argument
    a("--data", nargs="+", metavar="PATH", help="text files, folders, globs or builtin:python-docs")
    a("--model", help="preset name (gpt-nano, gpt-micro, gpt2-small, ...) or a config JSON file")
    a("--tokenizer", help="bytes | gpt2 | gpt2:DIR | a tokenizer directory")
    a("--out", help="run directory: checkpoint/, metrics.jsonl, loss.png")
    a("--config", help="YAML file with any of these options (flags win over it)")
    a("--max-steps", type=int, help="optimizer steps (with --epochs, the smaller wins)")
    a("--epochs", type=float, help="passes over the training split")
    a("--batch-size", type=int, help="sequences per micro-batch (default 8)")
    a("--grad-accum-steps", type=int, help="micro-batches per optimizer step (default 1)")
    a("--context-length", type=int, help="tokens per window (default: the model's)")
    a("--lr", type=float, help="peak learning rate (default 4e-4)")
    a("--min-lr", type=float, help="cosine floor (default lr/10)")
    a("--warmup-steps", type=int, help="linear warmup steps (default 5%% of steps, ≤200)")
    a("--schedule", choices=["cosine", "constant"], help="learning-rate schedule")
    a("--weight-decay", type=float, help="AdamW weight decay on ≥2-D weights (default 0.1)")
    a("--grad-clip", type=float, help="clip the global gradient norm (0 = off; default 1.0)")
    a("--dropout", type=float, help="override the model's dropout rate")
    a("--seed", type=int, help="random seed (default 123)")
    a("--eval-every", type=int, help="evaluate and save every N steps (default 100)")
    a("--eval-batches", type=int, help="batches per evaluation (default 20)")
    a("--save-every", type=int, help="also save every N steps between evaluations")
    a("--log-every", type=int, help="write a metrics line every N steps (default 10)")
    a("--dtype", choices=["float32", "bfloat16"], help="autocast precision (default float32)")
    a("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    a("--val-fraction", type=float, help="tail of the corpus held out (default 0.1)")
    a("--sampling", choices=["sliding", "random"], help="window sampling (default sliding)")
    a("--stride", type=int, help="sliding-window stride (default: context length)")
    a("--strip-gutenberg", action="store_const", const=True, help="drop Gutenberg boilerplate")
    a("--sample-prompt", help="prompt for the sample printed at each evaluation")
    a("--sample-tokens", type=int, help="tokens in each evaluation sample (0 = none)")
    a("--resume", action="store_const", const=True, help="continue the run in --out")
    a("--keep-last", type=int, help="step snapshots kept in OUT/checkpoints/ (default 2, 0 = none)")
    a("--compile", action="store_const", const=True, help="torch.compile the training step")
    a(
        "--activation-checkpointing",
        action="store_const",
        const=True,
        help="recompute block activations in backward: less memory, ~30%% more compute",
    )
    a("--fsdp", action="store_const", const=True, help="under torchrun: shard with FSDP2")
    a("--tensorboard", action="store_const", const=True, help="log to OUT/tensorboard too")
    a(
        "--vocab-multiple",
        type=int,
        help="pad the output matmul to a multiple of N rows (default 64 on CUDA, 1 on CPU)",
    )
    a(
        "--optimizer-impl",
        choices=["auto", "fused", "foreach"],
        help="AdamW kernel (default auto: fused)",
    )


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"--config {path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"--config {path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_options(args: argparse.Namespace) -> PretrainOptions:
    fields = {f.name for f in dataclasses.fields(PretrainOptions)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        for key, value in load_yaml(args.config).items():
            if key not in fields:
                raise InputError(f"--config {args.config}: unknown option {key!r}")
            values[key] = value
    for key in fields:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    if values.get("resume"):
        # Resuming: the original run's options are the base; flags given now still win.
        saved = Path(values.get("out", PretrainOptions.out)) / "run.json"
        if saved.exists():
            base = {k: v for k, v in json.loads(saved.read_text()).items() if k in fields}
            values = {**base, **values}
    try:
        return PretrainOptions(**values)
    except TypeError as exc:
        raise InputError(f"pretrain options: {exc}") from None


def build_model_config(opts: PretrainOptions, tokenizer):
    from scratchllm.config import PRESETS, ModelConfig, resolve_model_config

    config = resolve_model_config(opts.model)
    explicit_vocab = False
    if opts.model not in PRESETS:
        path = Path(opts.model)
        raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        explicit_vocab = "vocab_size" in raw
    changes: dict[str, Any] = {}
    if explicit_vocab:
        if tokenizer.vocab_size > config.vocab_size:
            raise InputError(
                f"--tokenizer {opts.tokenizer}: its {tokenizer.vocab_size} ids do not fit the "
                f"model's vocab_size {config.vocab_size} (from {opts.model})"
            )
    else:  # the vocabulary follows the tokenizer unless the config sets it
        changes["vocab_size"] = tokenizer.vocab_size
    if opts.context_length is not None:
        changes["context_length"] = opts.context_length
    if opts.dropout is not None:
        changes["drop_rate"] = opts.dropout
    return ModelConfig.from_dict({**config.to_dict(), **changes}, source=f"--model {opts.model}")


def run(args: argparse.Namespace) -> int:
    from scratchllm.train.trainer import TrainingDiverged

    opts = resolve_options(args)
    try:
        result = pretrain(opts)
    except TrainingDiverged as exc:
        print(f"scratchllm pretrain: stopped: {exc}", file=sys.stderr)
        return 1
    if result["rank"] != 0:
        return 0  # under torchrun rank 0 alone reports
    if result["interrupted"]:
        print(
            f"stopped by {result['interrupted']} at step {result['step']}; checkpoint saved in "
            f"{result['checkpoint']}: continue with --resume",
            file=sys.stderr,
        )
        return 143 if result["interrupted"] == "SIGTERM" else 130
    first, last = result["first_eval"], result["last_eval"]
    key = "val_loss" if "val_loss" in last else "train_loss"
    print(
        f"done: {result['steps']} steps, {result['tokens']:,} tokens in {result['seconds']:.0f}s "
        f"({result['tokens'] / max(result['seconds'], 1e-9):,.0f} tokens/s)"
    )
    if key in first and key in last:
        print(f"{key}: {first[key]:.3f} -> {last[key]:.3f}")
    print(f"checkpoint: {result['checkpoint']}")
    print(f"metrics: {Path(opts.out) / 'metrics.jsonl'}  plot: {Path(opts.out) / 'loss.png'}")
    return 0


def pretrain(opts: PretrainOptions, callback=None) -> dict[str, Any]:
    """Run pretraining from resolved options; returns a summary dict.

    Under torchrun (RANK/WORLD_SIZE set) every rank runs this; rank 0 alone writes."""
    from scratchllm.train import distributed as D
    from scratchllm.utils import pick_device

    out = Path(opts.out)
    if not 0.0 <= opts.val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    # Under torchrun: join the process group; each rank trains on its own GPU / data part.
    info = D.env_dist_info()
    device = D.device_for_rank(pick_device(opts.device), info)
    info = D.init_distributed(device)
    try:
        return _pretrain(opts, callback, out, device, info)
    finally:
        D.cleanup()


def _pretrain(opts: PretrainOptions, callback, out: Path, device, info) -> dict[str, Any]:
    import torch

    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.commands._progress import ProgressCallback
    from scratchllm.data.loader import split_tokens
    from scratchllm.data.shards import token_file_for
    from scratchllm.model.gpt import GPTModel
    from scratchllm.tokenizers import load_tokenizer
    from scratchllm.train import distributed as D
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import TrainConfig, Trainer, TrainerCallback
    from scratchllm.utils import seed_everything

    if opts.resume:
        ckpt = load_checkpoint(out)
        tokenizer, config = ckpt.tokenizer, ckpt.config
        model = GPTModel(config)
    else:
        if (out / "checkpoint" / "train_state.pt").exists():
            raise InputError(
                f"--out {out} already holds a run; pass --resume to continue it or pick a new --out"
            )
        tokenizer = load_tokenizer(opts.tokenizer)
        config = build_model_config(opts, tokenizer)
        # Same seed on every rank: FSDP does not broadcast, so all ranks must build equal weights.
        seed_everything(opts.seed)
        model = GPTModel(config)
    D.barrier()  # every rank has checked --out before rank 0 writes into it
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
    train_config = TrainConfig(
        max_steps=opts.max_steps,
        epochs=opts.epochs,
        batch_size=opts.batch_size,
        grad_accum_steps=opts.grad_accum_steps,
        lr=opts.lr,
        min_lr=opts.min_lr,
        warmup_steps=opts.warmup_steps,
        schedule=opts.schedule,
        weight_decay=opts.weight_decay,
        grad_clip=opts.grad_clip or None,
        eval_every=opts.eval_every,
        eval_batches=opts.eval_batches,
        save_every=opts.save_every,
        log_every=opts.log_every,
        dtype=opts.dtype,
        device=str(device),
        seed=opts.seed,
        sample_tokens=opts.sample_tokens,
        keep_last=opts.keep_last,
        optimizer_impl=opts.optimizer_impl,
        compile=opts.compile,
        activation_checkpointing=opts.activation_checkpointing,
        fsdp=opts.fsdp,
        tensorboard=opts.tensorboard,
        vocab_multiple=opts.vocab_multiple,
    )
    if opts.max_steps is None and opts.epochs is None:
        train_config.epochs = 1.0
    meta = {"title": f"{config.name} on {', '.join(opts.data)}"[:80], "data": opts.data}
    if not info.is_main:
        callback = TrainerCallback()  # one progress bar, from rank 0
    trainer = Trainer(
        model, task, train_config, out, tokenizer, meta, callback or ProgressCallback()
    )
    from scratchllm.fs import atomic_write_text

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
