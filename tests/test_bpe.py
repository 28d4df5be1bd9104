"""Byte-level BPE training: known answer, incremental updates, chunking, formats, CLI, bad input."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import regex
from bpe_reference import ReferenceBPE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchllm import cli
from scratchllm.errors import InputError
from scratchllm.tokenizers import BPETokenizer, load_tokenizer
from scratchllm.tokenizers import files as bpe_files
from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, GPT4_PATTERN, TIKTOKEN_FILE
from scratchllm.tokenizers.train import (
    count_pretokens,
    learn_merges,
    split_chunks,
    train_bpe,
    train_bpe_files,
)

PAD = "<|pad|>"


@pytest.fixture(scope="module")
def small_corpus(data_dir) -> list[str]:
    names = ["corpora/the-verdict.txt", "bpe_reference/tinystories_sample.txt"]
    return [(data_dir / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="module")
def sample_texts(data_dir) -> list[str]:
    """Texts to encode: unseen files, non-ASCII, code-ish, numbers, whitespace runs."""
    files = ["bpe_reference/german.txt", "bpe_reference/address.txt", "corpora/the-verdict.txt"]
    texts = [(data_dir / f).read_text(encoding="utf-8") for f in files]
    texts.append((data_dir / "corpora/tinyshakespeare.txt").read_text(encoding="utf-8")[:20000])
    texts += [
        "Hello, world!  12345 678.9\n\n\n  tabs\tand\r\nCRLF   \n",
        "don't I'LL we've they're 'S naïve café 東京 🙂 ünïcödé",
        "def f(x):\n    return x ** 2  # comment\n",
    ]
    return texts


# -- known answer ------------------------------------------------------------------------------
def _reference_files(data_dir: Path) -> tuple[dict[str, int], list[str]]:
    ref = data_dir / "bpe_reference"
    vocab = json.loads((ref / "train-bpe-reference-vocab.json").read_text(encoding="utf-8"))
    merges = (ref / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()
    return vocab, merges


@pytest.mark.parametrize("workers", [1, 2])
def test_known_answer_matches_reference_files(data_dir, tmp_path, workers):
    # workers=2 with small chunks also checks parallel counting and the safe chunk cuts.
    tok = train_bpe_files(
        [data_dir / "bpe_reference" / "corpus.en"],
        500,
        [EOT],
        layout="specials_first",
        workers=workers,
        chunk_chars=1 << 20 if workers == 1 else 8 << 10,
    )
    tok.save(tmp_path)
    ref_vocab, ref_merges = _reference_files(data_dir)
    vocab = json.loads((tmp_path / "encoder.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges[0] == bpe_files.VERSION_LINE
    assert merges[1:] == ref_merges
    assert vocab == ref_vocab
    assert tok.vocab_size == 500 and tok.special_tokens == {EOT: 0}


def test_reference_vocab_loads_with_its_id_layout(data_dir, tmp_path):
    # The reference vocabulary (<|endoftext|> = 0, bytes 1..256) loads and saves back unchanged.
    ref_vocab, ref_merges = _reference_files(data_dir)
    (tmp_path / "encoder.json").write_text(json.dumps(ref_vocab), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("\n".join(ref_merges) + "\n", encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens == {EOT: 0} and tok.vocab_size == 500
    text = (data_dir / "bpe_reference" / "address.txt").read_text(encoding="utf-8")
    ids = tok.encode(text + EOT, allow_special=True)
    assert ids[-1] == 0 and tok.decode(ids) == text + EOT
    assert ReferenceBPE.from_tokenizer(tok).encode_ordinary(text) == ids[:-1]
    tok.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "encoder.json").read_text("utf-8")) == ref_vocab


# -- the merge loop ----------------------------------------------------------------------------
def _naive_merges(word_counts: dict[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Recount every pair before every merge: slow, obviously right."""
    words = [([bytes([b]) for b in w], n) for w, n in word_counts.items()]
    known = {bytes([b]) for b in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < num_merges:
        counts: Counter[tuple[bytes, bytes]] = Counter()
        for parts, n in words:
            for pair in pairwise(parts):
                counts[pair] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merged = best[0] + best[1]
        if merged not in known:
            known.add(merged)
            merges.append(best)
        for k, (parts, n) in enumerate(words):
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            words[k] = (out, n)
    return merges


def test_ties_go_to_the_greater_byte_pair():
    assert learn_merges({b"ab": 1, b"cd": 1}, 2) == [(b"c", b"d"), (b"a", b"b")]
    # (b"a", b"bc") > (b"a", b"b"): a longer token with the same prefix is greater.
    merges = learn_merges({b"bc": 5, b"abc": 1, b"ab": 1, b"x": 3}, 2)
    assert merges == [(b"b", b"c"), (b"a", b"bc")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.binary(min_size=1, max_size=9).map(lambda b: bytes(97 + x % 4 for x in b)),
        st.integers(min_value=1, max_value=20),
        min_size=1,
        max_size=25,
    ),
    st.integers(min_value=1, max_value=30),
)
def test_incremental_updates_match_recounting(word_counts, num_merges):
    assert learn_merges(word_counts, num_merges) == _naive_merges(word_counts, num_merges)


def test_pair_runs_out_gives_smaller_vocab():
    tok = train_bpe(["aaaa"], 300, [EOT], workers=1)
    assert tok.merges == [(b"a", b"a"), (b"aa", b"aa")]
    assert tok.vocab_size == 256 + 2 + 1 and tok.special_tokens == {EOT: 258}


# -- pre-tokenization and chunking -------------------------------------------------------------
_TEXT_ALPHABET = st.sampled_from(
    list("ab Zé9 0\n\r\t.,'-sll\u00a0東") + ["'s", "'ll", "\r\n", "  "]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_TEXT_ALPHABET, max_size=80).map("".join), st.integers(1, 12))
def test_safe_chunks_keep_the_pretokens(text, chunk_chars):
    chunks = list(split_chunks([text[:7], text[7:]], chunk_chars))
    assert "".join(chunks) == text
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        compiled = regex.compile(pattern)
        whole = Counter(compiled.findall(text))
        parts: Counter[str] = Counter()
        for chunk in chunks:
            parts.update(compiled.findall(chunk))
        assert parts == whole


def test_big_documents_are_cut_into_bounded_chunks(data_dir):
    text = (data_dir / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    chunks = list(split_chunks([text], 10_000, [EOT]))
    assert "".join(chunks) == text
    assert len(chunks) > 100 and max(map(len, chunks)) <= 10_000
    # No safe cut at all (no letter before a space): cut anyway, at 8 chunks' length.
    assert [len(c) for c in split_chunks(["." * 100], 10)] == [100]
    assert [len(c) for c in split_chunks(["." * 100, "." * 20], 10)] == [100, 20]


def test_parallel_counting_equals_serial(data_dir):
    text = (data_dir / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    docs = [text, "x" + EOT + "y", text[:1000]]
    serial = count_pretokens(docs, workers=1)
    parallel = count_pretokens(docs, workers=2, chunk_chars=20_000)
    assert parallel == serial
    assert serial[b"<|"] == 0 and serial[b" the"] > 100


# -- trained tokenizers: round trips, reference agreement, specials ----------------------------
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_trained_tokenizer_round_trips(small_corpus, sample_texts, tmp_path, pattern):
    tok = train_bpe(small_corpus, 700, [EOT, PAD], pattern, workers=1)
    assert tok.vocab_size == 700 and tok.special_tokens == {EOT: 698, PAD: 699}
    assert len(tok.merges) == 700 - 256 - 2
    tok.save(tmp_path)
    tok.save_tiktoken(tmp_path / TIKTOKEN_FILE)
    loaded = load_tokenizer(tmp_path)
    from_ranks = BPETokenizer.from_tiktoken_file(
        tmp_path / TIKTOKEN_FILE, tok.special_tokens, tok.pattern
    )
    reference = ReferenceBPE.from_tokenizer(tok)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.mergeable_ranks == tok.mergeable_ranks == from_ranks.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens and loaded.pattern == tok.pattern
    assert loaded.fingerprint() == tok.fingerprint()
    # GPT-2 files carry the merges exactly; recovering them from the ranks gives the same list.
    assert bpe_files.read_merges(tmp_path / "vocab.bpe") == tok.merges
    assert bpe_files.recover_merges(tok.mergeable_ranks) == tok.merges
    for text in [*sample_texts, *small_corpus]:
        ids = tok.encode_ordinary(text)
        assert loaded.encode_ordinary(text) == ids
        assert from_ranks.encode_ordinary(text) == ids
        assert reference.encode_ordinary(text) == ids
        assert tok.decode(ids) == text
    mixed = f"one{EOT}two {PAD}{PAD}three"
    ids = tok.encode(mixed, allow_special=True)
    assert ids == reference.encode(mixed, allow_special=True)
    assert ids.count(698) == 1 and ids.count(699) == 2 and loaded.decode(ids) == mixed


def test_trained_layout_specials_first_round_trips(small_corpus, tmp_path):
    tok = train_bpe(small_corpus, 400, [EOT, PAD], layout="specials_first")
    assert tok.special_tokens == {EOT: 0, PAD: 1}
    assert min(tok.mergeable_ranks.values()) == 2 and tok.vocab_size == 400
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = small_corpus[0] + EOT + PAD
    assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_special_tokens_are_never_merged():
    text = ("hello world" + EOT + PAD) * 300 + "the end"
    tok = train_bpe([text], 300, [EOT, PAD], workers=1)
    for token in tok.mergeable_ranks:
        assert b"<|" not in token and b"|>" not in token and b"endof" not in token
    ids = tok.encode(("hello world" + EOT + PAD) * 2, allow_special=True)
    eot, pad = tok.special_tokens[EOT], tok.special_tokens[PAD]
    assert ids.count(eot) == 2 and ids.count(pad) == 2
    # Without permission a special string in the text is an error, as in tiktoken.
    with pytest.raises(InputError, match="special token"):
        tok.encode("a" + PAD)
    assert tok.encode(PAD, allow_special=[PAD]) == [pad]


# -- formats -----------------------------------------------------------------------------------
def test_tiktoken_rank_file_matches_tiktoken(gpt2_tokenizer, tmp_path, monkeypatch):
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    path = tmp_path / TIKTOKEN_FILE
    gpt2_tokenizer.save_tiktoken(path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == gpt2_tokenizer.mergeable_ranks
    assert bpe_files.read_tiktoken_ranks(path) == gpt2_tokenizer.mergeable_ranks


def test_gpt2_files_round_trip(gpt2_tokenizer, data_dir, tmp_path):
    gpt2_tokenizer.save(tmp_path)
    assert (tmp_path / "vocab.bpe").read_bytes() == (data_dir / "gpt2" / "vocab.bpe").read_bytes()
    again = load_tokenizer(tmp_path)
    assert again.mergeable_ranks == gpt2_tokenizer.mergeable_ranks
    assert again.special_tokens == {EOT: 50256}


def test_directory_with_only_a_rank_file_loads(small_corpus, tmp_path):
    tok = train_bpe(small_corpus, 300, workers=1)
    tok.save(tmp_path)
    tok.save_tiktoken(tmp_path / TIKTOKEN_FILE)
    (tmp_path / "encoder.json").unlink()
    (tmp_path / "vocab.bpe").unlink()
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode_ordinary(small_corpus[0]) == tok.encode_ordinary(small_corpus[0])


# -- bad input ---------------------------------------------------------------------------------
def test_vocab_size_below_bytes_plus_specials():
    with pytest.raises(InputError, match="vocab size 257: must be at least 258"):
        train_bpe(["text"], 257, [EOT, PAD])


@pytest.mark.parametrize(
    ("specials", "message"), [([""], "non-empty"), ([EOT, EOT], "given twice")]
)
def test_bad_special_tokens(specials, message):
    with pytest.raises(InputError, match=message):
        train_bpe(["text"], 300, specials)


def test_bad_pattern_and_layout():
    with pytest.raises(InputError, match="not a valid regex"):
        train_bpe(["text"], 300, pattern="(unclosed")
    with pytest.raises(InputError, match="layout"):
        train_bpe(["text"], 300, layout="sideways")


def test_no_text_to_train_on():
    with pytest.raises(InputError, match="no text to train on"):
        train_bpe([EOT * 3], 300, workers=1)


def test_empty_missing_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.txt: empty file"):
        train_bpe_files([empty], 300, workers=1)
    with pytest.raises(InputError, match="missing.txt: no such file"):
        train_bpe_files([tmp_path / "missing.txt"], 300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"abc caf\xe9 def")
    with pytest.raises(InputError, match=r"latin1.txt: invalid UTF-8 at byte offset 7"):
        train_bpe_files([latin1], 300, workers=1)


def test_malformed_merges_file_reports_the_line(tmp_path, gpt2_tokenizer):
    gpt2_tokenizer.save(tmp_path)
    lines = (tmp_path / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    lines[2] = "Ġt"  # one token instead of two
    (tmp_path / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"vocab.bpe: line 3: expected two byte-level tokens"):
        load_tokenizer(tmp_path)


def test_malformed_rank_file_reports_the_line(tmp_path):
    path = tmp_path / TIKTOKEN_FILE
    path.write_text("IQ== 0\nnot-base64! 1\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2"):
        bpe_files.read_tiktoken_ranks(path)


# -- CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def run_cli(monkeypatch, capsys):
    # Only this command in the table: the test does not depend on the other commands' modules.
    monkeypatch.setattr(cli, "COMMANDS", {"tokenizer": "scratchllm.commands.tokenizer"})

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(["tokenizer", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_train_encode_stats(run_cli, data_dir, tmp_path):
    out_dir = tmp_path / "tok"
    gutenberg = data_dir / "corpora" / "gutenberg"
    code, out, err = run_cli(
        "train",
        "--data",
        gutenberg / "pg11_alice_in_wonderland.txt",
        str(data_dir / "bpe_reference" / "*.txt"),
        "--vocab-size",
        600,
        "--special",
        PAD,
        "--workers",
        2,
        "--out",
        out_dir,
    )
    assert code == 0, err
    assert "vocab size 600" in out
    for name in ("encoder.json", "vocab.bpe", TIKTOKEN_FILE, "scratchllm_tokenizer.json"):
        assert (out_dir / name).is_file()
    tok = load_tokenizer(out_dir)
    assert tok.vocab_size == 600 and tok.special_tokens == {EOT: 598, PAD: 599}

    code, out, _ = run_cli("encode", "--tokenizer", out_dir, "Hello there" + EOT, "--allow-special")
    assert code == 0 and json.loads(out) == tok.encode("Hello there" + EOT, allow_special=True)
    text_file = tmp_path / "t.txt"
    text_file.write_text("line one\r\nline two\n", encoding="utf-8")
    code, out, _ = run_cli("encode", "--tokenizer", out_dir, "--file", text_file)
    assert code == 0 and tok.decode(json.loads(out)) == "line one\r\nline two\n"

    code, out, _ = run_cli(
        "stats", "--tokenizer", out_dir, "--data", data_dir / "corpora/the-verdict.txt"
    )
    assert code == 0 and "bytes per token:" in out and "top 20 tokens:" in out
    bpt = float(out.split("bytes per token:")[1].split()[0])
    assert 2.0 < bpt < 5.0


def test_cli_known_answer(run_cli, data_dir, tmp_path):
    code, _, err = run_cli(
        "train",
        "--data",
        data_dir / "bpe_reference" / "corpus.en",
        "--vocab-size",
        500,
        "--layout",
        "specials_first",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    ref_vocab, ref_merges = _reference_files(data_dir)
    assert json.loads((tmp_path / "encoder.json").read_text("utf-8")) == ref_vocab
    assert (tmp_path / "vocab.bpe").read_text("utf-8").splitlines()[1:] == ref_merges


def test_cli_bad_input_exits_2_with_one_line(run_cli, data_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    cases = [
        (["train", "--data", data_dir / "bpe_reference/address.txt", "--vocab-size", 256,
          "--out", tmp_path / "o"], "must be at least 257"),
        (["train", "--data", empty, "--vocab-size", 300, "--out", tmp_path / "o"], "empty file"),
        (["train", "--data", tmp_path / "nope", "--vocab-size", 300, "--out", tmp_path / "o"],
         "no such file"),
        (["encode", "--tokenizer", f"gpt2:{data_dir / 'gpt2'}", "a" + EOT], "special token"),
        (["encode", "--tokenizer", tmp_path / "nowhere", "x"], "no such directory"),
        (["stats", "--tokenizer", "bytes", "--data", tmp_path / "none*.txt"], "matches no files"),
    ]  # fmt: skip
    for argv, message in cases:
        code, out, err = run_cli(*argv)
        assert code == 2, (argv, err)
        assert message in err and err.count("\n") == 1 and out == ""


def test_cli_encode_gpt2(run_cli, data_dir):
    code, out, _ = run_cli(
        "encode",
        "--tokenizer",
        f"gpt2:{data_dir / 'gpt2'}",
        "--allow-special",
        "Hello, world! " + EOT,
    )
    assert code == 0 and json.loads(out) == [15496, 11, 995, 0, 220, 50256]


# -- saving a folder atomically (reliability item 6) -------------------------------------------
def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _hf_tokenizer(tok: BPETokenizer, tmp: Path):
    from scratchllm.tokenizers.hf import HFTokenizer, export_tokenizer

    tok.save(tmp / "bpe")
    export_tokenizer(tok, tmp / "bpe", tmp / "hf", 64)
    return HFTokenizer.from_directory(tmp / "hf")


@pytest.mark.parametrize("kind", ["bytes", "bpe", "hf"])
def test_save_replaces_the_whole_folder_or_leaves_it(small_corpus, tmp_path, monkeypatch, kind):
    """Every Tokenizer.save path builds the folder aside and swaps it in: a failure after the
    first file (here the last one, the meta file, fails) leaves the previous folder as it was,
    and a success leaves none of the previous folder's files behind."""
    from scratchllm.tokenizers import ByteTokenizer, base

    old = train_bpe(small_corpus, 300, workers=1)
    new = {
        "bytes": ByteTokenizer,
        "bpe": lambda: train_bpe(small_corpus, 320, workers=1),
        "hf": lambda: _hf_tokenizer(train_bpe(small_corpus, 320, workers=1), tmp_path),
    }[kind]()
    folder = tmp_path / "tok"
    old.save(folder)
    before = _files(folder)

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(base, "atomic_write_text", disk_full)
        with pytest.raises(OSError, match="No space left"):
            new.save(folder)
    assert _files(folder) == before
    assert load_tokenizer(folder).fingerprint() == old.fingerprint()
    new.save(folder)
    assert load_tokenizer(folder).fingerprint() == new.fingerprint()
    new.save(tmp_path / "fresh")  # exactly what a save into an empty folder writes
    assert set(_files(folder)) == set(_files(tmp_path / "fresh"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_train_refuses_to_replace_a_tokenizer_without_force(run_cli, data_dir, tmp_path):
    text = data_dir / "bpe_reference" / "address.txt"
    out = tmp_path / "tok"
    assert run_cli("train", "--data", text, "--vocab-size", 280, "--out", out)[0] == 0
    before = _files(out)
    code, _, err = run_cli("train", "--data", text, "--vocab-size", 300, "--out", out)
    assert code == 2 and "--out" in err and "--force" in err and err.count("\n") == 1
    assert _files(out) == before
    code, _, err = run_cli("train", "--data", text, "--vocab-size", 300, "--out", out, "--force")
    assert code == 0, err
    assert load_tokenizer(out).vocab_size == 300
