"""`scratchllm chat`: talk to an instruction-tuned or imported chat model in the terminal."""

from __future__ import annotations

import argparse
import sys

from scratchllm.commands._inference import add_model_arguments, load_model

HELP = "chat with a checkpoint in the terminal"
DESCRIPTION = """An interactive chat: replies stream as they are generated. The conversation is
kept (oldest turns dropped when it outgrows the context window). Commands: /reset, /exit.

Models with a chat template (imported Llama/Qwen) use it; others use the book's Alpaca format
("### Instruction:" / "### Response:", chapter 7).

examples:
  scratchllm chat --checkpoint models/qwen3-0.6b
  scratchllm chat --checkpoint runs/instruct --temperature 0.7 --top-p 0.9
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--system", default=None, help="system message")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.inference.chat import ChatSession
    from scratchllm.inference.engine import Engine, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except InputError as exc:
        raise InputError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    ckpt = load_model(args)
    if params.max_tokens >= ckpt.config.context_length:
        raise InputError(
            f"--max-new-tokens {params.max_tokens} leaves no room for a message in the context "
            f"of {ckpt.config.context_length}"
        )
    session = ChatSession(Engine(ckpt.model, ckpt.tokenizer, max_batch=1), params, args.system)
    interactive = sys.stdin.isatty()
    out = sys.stdout
    out.write(f"chatting with {ckpt.path} — /reset clears the conversation, /exit quits\n")
    while True:
        if interactive:
            out.write("> ")
        out.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            out.write("[conversation reset]\n")
            continue
        try:
            for piece in session.send(text):
                out.write(piece)
                out.flush()
        except InputError as exc:  # a message too long for the context: keep chatting
            out.write(f"[error: {exc}]")
        out.write("\n")
    return 0
