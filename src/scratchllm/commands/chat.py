"""`scratchllm chat`: talk to an instruction-tuned or imported chat model in the terminal."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Any, TextIO

from scratchllm.commands._inference import add_model_arguments, load_model, sampling_error

HELP = "chat with a checkpoint in the terminal"
DESCRIPTION = """An interactive chat: replies stream as they are generated. The conversation is
kept, its oldest turns dropped when it outgrows the context window. Type /help for the
commands; Ctrl-C stops a reply, and at the prompt (or Ctrl-D) ends the chat.

Models with a chat template (imported Llama/Qwen) use it; others use the book's Alpaca format
("### Instruction:" / "### Response:", chapter 7).

examples:
  scratchllm chat --checkpoint models/qwen3-0.6b
  scratchllm chat --checkpoint runs/instruct --temperature 0.7 --top-p 0.9
"""

COMMANDS = (
    ("/reset", "forget the conversation so far"),
    ("/help", "list these commands"),
    ("/exit", "end the chat (also /quit, Ctrl-D, or Ctrl-C at the prompt)"),
    ("//text", "send a message that starts with '/' (the first '/' is removed)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest reply (default: a quarter of the model's context, at most 256)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--system", default=None, help="system message")
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.inference.chat import ChatSession, default_reply_tokens
    from scratchllm.inference.engine import Engine, SamplingParams

    params = SamplingParams(
        max_tokens=1 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    try:
        params.validate()
    except InputError as exc:
        raise sampling_error(exc) from None
    ckpt = load_model(args)
    context = ckpt.config.context_length
    if args.max_new_tokens is None:
        params.max_tokens = default_reply_tokens(context)
    elif params.max_tokens >= context:
        raise InputError(
            f"--max-new-tokens {params.max_tokens} leaves no room for a message in the context "
            f"of {context}; leave it out to use {default_reply_tokens(context)}"
        )
    session = ChatSession(Engine(ckpt.model, ckpt.tokenizer, max_batch=1), params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input()
            import readline  # noqa: F401
    out = sys.stdout
    out.write(
        f"chatting with {ckpt.path} (context {context} tokens, replies up to "
        f"{params.max_tokens}) — /help lists the commands, /exit quits\n"
    )
    number = 0
    while True:
        out.flush()
        number += 1
        try:
            line = _read_line(interactive, number)
        except EOFError:  # Ctrl-D
            line = ""
        except KeyboardInterrupt:  # Ctrl-C at the prompt
            out.write("\n")
            break
        if not line:  # end of input
            if interactive:
                out.write("\n")
            break
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command.startswith("//"):
            text = text.replace("/", "", 1)
        elif command.startswith("/"):
            word = command.split()[0]
            if word in ("/exit", "/quit"):
                break
            if word == "/reset":
                session.reset()
                out.write("[conversation reset]\n")
            elif word == "/help":
                out.write("commands:\n")
                out.writelines(f"  {name:<8} {what}\n" for name, what in COMMANDS)
            else:
                out.write(f"[unknown command {word}: /help lists the commands]\n")
            continue
        reply(session, text, out)
    return 0


def _read_line(interactive: bool, number: int) -> str:
    """Line `number` of the chat ("" at the end of input), as text: bytes that are not UTF-8
    (a binary file piped in) are an InputError naming the line, not a traceback."""
    from scratchllm.data.text import decode_text
    from scratchllm.errors import InputError

    what = f"stdin line {number}"
    if not interactive and hasattr(sys.stdin, "buffer"):
        return decode_text(sys.stdin.buffer.readline(), what)
    try:
        line = input("> ") if interactive else sys.stdin.readline()
    except UnicodeDecodeError as exc:
        raise InputError(f"{what}: invalid UTF-8 at byte offset {exc.start}") from None
    if any("\udc80" <= c <= "\udcff" for c in line):  # undecodable bytes, surrogate-escaped
        raise InputError(f"{what}: not valid UTF-8 text; expected UTF-8")
    return line


def reply(session: Any, text: str, out: TextIO) -> None:
    """Stream the session's reply to `text`; Ctrl-C stops the reply, not the chat."""
    from scratchllm.errors import InputError

    stopped = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopped
        stopped = True

    # A flag, not KeyboardInterrupt: the engine is never interrupted in the middle of a step.
    previous = signal.signal(signal.SIGINT, stop)
    pieces = session.send(text)
    try:
        for i, piece in enumerate(pieces):
            if i == 0 and session.dropped:  # known once the prompt is built
                turns = "turn" if session.dropped == 1 else "turns"
                out.write(f"[the {session.dropped} oldest {turns} dropped to fit the context]\n")
            out.write(piece)
            out.flush()
            if stopped:
                break
    except InputError as exc:  # a message too long for any reply: keep chatting
        out.write(f"[{exc}]")
    finally:
        pieces.close()  # a stopped reply: its request is cancelled
        signal.signal(signal.SIGINT, previous)
    out.write(" [stopped]\n" if stopped else "\n")
