"""Prepared data: a corpus tokenized once into a folder of numbered token shards and an index.

    DIR/index.json        what the folder holds (below); rewritten atomically after each shard
    DIR/shard-00000.bin   token files in data/shards.py's format (256-byte header, then ids),
    DIR/shard-00001.bin   each `shard_tokens` ids long but the last; a document may run on
    ...                   from one shard into the next (the loader reads them as one stream)

index.json holds "format": "scratchllm-shards", "version", "complete", "tokenizer"
(fingerprint, vocab_size, name), "source" (fingerprint of the inputs, the specs, format,
text_field, strip_gutenberg, seed), "shard_tokens", "chunk_bytes", "dtype", the totals
"documents", "bytes" (UTF-8 text), "tokens", and "shards": one {"file", "tokens", "documents",
"bytes", "next"} per complete shard, where "next" = [task, offset] is where the token stream
goes on after it: token `offset` of encoding task `task` (`shards.iter_tasks` numbers the tasks
the same way in every run).

Resuming: each shard is written to a temporary file and renamed into place, then listed in the
index. A re-run with the same inputs, tokenizer and shard size keeps every shard the index
lists, deletes anything else a killed run left, and goes on from the last shard's "next": the
tasks before it are read and cut again (cheap) but not encoded. The shards come out identical
to an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratchllm.data import formats, shards
from scratchllm.data.loader import ConcatTokens
from scratchllm.data.shards import TokenFile, dtype_for_vocab
from scratchllm.errors import InputError
from scratchllm.fs import atomic_file, atomic_write_text
from scratchllm.settings import Settings, setting
from scratchllm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

INDEX = "index.json"
INDEX_FORMAT = "scratchllm-shards"
INDEX_VERSION = 1
DEFAULT_SHARD_TOKENS = 10**8
_SHARD = re.compile(r"shard-(\d{5,})\.bin")
_LEFTOVER = re.compile(r"\.shard-\d{5,}\.bin\..*\.tmp")  # atomic_file's temporary names

HookFn = Callable[[str, int], None]


@dataclass
class DataSettings(Settings):
    """How inputs are read and tokenized; `data prepare` and `pretrain` both have these."""

    format: str = setting(
        "auto", help="input format (auto: by file extension)", choices=formats.FORMATS
    )
    text_field: str = setting(
        formats.DEFAULT_TEXT_FIELD, help="the field holding the text in JSON, Parquet or datasets"
    )
    shard_tokens: int = setting(DEFAULT_SHARD_TOKENS, help="tokens per shard file", ge=1)
    workers: int | None = setting(None, help="tokenizer processes (default: all CPUs)", ge=1)
    strip_gutenberg: bool = setting(False, help="drop Project Gutenberg headers and footers")


@dataclass(kw_only=True)  # required `data` and `out` after defaulted settings
class PrepareOptions(DataSettings):
    """`scratchllm data prepare`: inputs, tokenizer and the folder to write."""

    data: list[str] = setting(
        help="inputs: files, folders, globs, builtin:NAME, hf:NAME[:SPLIT]; SPEC:W weighs one",
        metavar="SPEC",
    )
    out: str = setting(help="folder for the shards and index.json")
    tokenizer: str = setting("bytes", help="bytes | gpt2 | gpt2:DIR | a tokenizer directory")
    seed: int = setting(0, help="seed of the weighted mix (with SPEC:W inputs)", ge=0)
    force: bool = setting(False, help="replace shards of other data or settings in `out`")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a folder `prepare_shards` wrote (it has an index.json)."""
    return (Path(path) / INDEX).is_file()


def read_index(directory: str | Path) -> dict[str, Any]:
    """The index of a prepared folder; an InputError names what is wrong with it."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"prepared data {directory}: no {INDEX} (not a prepared folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"prepared data {path}: unreadable ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise InputError(f'prepared data {path}: expected "format": "{INDEX_FORMAT}"')
    if index.get("version") != INDEX_VERSION:
        raise InputError(
            f"prepared data {path}: version {index.get('version')!r}, expected {INDEX_VERSION}"
        )
    for key in ("complete", "tokenizer", "source", "shard_tokens", "chunk_bytes", "shards"):
        if key not in index:
            raise InputError(f"prepared data {path}: no {key!r} entry")
    return index


class ShardSet:
    """A prepared folder opened read-only; `tokens` reads across its shards (memory maps)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory)
        self.index = index = read_index(self.path)
        if not index["complete"]:
            raise InputError(
                f"prepared data {self.path}: incomplete ({len(index['shards'])} shards written, "
                "the preparation was interrupted); run `scratchllm data prepare` again with the "
                "same arguments to finish it"
            )
        self.fingerprint = str(index["tokenizer"]["fingerprint"])
        self.vocab_size = int(index["tokenizer"]["vocab_size"])
        self.files: list[TokenFile] = []
        for entry in index["shards"]:
            tf = TokenFile(self.path / entry["file"])
            if len(tf) != entry["tokens"] or tf.fingerprint != self.fingerprint:
                raise InputError(
                    f"prepared data {tf.path}: {len(tf)} tokens of tokenizer {tf.fingerprint}, "
                    f"but the index lists {entry['tokens']} of {self.fingerprint}"
                )
            self.files.append(tf)
        self.tokens = ConcatTokens([f.tokens for f in self.files])
        self.documents = int(index["documents"])
        self.bytes = int(index["bytes"])

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.path)!r}, shards={len(self.files)}, tokens={len(self)}, "
            f"documents={self.documents}, fingerprint={self.fingerprint!r})"
        )


class _ShardWriter:
    """Writes shards one after another; each is a temporary file until `finish` renames it."""

    def __init__(self, out: Path, number: int, tokenizer: Tokenizer, hook: HookFn | None):
        self.out, self.number, self.hook = out, number, hook
        self.vocab_size = tokenizer.vocab_size
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.fp = shards._fingerprint_bytes(tokenizer.fingerprint())
        self._stack: contextlib.ExitStack | None = None
        self._fh: Any = None
        self.count = self.documents = self.bytes = 0

    def write(self, ids: np.ndarray, documents: int, nbytes: int) -> None:
        if self._fh is None:
            self._stack = contextlib.ExitStack()
            tmp = self._stack.enter_context(atomic_file(self.out / shard_name(self.number)))
            self._fh = self._stack.enter_context(open(tmp, "wb"))  # noqa: SIM115
            self._fh.write(shards._pack_header(0, self.dtype, self.vocab_size, self.fp))
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise InputError(
                f"shard {shard_name(self.number)}: token id {int(ids.max())} is outside the "
                f"vocabulary of {self.vocab_size}"
            )
        self._fh.write(ids.astype(self.dtype, copy=False).tobytes())
        self.count += ids.size
        self.documents += documents
        self.bytes += nbytes

    def finish(self, next_at: tuple[int, int]) -> dict[str, Any]:
        """Complete the shard (header, fsync, rename); its index entry."""
        assert self._fh is not None and self._stack is not None
        self._fh.seek(0)
        self._fh.write(shards._pack_header(self.count, self.dtype, self.vocab_size, self.fp))
        self._stack.close()  # closes, fsyncs and renames into place
        entry = {
            "file": shard_name(self.number),
            "tokens": self.count,
            "documents": self.documents,
            "bytes": self.bytes,
            "next": list(next_at),
        }
        if self.hook is not None:
            self.hook("renamed", self.number)
        self._fh = self._stack = None
        self.number += 1
        self.count = self.documents = self.bytes = 0
        return entry

    def abort(self, exc: BaseException) -> None:
        """Drop the shard being written (its temporary file goes)."""
        if self._stack is not None:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
            self._fh = self._stack = None


def _key(
    tokenizer: Tokenizer, source_fp: str, shard_tokens: int
) -> dict[str, Any]:  # what must match for shards to be reused
    return {
        "tokenizer": [tokenizer.fingerprint(), tokenizer.vocab_size],
        "source": source_fp,
        "shard_tokens": shard_tokens,
    }


def _key_of(index: dict[str, Any]) -> dict[str, Any]:
    tok = index.get("tokenizer", {})
    return {
        "tokenizer": [tok.get("fingerprint"), tok.get("vocab_size")],
        "source": index.get("source", {}).get("fingerprint"),
        "shard_tokens": index.get("shard_tokens"),
    }


def _remove_shards(out: Path, keep: int) -> None:
    """Delete shard files numbered `keep` and up, and temporary files of killed runs."""
    for path in out.iterdir():
        match = _SHARD.fullmatch(path.name)
        if (match and int(match[1]) >= keep) or _LEFTOVER.fullmatch(path.name):
            log.info("removing %s (not in the index)", path)
            path.unlink(missing_ok=True)


def _valid_prefix(out: Path, entries: list[dict[str, Any]], fingerprint: str) -> int:
    """How many of the listed shards are on disk whole (a resume goes on after the last)."""
    for i, entry in enumerate(entries):
        try:
            tf = TokenFile(out / entry["file"])
        except InputError as exc:
            log.warning("re-writing from %s on: %s", entry["file"], exc)
            return i
        if len(tf) != entry["tokens"] or tf.fingerprint != fingerprint:
            log.warning("re-writing from %s on: it does not match the index", entry["file"])
            return i
    return len(entries)


def _start(out: Path, fresh: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The index to go on from: the folder's own when it holds these shards, else `fresh`."""
    if out.exists() and not out.is_dir():
        raise InputError(f"prepared data {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX).exists():
        try:
            old = read_index(out)
        except InputError as exc:
            if not overwrite:
                raise InputError(f"{exc}; pass --force to replace it") from None
            old = None
        if old is not None and _key_of(old) == _key_of(fresh):
            keep = _valid_prefix(out, old["shards"], fresh["tokenizer"]["fingerprint"])
            if keep == len(old["shards"]):
                return old
            old["shards"], old["complete"] = old["shards"][:keep], False
            return old
        if old is not None and old["complete"] and not overwrite:
            what = next(k for k, v in _key_of(old).items() if v != _key_of(fresh)[k])
            raise InputError(
                f"prepared data {out}: holds shards made with another {what.replace('_', ' ')}; "
                "pass --force to replace them, or choose another --out"
            )
        log.warning("%s: starting over (its shards were made from other data or settings)", out)
        (out / INDEX).unlink()
    _remove_shards(out, 0)
    return fresh


def prepare_shards(
    specs: Sequence[str] | str,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    fmt: str = "auto",
    text_field: str = formats.DEFAULT_TEXT_FIELD,
    strip_gutenberg: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: shards.ProgressFn | None = None,
    hook: HookFn | None = None,
) -> ShardSet:
    """Tokenize `specs` into shards of at most `shard_tokens` ids in `out_dir` (see the module
    docstring); a folder this left unfinished is continued, a finished one is returned as is.

    Every document ends with `<|endoftext|>`. `workers` processes encode (default: all CPUs);
    memory holds a few encoding tasks, never a shard or the corpus. `progress(done, total)`
    counts input bytes. `hook(stage, shard)`, for crash tests, runs once a shard is renamed
    into place ("renamed") and once the index lists it ("indexed").
    """
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise InputError(f"shard_tokens {shard_tokens!r}: expected a positive integer")
    out = Path(out_dir)
    data = formats.resolve(specs, fmt)
    total = formats.total_bytes(data)
    workers = shards.check_workers(workers, total)
    eot = tokenizer.eot_id  # fails early if the tokenizer has no <|endoftext|>
    fresh = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "complete": False,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "name": str(getattr(tokenizer, "name", type(tokenizer).__name__)),
        },
        "source": {
            "fingerprint": formats.fingerprint(data, text_field, strip_gutenberg, seed),
            "data": [str(s) for s in ([specs] if isinstance(specs, str | Path) else specs)],
            "format": fmt,
            "text_field": text_field,
            "strip_gutenberg": strip_gutenberg,
            "seed": seed,
        },
        "shard_tokens": shard_tokens,
        "chunk_bytes": shards.CHUNK_BYTES,
        "dtype": np.dtype(dtype_for_vocab(tokenizer.vocab_size)).name,
        "shards": [],
    }
    index = _start(out, fresh, overwrite)
    if index["complete"]:
        log.info("%s is up to date (%d shards)", out, len(index["shards"]))
        return ShardSet(out)
    done = index["shards"]
    _remove_shards(out, len(done))
    task, offset = done[-1]["next"] if done else (0, 0)
    if done:
        log.info("resuming %s after %d shards, at task %d token %d", out, len(done), task, offset)
    stream = shards.encode_stream(
        data,
        tokenizer,
        workers,
        text_field=text_field,
        strip_gutenberg=strip_gutenberg,
        seed=seed,
        skip=task,
        chunk_bytes=int(index["chunk_bytes"]),
    )
    writer = _ShardWriter(out, len(done), tokenizer, hook)
    seen = 0
    last = task - 1

    def add(entry: dict[str, Any]) -> None:
        done.append(entry)
        atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")
        if hook is not None:
            hook("indexed", len(done) - 1)

    try:
        for number, ids, weight, nbytes in stream:
            seen += weight
            if progress is not None:
                progress(min(seen, total), total)
            if number < 0:  # the tasks skipped on resuming
                continue
            last, n = number, len(ids)
            pos = offset if number == task else 0
            while pos < n:
                take = min(n - pos, shard_tokens - writer.count)
                part = ids[pos : pos + take]
                # A task's text bytes are shared between shards by its tokens, in whole bytes.
                share = nbytes * (pos + take) // n - nbytes * pos // n
                writer.write(part, int(np.count_nonzero(part == eot)), share)
                pos += take
                if writer.count == shard_tokens:
                    add(writer.finish((number, pos) if pos < n else (number + 1, 0)))
        if writer.count:
            add(writer.finish((last + 1, 0)))
    except BaseException as exc:
        writer.abort(exc)
        raise
    if not done:
        (out / INDEX).unlink(missing_ok=True)
        raise InputError(f"corpus {', '.join(fresh['source']['data'])}: no text found")
    index["complete"] = True
    for key in ("tokens", "documents", "bytes"):
        index[key] = sum(int(e[key]) for e in done)
    atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")
    if progress is not None:
        progress(total, total)
    log.info("prepared %s: %d shards, %d tokens", out, len(done), index["tokens"])
    return ShardSet(out)
