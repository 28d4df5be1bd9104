"""The tokenizer interface: what every tokenizer declares (stop ids, chat template, whether it may
be encoded in pieces), checked on each implementation, and honoured by both generators."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchllm import GPTModel, InputError, ModelConfig
from scratchllm.data.text import split_chunks
from scratchllm.inference.chat import chat_prompt
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.generate import generate, generate_text
from scratchllm.tokenizers import EOT, BPETokenizer, ByteTokenizer, Tokenizer
from scratchllm.tokenizers.hf import HFTokenizer
from scratchllm.tokenizers.train import train_bpe

SPECIALS = [EOT, "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "Hi there"}]
SAMPLE = (
    "It was a warm day.\nDon't   stop: 12345 apples, naïve café 東京 🙂\n\n\tend  of\r\nline "
    "x_y __init__ a\u00a0b c\u2028d 'LL 'll  \n"
) * 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data_dir) -> Path:
    """A byte-level BPE tokenizer.json trained by the `tokenizers` library, with specials."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([(data_dir / "corpora" / "the-verdict.txt").read_text()], trainer)
    directory = tmp_path_factory.mktemp("hf")
    tok.save(str(directory / "tokenizer.json"))
    return directory


def _hf_chat(hf_dir: Path, tmp: Path) -> HFTokenizer:
    (tmp / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = {"eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    plain = HFTokenizer.from_directory(hf_dir)
    # A model that names a second end token (as Llama 3 names <|eot_id|>) in its config.
    return HFTokenizer.from_directory(tmp, stop_ids=[plain.token_to_id("<|eot_id|>")])


def _make(case: str, gpt2: Tokenizer, hf_dir: Path, tmp: Path) -> tuple[Tokenizer, list[str]]:
    """The tokenizer of `case` and the names of the tokens it should stop at."""
    if case == "bytes":
        return ByteTokenizer(), [EOT]
    if case == "gpt2":
        return gpt2, [EOT]
    if case == "bpe-gpt4":
        return train_bpe([SAMPLE * 5], 300, [EOT, "<|pad|>"], "gpt4", workers=1), [EOT]
    if case == "bpe-custom":  # no <|endoftext|>, a pattern that joins words and spaces
        ranks = {bytes([b]): b for b in range(256)}
        return BPETokenizer(ranks, {"<|pad|>": 256}, r"\S+\s*|\s+", name="custom"), []
    if case == "hf-chat":  # its eos is the end of text: <|endoftext|> is just a token there
        return _hf_chat(hf_dir, tmp), ["<|im_end|>", "<|eot_id|>"]
    assert case == "hf-plain"  # no eos named: <|endoftext|>, a special token, ends the text
    return HFTokenizer.from_directory(hf_dir), [EOT]


# case: (has a chat template, splittable)
CASES = {
    "bytes": (False, True),
    "gpt2": (False, True),
    "bpe-gpt4": (False, True),
    "bpe-custom": (False, False),
    "hf-chat": (True, False),
    "hf-plain": (False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_tokenizer_answers_the_interface(case, gpt2_tokenizer, hf_dir, tmp_path):
    tok, stop_names = _make(case, gpt2_tokenizer, hf_dir, tmp_path)
    templated, splittable = CASES[case]
    assert isinstance(tok, Tokenizer)
    ids = {**tok.special_tokens}
    if isinstance(tok, HFTokenizer):
        ids = {name: tok.token_to_id(name) for name in stop_names}
    assert tok.stop_ids == tuple(sorted(ids[name] for name in stop_names))
    assert tok.has_chat_template is templated
    assert (tok.chat_template is not None) is templated
    assert tok.splittable is splittable
    if templated:
        chat = tok.encode_chat(MESSAGES)
        text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        assert chat == tok.encode(text, allow_special=True)
        assert chat_prompt(tok, MESSAGES) == (chat, ())
    else:
        with pytest.raises(InputError, match=rf"tokenizer {tok.name!r} has no chat template"):
            tok.encode_chat(MESSAGES)
        ids, stops = chat_prompt(tok, MESSAGES)  # the Alpaca format instead
        assert "### Response:" in tok.decode(ids) and stops


@pytest.mark.parametrize("case", [c for c, (_, split) in CASES.items() if split])
def test_splittable_tokenizers_encode_safe_pieces_as_the_whole(
    case, gpt2_tokenizer, hf_dir, tmp_path
):
    tok, _ = _make(case, gpt2_tokenizer, hf_dir, tmp_path)
    for size in (1, 5, 40):
        pieces = list(split_chunks([SAMPLE], size))
        assert len(pieces) > 5 and "".join(pieces) == SAMPLE
        assert [i for p in pieces for i in tok.encode_ordinary(p)] == tok.encode_ordinary(SAMPLE)


class _ExtraStops(ByteTokenizer):
    """A tokenizer that declares more stop ids than its end-of-text (as chat models do)."""

    def __init__(self, extra: tuple[int, ...]) -> None:
        self.extra = extra

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted({*super().stop_ids, *self.extra}))


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return GPTModel(config).eval()


def test_generate_and_the_engine_stop_at_the_declared_ids(model):
    prompt = "The cat"
    ids = ByteTokenizer().encode(prompt)
    free = generate(model, torch.tensor([ids]), 20)[0, len(ids) :].tolist()
    # The first id of the free run that has not come before: declared a stop id, it ends both
    # generations right there, and it is not part of either output.
    at = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop = free[at]
    assert 256 not in free[: at + 1]
    params = SamplingParams(max_tokens=20)
    for tok, expected in ((ByteTokenizer(), free), (_ExtraStops((stop,)), free[:at])):
        assert generate_text(model, tok, prompt, 20) == tok.decode(expected)
        (completion,) = Engine(model, tok).generate([ids], params)[0]
        assert completion.token_ids == expected
        assert completion.finish_reason == ("length" if expected == free else "stop")
    assert generate_text(model, _ExtraStops((stop,)), prompt, 20, stop_at_eos=False) == (
        ByteTokenizer().decode(free)
    )
