"""`scratchllm generate`: continue a prompt with a trained or imported checkpoint."""

from __future__ import annotations

import argparse
import sys

from scratchllm.commands._inference import (
    add_model_arguments,
    load_model,
    sampling_error,
    unescape,
)

HELP = "generate text from a checkpoint"
DESCRIPTION = """Continue a prompt with a checkpoint; prints the continuation.

The KV-cache engine (the one `chat` and `serve` use) generates when the prompt and
--max-new-tokens fit in the model's context; a longer run slides the context window as the
book's loop does (there --repetition-penalty is not available).

examples:
  scratchllm generate --checkpoint runs/quickstart --prompt "The object" --max-new-tokens 60
  scratchllm generate --checkpoint runs/q --prompt "Once" --temperature 0.8 --top-k 40 --seed 1
  scratchllm generate --checkpoint runs/q --prompt "Once" --temperature 0.8 -n 3 --stop "\\n\\n"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 makes tokens already in the prompt or text less likely; 1 = off (default)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="end the text before this string (repeatable; '\\n' is a newline)",
    )
    p.add_argument(
        "-n", type=int, default=1, help="samples of the prompt (seeds seed, seed+1, ...)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_model_arguments(p)
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.inference.engine import Engine, SamplingParams

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be ≥ 0, got {args.max_new_tokens}")
    stops = tuple(map(unescape, args.stop))
    params = SamplingParams(
        max_tokens=max(1, args.max_new_tokens),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=stops,
        n=args.n,
    )
    try:
        params.validate()
    except InputError as exc:
        raise sampling_error(exc) from None
    ckpt = load_model(args, rows=args.n)
    context = ckpt.config.context_length
    ids = ckpt.tokenizer.encode(args.prompt, allow_special=True)
    if len(ids) > context:
        raise InputError(
            f"--prompt: {len(ids)} tokens exceed the model's context length of {context}"
        )
    if args.max_new_tokens >= 1 and len(ids) + args.max_new_tokens <= context:
        engine = Engine(
            ckpt.model, ckpt.tokenizer, max_batch=args.n, max_tokens=args.max_new_tokens
        )
        texts = [c.text for c in engine.generate([ids], params)[0]]
    else:
        texts = _sliding(ckpt, args, params, len(ids))
    prefix = args.prompt if args.echo else ""
    if len(texts) == 1:
        sys.stdout.write(prefix + texts[0] + "\n")
        return 0
    for i, text in enumerate(texts, 1):
        sys.stdout.write(f"--- sample {i} of {len(texts)} ---\n{prefix}{text}\n")
    return 0


def _sliding(ckpt, args: argparse.Namespace, params, prompt_len: int) -> list[str]:
    """The book's loop, which slides the context window: for runs longer than the context."""
    from scratchllm.errors import InputError
    from scratchllm.inference.generate import generate_text

    if params.repetition_penalty != 1.0:
        raise InputError(
            f"--repetition-penalty needs the prompt and --max-new-tokens to fit in the context "
            f"of {ckpt.config.context_length} ({prompt_len} + {args.max_new_tokens} given)"
        )
    texts = []
    for i in range(params.n):
        text = generate_text(
            ckpt.model,
            ckpt.tokenizer,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=None if params.seed is None else params.seed + i,  # as the engine seeds
        )
        cuts = [text.find(s) for s in params.stop if s in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts
