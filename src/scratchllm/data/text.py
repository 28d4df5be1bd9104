"""Text files as a stream: the one UTF-8 reader and the one pre-token-safe chunker.

`read_text_pieces` streams a file as text without holding it (strict UTF-8, with the exact byte
offset of a bad byte; optionally no BOM and LF line ends). `split_chunks` re-cuts a document's
text into bounded chunks only where a pre-token boundary is certain, so that pre-tokenizing (and
so BPE-encoding) the chunks one by one gives what the whole text gives. The BPE trainer counts
and `data/shards.py` encodes corpora through these two.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from scratchllm.errors import InputError

READ_BYTES = 1 << 22
DEFAULT_CHUNK_CHARS = 1 << 20
# A stretch without a safe cut is cut anyway (unless `exact`) once it is this many chunks long.
_FORCE_CUT_CHUNKS = 8

# Between a letter/digit and whitespace is always a pre-token boundary for GPT-2's and GPT-4's
# patterns (and Llama 3's, GPT-4's shape): no pre-token holds a letter/digit and the whitespace
# after it, and neither pattern looks behind, so the text right of the cut pre-tokenizes alike
# on its own. `regex`'s \s is Unicode White_Space, as tiktoken's (Rust) \s is.
_SAFE_CUT = regex.compile(r"[\p{L}\p{N}]\s")
_LAST_SAFE_CUT = regex.compile(r"(?r)[\p{L}\p{N}]\s")


# -- reading ---------------------------------------------------------------------------------------
def read_error(path: Path, exc: OSError, what: str = "text file") -> InputError:
    """The one-line InputError for an OSError met opening or reading `path`."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{what} {path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{what} {path}: is a folder, expected a text file")
    if isinstance(exc, PermissionError):
        return InputError(f"{what} {path}: permission denied, cannot read it")
    return InputError(f"{what} {path}: cannot read it ({exc.strerror or exc})")


def decode_text(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or an InputError naming `what` ("--file notes.txt", "stdin line
    3"): a binary file (invalid UTF-8, or NUL bytes) is not text."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{what}: invalid UTF-8 at byte offset {exc.start}; expected UTF-8 text"
        ) from None
    if "\0" in text:
        raise InputError(
            f"{what}: a NUL byte at offset {data.index(0)} (a binary file?); expected UTF-8 text"
        )
    return text


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR become LF."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_pieces(
    path: str | Path,
    clean: bool = True,
    read_bytes: int = READ_BYTES,
    *,
    allow_empty: bool = False,
    what: str = "text file",
) -> Iterator[str]:
    """Stream a UTF-8 file as text pieces, `read_bytes` at a time (< 0: all in one read).

    `clean` drops a leading BOM and turns CRLF / CR into LF. Pieces end anywhere (not at line
    ends). A missing, unreadable or non-UTF-8 file is an InputError naming the file (`what` says
    what it is for) and, for bad UTF-8, the byte offset of the first bad byte; so is an empty
    file unless `allow_empty`.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except OSError as exc:
        raise read_error(path, exc, what) from None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes read before the current block
    first, pending_cr, empty = True, "", True
    with fh:
        while True:
            try:
                data = fh.read(read_bytes)
            except OSError as exc:
                raise read_error(path, exc, what) from None
            final = not data
            # Bytes of a character cut by the previous block: the error offset counts them back.
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                at = offset - buffered + exc.start
                raise InputError(
                    f"{what} {path}: invalid UTF-8 at byte offset {at}; expected UTF-8 text"
                ) from None
            offset += len(data)
            if clean:
                if first and text:
                    text, first = text.removeprefix("\ufeff"), False
                text = pending_cr + text
                pending_cr = ""
                if not final and text.endswith("\r"):  # may be the first half of "\r\n"
                    text, pending_cr = text[:-1], "\r"
                text = normalize_newlines(text)
            if text:
                empty = False
                yield text
            if final:
                break
    if empty and not allow_empty:
        raise InputError(f"{what} {path}: empty file, expected text")


# -- chunking --------------------------------------------------------------------------------------
def _specials_spanning(text: str, cut: int, specials: Sequence[str]) -> bool:
    for s in specials:
        if len(s) > 1 and text.find(s, max(0, cut - len(s) + 1), cut + len(s) - 1) >= 0:
            return True
    return False


def last_safe_cut(
    text: str, specials: Sequence[str] = (), pos: int = 0, endpos: int | None = None
) -> int:
    """The last position in `text[pos:endpos]` where the text may be cut without changing its
    pre-tokens (and not inside a special token), or -1 if there is none."""
    end = len(text) if endpos is None else endpos
    while True:
        m = _LAST_SAFE_CUT.search(text, pos, end)
        if m is None:
            return -1
        cut = m.start() + 1
        if not _specials_spanning(text, cut, specials):
            return cut
        end = cut


def _first_safe_cut(text: str, specials: Sequence[str], pos: int) -> int:
    for m in _SAFE_CUT.finditer(text, pos):
        if not _specials_spanning(text, m.start() + 1, specials):
            return m.start() + 1
    return -1


def split_chunks(
    pieces: Iterable[str],
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    specials: Sequence[str] = (),
    *,
    exact: bool = False,
) -> Iterator[str]:
    """Re-cut one document's consecutive `pieces` into chunks of at most about `chunk_chars`
    characters, only at pre-token-safe cuts (see `last_safe_cut`), never inside `specials`.

    Where a window holds no safe cut, the chunk runs to the first one after it. A stretch
    without any (not prose, really) is cut anyway once it reaches 8 chunks, unless `exact`:
    then it is held until a safe cut or the document's end comes.
    """
    if chunk_chars < 1:
        raise InputError(f"chunk size {chunk_chars}: expected at least 1 character")
    buf, start = "", 0
    searched = 0  # buf[:searched] is known to hold no safe cut after the current window
    for piece in pieces:
        if not piece:
            continue
        searched = max(0, searched - start)
        buf = buf[start:] + piece if start < len(buf) else piece
        start = 0
        while len(buf) - start >= chunk_chars:
            cut = last_safe_cut(buf, specials, start, start + chunk_chars)
            if cut <= start:  # none in this window: take the first one after it
                cut = _first_safe_cut(buf, specials, max(start + chunk_chars, searched))
            if cut <= start:
                # A cut is a letter and the whitespace after it: the last letter may still
                # pair with the next piece's first character.
                searched = len(buf) - 1
                if exact or len(buf) - start < _FORCE_CUT_CHUNKS * chunk_chars:
                    break  # wait for more text
                cut = len(buf)
            yield buf[start:cut]
            start, searched = cut, 0
    if start < len(buf):
        yield buf[start:]
