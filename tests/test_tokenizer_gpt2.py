"""GPT-2 parity: OpenAI's files loaded by scratchllm give tiktoken's GPT-2 ids on every text file
of the test data and on random unicode, and the pure-Python reference encoder agrees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bpe_reference import ReferenceBPE, gpt2_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.tokenizers import EOT, GPT2_PATTERN, BPETokenizer

REFERENCE_PREFIX = 50_000  # characters the slow reference encoder gets of each file


@pytest.fixture(scope="module")
def tiktoken_gpt2(data_dir, monkeypatch_module):
    """tiktoken's own GPT-2 encoding, built offline from the local files."""
    import tiktoken
    import tiktoken.load

    monkeypatch_module.setenv("TIKTOKEN_CACHE_DIR", "")  # do not copy the files into a cache
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data_dir / "gpt2" / "vocab.bpe"),
        encoder_json_file=str(data_dir / "gpt2" / "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2-reference",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def reference(data_dir) -> ReferenceBPE:
    return gpt2_reference(data_dir / "gpt2")


def _text_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def _data_root() -> Path:
    # Same place as conftest's `data_dir` fixture; needed at collection time to parametrize.
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("SCRATCHLLM_TEST_DATA", default)).resolve()


DATA_FILES = _text_files(_data_root())


def test_the_data_has_the_expected_files():
    names = {p.name for p in DATA_FILES}
    expected = {
        "the-verdict.txt",
        "tinyshakespeare.txt",
        "pg1342_pride_and_prejudice.txt",
        "valid.txt",
        "SMSSpamCollection",
        "instruction-data.json",
        "alpaca_libre_tasks_v1.jsonl",
        "corpus.en",
        "german.txt",
    }
    assert expected <= names


def test_loaded_ranks_equal_tiktokens(gpt2_tokenizer, tiktoken_gpt2):
    assert isinstance(gpt2_tokenizer, BPETokenizer)
    assert gpt2_tokenizer.mergeable_ranks == tiktoken_gpt2._mergeable_ranks
    assert gpt2_tokenizer.special_tokens == {EOT: 50256}
    assert gpt2_tokenizer.vocab_size == tiktoken_gpt2.n_vocab == 50257


def test_known_ids(gpt2_tokenizer, reference, data_dir):
    assert gpt2_tokenizer.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2_tokenizer.encode("Hello, world! " + EOT, allow_special=True) == [
        15496, 11, 995, 0, 220, 50256,
    ]  # fmt: skip
    text = f"Hello, do you like tea? {EOT} In the sunlit terraces of someunknownPlace."
    expected = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                8812, 2114, 286, 617, 34680, 27271, 13]  # fmt: skip
    assert gpt2_tokenizer.encode(text, allow_special=True) == expected
    assert reference.encode(text, allow_special=True) == expected
    shakespeare = (data_dir / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    assert len(gpt2_tokenizer.encode(shakespeare)) == 338025


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.name)
def test_every_data_file_matches_tiktoken(path, gpt2_tokenizer, tiktoken_gpt2, reference):
    text = path.read_bytes().decode("utf-8")  # the bytes as they are: BOM, CRLF and all
    ids = gpt2_tokenizer.encode_ordinary(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.encode(text, allow_special=True) == tiktoken_gpt2.encode(
        text, allowed_special="all"
    )
    prefix = text[:REFERENCE_PREFIX]
    assert reference.encode_ordinary(prefix) == gpt2_tokenizer.encode_ordinary(prefix)


def test_batch_encoding_matches(gpt2_tokenizer, tiktoken_gpt2):
    texts = [p.read_bytes().decode("utf-8")[:20_000] for p in DATA_FILES]
    assert gpt2_tokenizer.encode_batch(texts) == tiktoken_gpt2.encode_ordinary_batch(texts)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_unicode_matches_tiktoken(gpt2_tokenizer, tiktoken_gpt2, reference, text):
    ids = gpt2_tokenizer.encode_ordinary(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)
    assert reference.encode_ordinary(text) == ids
    assert gpt2_tokenizer.decode(ids) == text
    assert reference.decode(ids) == text


_PIECES = st.sampled_from([EOT, " ", "\n", "  ", "'s", "'LL", "12345", "é", "🙂", "a", "The"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=30).map("".join))
def test_random_text_with_specials_matches_tiktoken(gpt2_tokenizer, tiktoken_gpt2, reference, text):
    ids = gpt2_tokenizer.encode(text, allow_special=True)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert reference.encode(text, allow_special=True) == ids
    assert gpt2_tokenizer.decode(ids) == text
