"""The book's chapter 5 run, reproduced with scratchllm's pretrain.

gpt2-small architecture (untied head, dropout 0.1, no qkv bias), context 256, the-verdict.txt,
AdamW lr 4e-4 weight decay 0.1, batch 2, 10 epochs, 90/10 split, constant learning rate, no
warmup or clipping (the book's `train_model_simple`). The book reports train 0.569 / val 6.37
at the end. Writes benchmarks/results/ch5_verdict.json.

    python benchmarks/ch5_verdict.py [--epochs 10] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, write_result  # noqa: E402

BOOK = {"train_loss": 0.569, "val_loss": 6.372}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from scratchllm.train.pretrain import PretrainOptions, pretrain
    from scratchllm.train.trainer import TrainerCallback

    data = data_dir()
    with tempfile.TemporaryDirectory() as tmp:
        opts = PretrainOptions(
            data=[str(data / "corpora" / "the-verdict.txt")],
            model="gpt2-small",
            tokenizer=f"gpt2:{data / 'gpt2'}",
            out=tmp,
            epochs=args.epochs,
            batch_size=2,
            context_length=256,
            lr=4e-4,
            weight_decay=0.1,
            schedule="constant",
            warmup_steps=0,
            grad_clip=0.0,
            dropout=0.1,
            seed=123,
            eval_every=5,
            eval_batches=5,
            log_every=5,
            val_fraction=0.1,
            sample_prompt="Every effort moves you",
            sample_tokens=25,
            device=args.device,
        )
        start = time.perf_counter()
        result = pretrain(opts, callback=TrainerCallback())
        seconds = time.perf_counter() - start
        from scratchllm.train.metrics import MetricsLog

        evals = [r for r in MetricsLog(Path(tmp) / "metrics.jsonl").read() if r["kind"] == "eval"]
    last = result["last_eval"]
    payload = {
        "config": "gpt2-small (163M, untied), ctx 256, the-verdict, AdamW 4e-4 wd 0.1, batch 2",
        "epochs": args.epochs,
        "steps": result["steps"],
        "seconds": round(seconds, 1),
        "tokens_per_s": round(result["tokens"] / seconds, 1),
        "scratchllm": {
            "train_loss": round(last["train_loss"], 3),
            "val_loss": round(last["val_loss"], 3),
        },
        "book": BOOK,
        "final_sample": evals[-1].get("sample") if evals else None,
        "curve": [
            {
                "step": r["step"],
                "train_loss": round(r["train_loss"], 3),
                "val_loss": round(r["val_loss"], 3),
            }
            for r in evals
        ],
    }
    path = write_result("ch5_verdict", payload, args.out)
    print(
        f"train {last['train_loss']:.3f} / val {last['val_loss']:.3f} (book 0.569 / 6.37) "
        f"in {seconds:.0f}s -> {path}"
    )


if __name__ == "__main__":
    main()
