"""`scratchllm finetune classify|instruct|dpo|judge`: fine-tune a checkpoint (ch. 6, 7, app. E)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchllm import settings
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


def _tasks() -> dict[str, type]:
    from scratchllm.finetune.classify import ClassifyOptions
    from scratchllm.finetune.instruct import InstructOptions
    from scratchllm.finetune.preference import DPOOptions

    # Each task's own defaults for the shared settings (the library's FinetuneOptions: 3 epochs).
    return {
        "classify": settings.with_defaults(ClassifyOptions, epochs=5.0),
        "instruct": settings.with_defaults(InstructOptions, epochs=2.0),
        "dpo": settings.with_defaults(DPOOptions, epochs=1.0, lr=5e-6),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    tasks = _tasks()
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = sub.add_parser("classify", help="text classification head (ch. 6)")
    settings.add_flags(c, tasks["classify"])
    c.add_argument("--balance", action="store_true", help="undersample classes to the smallest")
    c.add_argument(
        "--append-eot",
        action="store_true",
        help="end each text with <|endoftext|> and classify from that token's state",
    )
    i = sub.add_parser("instruct", help="instruction fine-tuning on Alpaca-format data (ch. 7)")
    settings.add_flags(i, tasks["instruct"])
    i.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca", help="prompt style")
    i.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt tokens")
    i.add_argument(
        "--generate-tokens", type=int, default=256, help="tokens per test response (0: skip)"
    )
    d = sub.add_parser("dpo", help="direct preference optimisation (ch. 7 bonus)")
    settings.add_flags(d, tasks["dpo"])
    d.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (0.1)")
    d.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca", help="prompt style")
    j = sub.add_parser("judge", help="score test_responses.json with an OpenAI-compatible judge")
    j.add_argument("--responses", required=True, help="JSON list with model_response fields")
    j.add_argument("--url", default="http://127.0.0.1:11434", help="server base URL (Ollama's)")
    j.add_argument("--model", default="llama3", help="judge model name on that server")
    j.add_argument("--api-key", help="bearer token, if the server wants one")
    j.add_argument("--template", choices=["alpaca", "phi3"], default="alpaca")
    j.add_argument("--out", help="write the scores here (default: RESPONSES with .scores.json)")


def run(args: argparse.Namespace) -> int:
    if args.task == "judge":
        return _judge(args)
    cls = _tasks()[args.task]
    with settings.flags_in_errors(cls):
        return _finetune(cls, args)


def _finetune(cls: type, args: argparse.Namespace) -> int:
    from scratchllm.commands._progress import ProgressCallback

    opts = settings.from_args(cls, args)
    out = Path(opts.out)
    if (out / "results.json").exists() or (out / "checkpoint").exists():
        raise InputError(f"--out {out} already holds a run; pick a new directory")
    callback = ProgressCallback(show_samples=args.task == "instruct")
    if args.task == "classify":
        from scratchllm.finetune.classify import finetune_classify

        r = finetune_classify(opts, callback)
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
        _params(r)
        print(f"val loss {r['val_loss']:.4f}  test loss {r['test_loss']:.4f}")
        if "responses" in r:
            print(f"test responses: {r['responses']}")
    else:
        from scratchllm.finetune.preference import finetune_dpo

        r = finetune_dpo(opts, callback)
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
        n = result["unparsed"]
        print(f"warning: {n} {'reply' if n == 1 else 'replies'} held no number")
    print(f"scores: {out}")
    return 0
