"""`scratchllm data`: tokenize inputs into a folder of token shards once (`prepare`), and show
what a prepared folder holds (`stats`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scratchllm import settings
from scratchllm.data.prepare import PrepareOptions

HELP = "prepare token shards from text, JSON lines, Parquet or datasets; show their stats"
DESCRIPTION = """Tokenize a corpus once into numbered token shards (DIR/shard-NNNNN.bin, index).

examples:
  scratchllm data prepare --data books/ --tokenizer gpt2:gpt2_files --out data/books
  scratchllm data prepare --data web.jsonl.zst:0.7 code.parquet:0.3 --text-field content \\
      --tokenizer gpt2 --out data/mix --workers 8 --shard-tokens 100000000
  scratchllm data prepare --data hf:roneneldan/TinyStories:train --out data/stories
  scratchllm data stats data/books
  scratchllm pretrain --data data/books ...        # train on the prepared folder

A killed `prepare` continues where it stopped when run again with the same arguments.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p), required=True)
    prepare = sub.add_parser(
        "prepare",
        help="tokenize inputs into DIR (resumable)",
        description="Tokenize inputs into a folder of token shards; a re-run resumes.",
    )
    settings.add_flags(prepare, PrepareOptions)
    stats = sub.add_parser("stats", help="documents, bytes, tokens and shards of a prepared DIR")
    stats.add_argument("dir", help="a folder written by `scratchllm data prepare`")


def run(args: argparse.Namespace) -> int:
    if args.action == "stats":
        return _stats(Path(args.dir))
    return _prepare(args)


def _prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scratchllm.data.prepare import prepare_shards
    from scratchllm.tokenizers import load_tokenizer

    with settings.flags_in_errors(PrepareOptions):
        opts = settings.from_args(PrepareOptions, args)
    tokenizer = load_tokenizer(opts.tokenizer)
    bars: list[tqdm] = []  # made at the first report, so an error before it prints no bar

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="tokenize", unit="B", unit_scale=True, file=sys.stderr))
        bars[0].total = total or None
        bars[0].update(done - bars[0].n)

    started = time.perf_counter()
    try:
        shard_set = prepare_shards(
            opts.data,
            tokenizer,
            opts.out,
            shard_tokens=opts.shard_tokens,
            workers=opts.workers,
            fmt=opts.format,
            text_field=opts.text_field,
            strip_gutenberg=opts.strip_gutenberg,
            seed=opts.seed,
            overwrite=opts.force,
            progress=progress,
        )
    finally:
        for bar in bars:
            bar.close()
    seconds = time.perf_counter() - started
    print(
        f"prepared {opts.out}: {len(shard_set.files)} shards, {len(shard_set):,} tokens, "
        f"{shard_set.documents:,} documents, {shard_set.bytes:,} bytes in {seconds:.1f}s"
    )
    return 0


def _stats(directory: Path) -> int:
    from scratchllm.data.prepare import read_index

    index = read_index(directory)
    entries = index["shards"]
    tokens = sum(int(e["tokens"]) for e in entries)
    documents = sum(int(e["documents"]) for e in entries)
    nbytes = sum(int(e["bytes"]) for e in entries)
    tok = index["tokenizer"]
    state = "complete" if index["complete"] else "INCOMPLETE (run `data prepare` again)"
    print(f"{directory}: {state}")
    print(f"tokenizer: {tok.get('name')} ({tok['fingerprint']}, vocab {tok['vocab_size']})")
    print(f"source: {' '.join(index['source'].get('data', []))} ({index['source']['fingerprint']})")
    print(f"documents: {documents:,}")
    print(f"bytes: {nbytes:,}")
    print(f"{tokens} tokens")
    print(f"bytes per token: {nbytes / tokens:.3f}" if tokens else "bytes per token: -")
    print(f"shards: {len(entries)} (at most {index['shard_tokens']:,} tokens each)")
    for e in entries:
        tokens, docs, size = e["tokens"], e["documents"], e["bytes"]
        print(f"  {e['file']}  {tokens:>12,} tokens  {docs:>9,} docs  {size:>13,} bytes")
    return 0
