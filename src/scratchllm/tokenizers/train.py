"""Byte-level BPE trained from scratch (the book's chapter 2 tokenizer, built rather than loaded).

The pipeline:

1. **Pre-tokenize.** Text is split on the special tokens (so they are never merged), then cut
   into pre-tokens by a regex (GPT-2's by default, GPT-4's as an option). Only the *counts* of
   distinct pre-tokens are kept, so memory grows with the vocabulary of words, not with the
   corpus. Large inputs are streamed and cut where the regex is sure to split anyway
   (`scratchllm.data.text`), and the chunks are counted on all cores (`scratchllm.data.pool`).
2. **Merge.** Each distinct pre-token is a list of token ids with a count. The most frequent
   adjacent pair (ties: the lexicographically greater `(bytes, bytes)` pair) becomes a new token.
   Pair counts are updated incrementally: an index pair → words holding it means a merge only
   visits the words it changes, and a heap with lazy invalidation finds the next best pair.
3. **Lay out ids** and hand the result to `BPETokenizer`, which encodes through tiktoken.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain, pairwise
from pathlib import Path
from typing import Any

import regex

from scratchllm.data.pool import default_workers, ordered_map
from scratchllm.data.text import DEFAULT_CHUNK_CHARS, read_text_pieces, split_chunks
from scratchllm.errors import InputError
from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, PATTERNS
from scratchllm.tokenizers.bpe import BPETokenizer
from scratchllm.tokenizers.files import bytes_to_unicode

log = logging.getLogger(__name__)

# progress(stage, done, total): stage "pretokenize" counts characters read (total: the input's
# size in bytes when known, else None); stage "merge" counts merges learned out of the target.
ProgressFn = Callable[[str, int, "int | None"], None]

LAYOUTS = ("gpt2", "specials_first")


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


def iter_file_chunks(
    paths: Iterable[str | Path],
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    specials: Sequence[str] = (),
    clean: bool = False,
) -> Iterator[str]:
    """Every file's text in pre-token-safe chunks; each file is its own document."""
    for path in paths:
        yield from split_chunks(read_text_pieces(Path(path), clean), chunk_chars, specials)


# -- counting pre-tokens ------------------------------------------------------------------------
_Patterns = tuple[Any, Any]  # (compiled pre-token pattern, compiled specials splitter or None)


def _compile(pattern: str, specials: Sequence[str]) -> _Patterns:
    splitter = (
        regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))
        if specials
        else None
    )
    return regex.compile(pattern), splitter


def _count_batch(patterns: _Patterns, batch: Sequence[str]) -> tuple[Counter[str], int]:
    """Pre-token counts of `batch` and its size in characters (for progress)."""
    findall = patterns[0].findall
    splitter = patterns[1]
    counts: Counter[str] = Counter()
    for text in batch:
        for segment in splitter.split(text) if splitter is not None else (text,):
            if segment:
                counts.update(findall(segment))
    return counts, sum(map(len, batch))


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
    than one worker and more than one chunk of input, chunks are counted in worker processes
    (`scratchllm.data.pool`), a few per worker in flight, so a corpus larger than memory
    streams through.
    """
    pattern = resolve_pattern(pattern)
    specials = check_special_tokens(special_tokens)
    workers = default_workers() if workers is None else max(1, int(workers))
    chunks = chain.from_iterable(split_chunks((t,), chunk_chars, specials) for t in texts)
    batches = _batches(chunks, chunk_chars)
    counts: Counter[str] = Counter()
    done = 0
    for part, size in ordered_map(_count_batch, batches, _compile(pattern, specials), workers):
        counts.update(part)
        done += size
        if progress is not None:
            progress("pretokenize", done, total)
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
    `scratchllm.data.text.read_text_pieces`). Files are checked to exist before any training
    starts."""
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
