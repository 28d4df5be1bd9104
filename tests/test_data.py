"""Data pipeline: corpus reading, token files, chunked/multi-process tokenization, loaders."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scratchllm.data import (
    BatchLoader,
    SlidingWindowDataset,
    TokenFile,
    corpus,
    iter_documents,
    read_text_file,
    resolve_paths,
    shards,
    split_tokens,
    strip_gutenberg_boilerplate,
    token_file_for,
    tokenize_corpus,
    write_token_file,
)
from scratchllm.data.pool import ordered_map
from scratchllm.data.shards import HEADER_BYTES, MAGIC
from scratchllm.data.text import read_text_pieces, split_chunks
from scratchllm.errors import InputError
from scratchllm.tokenizers import GPT2_PATTERN, ByteTokenizer

EOT = 50256


@pytest.fixture(scope="module")
def tiktoken_gpt2(data_dir):
    """tiktoken's own GPT-2 encoding, built from the local files (independent of our wrapper)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data_dir / "gpt2" / "vocab.bpe"),
        encoder_json_file=str(data_dir / "gpt2" / "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )


@pytest.fixture
def alice(data_dir) -> Path:
    return data_dir / "corpora" / "gutenberg" / "pg11_alice_in_wonderland.txt"


# -- corpus ---------------------------------------------------------------------------------------
def test_bom_crlf_and_lone_cr_are_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\rline three\r\n")
    assert read_text_file(path) == "line one\nline two\nline three\n"


def test_raw_gutenberg_file_is_cleaned_but_kept_whole(alice):
    text = read_text_file(alice)
    assert not text.startswith("\ufeff") and "\r" not in text
    assert text.startswith("The Project Gutenberg eBook of Alice")
    assert "*** START OF THE PROJECT GUTENBERG EBOOK" in text
    assert "*** END OF THE PROJECT GUTENBERG EBOOK" in text


def test_gutenberg_header_and_footer_are_stripped(alice):
    text = read_text_file(alice, strip_gutenberg=True)
    assert "*** START" not in text and "*** END" not in text
    assert "This ebook is for the use of anyone" not in text
    assert "Project Gutenberg" not in text  # neither the header nor the license survives
    assert text.startswith("[Illustration]\n")
    assert "Alice’s Adventures in Wonderland" in text[:100]
    assert text.endswith("days.\n\nTHE END\n")
    assert text.count("CHAPTER I.") >= 2  # contents + the chapter itself: the book is all there
    assert 140_000 < len(text) < len(read_text_file(alice))


def test_gutenberg_variants_and_files_without_markers():
    old = (
        "Header\n***START OF THIS PROJECT GUTENBERG EBOOK FOO***\n\n\nBody line.\n\n"
        "End of the Project Gutenberg EBook of Foo\n\n*** END OF THIS PROJECT GUTENBERG EBOOK FOO"
        " ***\nLicense text\n"
    )
    assert strip_gutenberg_boilerplate(old) == "Body line.\n"
    plain = "No markers here.\n*** not a marker ***\n"
    assert strip_gutenberg_boilerplate(plain) == plain


def test_streamed_reading_equals_whole_file_reading(tmp_path):
    # Blocks of 1..16 bytes split the BOM, CRLF pairs, a 3-byte character and the markers.
    raw = (
        "\ufeffHdr\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\nBody — one\r"
        "more\r\n\r\nEnd of the Project Gutenberg EBook of X\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicense\r\n"
    )
    path = tmp_path / "old.txt"
    path.write_bytes(raw.encode())
    assert read_text_file(path, strip_gutenberg=True) == "Body — one\nmore\n"
    for strip in (False, True):
        whole = read_text_file(path, strip_gutenberg=strip)
        for block in range(1, 17):
            assert "".join(corpus.iter_file_pieces(path, strip, 0, block)) == whole


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"abc\xff")
    with pytest.raises(InputError, match=rf"{path}: invalid UTF-8 at byte offset 3\b"):
        read_text_file(path)


def test_invalid_utf8_offset_is_exact_when_streaming(tmp_path, monkeypatch):
    # The bad byte sits blocks in, right after a 2-byte character split across two blocks.
    path = tmp_path / "bad.txt"
    data = "ab\ncd é\n".encode() + b"\xfe" + b"tail\n"
    path.write_bytes(data)
    monkeypatch.setattr(shards, "STREAM_BYTES", 0)
    monkeypatch.setattr(shards, "READ_BYTES", 3)
    with pytest.raises(InputError, match=rf"{path}: invalid UTF-8 at byte offset {len(data) - 6}"):
        tokenize_corpus([str(path)], ByteTokenizer(), tmp_path / "out.bin", workers=1)
    assert not (tmp_path / "out.bin").exists()


def test_missing_paths_empty_folders_and_bad_builtins(tmp_path):
    with pytest.raises(InputError, match=r"corpus .*nope\.txt: no such file or folder"):
        resolve_paths([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a txt file")
    with pytest.raises(InputError, match=r"corpus folder .*empty: no \.txt files"):
        resolve_paths([str(tmp_path / "empty")])
    with pytest.raises(InputError, match=r"corpus pattern .*\*\.zzz.*matches no files"):
        resolve_paths([str(tmp_path / "*.zzz")])
    with pytest.raises(InputError, match=r"builtin:nope.*known: builtin:python-docs"):
        list(iter_documents(["builtin:nope"]))


def test_resolve_paths_folders_globs_dedup_and_builtin(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt", "sub/skip.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    got = resolve_paths(
        [str(tmp_path / "b.txt"), "builtin:python-docs", str(tmp_path), str(tmp_path / "*.txt")]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["b.txt", "a.txt", "sub/c.txt"]


def test_iter_documents_skips_empty_and_reads_builtin(tmp_path):
    (tmp_path / "1.txt").write_text("first\n")
    (tmp_path / "2.txt").write_text("  \n\n\t")
    (tmp_path / "3.txt").write_text("third")
    docs = list(iter_documents([str(tmp_path)]))
    assert [(Path(s).name, t) for s, t in docs] == [("1.txt", "first\n"), ("3.txt", "third")]
    ((name, text),) = iter_documents(["builtin:python-docs"])
    assert name == "builtin:python-docs"
    assert len(text) > 400_000 and text.startswith('The "assert" statement')


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path, gpt2_tokenizer):
    (tmp_path / "a.txt").write_text("\n\n")
    out = tmp_path / "cache" / "tokens.bin"
    with pytest.raises(InputError, match=r"corpus .*: no text found"):
        tokenize_corpus([str(tmp_path / "a.txt")], gpt2_tokenizer, out)
    assert not out.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no temp file left behind


# -- token files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("vocab", "dtype"), [(50257, np.uint16), (100_000, np.uint32)])
def test_token_file_round_trip(tmp_path, vocab, dtype):
    ids = np.arange(0, vocab, 997)
    path = write_token_file(
        tmp_path / "t.bin", [ids[:10], ids[10:].tolist(), []], vocab, "0123456789abcdef"
    )
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    version, code, count = struct.unpack_from("<IIQ", raw, 8)
    assert (version, code, count) == (1, np.dtype(dtype).itemsize, len(ids))
    assert len(raw) == HEADER_BYTES + len(ids) * np.dtype(dtype).itemsize
    tf = TokenFile(path)
    assert len(tf) == len(ids) and tf.tokens.dtype == dtype
    assert np.array_equal(tf.tokens, ids)
    assert (tf.fingerprint, tf.vocab_size) == ("0123456789abcdef", vocab)
    assert not tf.tokens.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_token_file_rejects_out_of_vocab_ids(tmp_path):
    with pytest.raises(InputError, match=r"token id 50257 at position 3 is outside .* 50257"):
        write_token_file(tmp_path / "t.bin", [[1, 2, 3, 50257]], 50257, "f" * 16)
    assert list(tmp_path.iterdir()) == []


def test_token_file_corruption_is_reported(tmp_path):
    path = write_token_file(tmp_path / "t.bin", [np.arange(100)], 50257, "f" * 16)
    good = path.read_bytes()
    path.write_bytes(b"NOTTOKEN" + good[8:])
    with pytest.raises(InputError, match=r"t\.bin: bad magic b'NOTTOKEN', expected b'SLLMTOKS'"):
        TokenFile(path)
    path.write_bytes(good[:8] + struct.pack("<I", 7) + good[12:])
    with pytest.raises(InputError, match=r"t\.bin: format version 7, expected 1"):
        TokenFile(path)
    path.write_bytes(good[:-10])
    with pytest.raises(InputError, match=rf"t\.bin: truncated: {len(good) - 10} bytes, expected"):
        TokenFile(path)
    path.write_bytes(good[:100])
    with pytest.raises(InputError, match=r"t\.bin: truncated header \(100 bytes\)"):
        TokenFile(path)


# -- tokenize_corpus ------------------------------------------------------------------------------
def test_the_verdict_matches_tiktoken(data_dir, gpt2_tokenizer, tiktoken_gpt2, tmp_path):
    path = data_dir / "corpora" / "the-verdict.txt"
    tf = tokenize_corpus([str(path)], gpt2_tokenizer, tmp_path / "v.bin")
    expected = tiktoken_gpt2.encode_ordinary(path.read_text(encoding="utf-8"))
    assert len(expected) == 5145
    assert len(tf) == 5146
    assert tf.tokens.tolist() == [*expected, EOT]
    assert tf.fingerprint == gpt2_tokenizer.fingerprint()


def test_multiprocess_chunked_tinyshakespeare_equals_whole(
    data_dir, gpt2_tokenizer, tiktoken_gpt2, tmp_path, monkeypatch
):
    path = data_dir / "corpora" / "tinyshakespeare.txt"
    monkeypatch.setattr(shards, "CHUNK_BYTES", 64 * 1024)  # ~17 chunks, 2 worker processes
    seen: list[tuple[int, int]] = []
    tf = tokenize_corpus(
        [str(path)],
        gpt2_tokenizer,
        tmp_path / "s.bin",
        workers=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    whole = tiktoken_gpt2.encode_ordinary(path.read_text(encoding="utf-8"))
    assert len(whole) == 338025
    assert np.array_equal(tf.tokens, np.array([*whole, EOT]))
    size = path.stat().st_size
    assert len(seen) > 10 and seen[-1] == (size, size)
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_streamed_small_chunked_gutenberg_equals_whole_documents(
    data_dir, gpt2_tokenizer, tmp_path, monkeypatch
):
    # Big-file path (blocks of 5000 bytes) + 2 kB chunks + Gutenberg stripping + several docs.
    folder = data_dir / "corpora" / "gutenberg"
    specs = [str(folder / "pg84_frankenstein.txt"), str(folder / "pg11_alice_in_wonderland.txt")]
    expected: list[int] = []
    for _, text in iter_documents(specs, strip_gutenberg=True):
        expected += [*gpt2_tokenizer.encode_ordinary(text), EOT]
    monkeypatch.setattr(shards, "STREAM_BYTES", 0)
    monkeypatch.setattr(shards, "READ_BYTES", 300)
    monkeypatch.setattr(shards, "CHUNK_BYTES", 2048)
    tf = tokenize_corpus(specs, gpt2_tokenizer, tmp_path / "g.bin", strip_gutenberg=True, workers=1)
    assert np.array_equal(tf.tokens, np.array(expected))


_TEXT_CHARS = st.sampled_from(
    [
        *"ab zé9_'.,-!\n\t",
        "  ",
        "\n\n",
        " 's",
        "'LL",
        "1234",
        "\u00a0",
        "\u2028",
        "\x1c",
        "日本",
        "🙂",
    ]
)
# tiktoken's cl100k_base (GPT-4) pattern; Llama 3 uses the same shape.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT_CHARS, min_size=1, max_size=120).map("".join), st.integers(1, 12))
def test_safe_cuts_never_change_ids(gpt2_tokenizer, text, chunk):
    # Cuts made by _split_document must leave the pre-tokens (GPT-2's and GPT-4's patterns; in
    # the latter punctuation + newline is one pre-token) and so the GPT-2 ids unchanged.
    import regex

    assume(text.strip())  # whitespace-only documents are dropped on purpose
    parts = [p for p, _, _ in shards._split_document([text], len(text), chunk, split=True)]
    assert "".join(parts) == text
    for pattern in (GPT2_PATTERN, CL100K_PATTERN):
        assert [t for p in parts for t in regex.findall(pattern, p)] == regex.findall(pattern, text)
    ids = [i for p in parts for i in gpt2_tokenizer.encode_ordinary(p)]
    assert ids == gpt2_tokenizer.encode_ordinary(text)


def test_exact_chunks_wait_for_a_safe_cut():
    # Token files need exact ids: a stretch without a safe cut is never cut (the trainer's
    # default cuts it at 8 chunks, see test_bpe).
    assert list(split_chunks(["." * 100, "." * 20], 10, exact=True)) == ["." * 120]
    assert list(split_chunks(["." * 50, ".a", " b"], 10, exact=True)) == ["." * 51 + "a", " b"]


def test_raw_and_clean_reading_with_one_byte_blocks(tmp_path):
    raw = "\ufeffa\r\nb\rc é\r".encode()
    path = tmp_path / "t.txt"
    path.write_bytes(raw)
    assert "".join(read_text_pieces(path, clean=False, read_bytes=1)) == raw.decode()
    assert "".join(read_text_pieces(path, read_bytes=1)) == "a\nb\nc é\n"
    path.write_bytes(b"ab\xe2\x82")  # a character cut off by the end of the file
    with pytest.raises(InputError, match=rf"{path}: invalid UTF-8 at byte offset 2;"):
        list(read_text_pieces(path, read_bytes=1))
    path.write_bytes(b"")
    assert list(read_text_pieces(path, allow_empty=True)) == []
    with pytest.raises(InputError, match=rf"{path}: empty file"):
        list(read_text_pieces(path))


def _scaled_square(scale: int, i: int) -> int:
    time.sleep(0.002 * (i % 3))  # later items often finish first
    return scale * i * i


def test_pool_keeps_order_and_reads_at_most_in_flight_ahead():
    read: list[int] = []

    def items():
        for i in range(30):
            read.append(i)
            yield i

    out = []
    for result in ordered_map(_scaled_square, items(), 3, workers=2, in_flight=4):
        out.append(result)
        assert len(read) - len(out) <= 4
    assert out == [3 * i * i for i in range(30)]
    assert list(ordered_map(_scaled_square, [5], 2, workers=2)) == [50]  # one item: no processes


class _WholeTextBytes(ByteTokenizer):
    """A byte tokenizer that declares it cannot be split (like SentencePiece) and logs calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def splittable(self) -> bool:
        return False

    def encode_ordinary(self, text: str) -> list[int]:
        self.calls.append(text)
        return super().encode_ordinary(text)


def test_unsplittable_tokenizers_get_whole_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_BYTES", 16)
    docs = ["first document\nwith lines\nand more words " * 3, "second one " * 10]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    tok = _WholeTextBytes()
    tf = tokenize_corpus([str(tmp_path)], tok, tmp_path / "out" / "t.bin", workers=1)
    assert tok.calls == docs
    assert tf.tokens.tolist() == [*docs[0].encode(), 256, *docs[1].encode(), 256]
    split = tokenize_corpus([str(tmp_path)], ByteTokenizer(), tmp_path / "out" / "b.bin")
    assert np.array_equal(split.tokens, tf.tokens)


def test_token_file_for_caches_by_content_and_tokenizer(tmp_path, gpt2_tokenizer, monkeypatch):
    text_file = tmp_path / "c.txt"
    text_file.write_text("Hello, world!\n")
    first = token_file_for([str(text_file)], gpt2_tokenizer, tmp_path / "cache")
    assert first.path.name.startswith("tokens-") and first.tokens.tolist() == [
        15496,
        11,
        995,
        0,
        198,
        EOT,
    ]

    def boom(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(shards, "tokenize_corpus", boom)
    again = token_file_for([str(text_file)], gpt2_tokenizer, tmp_path / "cache")
    assert again.path == first.path
    monkeypatch.undo()
    text_file.write_text("Hello again, world!\n")  # new size → new key
    changed = token_file_for([str(text_file)], gpt2_tokenizer, tmp_path / "cache")
    assert changed.path != first.path
    other = token_file_for([str(text_file)], ByteTokenizer(), tmp_path / "cache")
    assert other.path != changed.path and len(other) == len("Hello again, world!\n") + 1


# -- datasets and loaders -------------------------------------------------------------------------
def _book_windows(token_ids, max_length, stride):
    """The book's GPTDatasetV1 loop, verbatim."""
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i : i + max_length])
        targets.append(token_ids[i + 1 : i + max_length + 1])
    return inputs, targets


def test_sliding_window_dataset_matches_the_book():
    tokens = np.arange(10, 20)
    ds = SlidingWindowDataset(tokens, context_length=4, stride=3)
    assert len(ds) == 2  # range(0, 6, 3) -> 0, 3
    assert [x.tolist() for x, _ in ds] == [[10, 11, 12, 13], [13, 14, 15, 16]]
    assert [y.tolist() for _, y in ds] == [[11, 12, 13, 14], [14, 15, 16, 17]]
    assert ds[0][0].dtype == torch.int64
    for n, c, s in [(10, 4, 1), (10, 4, 4), (10, 9, 1), (10, 10, 1), (3, 5, 2), (101, 8, 5)]:
        ds = SlidingWindowDataset(np.arange(n), c, s)
        inputs, targets = _book_windows(list(range(n)), c, s)
        assert [x.tolist() for x, _ in ds] == inputs
        assert [y.tolist() for _, y in ds] == targets


def test_split_tokens_views_and_validation():
    tokens = np.arange(100)
    train, val = split_tokens(tokens, 0.1)
    assert (len(train), len(val)) == (90, 10) and val[0] == 90
    assert np.shares_memory(train, tokens) and np.shares_memory(val, tokens)
    assert len(split_tokens(tokens, 0.0)[1]) == 0
    with pytest.raises(InputError, match="val_fraction 1.0"):
        split_tokens(tokens, 1.0)


def test_batch_loader_shapes_and_shifted_targets():
    tokens = np.arange(1000, dtype=np.uint16)
    loader = BatchLoader(tokens, batch_size=4, context_length=16, seed=1)
    assert loader.batches_per_epoch == len(range(0, 1000 - 16, 16)) // 4
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert all(int(row[0]) % 16 == 0 for row in x)  # sliding windows start on the stride
    rx, ry = BatchLoader(tokens, 4, 16, mode="random", seed=1).next_batch()
    assert rx.shape == (4, 16) and torch.equal(ry, rx + 1)


def _epoch_starts(loader: BatchLoader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0]]


def test_ranks_read_disjoint_windows():
    tokens = np.arange(4097)
    loaders = [BatchLoader(tokens, 4, 32, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 16
    starts = [_epoch_starts(lo) for lo in loaders]
    assert len(starts[0]) == len(starts[1]) == 64
    assert not set(starts[0]) & set(starts[1])
    assert set(starts[0]) | set(starts[1]) == set(range(0, 4096, 32))


def test_epoch_rollover_reshuffles_and_covers_all_windows():
    loader = BatchLoader(np.arange(801), batch_size=5, context_length=20, seed=0)
    assert loader.batches_per_epoch == 8
    first = _epoch_starts(loader)
    assert (loader.epoch, loader.position) == (1, 0)
    second = _epoch_starts(loader)
    assert sorted(first) == sorted(second) == list(range(0, 800, 20))
    assert first != second
    loader.next_batch()
    assert (loader.epoch, loader.position) == (2, 1)
    ordered = BatchLoader(np.arange(801), 5, 20, shuffle=False)
    assert _epoch_starts(ordered) == list(range(0, 800, 20))


@pytest.mark.parametrize("mode", ["sliding", "random"])
def test_state_dict_resume_continues_exactly(mode):
    tokens = np.arange(2000, dtype=np.uint16)
    kwargs = dict(batch_size=3, context_length=32, mode=mode, seed=7)
    loader = BatchLoader(tokens, **kwargs)
    assert loader.batches_per_epoch in (20, 6)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    assert {"epoch", "position", "seed"} <= set(state)
    expected = [loader.next_batch() for _ in range(3)]
    resumed = BatchLoader(tokens, **{**kwargs, "seed": 0})
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(3)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # Across an epoch boundary too (6 batches per epoch in random mode).
    fresh = BatchLoader(tokens, **kwargs)
    run = [fresh.next_batch()[0] for _ in range(25)]
    again = BatchLoader(tokens, **kwargs)
    again.load_state_dict({"epoch": 0, "position": 0, "seed": 7})
    assert all(torch.equal(a, again.next_batch()[0]) for a in run)


def test_too_short_corpus_and_too_large_batch_errors():
    with pytest.raises(InputError, match=r"corpus has 50 tokens.*context window of 64\+1"):
        BatchLoader(np.arange(50), batch_size=2, context_length=64)
    with pytest.raises(InputError, match=r"batch size 64 is too large"):
        BatchLoader(np.arange(200), batch_size=64, context_length=16)
    with pytest.raises(InputError, match=r"too large"):
        BatchLoader(np.arange(200), batch_size=64, context_length=16, mode="random")
    tail = BatchLoader(np.arange(200), batch_size=64, context_length=16, drop_last=False)
    x, _ = tail.next_batch()
    assert x.shape == (12, 16) and tail.epoch == 1  # the one incomplete batch is the epoch
