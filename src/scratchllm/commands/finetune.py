"""`scratchllm finetune classify|instruct|dpo|judge`: fine-tune a checkpoint (ch. 6, 7, app. E)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchllm.errors import InputError

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
classify) and results.json into --out. With --lora-rank, adapters are also saved alone in
--out/adapters/ and merged into checkpoint/ for export.
"""


def _common(p: argparse.ArgumentParser, lr: float, epochs: float, train_help: str) -> None:
    a = p.add_argument
    a("--checkpoint", required=True, help="base checkpoint (or run) directory")
    a("--data", required=True, help="training data file")
    a("--out", required=True, help="run directory for checkpoint/, metrics, results.json")
    a("--epochs", type=float, default=epochs, help=f"passes over the training split ({epochs:g})")
    a("--batch-size", type=int, default=8, help="examples per batch (8)")
    a("--lr", type=float, default=lr, help=f"peak learning rate ({lr:g})")
    a("--seed", type=int, default=123, help="seed for split, shuffling and init (123)")
    a("--lora-rank", type=int, default=0, help="LoRA rank (0 = no LoRA, train --train layers)")
    a("--lora-alpha", type=float, default=16.0, help="LoRA alpha; updates scale by alpha/rank")
    a("--lora-targets", default="attn,ff", help="layers LoRA wraps: attn, ff or attn,ff")
    a("--train", help=train_help)
    a("--max-length", type=int, help="tokens per example (default: the model's context length)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (0.1)")
    a("--warmup-steps", type=int, help="linear warmup steps (default 5%% of steps)")
    a("--dropout", type=float, help="override the checkpoint's dropout rate")
    a("--eval-batches", type=int, default=50, help="batches per split at each evaluation (50)")
    a("--device", default="auto", help="auto | cpu | cuda | mps")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = sub.add_parser("classify", help="text classification head (ch. 6)")
    _common(c, 5e-5, 5.0, "what trains: head | last-N (blocks + final norm + head) | all (last-1)")
    c.add_argument("--balance", action="store_true", help="undersample classes to the smallest")
    c.add_argument(
        "--append-eot",
        action="store_true",
        help="end each text with <|endoftext|> and classify from that token's state",
    )
    i = sub.add_parser("instruct", help="instruction fine-tuning on Alpaca-format data (ch. 7)")
    _common(i, 5e-5, 2.0, "what trains: head | last-N | all (all)")
    i.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca", help="prompt style")
    i.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt tokens")
    i.add_argument(
        "--generate-tokens", type=int, default=256, help="tokens per test response (0: skip)"
    )
    d = sub.add_parser("dpo", help="direct preference optimisation (ch. 7 bonus)")
    _common(d, 5e-6, 1.0, "what trains: head | last-N | all (all)")
    d.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (0.1)")
    d.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca", help="prompt style")
    j = sub.add_parser("judge", help="score test_responses.json with an OpenAI-compatible judge")
    j.add_argument("--responses", required=True, help="JSON list with model_response fields")
    j.add_argument("--url", default="http://127.0.0.1:11434", help="server base URL (Ollama's)")
    j.add_argument("--model", default="llama3", help="judge model name on that server")
    j.add_argument("--api-key", help="bearer token, if the server wants one")
    j.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca")
    j.add_argument("--out", help="write the scores here (default: RESPONSES with .scores.json)")


def _options(cls, args: argparse.Namespace):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def run(args: argparse.Namespace) -> int:
    from scratchllm.commands._progress import ProgressCallback

    if args.task == "judge":
        return _judge(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    out = Path(args.out)
    if (out / "results.json").exists() or (out / "checkpoint").exists():
        raise InputError(f"--out {out} already holds a run; pick a new directory")
    callback = ProgressCallback(show_samples=args.task == "instruct")
    if args.task == "classify":
        from scratchllm.finetune.classify import ClassifyOptions, finetune_classify

        r = finetune_classify(_options(ClassifyOptions, args), callback)
        _params(r)
        for name in ("train", "val", "test"):
            print(f"{name}: accuracy {r[f'{name}_accuracy']:.4f}  loss {r[f'{name}_loss']:.4f}")
        print(f"confusion matrix: {out / 'confusion_matrix.png'}")
    elif args.task == "instruct":
        from tqdm import tqdm

        from scratchllm.finetune.instruct import InstructOptions, finetune_instruct

        opts = _options(InstructOptions, args)
        bar = None

        def progress(n: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(desc="responses", unit="resp", dynamic_ncols=True)
            bar.update(n)

        r = finetune_instruct(opts, callback, progress)
        if bar is not None:
            bar.close()
        _params(r)
        print(f"val loss {r['val_loss']:.4f}  test loss {r['test_loss']:.4f}")
        if "responses" in r:
            print(f"test responses: {r['responses']}")
    else:
        from scratchllm.finetune.preference import DPOOptions, finetune_dpo

        r = finetune_dpo(_options(DPOOptions, args), callback)
        _params(r)
        print(
            f"val: loss {r['val_loss']:.4f}  reward margin {r['val_reward_margin']:.4f}  "
            f"accuracy {r['val_accuracy']:.4f}"
        )
    if r.get("truncated"):
        print(
            f"warning: {r['truncated']} examples were longer than the allowed length and were cut"
        )
    print(f"checkpoint: {r['checkpoint']}")
    print(f"results: {out / 'results.json'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def _params(r: dict) -> None:
    print(
        f"trained {r['train']}: {r['trainable_parameters']:,} of {r['total_parameters']:,} "
        f"parameters ({100 * r['trainable_parameters'] / r['total_parameters']:.2f}%)"
    )


def _judge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scratchllm.finetune.judge import JudgeClient, score_responses
    from scratchllm.fs import atomic_write_text

    path = Path(args.responses)
    if not path.is_file():
        raise InputError(f"--responses {path}: no such file")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"--responses {path}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"--responses {path}: expected a JSON list of objects")
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
        print(f"warning: {result['unparsed']} replies held no number")
    print(f"scores: {out}")
    return 0
