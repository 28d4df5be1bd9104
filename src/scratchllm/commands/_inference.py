"""The model-loading flags that generate, chat and serve share, and the load they drive."""

from __future__ import annotations

import argparse
import re
from typing import Any

from scratchllm.errors import InputError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--quantize",
        default=None,
        metavar="{fp16,int8}",
        help="CPU decoding with smaller weights: fp16 (half the bytes, near-fp32 logits) or "
        "int8 (a quarter, coarser); docs/serving.md",
    )
    p.add_argument(
        "--pack",
        default="auto",
        choices=["auto", "both", "gemv", "onednn"],
        help="layout of packed fp32 CPU linears: gemv (one row at a time), onednn (batches), both "
        "(twice the memory); auto: gemv when decoding one sequence, else both",
    )
    p.add_argument(
        "--no-pack",
        action="store_true",
        help="keep fp32 CPU linears as they are (default: packed, faster decoding)",
    )


def load_model(args: argparse.Namespace, rows: int = 1) -> Any:
    """The checkpoint at `args.checkpoint` on `--device`, in `--dtype`, `--quantize`d, its fp32
    CPU linears packed unless `--no-pack` (`--pack auto`: for `rows` sequences at a time).
    A classifier is refused: its head scores classes, not the next token."""
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.inference.weights import device_for
    from scratchllm.utils import parse_dtype, pick_device

    device = pick_device(device_for(args.device, args.quantize))
    ckpt = load_checkpoint(
        args.checkpoint,
        device,
        parse_dtype(args.dtype),
        args.quantize,
        pack=False if args.no_pack else pack_layout(args.pack, rows),
    )
    if ckpt.config.num_classes is not None:
        raise InputError(
            f"--checkpoint {args.checkpoint}: is a classifier with {ckpt.config.num_classes} "
            "classes, not a language model; use scratchllm classify"
        )
    return ckpt


def pack_layout(pack: str, rows: int) -> str:
    """`--pack auto`: the one-row layout when at most one sequence decodes at a time."""
    if pack != "auto":
        return pack
    return "gemv" if rows <= 1 else "both"


def sampling_error(exc: InputError) -> InputError:
    """`SamplingParams.validate`'s error ("top_p must be ...") named as its flag (--top-p)."""
    name = str(exc).split()[0].rstrip(":")
    flag = {"n": "-n", "max_tokens": "--max-new-tokens"}.get(name, "--" + name.replace("_", "-"))
    return InputError(f"{flag}: {exc}")


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """A flag's text with the escapes a shell passes through literally: \\n, \\t, \\\\."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)
