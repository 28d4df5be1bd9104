"""`scratchllm quickstart`: train a small GPT on the built-in corpus and show what it writes."""

from __future__ import annotations

import argparse
import time

HELP = "train a small GPT on the built-in corpus (a few minutes on a CPU) and print samples"

PROMPTS = ["The object", "In a function definition,", "Exceptions are"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/quickstart", help="run directory (default runs/quickstart)"
    )
    p.add_argument("--max-steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048)")


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.commands._progress import ProgressCallback
    from scratchllm.inference.generate import generate_text
    from scratchllm.train.pretrain import PretrainOptions, pretrain

    out = Path(args.out)
    if (out / "checkpoint").exists():
        shutil.rmtree(out / "checkpoint")  # a quickstart always starts fresh
        (out / "metrics.jsonl").unlink(missing_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("scratchllm quickstart: a GPT trained on Python's own language reference")
    print("  corpus builtin:python-docs (pydoc_data.topics, ~0.47 MB, ships with Python)")
    # A small byte-level BPE learned from the corpus itself (seconds), as nanochat does.
    from scratchllm.data.formats import iter_documents
    from scratchllm.tokenizers.train import train_bpe

    t0 = time.perf_counter()
    texts = [text for _, text in iter_documents(["builtin:python-docs"])]
    tokenizer = train_bpe(texts, args.vocab_size, name="python-docs-bpe")
    tokenizer_spec = str(out / "tokenizer")
    tokenizer.save(tokenizer_spec)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    n_bytes = sum(len(t.encode()) for t in texts)
    print(
        f"  tokenizer: BPE with {tokenizer.vocab_size} ids trained in "
        f"{time.perf_counter() - t0:.1f}s ({n_bytes / n_tokens:.2f} bytes per token)"
    )
    opts = PretrainOptions(
        data=["builtin:python-docs"],
        model="gpt-nano",
        tokenizer=tokenizer_spec,
        out=str(out),
        max_steps=args.max_steps,
        batch_size=16,
        context_length=128,
        lr=3e-3,
        warmup_steps=30,
        eval_every=100,
        eval_batches=10,
        sample_prompt=PROMPTS[0],
        sample_tokens=40,
        seed=args.seed,
        device=args.device,
        sampling="random",
    )
    start = time.perf_counter()
    result = pretrain(opts, ProgressCallback())
    first, last = result["first_eval"]["val_loss"], result["last_eval"]["val_loss"]
    print(
        f"\ntrained {result['parameters']:,} parameters for {result['steps']} steps "
        f"({result['tokens']:,} tokens) in {time.perf_counter() - start:.0f}s"
    )
    print(f"validation loss: {first:.3f} at the start -> {last:.3f} at the end")
    ckpt = load_checkpoint(out)
    print("\nsamples (temperature 0.8, top-k 40):")
    for i, prompt in enumerate(PROMPTS):
        text = generate_text(
            ckpt.model, ckpt.tokenizer, prompt, 80, temperature=0.8, top_k=40, seed=args.seed + i
        )
        print(f"--- {prompt}{text}")
    print(f"\ncheckpoint: {out / 'checkpoint'}  loss curve: {out / 'loss.png'}")
    print(f'next: scratchllm generate --checkpoint {out} --prompt "The object" --temperature 0.8')
    return 0
