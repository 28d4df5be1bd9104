"""`scratchllm generate`: continue a prompt with a trained or imported checkpoint."""

from __future__ import annotations

import argparse
import sys

from scratchllm.commands._inference import add_model_arguments, load_model

HELP = "generate text from a checkpoint"
DESCRIPTION = """Continue a prompt with a checkpoint; prints the continuation.

examples:
  scratchllm generate --checkpoint runs/quickstart --prompt "The object" --max-new-tokens 60
  scratchllm generate --checkpoint runs/q --prompt "Once" --temperature 0.8 --top-k 40 --seed 1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_model_arguments(p)
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.inference.generate import generate_text

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be ≥ 0, got {args.max_new_tokens}")
    ckpt = load_model(args)
    prompt_len = len(ckpt.tokenizer.encode(args.prompt, allow_special=True))
    if prompt_len > ckpt.config.context_length:
        raise InputError(
            f"--prompt: {prompt_len} tokens exceed the model's context length of "
            f"{ckpt.config.context_length}"
        )
    text = generate_text(
        ckpt.model,
        ckpt.tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    sys.stdout.write((args.prompt if args.echo else "") + text + "\n")
    return 0
