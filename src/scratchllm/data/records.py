"""Record readers: JSON lines (plain, gzip, zstd), JSON arrays, Parquet, Arrow (`datasets`
folders) and hub datasets, each yielding one record's text at a time.

`iter_records` is what `data/formats.py` calls. Files are read in blocks (a compressed stream is
decompressed block by block, a Parquet file a row group and a few hundred rows at a time), so
memory holds one block or batch, never the file. Every error names the file and the line, row
or element, and the field.
"""

from __future__ import annotations

import codecs
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from scratchllm.data.text import read_error
from scratchllm.errors import InputError

READ_BYTES = 1 << 20  # raw bytes per read of a record file
_BATCH_ROWS = 256  # rows per Arrow batch read (Parquet, datasets folders)
EXTRA = "pip install 'scratchllm[data]'"
HF_PREFIX = "hf:"

# (document name, text, input bytes read since the previous record: progress only)
Record = tuple[str, str, int]


# -- byte streams ----------------------------------------------------------------------------------
def _decompressor(kind: str) -> Any:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)
    try:
        import zstandard
    except ImportError:
        raise InputError(f"reading .zst files needs the zstandard package ({EXTRA})") from None
    return zstandard.ZstdDecompressor().decompressobj()


def _blocks(path: Path, compression: str | None, what: str) -> Iterator[tuple[bytes, int]]:
    """(decompressed bytes, raw bytes read so far) blocks of a file; a corrupt or truncated
    gzip / zstd stream is an InputError naming the file."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except OSError as exc:
        raise read_error(path, exc, what) from None
    dec = _decompressor(compression) if compression else None
    pos = 0
    with fh:
        while True:
            try:
                raw = fh.read(READ_BYTES)
            except OSError as exc:
                raise read_error(path, exc, what) from None
            pos += len(raw)
            if dec is None:
                if not raw:
                    return
                yield raw, pos
                continue
            if not raw:
                if not dec.eof and pos:
                    raise InputError(
                        f"{what} {path}: corrupt {compression} stream (truncated: it ends "
                        "inside a compressed frame)"
                    )
                return
            try:
                while raw:  # a new member / frame may follow the one that ends here
                    out = dec.decompress(raw)
                    raw = dec.unused_data if dec.eof else b""
                    if dec.eof and raw:
                        dec = _decompressor(compression)
                    if out:
                        yield out, pos
            except InputError:
                raise
            except Exception as exc:  # zlib.error, zstandard.ZstdError
                raise InputError(f"{what} {path}: corrupt {compression} stream ({exc})") from None


def _lines(path: Path, compression: str | None, what: str) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line bytes without the newline, raw bytes read) of a (compressed) file."""
    carry: list[bytes] = []  # the start of a line that the next block completes
    number = pos = 0
    for block, pos in _blocks(path, compression, what):
        parts = block.split(b"\n")
        if len(parts) == 1:
            carry.append(block)
            continue
        if carry:
            parts[0] = b"".join(carry) + parts[0]
        carry = [parts.pop()]
        for line in parts:
            number += 1
            yield number, line, pos
    rest = b"".join(carry)
    if rest:
        yield number + 1, rest, pos


# -- records ---------------------------------------------------------------------------------------
def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise InputError(
            f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}"
        )
    if field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise InputError(
            f"{where}: no field {field!r} (fields: {keys}); pick one with --text-field"
        )
    text = record[field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
    return text


def _jsonl_docs(path: Path, compression: str | None, field: str) -> Iterator[Record]:
    what = "JSON lines file"
    last = 0
    for number, raw, pos in _lines(path, compression, what):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{what} {path} line {number}: invalid UTF-8 at byte {exc.start} of the line"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{what} {path} line {number}: not JSON ({exc.msg} at column {exc.colno}); "
                "expected one JSON object per line"
            ) from None
        text = _record_text(record, field, f"{what} {path} line {number}")
        yield f"{path}:{number}", text, pos - last
        last = pos


def _json_array_docs(path: Path, compression: str | None, field: str) -> Iterator[Record]:
    """The objects of a top-level JSON array, parsed one at a time from a streamed buffer."""
    what = "JSON file"
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8-sig")()
    blocks = _blocks(path, compression, what)
    buf, pos, eof, raw_pos, last = "", 0, False, 0, 0
    line, line_pos = 1, 0  # the line number at buf[line_pos]; advanced as parsing goes

    def line_at(at: int) -> int:
        nonlocal line, line_pos
        line += buf.count("\n", line_pos, at)
        line_pos = at
        return line

    def more(minimum: int) -> bool:
        """Drop what was parsed and read at least `minimum` more characters (False at EOF)."""
        nonlocal buf, pos, eof, raw_pos, line_pos
        if eof:
            return False
        line_at(pos)
        buf, pos, line_pos = buf[pos:], 0, 0
        got = 0
        while got < minimum and not eof:
            block, raw_pos = next(blocks, (b"", raw_pos))
            eof = not block
            try:
                text = utf8.decode(block, final=eof)
            except UnicodeDecodeError:
                raise InputError(f"{what} {path}: invalid UTF-8 near line {line}") from None
            buf += text
            got += len(text)
        return True

    def peek() -> str:
        """The next non-blank character ("" at the end of the file)."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more(READ_BYTES):
                return buf[pos] if pos < len(buf) else ""

    if peek() != "[":
        raise InputError(
            f"{what} {path} line {line_at(pos)}: expected a JSON array of objects ([{{...}}, ...])"
        )
    pos += 1
    if peek() == "]":
        return
    index = 0
    while True:
        start_line = line_at(pos)
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                # Usually the element runs past the buffer: read more (doubling) and retry.
                if not more(max(READ_BYTES, len(buf) - pos)):
                    raise InputError(
                        f"{what} {path} line {line_at(exc.pos)}: not valid JSON ({exc.msg})"
                    ) from None
        pos = end
        where = f"{what} {path} line {start_line} (element {index})"
        yield f"{path}[{index}]", _record_text(record, field, where), raw_pos - last
        last = raw_pos
        index += 1
        sep = peek()
        if sep == "]":
            return
        if sep != ",":
            raise InputError(
                f"{what} {path} line {line_at(pos)}: expected ',' or ']' after element {index - 1}"
            )
        pos += 1
        peek()  # raw_decode does not skip blanks itself


def _arrow_strings(batches: Iterable[Any], field: str, where: str) -> Iterator[tuple[int, str]]:
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                got = "null" if value is None else type(value).__name__
                raise InputError(f"{where} row {row}: field {field!r} is {got}, expected a string")
            yield row, value
            row += 1


def _check_column(schema: Any, field: str, where: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        cols = ", ".join(map(repr, schema.names[:8])) or "none"
        raise InputError(
            f"{where}: no column {field!r} (columns: {cols}); pick one with --text-field"
        )
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"
    ):
        raise InputError(f"{where}: column {field!r} has type {kind}, expected strings")


def _pyarrow(what: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"reading {what} needs the pyarrow package ({EXTRA})") from None
    return pq


def _parquet_docs(path: Path, field: str) -> Iterator[Record]:
    pq = _pyarrow("Parquet")
    import pyarrow as pa

    where = f"Parquet file {path}"
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: cannot read it ({exc}); expected a Parquet file") from None
    _check_column(pf.schema_arrow, field, where)
    rows = pf.metadata.num_rows
    if rows == 0:
        raise InputError(f"{where}: empty (no rows); expected rows with a {field!r} column")
    size, last = path.stat().st_size, 0

    def batches() -> Iterator[Any]:
        # Row group by row group, a few hundred rows at a time: memory is one batch.
        for group in range(pf.num_row_groups):
            try:
                yield from pf.iter_batches(_BATCH_ROWS, row_groups=[group], columns=[field])
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{where}: row group {group} is corrupt ({exc})") from None

    for row, text in _arrow_strings(batches(), field, where):
        done = size * (row + 1) // rows
        yield f"{path}#{row}", text, done - last
        last = done


def arrow_files(folder: Path) -> list[Path]:
    """A `save_to_disk` folder's data files, in its state.json order."""
    if not folder.is_dir():
        return [folder]
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        files = sorted(folder.glob("*.arrow"))
    return files


def _arrow_docs(path: Path, field: str) -> Iterator[Record]:
    _pyarrow("datasets folders")
    import pyarrow as pa

    for file in arrow_files(path):
        where = f"datasets file {file}"
        try:
            stream = pa.OSFile(str(file))  # read, not mapped: memory stays one batch
            try:
                reader = pa.ipc.open_stream(stream)
            except pa.ArrowInvalid:  # the random-access IPC file format
                stream.seek(0)
                reader = pa.ipc.open_file(stream)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{where}: cannot read it ({exc}); expected Arrow IPC data") from None
        _check_column(reader.schema, field, where)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            parts: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            parts = reader
        batches = (b.select([field]) for b in parts)
        size, last = file.stat().st_size, 0
        for row, text in _arrow_strings(batches, field, where):
            done = min(size, stream.tell())
            yield f"{file}#{row}", text, done - last
            last = done


def _hf_docs(spec: str, split: str, field: str) -> Iterator[Record]:
    name = spec[len(HF_PREFIX) :].split(":")[0]
    try:
        import datasets
    except ImportError:
        raise InputError(f"data {spec}: hub datasets need the datasets package ({EXTRA})") from None
    where = f"hub dataset {name} (split {split})"
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for row, record in enumerate(stream):
            yield f"{spec}#{row}", _record_text(record, field, f"{where} row {row}"), 0
    except InputError:
        raise
    except Exception as exc:  # offline, unknown name or split, a broken download
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise InputError(
            f"{where}: cannot stream it ({type(exc).__name__}: {first}); expected a dataset "
            "on the Hugging Face hub (needs network; HF_ENDPOINT picks the server)"
        ) from None


def iter_records(
    kind: str,
    path: Path | None,
    field: str,
    *,
    compression: str | None = None,
    spec: str = "",
    split: str = "train",
) -> Iterator[Record]:
    """(name, text, progress bytes) of every record of one input of `kind` (jsonl, json,
    parquet, arrow, hf); `spec` and `split` name a hub dataset."""
    if kind == "hf":
        return _hf_docs(spec, split, field)
    assert path is not None
    if kind == "jsonl":
        return _jsonl_docs(path, compression, field)
    if kind == "json":
        return _json_array_docs(path, compression, field)
    if kind == "parquet":
        return _parquet_docs(path, field)
    if kind == "arrow":
        return _arrow_docs(path, field)
    raise InputError(f"data {path}: unknown record format {kind!r}")
