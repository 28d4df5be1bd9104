"""`scratchllm pretrain`: tokenize a corpus and pretrain a GPT on it (ch. 5)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scratchllm import settings
from scratchllm.train.pretrain import PretrainOptions, pretrain

HELP = "pretrain a GPT on text files (next-token prediction)"
DESCRIPTION = """Pretrain a GPT on your own text.

examples:
  scratchllm pretrain --data notes/ --model gpt-micro --tokenizer bytes --out runs/notes
  scratchllm pretrain --data 'books/*.txt' --model gpt2-small --tokenizer gpt2:gpt2_files \\
      --context-length 256 --max-steps 2000 --dtype bfloat16 --out runs/books
  scratchllm pretrain --out runs/books --resume      # continue where it stopped
  scratchllm pretrain --data notes/ --recipe speedrun --time-budget 10m --out runs/fast
      # the best known settings for 10 minutes of training on this machine
  scratchllm pretrain --data data/web --val-data val.jsonl --tokenizer gpt2 --out runs/web
      # data/web from `scratchllm data prepare`; --val-data in any input format
  torchrun --nproc_per_node=4 -m scratchllm pretrain --model gpt2-small ... --out runs/big
      # data-parallel (DDP) on 4 GPUs or CPU processes; add --fsdp to shard the model
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Every flag comes from a PretrainOptions field; argparse defaults are None so that a YAML
    # --config can fill what the command line leaves out.
    settings.add_flags(p, PretrainOptions, config=True)


def resolve_options(args: argparse.Namespace) -> PretrainOptions:
    """Defaults < --config YAML < flags; with --resume, OUT/run.json sits under the YAML."""
    values = settings.given(PretrainOptions, args)
    return settings.build(PretrainOptions, settings.with_saved_settings(PretrainOptions, values))


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _data_line(label: str, report: dict[str, Any]) -> list[str]:
    inputs = ", ".join(report["inputs"])
    if report["prepared"]:
        read = f"prepared shards {inputs}"
    else:
        read = f"{_count(report['files'], 'file')} read ({inputs})"
    documents, tokens = _count(report["documents"], "document"), _count(report["tokens"], "token")
    lines = [f"{label}: {read}: {documents}, {tokens}"]
    if (g := report.get("gutenberg")) is not None:
        lines.append(
            f"  --strip-gutenberg removed {_count(g['bytes'], 'byte')} of Project Gutenberg "
            f"headers and footers from {g['stripped']} of {_count(g['files'], 'text file')}"
        )
    return lines


def print_header(info: dict[str, Any]) -> None:
    """What the run is about to do, before its first step (`pretrain`'s `on_header`)."""
    lines = _data_line("data", info["data"])
    if info["val_data"] is not None:
        lines += _data_line("validation data", info["val_data"])
        held = "--val-data"
    elif info["split"]:
        held = f"the last {info['split']:.0%} of the data held out"
    else:
        held = "none held out: no validation loss"
    lines.append(
        f"split: {info['train_tokens']:,} train / {info['val_tokens']:,} validation tokens ({held})"
    )
    lines.append(f"model: {info['model']}, {info['parameters']:,} parameters")
    world = info["world_size"]
    ranks = (
        f"world size {world} (tokens/s is the total over all {world} ranks)"
        if world > 1
        else "world size 1 (one process)"
    )
    lines.append(f"device: {info['device']}, dtype {info['dtype']}; {ranks}")
    if info.get("time_budget") is not None:
        from scratchllm.train.budget import format_duration

        lines.append(
            f"time budget: {format_duration(info['time_budget'])} of training steps "
            "(evaluation and saving not counted)"
        )
    if info.get("recipe") is not None:
        name, reasons = info["recipe"]
        lines.append(f"recipe {name} picked:")
        lines += [f"  {reason}" for reason in reasons]
    if info["resume_step"] is not None:
        lines.append(f"resuming from step {info['resume_step']}")
    print("\n".join(lines), flush=True)


def run(args: argparse.Namespace) -> int:
    from scratchllm.commands._progress import ProgressCallback
    from scratchllm.train.trainer import TrainingDiverged

    try:
        with settings.flags_in_errors(PretrainOptions):
            opts = resolve_options(args)
            given = set(settings.given(PretrainOptions, args))  # a recipe keeps these
            result = pretrain(opts, ProgressCallback(), on_header=print_header, explicit=given)
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
