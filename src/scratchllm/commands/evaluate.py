"""`scratchllm evaluate`: held-out text (loss, perplexity, bits per byte) and in-context tasks
(the CORE suite, or a task file of your own) for a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HELP = "evaluate a checkpoint: bits per byte on text, CORE and other in-context tasks"
DESCRIPTION = """Evaluate a checkpoint on held-out text and on in-context tasks.

Writes OUT/results.json, a bar chart of the centred task scores (OUT/centered.png) and prints a
table. Text: loss in nats per token, perplexity and bits per byte (comparable across tokenizers).
Tasks: accuracy, the score centred on chance, and CORE (the mean centred score; docs/evaluation.md).

examples:
  scratchllm evaluate --checkpoint runs/q --out runs/q/eval --text held_out.txt
  scratchllm evaluate --checkpoint runs/q --out runs/q/eval --tasks core --limit 500
  scratchllm evaluate --checkpoint runs/q --out runs/q/eval --tasks copa arc_easy
  scratchllm evaluate --checkpoint runs/q --out runs/q/eval --task-file mine.jsonl \\
      --type multiple_choice --shots 3 --delimiter '\\nAnswer: ' --baseline 25
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--out", required=True, help="directory for results.json and the chart")
    p.add_argument("--text", nargs="+", default=[], metavar="FILE", help="held-out text files")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between the starts of text windows (default: half the model's window)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="NAME",
        help="core (all 18 CORE tasks) or some of their names (e.g. copa arc_easy)",
    )
    p.add_argument(
        "--eval-dir",
        default=None,
        help="folder of the CORE .jsonl files (default: $SCRATCHLLM_TEST_DATA/eval)",
    )
    g = p.add_argument_group("a task file of your own")
    g.add_argument("--task-file", default=None, help="JSONL in one of the three CORE shapes")
    g.add_argument(
        "--type", default=None, choices=["multiple_choice", "schema", "language_modeling"]
    )
    g.add_argument("--shots", type=int, default=0, help="few-shot examples (default 0)")
    g.add_argument(
        "--delimiter",
        default=" ",
        help="between the question/context and the answer (default ' '; \\n and \\t understood)",
    )
    g.add_argument("--baseline", type=float, default=0.0, help="chance accuracy in percent")
    g.add_argument("--name", default=None, help="the task's name (default: the file's stem)")
    p.add_argument("--limit", type=int, default=None, help="items per task, a seeded subset")
    p.add_argument("--seed", type=int, default=1234, help="draws the subset and the few shots")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 autocast where the hardware has fast bf16, else float32",
    )
    p.add_argument(
        "--log-samples", action="store_true", help="also write OUT/samples/TASK.jsonl per item"
    )


def _unescape(text: str) -> str:
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _task_specs(args: argparse.Namespace) -> list[Any]:
    from scratchllm.errors import InputError
    from scratchllm.evaluate import TaskSpec, core_suite

    specs = core_suite(args.tasks, args.eval_dir) if args.tasks else []
    if args.task_file is None:
        for flag in ("type", "name"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag} describes a --task-file; none was given")
        return specs
    if args.type is None:
        raise InputError(
            f"--task-file {args.task_file}: --type is needed "
            "(multiple_choice, schema or language_modeling)"
        )
    name = args.name or Path(args.task_file).stem
    if name in {s.name for s in specs}:
        raise InputError(f"--task-file {args.task_file}: name {name!r} is taken; pass --name")
    spec = TaskSpec(
        name, Path(args.task_file), args.type, args.shots, _unescape(args.delimiter), args.baseline
    )
    return [*specs, spec]


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.errors import InputError
    from scratchllm.evaluate import (
        build_results,
        evaluate_tasks,
        evaluate_text,
        format_table,
        load_items,
        read_text,
        resolve_autocast,
        write_results,
    )
    from scratchllm.evaluate.tasks import subset
    from scratchllm.utils import pick_device

    if not (args.text or args.tasks or args.task_file):
        raise InputError("nothing to evaluate: give --text FILES, --tasks NAMES or --task-file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, expected a directory")
    for flag in ("limit", "stride", "batch_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be ≥ 1, got {value}")
    # Every input is read and checked before the model is loaded or anything is written.
    texts = [(Path(f), read_text(f)) for f in args.text]
    tasks = [(spec, load_items(spec)) for spec in _task_specs(args)]
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device)
    amp = resolve_autocast(device, args.dtype)
    started = time.perf_counter()

    text_results = []
    for path, text in texts:
        with tqdm(desc=f"text {path.name}", unit="window", file=sys.stderr, leave=False) as bar:
            text_results.append(
                evaluate_text(
                    ckpt.model,
                    ckpt.tokenizer,
                    text,
                    name=str(path),
                    stride=args.stride,
                    batch_tokens=args.batch_tokens,
                    autocast=amp,
                    progress=bar.update,
                )
            )
    task_results = []
    if tasks:
        total = sum(len(subset(len(items), args.limit, args.seed)) for _, items in tasks)
        with tqdm(total=total, desc="tasks", unit="item", file=sys.stderr) as bar:

            def step(name: str, n: int) -> None:
                bar.set_description(name, refresh=False)
                bar.update(n)

            task_results = evaluate_tasks(
                ckpt.model,
                ckpt.tokenizer,
                tasks,
                limit=args.limit,
                seed=args.seed,
                batch_tokens=args.batch_tokens,
                autocast=amp,
                progress=step,
            )
    meta = {
        "checkpoint": str(ckpt.path),
        "step": ckpt.meta.get("step"),
        "model": {
            "name": ckpt.config.name,
            "parameters": ckpt.model.num_parameters(),
            "context_length": ckpt.config.context_length,
            "vocab_size": ckpt.config.vocab_size,
        },
        "tokenizer": ckpt.tokenizer.name,
        "settings": {
            "limit": args.limit,
            "seed": args.seed,
            "stride": args.stride,
            "batch_tokens": args.batch_tokens,
            "device": str(device),
            "dtype": "bfloat16" if amp == torch.bfloat16 else "float32",
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    results = build_results(text_results, task_results, meta)
    written = write_results(
        out, results, task_results, samples=args.log_samples, title=str(ckpt.path)
    )
    print(format_table(results))
    print(f"wrote {', '.join(p.name for p in written if p.parent == out)} to {out}")
    return 0
