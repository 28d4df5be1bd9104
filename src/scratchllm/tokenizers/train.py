"""Byte-level BPE trained from scratch (the book's chapter 2 tokenizer, built rather than loaded).

The pipeline:

1. **Pre-tokenize.** Text is split on the special tokens (so they are never merged), then cut
   into pre-tokens by a regex (GPT-2's by default, GPT-4's as an option). Only the *counts* of
   distinct pre-tokens are kept, so memory grows with the vocabulary of words, not with the
   corpus. Large inputs are streamed in chunks cut where the regex is sure to split anyway, and
   the chunks are counted on all cores.
2. **Merge.** Each distinct pre-token is a list of token ids with a count. The most frequent
   adjacent pair (ties: the lexicographically greater `(bytes, bytes)` pair) becomes a new token.
   Pair counts are updated incrementally: an index pair → words holding it means a merge only
   visits the words it changes, and a heap with lazy invalidation finds the next best pair.
3. **Lay out ids** and hand the result to `BPETokenizer`, which encodes through tiktoken.
"""

from __future__ import annotations

import codecs
import heapq
import logging
import multiprocessing
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, pairwise
from pathlib import Path
from typing import Any

import regex

from scratchllm.errors import InputError
from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, PATTERNS
from scratchllm.tokenizers.bpe import BPETokenizer
from scratchllm.tokenizers.files import bytes_to_unicode

log = logging.getLogger(__name__)

# progress(stage, done, total): stage "pretokenize" counts characters read (total: the input's
# size in bytes when known, else None); stage "merge" counts merges learned out of the target.
ProgressFn = Callable[[str, int, "int | None"], None]

LAYOUTS = ("gpt2", "specials_first")
DEFAULT_CHUNK_CHARS = 1 << 20
_READ_BYTES = 1 << 22

# A cut between a letter/digit and whitespace is always a pre-token boundary for both the GPT-2
# and GPT-4 patterns (no pre-token spans it, and neither pattern looks behind), so counting the
# two sides separately gives exactly the counts of the whole text.
_SAFE_CUT = regex.compile(r"[\p{L}\p{N}]\s")
_LAST_SAFE_CUT = regex.compile(r"(?r)[\p{L}\p{N}]\s")


# -- settings ----------------------------------------------------------------------------------
def resolve_pattern(pattern: str) -> str:
    """`gpt2` / `gpt4` name a known pattern; anything else is taken as a regex."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise InputError(f"pattern {pattern[:40]!r}: not a valid regex ({exc})") from None
    return pattern


def check_special_tokens(special_tokens: Sequence[str]) -> list[str]:
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    specials: list[str] = []
    for token in special_tokens:
        if not isinstance(token, str) or not token:
            raise InputError(f"special token {token!r}: expected a non-empty string")
        if token in specials:
            raise InputError(f"special token {token!r}: given twice")
        specials.append(token)
    return specials


def check_vocab_size(vocab_size: int, n_special: int) -> int:
    minimum = 256 + n_special
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise InputError(
            f"vocab size {vocab_size}: must be at least {minimum} "
            f"(256 byte tokens + {n_special} special tokens)"
        )
    return vocab_size - minimum


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# -- streaming text in safe chunks --------------------------------------------------------------
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
    pieces: Iterable[str], chunk_chars: int = DEFAULT_CHUNK_CHARS, specials: Sequence[str] = ()
) -> Iterator[str]:
    """Re-cut one document's consecutive `pieces` into chunks of at most about `chunk_chars`
    characters, only at safe cuts. A stretch without any safe cut (not text, really) is cut
    anyway once it reaches 8 chunks."""
    buf, start = "", 0
    for piece in pieces:
        buf = buf[start:] + piece if buf else piece
        start = 0
        while len(buf) - start >= chunk_chars:
            cut = last_safe_cut(buf, specials, start, start + chunk_chars)
            if cut <= start:  # none in this window: take the first one after it
                cut = _first_safe_cut(buf, specials, start + chunk_chars)
            if cut <= start:
                if len(buf) - start < 8 * chunk_chars:
                    break  # wait for more text
                cut = len(buf)
            yield buf[start:cut]
            start = cut
    if start < len(buf):
        yield buf[start:]


def read_text_pieces(
    path: Path, clean: bool = False, read_bytes: int = _READ_BYTES
) -> Iterator[str]:
    """Stream a UTF-8 file as text pieces, `read_bytes` at a time.

    `clean` drops a leading BOM and turns CRLF / CR into LF (as `scratchllm.data.corpus` does).
    Empty, missing, unreadable and non-UTF-8 files are an InputError naming the file.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a text file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, first, pending_cr, empty = 0, True, "", True
    with fh:
        while True:
            try:
                data = fh.read(read_bytes)
            except OSError as exc:
                raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
            final = not data
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"{path}: invalid UTF-8 at byte offset {offset - buffered + exc.start}"
                ) from None
            offset += len(data)
            if clean:
                if first and text:
                    text, first = text.removeprefix("\ufeff"), False
                text = pending_cr + text
                pending_cr = ""
                if not final and text.endswith("\r"):  # may be the first half of "\r\n"
                    text, pending_cr = text[:-1], "\r"
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                empty = False
                yield text
            if final:
                break
    if empty:
        raise InputError(f"{path}: empty file, nothing to train on")


def iter_file_chunks(
    paths: Iterable[str | Path],
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    specials: Sequence[str] = (),
    clean: bool = False,
) -> Iterator[str]:
    """Every file's text in safe chunks; each file is its own document."""
    for path in paths:
        yield from split_chunks(read_text_pieces(Path(path), clean), chunk_chars, specials)


# -- counting pre-tokens ------------------------------------------------------------------------
_worker_state: dict[str, Any] = {}


def _init_worker(pattern: str, specials: Sequence[str]) -> None:
    _worker_state["pattern"] = regex.compile(pattern)
    _worker_state["specials"] = (
        regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
        if specials
        else None
    )


def _count_batch(batch: Sequence[str]) -> Counter[str]:
    findall = _worker_state["pattern"].findall
    splitter = _worker_state["specials"]
    counts: Counter[str] = Counter()
    for text in batch:
        for segment in splitter.split(text) if splitter is not None else (text,):
            if segment:
                counts.update(findall(segment))
    return counts


def _batches(chunks: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    # Many small documents travel to a worker together, so each task is worth its overhead.
    batch: list[str] = []
    size = 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _mp_context() -> Any:
    # fork starts workers in milliseconds and they need nothing but the regex module.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def count_pretokens(
    texts: Iterable[str],
    pattern: str = GPT2_PATTERN,
    special_tokens: Sequence[str] = (EOT,),
    *,
    workers: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: ProgressFn | None = None,
    total: int | None = None,
) -> Counter[bytes]:
    """Counts of the distinct pre-tokens (as UTF-8 bytes) of all `texts`.

    Each text is a separate document. Special tokens are split out and not counted. With more
    than one worker and more than one chunk of input, chunks are counted in worker processes,
    at most two per worker in flight, so a corpus larger than memory streams through.
    """
    pattern = resolve_pattern(pattern)
    specials = check_special_tokens(special_tokens)
    workers = default_workers() if workers is None else max(1, int(workers))
    chunks = chain.from_iterable(split_chunks((t,), chunk_chars, specials) for t in texts)
    batches = _batches(chunks, chunk_chars)
    counts: Counter[str] = Counter()
    done = 0

    def add(part: Counter[str], size: int) -> None:
        nonlocal done
        counts.update(part)
        done += size
        if progress is not None:
            progress("pretokenize", done, total)

    first = next(batches, None)
    second = next(batches, None) if first is not None else None
    if first is None:
        pass
    elif workers == 1 or second is None:
        _init_worker(pattern, specials)
        for batch in chain([first], [second] if second else [], batches):
            add(_count_batch(batch), sum(map(len, batch)))
    else:
        ctx = _mp_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(pattern, specials)) as pool:
            pending: deque[tuple[Any, int]] = deque()
            for batch in chain([first, second], batches):
                pending.append((pool.apply_async(_count_batch, (batch,)), sum(map(len, batch))))
                while len(pending) >= 2 * workers:
                    result, size = pending.popleft()
                    add(result.get(), size)
            while pending:
                result, size = pending.popleft()
                add(result.get(), size)
    out: Counter[bytes] = Counter()
    for token, n in counts.items():
        try:
            out[token.encode("utf-8")] += n
        except UnicodeEncodeError:  # lone surrogates: replaced, as tiktoken does
            fixed = token.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            out[fixed.encode("utf-8")] += n
    return out


# -- learning merges ----------------------------------------------------------------------------
_DESC = [(255 - b).to_bytes(2, "big") for b in range(256)]
_END = b"\x01\x00"  # sorts after every `_DESC` unit, so a longer token ranks as greater


def _desc_key(token: bytes) -> bytes:
    """A key whose ascending order is `token`'s descending byte order (heapq is a min-heap)."""
    return b"".join([_DESC[b] for b in token]) + _END


def learn_merges(
    word_counts: Mapping[bytes, int],
    num_merges: int,
    progress: ProgressFn | None = None,
) -> list[tuple[bytes, bytes]]:
    """Learn up to `num_merges` merges from pre-token counts; fewer if the pairs run out.

    Each step merges the most frequent adjacent pair; on equal counts the greater
    `(bytes, bytes)` pair wins. Occurrences inside a word are merged left to right.
    """
    tokens: list[bytes] = [bytes([b]) for b in range(256)]  # internal id → bytes
    keys: list[bytes] = [_desc_key(t) for t in tokens]
    ids: dict[bytes, int] = {t: i for i, t in enumerate(tokens)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, n in word_counts.items():
        if len(word) > 1 and n > 0:
            words.append(list(word))
            freqs.append(n)

    counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, word in enumerate(words):
        f = freqs[w]
        for pair in pairwise(word):
            counts[pair] += f
            where[pair].add(w)
    # Heap entries (-count, key, pair). An entry is live when its count is the pair's current
    # count; counts that fall leave stale entries (re-pushed when they surface), counts that
    # rise push a fresh entry, so the first live entry popped is always the best pair.
    heap = [(-c, keys[a] + keys[b], (a, b)) for (a, b), c in counts.items()]
    heapq.heapify(heap)
    heappush, heappop = heapq.heappush, heapq.heappop

    merges: list[tuple[bytes, bytes]] = []
    started = time.perf_counter()
    while len(merges) < num_merges:
        while heap:
            neg, key, pair = heap[0]
            current = counts.get(pair, 0)
            if current == -neg:
                break
            heappop(heap)
            if current > 0:
                heappush(heap, (-current, key, pair))
        if not heap:
            break
        heappop(heap)
        a, b = pair
        merged = tokens[a] + tokens[b]
        new = ids.get(merged)
        if new is None:
            new = len(tokens)
            tokens.append(merged)
            keys.append(_desc_key(merged))
            ids[merged] = new
            merges.append((tokens[a], tokens[b]))
        else:
            # The same bytes were built by another merge: reuse its id (as tiktoken would when
            # encoding), so the vocabulary keeps one id per token.
            log.debug("merge %r + %r repeats an existing token", tokens[a], tokens[b])

        touched: set[tuple[int, int]] = set()
        for w in where.pop(pair):
            word = words[w]
            f = freqs[w]
            size = len(word)
            out: list[int] = []
            i = 0
            while i < size:
                t = word[i]
                if t == a and i + 1 < size and word[i + 1] == b:
                    if out:  # left neighbour: (p, a) becomes (p, new)
                        p = out[-1]
                        counts[(p, a)] -= f
                        q = (p, new)
                        counts[q] += f
                        where[q].add(w)
                        touched.add(q)
                    if i + 2 < size:  # right neighbour: (b, x) becomes (new, x)
                        x = word[i + 2]
                        counts[(b, x)] -= f
                        q = (new, x)
                        counts[q] += f
                        where[q].add(w)
                        touched.add(q)
                    out.append(new)
                    i += 2
                else:
                    out.append(t)
                    i += 1
            words[w] = out
        counts.pop(pair, None)
        for q in touched:
            c = counts[q]
            if c > 0:
                heappush(heap, (-c, keys[q[0]] + keys[q[1]], q))
        if progress is not None and (len(merges) % 32 == 0 or len(merges) == num_merges):
            progress("merge", len(merges), num_merges)
    if progress is not None:
        progress("merge", len(merges), num_merges)
    log.info("learned %d merges in %.2fs", len(merges), time.perf_counter() - started)
    return merges


# -- vocabulary layout --------------------------------------------------------------------------
def build_vocab(
    merges: Sequence[tuple[bytes, bytes]], special_tokens: Sequence[str], layout: str = "gpt2"
) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks and special-token ids for `merges`.

    Single bytes are numbered in GPT-2's bytes-to-unicode order (as in OpenAI's encoder.json),
    merges in merge order after them. `gpt2` puts the special tokens last (`<|endoftext|>` is the
    final id, as in GPT-2); `specials_first` puts them first (`<|endoftext|>` = 0).
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    specials = check_special_tokens(special_tokens)
    start = len(specials) if layout == "specials_first" else 0
    ranks: dict[bytes, int] = {}
    for i, b in enumerate(bytes_to_unicode()):
        ranks[bytes([b])] = start + i
    for left, right in merges:
        ranks[left + right] = start + len(ranks)
    first_special = 0 if layout == "specials_first" else len(ranks)
    return ranks, {s: first_special + i for i, s in enumerate(specials)}


# -- the whole run ------------------------------------------------------------------------------
def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    pattern: str = GPT2_PATTERN,
    *,
    layout: str = "gpt2",
    workers: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: ProgressFn | None = None,
    total: int | None = None,
    name: str = "bpe",
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (bytes + merges + specials).

    `texts` are documents (any iterable, consumed once); `pattern` is a regex or `gpt2`/`gpt4`;
    `layout` is `gpt2` (specials last) or `specials_first`. If the corpus runs out of pairs
    first, the vocabulary is smaller than asked (logged as a warning).

    Long texts are counted in chunks cut between a letter/digit and whitespace; a custom
    `pattern` must also always split there (GPT-2's and GPT-4's do) for exact counts.
    """
    specials = check_special_tokens(special_tokens)
    num_merges = check_vocab_size(vocab_size, len(specials))
    pattern = resolve_pattern(pattern)
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    started = time.perf_counter()
    word_counts = count_pretokens(
        texts,
        pattern,
        specials,
        workers=workers,
        chunk_chars=chunk_chars,
        progress=progress,
        total=total,
    )
    if not word_counts:
        raise InputError("training data: no text to train on (empty, or only special tokens)")
    log.info(
        "counted %d distinct pre-tokens in %.2fs", len(word_counts), time.perf_counter() - started
    )
    merges = learn_merges(word_counts, num_merges, progress)
    if len(merges) < num_merges:
        log.warning(
            "the corpus ran out of pairs after %d of %d merges; vocab size is %d",
            len(merges),
            num_merges,
            256 + len(merges) + len(specials),
        )
    ranks, special_ids = build_vocab(merges, specials, layout)
    return BPETokenizer(ranks, special_ids, pattern, name=name, merges=list(merges))


def train_bpe_files(
    paths: Iterable[str | Path],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOT,),
    pattern: str = GPT2_PATTERN,
    *,
    clean: bool = False,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    **kwargs: Any,
) -> BPETokenizer:
    """`train_bpe` on text files, streamed (each file a document; `clean`: see
    `read_text_pieces`). Files are checked to exist before any training starts."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("training data: no files given")
    total = 0
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        total += path.stat().st_size
    specials = check_special_tokens(special_tokens)
    check_vocab_size(vocab_size, len(specials))
    chunks = iter_file_chunks(paths, chunk_chars, specials, clean)
    return train_bpe(
        chunks, vocab_size, specials, pattern, chunk_chars=chunk_chars, total=total, **kwargs
    )
