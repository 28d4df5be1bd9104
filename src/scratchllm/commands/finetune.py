"""`scratchllm finetune classify|instruct|dpo|judge`: fine-tune a checkpoint (ch. 6, 7, app. E)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scratchllm import settings

HELP = "fine-tune a checkpoint: classifier, instructions, LoRA, DPO"
DESCRIPTION = """Fine-tune a checkpoint on your own labelled texts, instructions or preferences.

examples:
  scratchllm finetune classify --checkpoint runs/base --data sms.tsv --out runs/spam --balance
  scratchllm finetune classify --checkpoint runs/base --data sms.tsv --out runs/spam-lora \\
      --lora-rank 8 --lora-alpha 16 --lr 3e-3
  scratchllm finetune instruct --checkpoint runs/base --data instruction-data.json \\
      --out runs/inst --template alpaca --mask-prompt
  scratchllm finetune dpo --checkpoint runs/inst --data instruction-data-with-preference.json \\
      --out runs/dpo
  scratchllm finetune judge --responses runs/inst/test_responses.json --url http://127.0.0.1:11434

Each run writes checkpoint/, metrics.jsonl, loss.png (+ accuracy.png, confusion_matrix.png for
classify) and results.json into --out. With --lora-rank, every checkpoint holds the merged
weights and the adapters, which are also saved alone in --out/adapters/; `scratchllm convert
--from RUN --to peft --out DIR` turns them into a PEFT adapter, and --adapter DIR starts a LoRA
run from one (--lora-rank at least its r). A run that was stopped or killed continues with:
scratchllm finetune TASK --out RUN --resume
"""


def _tasks() -> dict[str, type]:
    from scratchllm.finetune.classify import ClassifyOptions
    from scratchllm.finetune.instruct import InstructOptions
    from scratchllm.finetune.preference import DPOOptions

    # Each task's flags and defaults are its options class's fields (one home each).
    return {"classify": ClassifyOptions, "instruct": InstructOptions, "dpo": DPOOptions}


TASK_HELP = {
    "classify": "text classification head (ch. 6)",
    "instruct": "instruction fine-tuning on Alpaca-format data (ch. 7)",
    "dpo": "direct preference optimisation (ch. 7 bonus)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, cls in _tasks().items():
        settings.add_flags(sub.add_parser(name, help=TASK_HELP[name]), cls, config=True)
    j = sub.add_parser("judge", help="score test_responses.json with an OpenAI-compatible judge")
    j.add_argument("--responses", required=True, help="JSON list with model_response fields")
    j.add_argument("--url", default="http://127.0.0.1:11434", help="server base URL (Ollama's)")
    j.add_argument("--model", default="llama3", help="judge model name on that server")
    j.add_argument("--api-key", help="bearer token, if the server wants one")
    j.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca")
    j.add_argument("--out", help="write the scores here (default: RESPONSES with .scores.json)")


def run(args: argparse.Namespace) -> int:
    from scratchllm.train.trainer import TrainingDiverged

    if args.task == "judge":
        return _judge(args)
    cls = _tasks()[args.task]
    try:
        with settings.flags_in_errors(cls):
            # Defaults < OUT/run.json (with --resume) < --config YAML < flags.
            values = settings.with_saved_settings(cls, settings.given(cls, args))
            return _finetune(settings.build(cls, values), args)
    except TrainingDiverged as exc:
        print(f"scratchllm finetune: stopped: {exc}", file=sys.stderr)
        return 1


def _finetune(opts, args: argparse.Namespace) -> int:
    from scratchllm.commands._progress import ProgressCallback

    out = Path(opts.out)
    callback = ProgressCallback(show_samples=args.task == "instruct")
    if args.task == "classify":
        from scratchllm.finetune.classify import finetune_classify

        r = finetune_classify(opts, callback)
        if _interrupted(r):
            return _interrupted(r)
        _params(r)
        for name in ("train", "val", "test"):
            print(f"{name}: accuracy {r[f'{name}_accuracy']:.4f}  loss {r[f'{name}_loss']:.4f}")
        print(f"confusion matrix: {out / 'confusion_matrix.png'}")
    elif args.task == "instruct":
        from tqdm import tqdm

        from scratchllm.finetune.instruct import finetune_instruct

        bar = None

        def progress(n: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(desc="responses", unit="resp", dynamic_ncols=True)
            bar.update(n)

        r = finetune_instruct(opts, callback, progress)
        if bar is not None:
            bar.close()
        if _interrupted(r):
            return _interrupted(r)
        _params(r)
        print(f"val loss {r['val_loss']:.4f}  test loss {r['test_loss']:.4f}")
        if "responses" in r:
            print(f"test responses: {r['responses']}")
    else:
        from scratchllm.finetune.preference import finetune_dpo

        r = finetune_dpo(opts, callback)
        if _interrupted(r):
            return _interrupted(r)
        _params(r)
        print(
            f"val: loss {r['val_loss']:.4f}  reward margin {r['val_reward_margin']:.4f}  "
            f"accuracy {r['val_accuracy']:.4f}"
        )
    if r.get("truncated"):
        n, dropped = r["truncated"], r.get("dropped", 0)
        gone = f" ({dropped} dropped: no response left)" if dropped else ""
        print(
            f"warning: {n} {'example' if n == 1 else 'examples'} longer than the allowed length "
            f"{'was' if n == 1 else 'were'} cut{gone}"
        )
    print(f"checkpoint: {r['checkpoint']}")
    print(f"results: {out / 'results.json'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _interrupted(r: dict) -> int:
    """0 for a finished run; for one a signal stopped (its checkpoint saved), says how to go on
    and returns the exit code (143 SIGTERM, 130 SIGINT)."""
    if not r.get("interrupted"):
        return 0
    print(
        f"stopped by {r['interrupted']} at step {r['step']}; checkpoint saved in "
        f"{r['checkpoint']}: continue with --resume",
        file=sys.stderr,
    )
    return 143 if r["interrupted"] == "SIGTERM" else 130


def _params(r: dict) -> None:
    print(
        f"trained {r['train']}: {r['trainable_parameters']:,} of {r['total_parameters']:,} "
        f"parameters ({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%)"
    )


def _judge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scratchllm.finetune.judge import JudgeClient, load_responses, score_responses
    from scratchllm.fs import atomic_write_text

    path = Path(args.responses)
    entries = load_responses(path)
    client = JudgeClient(args.url, args.model, args.api_key)
    with tqdm(total=len(entries), desc="judge", unit="resp", dynamic_ncols=True) as bar:
        result = score_responses(client, entries, template=args.template, progress=bar.update)
    out = Path(args.out) if args.out else path.with_suffix(".scores.json")
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    mean = result["mean_score"]
    print(
        f"mean score: {mean:.2f} over {result['scored']} responses"
        if mean is not None
        else "no scores"
    )
    if result["unparsed"]:
        n = result["unparsed"]
        print(f"warning: {n} {'reply' if n == 1 else 'replies'} held no number")
    print(f"scores: {out}")
    return 0
