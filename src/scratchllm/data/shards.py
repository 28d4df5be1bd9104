"""Token files: a corpus tokenized once, stored as a flat array the trainer memory-maps.

Layout (little-endian, in the spirit of llm.c's .bin shards):

    offset  size  field
         0     8  magic b"SLLMTOKS"
         8     4  format version (uint32, = 1)
        12     4  dtype code (uint32): 2 → uint16, 4 → uint32 (bytes per token)
        16     8  token count (uint64)
        24    16  tokenizer fingerprint (ASCII, NUL-padded; `Tokenizer.fingerprint()`)
        40     8  vocab size (uint64)
        48   208  zero padding up to HEADER_BYTES
       256     …  the tokens

Files are written to a temporary sibling and renamed into place, so a reader never sees a
half-written file. `tokenize_corpus` writes one such file (the pretraining cache); folders of
numbered shards with an index are `data/prepare.py`'s, built from the same encoding pipeline
(`encode_stream`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scratchllm.data import formats
from scratchllm.data.pool import default_workers, ordered_map
from scratchllm.data.text import split_chunks
from scratchllm.errors import InputError
from scratchllm.fs import atomic_file
from scratchllm.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer

log = logging.getLogger(__name__)

MAGIC = b"SLLMTOKS"
FORMAT_VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQ16sQ")
_DTYPES: dict[int, type[np.unsignedinteger]] = {2: np.uint16, 4: np.uint32}

# Text per worker task (characters ≈ bytes). Module-level so tests can make it tiny.
CHUNK_BYTES = 1 << 20
# Files larger than this are read in READ_BYTES blocks instead of all at once.
STREAM_BYTES = 64 << 20
READ_BYTES = 8 << 20

ProgressFn = Callable[[int, int], None]


def dtype_for_vocab(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id fits (vocab ≤ 65536, as GPT-2's 50257), else uint32."""
    if vocab_size < 1:
        raise InputError(f"vocab size {vocab_size}: expected at least 1")
    if vocab_size > 2**32:
        raise InputError(f"vocab size {vocab_size}: token files hold ids below 2**32 only")
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _pack_header(count: int, dtype: type[np.unsignedinteger], vocab_size: int, fp: bytes) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, np.dtype(dtype).itemsize, count, fp, vocab_size)
    return head.ljust(HEADER_BYTES, b"\0")


def _fingerprint_bytes(fingerprint: str) -> bytes:
    try:
        raw = fingerprint.encode("ascii")
    except UnicodeEncodeError:
        raise InputError(f"tokenizer fingerprint {fingerprint!r}: expected ASCII") from None
    if len(raw) > 16:
        raise InputError(f"tokenizer fingerprint {fingerprint!r}: expected at most 16 characters")
    return raw.ljust(16, b"\0")


def write_token_file(
    path: str | Path,
    chunks: Iterable[np.ndarray | list[int]],
    vocab_size: int,
    fingerprint: str,
) -> Path:
    """Stream token `chunks` into a token file at `path` atomically; returns the path.

    Every id must lie in [0, vocab_size); the first one that does not is an InputError.
    """
    path = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    fp = _fingerprint_bytes(fingerprint)
    count = 0
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_pack_header(0, dtype, vocab_size, fp))  # placeholder; count comes last
        for chunk in chunks:
            arr = np.asarray(chunk)
            if arr.size == 0:
                continue
            arr = arr.reshape(-1)
            if arr.dtype.kind not in "iu":
                raise InputError(
                    f"token file {path}: chunk of dtype {arr.dtype}, expected integer ids"
                )
            bad = (arr < 0) | (arr >= vocab_size)
            if bad.any():
                at = int(np.argmax(bad))
                raise InputError(
                    f"token file {path}: token id {int(arr[at])} at position {count + at} "
                    f"is outside the vocabulary of {vocab_size}"
                )
            fh.write(arr.astype(dtype, copy=False).tobytes())
            count += arr.size
        fh.seek(0)
        fh.write(_pack_header(count, dtype, vocab_size, fp))
    log.info("wrote %s: %d tokens (%s)", path, count, np.dtype(dtype).name)
    return path


class TokenFile:
    """A token file opened read-only: `tokens` is a memory map, so opening costs nothing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(HEADER_BYTES)
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            raise InputError(f"token file {self.path}: no such file") from None
        except OSError as exc:
            raise InputError(
                f"token file {self.path}: cannot read it ({exc.strerror or exc})"
            ) from None
        if len(head) < HEADER_BYTES:
            raise InputError(
                f"token file {self.path}: truncated header ({len(head)} bytes), "
                f"expected {HEADER_BYTES}"
            )
        magic, version, code, count, fp, vocab_size = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise InputError(
                f"token file {self.path}: bad magic {magic!r}, expected {MAGIC!r} "
                "(not a scratchllm token file)"
            )
        if version != FORMAT_VERSION:
            raise InputError(
                f"token file {self.path}: format version {version}, expected {FORMAT_VERSION}"
            )
        if code not in _DTYPES:
            raise InputError(
                f"token file {self.path}: dtype code {code}, expected 2 (uint16) or 4 (uint32)"
            )
        expected = HEADER_BYTES + count * code
        if size != expected:
            what = "truncated" if size < expected else "size mismatch"
            raise InputError(
                f"token file {self.path}: {what}: {size} bytes, expected {expected} "
                f"for {count} tokens of {code} bytes"
            )
        try:
            self.fingerprint = fp.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise InputError(
                f"token file {self.path}: tokenizer fingerprint is not ASCII (corrupt header)"
            ) from None
        self.vocab_size = int(vocab_size)
        dtype = _DTYPES[code]
        self.tokens: np.ndarray
        if count == 0:  # an empty file cannot be memory-mapped
            self.tokens = np.zeros(0, dtype=dtype)
            self.tokens.flags.writeable = False
        else:
            self.tokens = np.memmap(
                self.path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,)
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.path)!r}, tokens={len(self)}, dtype={self.tokens.dtype}, "
            f"vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"
        )


# -- tokenizing a corpus ---------------------------------------------------------------------------
def _split_document(
    pieces: Iterable[str], size: int, chunk_chars: int, split: bool
) -> Iterator[tuple[str, bool, int]]:
    """(text, ends_document, progress_bytes) chunks of one document's text pieces.

    With `split`, the text is cut only at pre-token-safe cuts (`data.text.split_chunks`, exact:
    never where ids could change); else the document is one chunk. A whitespace-only document
    yields no text and no eot, as `iter_documents` skips it. The progress bytes of a document
    add up to `size`, so progress ends exactly at the total.
    """
    chunks = split_chunks(pieces, chunk_chars, exact=True) if split else iter(["".join(pieces)])
    done = 0
    emitted = False
    last: str | None = None  # held back one step: the final chunk carries the eot
    for chunk in chunks:
        if last is not None:
            weight = min(len(last), size - done)
            done += weight
            emitted = True
            yield last, False, weight
        last = chunk
    text = last or ""
    if not emitted and not text.strip():
        yield "", False, size - done  # counts for progress only
        return
    yield text, True, size - done


Task = tuple[list[tuple[str, bool]], int]  # (text, add_eot) segments, progress bytes


def iter_tasks(
    docs: Iterable[formats.Document], split: bool, chunk_bytes: int | None = None
) -> Iterator[Task]:
    """Batches of (text, add_eot) segments of about CHUNK_BYTES, with their progress bytes.

    Small documents are batched together so each worker task is worth sending. The batching
    depends only on the documents and CHUNK_BYTES, so a task's number names the same text in
    every run (`data/prepare.py` resumes by it).
    """
    chunk_chars = max(1, CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    segments: list[tuple[str, bool]] = []
    chars = 0
    weight = 0
    for _name, pieces, size in docs:
        for text, eot, w in _split_document(pieces, size, chunk_chars, split):
            weight += w
            if text or eot:
                segments.append((text, eot))
                chars += len(text)
            # A chunk cut out of a longer document is as big as chunks get: a task by itself.
            if chars >= chunk_chars or (text and not eot):
                yield segments, weight
                segments, chars, weight = [], 0, 0
    if segments or weight:
        yield segments, weight


def _array_encoder(tokenizer: Tokenizer) -> Callable[[str], np.ndarray]:
    """`encode_ordinary` returning an array. For tiktoken BPE and bytes it skips the Python
    list of ints, which costs a third of tiktoken's encoding time; ids are the same."""
    method = type(tokenizer).encode_ordinary
    if method is BPETokenizer.encode_ordinary and hasattr(tokenizer.encoding, "encode_to_numpy"):
        enc = tokenizer.encoding
        # No special token is allowed, and none is refused: exactly `encode_ordinary`.
        return lambda text: enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    if method is ByteTokenizer.encode_ordinary:
        return lambda text: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return lambda text: np.asarray(tokenizer.encode_ordinary(text), dtype=np.int64)


def _encode_task(tokenizer: Tokenizer, task: Task) -> tuple[np.ndarray, int, int]:
    """The ids of one task's (text, add_eot) segments, its progress bytes (passed through) and
    the UTF-8 bytes of its text."""
    segments, weight = task
    encode = _array_encoder(tokenizer)
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    parts: list[np.ndarray] = []
    nbytes = 0
    for text, add_eot in segments:
        if text:
            parts.append(encode(text).astype(np.uint32, copy=False))
            nbytes += len(text.encode("utf-8"))
        if add_eot:
            parts.append(eot)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return ids, weight, nbytes


def _encode_numbered(
    tokenizer: Tokenizer, item: tuple[int, Task]
) -> tuple[int, np.ndarray, int, int]:
    number, task = item
    return (number, *_encode_task(tokenizer, task))


def encode_stream(
    specs: Sequence[formats.DataSpec],
    tokenizer: Tokenizer,
    workers: int,
    *,
    text_field: str = formats.DEFAULT_TEXT_FIELD,
    strip_gutenberg: bool = False,
    seed: int = 0,
    skip: int = 0,
    chunk_bytes: int | None = None,
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """(task number, ids, progress bytes, text bytes) of every task from number `skip` on.

    Tasks before `skip` are read and cut (cheap) but not encoded; when there are any, one
    (-1, no ids, their progress bytes, 0) comes first. Tasks are encoded in order by `workers`
    processes, a few per worker in flight, so memory stays bounded.
    """
    split = tokenizer.splittable
    if not split:
        log.info("tokenizer %s is not known to be splittable: encoding whole documents", tokenizer)
    docs = formats.iter_docs(
        specs, text_field, strip_gutenberg, seed, stream_bytes=STREAM_BYTES, read_bytes=READ_BYTES
    )
    numbered = enumerate(iter_tasks(docs, split, chunk_bytes))
    if skip > 0:
        skipped = 0
        for number, (_, weight) in numbered:
            skipped += weight
            if number + 1 >= skip:
                break
        yield -1, np.zeros(0, dtype=np.uint32), skipped, 0
    yield from ordered_map(_encode_numbered, numbered, tokenizer, workers)


def check_workers(workers: int | None, total_bytes: int) -> int:
    """`workers`, default all CPUs; 1 for a small corpus (processes would cost more)."""
    if workers is None:
        workers = default_workers()
    if workers < 1:
        raise InputError(f"workers {workers}: expected at least 1")
    return 1 if total_bytes <= 2 * CHUNK_BYTES else workers


def tokenize_corpus(
    specs: Sequence[str],
    tokenizer: Tokenizer,
    out_path: str | Path,
    strip_gutenberg: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    *,
    fmt: str = "auto",
    text_field: str = formats.DEFAULT_TEXT_FIELD,
    seed: int = 0,
) -> TokenFile:
    """Tokenize the documents named by `specs` (any format `data/formats.py` reads; `fmt`,
    `text_field` and `seed` as there) into one token file at `out_path`.

    Every document is followed by `<|endoftext|>`. Text is read document by document (big files
    in blocks), cut into ~CHUNK_BYTES pieces at safe boundaries and encoded by `workers`
    processes (default: all CPUs), so memory stays bounded whatever the corpus size.
    `progress(bytes_done, bytes_total)` is called as chunks complete.
    """
    data = formats.resolve(specs, fmt)
    total = formats.total_bytes(data)
    workers = check_workers(workers, total)
    eot = tokenizer.eot_id  # fails early if the tokenizer has no <|endoftext|>
    label = ", ".join(map(str, [specs] if isinstance(specs, str | Path) else specs))
    documents = 0

    def checked() -> Iterator[np.ndarray]:
        nonlocal documents
        count = done = 0
        stream = encode_stream(
            data,
            tokenizer,
            workers,
            text_field=text_field,
            strip_gutenberg=strip_gutenberg,
            seed=seed,
        )
        for _, arr, weight, _ in stream:
            count += arr.size
            documents += int(np.count_nonzero(arr == eot))
            yield arr
            done += weight
            if progress is not None:
                progress(min(done, total), total)
        if count == 0:
            raise InputError(f"corpus {label}: no text found (every document is empty)")
        if progress is not None and done < total:
            progress(total, total)  # records skipped or a mix that stopped early

    write_token_file(out_path, checked(), tokenizer.vocab_size, tokenizer.fingerprint())
    token_file = TokenFile(out_path)
    log.info(
        "tokenized %d documents (%d bytes) into %d tokens with eot=%d: %s",
        documents,
        total,
        len(token_file),
        eot,
        out_path,
    )
    return token_file


def corpus_key(
    specs: Sequence[str],
    tokenizer: Tokenizer,
    strip_gutenberg: bool,
    *,
    fmt: str = "auto",
    text_field: str = formats.DEFAULT_TEXT_FIELD,
    seed: int = 0,
) -> str:
    """A hash of what a token file depends on: files (path, size, mtime), tokenizer, options."""
    h = hashlib.sha256(f"scratchllm-tokens-v{FORMAT_VERSION}".encode())
    source = formats.fingerprint(formats.resolve(specs, fmt), text_field, strip_gutenberg, seed)
    h.update(f"\0{source}\0{tokenizer.fingerprint()}\0{tokenizer.vocab_size}".encode())
    return h.hexdigest()[:16]


def token_file_for(
    specs: Sequence[str],
    tokenizer: Tokenizer,
    cache_dir: str | Path,
    strip_gutenberg: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    *,
    fmt: str = "auto",
    text_field: str = formats.DEFAULT_TEXT_FIELD,
    seed: int = 0,
) -> TokenFile:
    """The token file for `specs`, from `cache_dir` when an up-to-date one is there."""
    options: dict[str, Any] = dict(fmt=fmt, text_field=text_field, seed=seed)
    key = corpus_key(specs, tokenizer, strip_gutenberg, **options)
    path = Path(cache_dir) / f"tokens-{key}.bin"
    if path.exists():
        try:
            cached = TokenFile(path)
        except InputError as exc:
            log.warning("rebuilding unreadable cached token file: %s", exc)
        else:
            if (
                cached.fingerprint == tokenizer.fingerprint()
                and cached.vocab_size == tokenizer.vocab_size
            ):
                log.info("using cached token file %s (%d tokens)", path, len(cached))
                return cached
            log.warning("rebuilding %s: it was made with another tokenizer", path)
    return tokenize_corpus(specs, tokenizer, path, strip_gutenberg, workers, progress, **options)
