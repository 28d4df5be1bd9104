"""`scratchllm tokenizer`: train a byte-level BPE, encode text with a tokenizer, measure one."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HELP = "train a BPE tokenizer, encode text, or measure a tokenizer on a corpus"
DESCRIPTION = """Train a byte-level BPE tokenizer (GPT-2 compatible files), encode text, or report
bytes per token on a corpus.

TOKENIZER specs: bytes, gpt2, gpt2:DIR (OpenAI's encoder.json + vocab.bpe), or a tokenizer
directory written by `tokenizer train` (or a checkpoint directory).
DATA: files, folders (every *.txt below them), glob patterns, or builtin:python-docs.

examples:
  scratchllm tokenizer train --data corpus/ --vocab-size 8192 --out runs/tok
  scratchllm tokenizer train --data "books/*.txt" --vocab-size 4096 --pattern gpt4 --out tok4
  scratchllm tokenizer encode --tokenizer runs/tok "Hello, world!"
  scratchllm tokenizer encode --tokenizer gpt2:../shared/data/gpt2 --file notes.txt
  scratchllm tokenizer stats --tokenizer runs/tok --data corpus/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH", help="training text")
    train.add_argument("--vocab-size", type=int, required=True, help="ids, specials included")
    train.add_argument("--out", required=True, help="directory for the tokenizer files")
    train.add_argument(
        "--special",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a special token besides <|endoftext|> (repeatable); never merged",
    )
    train.add_argument("--pattern", choices=["gpt2", "gpt4"], default="gpt2", help="pre-tokenizer")
    train.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    train.add_argument(
        "--layout",
        choices=["gpt2", "specials_first"],
        default="gpt2",
        help="gpt2: special tokens get the last ids (default); specials_first: the first",
    )
    train.add_argument(
        "--raw", action="store_true", help="train on the bytes as they are (no BOM/CRLF cleanup)"
    )
    train.add_argument("--name", default=None, help="tokenizer name (default: the --out name)")
    train.add_argument(
        "--force", action="store_true", help="replace --out when it already holds files"
    )

    encode = sub.add_parser("encode", help="print the token ids of a text as a JSON list")
    encode.add_argument("--tokenizer", required=True, metavar="SPEC", help="tokenizer spec")
    source = encode.add_mutually_exclusive_group()
    source.add_argument("--file", help="encode this file's text (default: TEXT, else stdin)")
    source.add_argument("text", nargs="?", metavar="TEXT", help="the text to encode")
    encode.add_argument(
        "--allow-special", action="store_true", help="encode special-token strings as specials"
    )

    stats = sub.add_parser("stats", help="bytes per token and the most frequent tokens")
    stats.add_argument("--tokenizer", required=True, metavar="SPEC", help="tokenizer spec")
    stats.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text to measure")
    stats.add_argument("--top", type=int, default=20, help="how many frequent tokens to list")


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "encode": _encode, "stats": _stats}[args.action](args)


# -- reading the corpus --------------------------------------------------------------------------
def _documents(specs: list[str], specials: list[str], clean: bool) -> tuple[Iterator[str], int]:
    """Safe-cut text chunks of every document named by `specs`, and their total size."""
    from scratchllm.data.corpus import builtin_text, list_sources
    from scratchllm.data.text import read_text_pieces, split_chunks

    sources = list_sources(specs)  # checks every spec before reading anything
    total = 0
    for _, path in sources:
        if path is not None:
            with contextlib.suppress(OSError):  # the reader reports it, naming the file
                total += path.stat().st_size

    def chunks() -> Iterator[str]:
        for name, path in sources:
            pieces = [builtin_text(name)] if path is None else read_text_pieces(path, clean)
            yield from split_chunks(pieces, specials=specials)

    return chunks(), total


class _Bars:
    """Progress callback for `train_bpe`: one tqdm bar per stage, on stderr."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            self.close()
            unit = "merge" if stage == "merge" else "B"
            bar = tqdm(
                total=total,
                desc=stage,
                unit=unit,
                unit_scale=stage != "merge",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=None,  # off when stderr is not a terminal
            )
            self.bars[stage] = bar
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _train(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.fs import atomic_dir, crash_point, kill_hook
    from scratchllm.tokenizers.base import EOT, PATTERNS, TIKTOKEN_FILE
    from scratchllm.tokenizers.train import check_special_tokens, check_vocab_size, train_bpe

    specials = check_special_tokens([EOT] + [s for s in args.special if s != EOT])
    check_vocab_size(args.vocab_size, len(specials))
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be ≥ 1, got {args.workers}")
    out = _check_out(Path(args.out), args.force)
    chunks, total = _documents(args.data, specials, clean=not args.raw)
    bars = _Bars()
    started = time.perf_counter()
    try:
        tokenizer = train_bpe(
            chunks,
            args.vocab_size,
            specials,
            PATTERNS[args.pattern],
            layout=args.layout,
            workers=args.workers,
            progress=bars,
            total=total or None,
            name=args.name or out.resolve().name or "bpe",
        )
    finally:
        bars.close()
    seconds = time.perf_counter() - started
    crash_point("tokenizer:trained")
    # The folder is built aside and swapped in whole: a crash leaves the old one or the new.
    with atomic_dir(out, hook=kill_hook("tokenizer")) as tmp:
        tokenizer.write_files(tmp)
        tokenizer.save_tiktoken(tmp / TIKTOKEN_FILE)
    n_merges = len(tokenizer.merges or [])
    print(
        f"trained {n_merges} merges in {seconds:.1f}s: vocab size {tokenizer.vocab_size}, "
        f"special tokens {tokenizer.special_tokens}"
    )
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs before --vocab-size {args.vocab_size}")
    print(
        f"wrote {out}/ (encoder.json, vocab.bpe, {TIKTOKEN_FILE}); load it with --tokenizer {out}"
    )
    return 0


def _check_out(out: Path, force: bool) -> Path:
    """--out as a folder to (re)write: a file is refused, and so is a folder holding anything
    (a tokenizer a checkpoint uses, say: new ids would silently mean other text) unless
    --force. A save a crash cut short is finished first."""
    from scratchllm.errors import InputError
    from scratchllm.fs import recover_dir

    recover_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "a tokenizer" if any((out / n).exists() for n in _TOKENIZER_FILES) else "files"
        raise InputError(f"--out {out}: already holds {what}; pass --force to replace it")
    return out


# What marks a folder as a tokenizer (for the message only: any non-empty folder is kept).
_TOKENIZER_FILES = ("scratchllm_tokenizer.json", "encoder.json", "tokenizer.json")


def _encode(args: argparse.Namespace) -> int:
    import json

    from scratchllm.errors import InputError
    from scratchllm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.file is not None:
        path = Path(args.file)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise InputError(f"--file {path}: cannot read it ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"--file {path}: invalid UTF-8 at byte offset {exc.start}") from None
    elif args.text is not None:
        text = args.text
    else:
        text = sys.stdin.read()
    ids = tokenizer.encode(text, allow_special=args.allow_special)
    print(json.dumps(ids))
    return 0


def _token_text(tokenizer: Any, token_id: int) -> str:
    data = tokenizer.decode_bytes([token_id])
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def _stats(args: argparse.Namespace) -> int:
    import numpy as np

    from scratchllm.errors import InputError
    from scratchllm.tokenizers import load_tokenizer

    if args.top < 0:
        raise InputError(f"--top must be ≥ 0, got {args.top}")
    tokenizer = load_tokenizer(args.tokenizer)
    specials = list(tokenizer.special_tokens)
    chunks, _ = _documents(args.data, specials, clean=True)
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    n_bytes = 0
    for chunk in chunks:
        n_bytes += len(chunk.encode("utf-8", "surrogatepass"))
        ids = tokenizer.encode(chunk, allow_special=True)
        if ids:
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=counts.size)
    n_tokens = int(counts.sum())
    if n_tokens == 0:
        raise InputError("--data: no text to measure")
    print(f"tokenizer: {tokenizer.name} (vocab size {tokenizer.vocab_size})")
    print(f"text: {n_bytes:,} bytes → {n_tokens:,} tokens")
    print(f"bytes per token: {n_bytes / n_tokens:.3f}")
    used = int((counts > 0).sum())
    print(f"distinct tokens used: {used:,} of {tokenizer.vocab_size:,}")
    top = np.argsort(-counts, kind="stable")[: args.top]
    if args.top:
        print(f"top {min(args.top, used)} tokens:")
        print(f"  {'rank':>4}  {'id':>6}  {'count':>10}  {'share':>6}  token")
    for rank, token_id in enumerate(top, start=1):
        n = int(counts[token_id])
        if n == 0:
            break
        share = 100.0 * n / n_tokens
        text = _token_text(tokenizer, int(token_id))
        print(f"  {rank:>4}  {int(token_id):>6}  {n:>10,}  {share:5.2f}%  {text}")
    return 0
