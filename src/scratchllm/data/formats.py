"""Every input format as one stream of documents, and weighted mixing of several inputs.

A data spec is what `--data` takes: a text file (`.txt`, `.md`, any unknown extension), JSON
lines (`.jsonl`, also `.jsonl.gz` / `.jsonl.zst`), a JSON array of objects (`.json`), Parquet
(`.parquet`), a folder written by `datasets.save_to_disk` (its `.arrow` files), a folder or glob
of such files, `builtin:NAME`, or `hf:NAME[:SPLIT]` (a hub dataset, streamed). Records give their
text in one field (`text_field`, default "text"). `SPEC:W` gives an input a weight: with weights,
documents are drawn from the inputs at random (seeded) in those proportions until one runs out.

Every reader yields one document at a time (a record, or a text file's text in blocks), so
memory does not grow with the corpus. Bad input is an InputError naming the file, line or row,
and the field.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchllm.data import corpus
from scratchllm.data.records import HF_PREFIX, arrow_files, iter_records
from scratchllm.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "jsonl", "json", "parquet", "arrow")
DEFAULT_TEXT_FIELD = "text"
STREAM_BYTES = 64 << 20  # text files above this are read in blocks
TEXT_READ_BYTES = 8 << 20

# (suffix, kind, compression), longest first so `.jsonl.gz` wins over `.gz`.
_SUFFIXES = (
    (".jsonl.zstd", "jsonl", "zstd"),
    (".jsonl.zst", "jsonl", "zstd"),
    (".jsonl.gz", "jsonl", "gzip"),
    (".ndjson.gz", "jsonl", "gzip"),
    (".ndjson.zst", "jsonl", "zstd"),
    (".json.zst", "json", "zstd"),
    (".json.gz", "json", "gzip"),
    (".jsonl", "jsonl", None),
    (".ndjson", "jsonl", None),
    (".json", "json", None),
    (".parquet", "parquet", None),
    (".arrow", "arrow", None),
)
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)", re.I)

# (name, text pieces, input bytes it accounts for: progress only)
Document = tuple[str, Iterable[str], int]


@dataclass(frozen=True)
class Source:
    """One stream of documents: a file, a datasets folder, a builtin corpus or a hub dataset."""

    name: str
    kind: str  # text | jsonl | json | parquet | arrow | builtin | hf
    path: Path | None = None
    compression: str | None = None  # gzip | zstd (jsonl and json only)
    split: str | None = None  # hf only


@dataclass(frozen=True)
class DataSpec:
    """One `--data` argument: its sources in reading order, and its weight (None: not given)."""

    spec: str
    sources: tuple[Source, ...]
    weight: float | None = None


# -- specs -----------------------------------------------------------------------------------------
def _weight(spec: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"data {spec!r}: weight {text!r} is not a positive number")
    return value


def split_weight(spec: str) -> tuple[str, float | None]:
    """`SPEC:W` → (SPEC, W); a spec without a weight → (spec, None).

    A trailing `:W` is a weight when W looks like a number or what precedes it names an input;
    it must then be a positive number. `hf:NAME:SPLIT` keeps its split.
    """
    spec = str(spec)
    if Path(spec).expanduser().exists():
        return spec, None  # a file whose name holds a colon
    for prefix, parts_max in ((HF_PREFIX, 3), (corpus.BUILTIN_PREFIX, 2)):
        if spec.startswith(prefix):
            parts = spec[len(prefix) :].split(":")
            if len(parts) == parts_max or (len(parts) == parts_max - 1 and _looks_numeric(parts)):
                return spec.rpartition(":")[0], _weight(spec, parts[-1])
            return spec, None
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return spec, None
    names_input = Path(head).expanduser().exists() or bool(corpus._GLOB_CHARS.search(head))
    if _NUMBER.fullmatch(tail) or names_input:
        return head, _weight(spec, tail)
    return spec, None


def _looks_numeric(parts: list[str]) -> bool:
    return len(parts) > 1 and bool(_NUMBER.fullmatch(parts[-1]))


def _file_source(path: Path, fmt: str) -> Source:
    name = path.name.lower()
    if fmt == "auto":
        for suffix, kind, compression in _SUFFIXES:
            if name.endswith(suffix):
                return Source(str(path), kind, path, compression)
        if path.suffix.lower() in _COMPRESSED:
            raise InputError(
                f"data file {path}: compressed input is read as JSON lines only; expected "
                ".jsonl.gz or .jsonl.zst (or pass --format jsonl)"
            )
        return Source(str(path), "text", path)
    compression = _COMPRESSED.get(path.suffix.lower()) if fmt in ("jsonl", "json") else None
    return Source(str(path), fmt, path, compression)


def _is_datasets_folder(path: Path) -> bool:
    return (path / "state.json").is_file() and any(path.glob("*.arrow"))


def _folder_sources(path: Path, fmt: str, spec: str) -> list[Source]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if _is_datasets_folder(p))
        raise InputError(
            f"datasets folder {path}: holds the splits {', '.join(splits) or 'none'}; "
            f"expected one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    if _is_datasets_folder(path) and fmt in ("auto", "arrow"):
        return [Source(str(path), "arrow", path)]
    if fmt in ("auto", "text"):
        return [Source(str(p), "text", p) for p in corpus._resolve_spec(str(path))]
    wanted = tuple(s for s, kind, _ in _SUFFIXES if kind == fmt)
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(wanted))
    if not found:
        raise InputError(f"corpus folder {spec}: no {fmt} files ({', '.join(wanted)}) in it")
    return [_file_source(p, fmt) for p in found]


def _expand(spec: str, fmt: str) -> list[Source]:
    if spec.startswith(HF_PREFIX):
        name, _, split = spec[len(HF_PREFIX) :].partition(":")
        if not name:
            raise InputError(f"data {spec!r}: expected hf:NAME or hf:NAME:SPLIT")
        return [Source(spec, "hf", None, None, split or "train")]
    if spec.startswith(corpus.BUILTIN_PREFIX):
        corpus.builtin_text(spec)  # validate the name now
        return [Source(spec, "builtin")]
    path = Path(spec).expanduser()
    if path.is_file():
        return [_file_source(path, fmt)]
    if path.is_dir():
        return _folder_sources(path, fmt, spec)
    if corpus._GLOB_CHARS.search(spec):
        sources: list[Source] = []
        for match in map(Path, sorted(glob.glob(str(path), recursive=True))):
            if match.is_file():
                sources.append(_file_source(match, fmt))
            elif match.is_dir():
                sources.extend(_folder_sources(match, fmt, str(match)))
        if not sources:
            raise InputError(f"corpus pattern {spec!r}: matches no files")
        return sources
    raise InputError(f"corpus {spec}: no such file or folder")


def resolve(specs: Sequence[str] | str, fmt: str = "auto") -> list[DataSpec]:
    """Every spec's sources, checked before anything is read (a typo fails fast).

    A file named twice is read once, where it first appears.
    """
    if isinstance(specs, str | Path):
        specs = [str(specs)]
    if fmt not in FORMATS:
        raise InputError(f"data format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not specs:
        raise InputError("corpus: no files given; expected files, folders, globs or builtin:NAME")
    seen: set[Any] = set()
    out = []
    for raw in map(str, specs):
        spec, weight = split_weight(raw)
        sources = []
        for source in _expand(spec, fmt):
            key = source.path.resolve() if source.path is not None else source.name
            if key not in seen:
                seen.add(key)
                sources.append(source)
        out.append(DataSpec(spec, tuple(sources), weight))
    return out


def fingerprint(
    specs: Sequence[DataSpec], text_field: str, strip_gutenberg: bool, seed: int
) -> str:
    """A hash of what the document stream depends on: every file (path, size, mtime), the
    formats, weights and options. Equal fingerprints mean equal documents."""
    h = hashlib.sha256(b"scratchllm-data-v1")
    weighted = any(s.weight is not None for s in specs)
    for spec in specs:
        h.update(f"\0spec\0{spec.weight if weighted else ''}".encode())
        for source in spec.sources:
            h.update(f"\0{source.kind}\0{source.compression}\0{source.split}".encode())
            if source.kind == "builtin":
                text = corpus.builtin_text(source.name).encode("utf-8")
                h.update(f"\0{source.name}\0{hashlib.sha256(text).hexdigest()}".encode())
            elif source.path is None:
                h.update(f"\0{source.name}".encode())  # a hub dataset: its name is all we know
            else:
                files = arrow_files(source.path) if source.path.is_dir() else [source.path]
                for file in files:
                    st = file.stat()
                    h.update(f"\0{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(f"\0{text_field}\0{strip_gutenberg}\0{seed if weighted else ''}".encode())
    return h.hexdigest()[:16]


def total_bytes(specs: Sequence[DataSpec]) -> int:
    """Input bytes (files on disk; builtin text), for progress; hub datasets count 0."""
    total = 0
    for spec in specs:
        for source in spec.sources:
            if source.kind == "builtin":
                total += len(corpus.builtin_text(source.name).encode("utf-8"))
            elif source.path is not None:
                files = arrow_files(source.path) if source.path.is_dir() else [source.path]
                total += sum(f.stat().st_size for f in files)
    return total


# -- documents -------------------------------------------------------------------------------------
def iter_source(
    source: Source,
    text_field: str = DEFAULT_TEXT_FIELD,
    strip_gutenberg: bool = False,
    stream_bytes: int = STREAM_BYTES,
    read_bytes: int = TEXT_READ_BYTES,
) -> Iterator[Document]:
    """The documents of one source. A text file is one document (read in blocks when large);
    each record is one. Whitespace-only records are skipped, as empty files are downstream."""
    if source.kind == "builtin":
        yield source.name, [corpus.builtin_text(source.name)], 0
        return
    if source.kind == "text":
        assert source.path is not None
        try:
            size = source.path.stat().st_size
        except OSError:
            size = 0
        pieces = corpus.iter_file_pieces(source.path, strip_gutenberg, stream_bytes, read_bytes)
        yield source.name, pieces, size
        return
    pending = 0  # progress bytes of skipped records, carried to the next document
    records = iter_records(
        source.kind,
        source.path,
        text_field,
        compression=source.compression,
        spec=source.name,
        split=source.split or "train",
    )
    for name, text, done in records:
        if strip_gutenberg:
            text = corpus.strip_gutenberg_boilerplate(text)
        if not text.strip():
            pending += done
            continue
        yield name, [text], done + pending
        pending = 0


def _spec_docs(spec: DataSpec, **options: Any) -> Iterator[Document]:
    for source in spec.sources:
        yield from iter_source(source, **options)


def mix(
    streams: Sequence[Iterator[Document]], weights: Sequence[float], seed: int
) -> Iterator[Document]:
    """Documents drawn from `streams` with probabilities ∝ `weights` (numpy's default_rng(seed)),
    until the first stream runs out, so the proportions hold over the whole output."""
    import numpy as np

    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    counts = [0] * len(streams)
    while True:
        for i in rng.choice(len(streams), size=1024, p=p).tolist():  # drawn in blocks: fast
            doc = next(streams[i], None)
            if doc is None:
                log.info("mixing stopped: input %d ran out; documents per input: %s", i, counts)
                return
            counts[i] += 1
            yield doc


def iter_docs(
    specs: Sequence[DataSpec],
    text_field: str = DEFAULT_TEXT_FIELD,
    strip_gutenberg: bool = False,
    seed: int = 0,
    stream_bytes: int = STREAM_BYTES,
    read_bytes: int = TEXT_READ_BYTES,
) -> Iterator[Document]:
    """Every document of `specs`: in order, or mixed by their weights when any has one."""
    options = dict(
        text_field=text_field,
        strip_gutenberg=strip_gutenberg,
        stream_bytes=stream_bytes,
        read_bytes=read_bytes,
    )
    if not any(s.weight is not None for s in specs):
        for spec in specs:
            yield from _spec_docs(spec, **options)
        return
    weights = [1.0 if s.weight is None else s.weight for s in specs]
    yield from mix([_spec_docs(s, **options) for s in specs], weights, seed)


def iter_documents(
    specs: Sequence[str],
    strip_gutenberg: bool = False,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    seed: int = 0,
) -> Iterator[tuple[str, str]]:
    """(source name, text) for every document named by `specs`, in order (or mixed, when a
    spec carries a weight `SPEC:W`; `seed` draws the mix).

    A text file is one document, `builtin:NAME` is one, and each record of a JSON lines, JSON,
    Parquet or datasets input is one (`text_field` holds its text; `data/formats.py` reads
    them). Whitespace-only documents are skipped (they would only add an `<|endoftext|>`).
    """
    docs = iter_docs(resolve(specs, fmt), text_field, strip_gutenberg, seed)
    for source, pieces, _ in docs:
        text = "".join(pieces)
        if not text.strip():
            log.info("skipping empty document %s", source)
            continue
        yield source, text
