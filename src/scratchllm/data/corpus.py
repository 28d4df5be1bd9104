"""Raw text corpora (book chapter 2): find the files, read them cleanly, yield documents.

A corpus spec is a file, a folder (every `*.txt` below it), a glob pattern, or
`builtin:NAME` for a corpus that ships with Python itself (works offline).
Each file is one document; the tokenizer joins documents with `<|endoftext|>`.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from scratchllm.data.text import read_text_pieces
from scratchllm.errors import InputError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
_WHAT = "corpus file"  # how read errors name a corpus file


def _python_docs() -> str:
    # pydoc_data ships with CPython: the language reference as topic → text. Sorted keys make
    # the text identical from run to run.
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


BUILTIN_CORPORA: dict[str, str] = {}
# A stripped-down Python without pydoc_data simply lacks the builtin.
with contextlib.suppress(ImportError):
    BUILTIN_CORPORA["python-docs"] = _python_docs()

_GLOB_CHARS = re.compile(r"[*?\[]")
# "*** START OF THE PROJECT GUTENBERG EBOOK ... ***" and its variants (THIS, E-BOOK, lower case).
_PG_MARKER = r"[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG[ \t]+E-?BOOK\b.*$"
_PG_START = re.compile(r"^[ \t]*\*{3}[ \t]*START" + _PG_MARKER, re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^[ \t]*\*{3}[ \t]*END" + _PG_MARKER, re.IGNORECASE | re.MULTILINE)
# Older files repeat "End of the Project Gutenberg EBook of ..." just above the END marker.
_PG_OLD_END = re.compile(
    r"\n[ \t]*End of (?:the |this )?Project Gutenberg'?s?\b[^\n]*\s*\Z", re.IGNORECASE
)
HEADER_SEARCH_CHARS = 1 << 20
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


# -- finding files ---------------------------------------------------------------------------------
def _resolve_spec(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not found:
            raise InputError(_no_txt_files(spec, path))
        return found
    if _GLOB_CHARS.search(spec):
        matches = sorted(glob.glob(str(path), recursive=True))
        found = []
        for match in map(Path, matches):
            if match.is_file():
                found.append(match)
            elif match.is_dir():
                found.extend(sorted(p for p in match.rglob("*.txt") if p.is_file()))
        if not found:
            raise InputError(f"corpus pattern {spec!r}: matches no files")
        return found
    raise InputError(f"corpus {spec}: no such file or folder")


def _no_txt_files(spec: str, folder: Path, scan: int = 10_000) -> str:
    """What a folder without .txt files holds instead, and a glob that would read it."""
    from collections import Counter

    from scratchllm.utils import plural

    kinds: Counter[str] = Counter()
    nested: set[str] = set()
    for i, p in enumerate(folder.rglob("*")):
        if i >= scan:
            break
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            kinds[p.suffix] += 1
            if p.parent != folder:
                nested.add(p.suffix)
    name = spec if spec.endswith(("/", "\\")) else spec + "/"
    if not kinds:
        return f"corpus folder {spec}: no .txt files in it (nor any other files)"
    found = ", ".join(
        plural(n, f"{ext} file" if ext else "file without an extension")
        for ext, n in kinds.most_common(3)
    )
    hint = ""
    ext = next((e for e, _ in kinds.most_common() if e), None)
    if ext is not None:
        pattern = name + ("**/*" if ext in nested else "*") + ext
        hint = f": if they are plain text, try --data '{pattern}'"
    return f"corpus folder {spec}: no .txt files in it; found {found}{hint}"


def resolve_paths(specs: Sequence[str]) -> list[Path]:
    """Files named by `specs` (files, folders of *.txt, globs), in order, without duplicates.

    `builtin:NAME` specs are not paths and are skipped here (see `iter_documents`).
    """
    if isinstance(specs, str | Path):
        specs = [str(specs)]
    seen: set[Path] = set()
    paths: list[Path] = []
    for spec in specs:
        spec = str(spec)
        if spec.startswith(BUILTIN_PREFIX):
            continue
        for path in _resolve_spec(spec):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def builtin_text(spec: str) -> str:
    """Text of `builtin:NAME` (or bare NAME); InputError listing the known names otherwise."""
    name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else spec
    if name not in BUILTIN_CORPORA:
        known = ", ".join(BUILTIN_PREFIX + k for k in sorted(BUILTIN_CORPORA)) or "none"
        raise InputError(f"corpus {spec!r}: unknown builtin corpus; known: {known}")
    return BUILTIN_CORPORA[name]


# -- reading text ----------------------------------------------------------------------------------
def read_text_file(path: Path, strip_gutenberg: bool = False) -> str:
    """A corpus file as clean text: strict UTF-8, no BOM, LF line ends (optionally no PG boilerplate).

    Invalid UTF-8 is an InputError giving the byte offset, so the user can find the bad byte.
    """
    # One read of the whole file through the one reader, so cleaning is done in one place.
    text = "".join(read_text_pieces(path, read_bytes=-1, allow_empty=True, what=_WHAT))
    if strip_gutenberg:
        text = strip_gutenberg_boilerplate(text)
    return text


def _after_start_marker(text: str) -> str:
    match = _PG_START.search(text)
    if match is None:
        return text
    return _LEADING_BLANK_LINES.sub("", text[match.end() :].lstrip("\r\n"))


def _before_end_marker(text: str) -> tuple[str, bool]:
    """Text before the END marker line (trailing blanks and old 'End of ...' line dropped)."""
    match = _PG_END.search(text)
    if match is None:
        return text, False
    body = _PG_OLD_END.sub("", text[: match.start()]).rstrip()
    return (body + "\n" if body else ""), True


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg header (through the START line) and footer (from the END line).

    Text without the markers is returned unchanged.
    """
    return _before_end_marker(_after_start_marker(text))[0]


def _whole_lines(pieces: Iterable[str]) -> Iterator[str]:
    """The same text re-cut so that each piece ends with a newline (except the last)."""
    carry = ""  # text after the last newline, completed by the next piece
    for piece in pieces:
        text = carry + piece
        cut = text.rfind("\n") + 1
        carry = text[cut:]
        if cut:
            yield text[:cut]
    if carry:
        yield carry


def iter_file_pieces(
    path: Path, strip_gutenberg: bool, stream_bytes: int, read_bytes: int
) -> Iterator[str]:
    """One file's clean text: in one piece if it is at most `stream_bytes`, else streamed."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size <= stream_bytes:
        yield read_text_file(path, strip_gutenberg)
        return
    log.info("streaming %s (%d bytes) in %d-byte blocks", path, size, read_bytes)
    pieces = read_text_pieces(path, read_bytes=read_bytes, allow_empty=True, what=_WHAT)
    if not strip_gutenberg:
        yield from pieces
        return
    pieces = _whole_lines(pieces)
    # Pieces end at line breaks, so marker lines are never split. The START marker is looked
    # for in the first MB (headers are a few kB); the END marker ends the text wherever it is.
    # The last line and trailing blanks of each piece are held back, so the text before END is
    # trimmed exactly as `strip_gutenberg_boilerplate` trims it.
    head: str | None = ""
    tail = ""
    for piece in pieces:
        if head is not None:
            head += piece
            start = _PG_START.search(head)
            # Wait for the marker, and for text after it (its blank lines are dropped).
            waiting = start is None or not head[start.end() :].strip()
            if waiting and len(head) < HEADER_SEARCH_CHARS:
                continue
            piece, head = _after_start_marker(head), None
        text, ended = _before_end_marker(tail + piece)
        if ended:
            if text:
                yield text
            return
        end = text.rfind("\n", 0, len(text.rstrip()))  # the newline before the last line
        emit, tail = (text[:end], text[end:]) if end > 0 else ("", text)
        if emit:
            yield emit
    if head is not None:  # a short file: all of it was held back looking for the header
        head = strip_gutenberg_boilerplate(head)
        if head:
            yield head
    elif tail:
        yield tail


def list_sources(specs: Sequence[str]) -> list[tuple[str, Path | None]]:
    """(name, path) per document in spec order; path is None for builtin corpora.

    Every spec is checked before anything is read, so a typo fails fast.
    """
    if isinstance(specs, str | Path):
        specs = [str(specs)]
    if not specs:
        raise InputError("corpus: no files given; expected files, folders, globs or builtin:NAME")
    seen: set[Path | str] = set()
    sources: list[tuple[str, Path | None]] = []
    for spec in map(str, specs):
        if spec.startswith(BUILTIN_PREFIX):
            builtin_text(spec)  # validate the name now
            if spec not in seen:
                seen.add(spec)
                sources.append((spec, None))
            continue
        for path in _resolve_spec(spec):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                sources.append((str(path), path))
    return sources
