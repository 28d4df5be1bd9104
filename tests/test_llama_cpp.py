"""llama.cpp parity: a GGUF file from `scratchllm convert --to gguf` loaded by llama.cpp itself
(through llama-cpp-python) computes what scratchllm computes.

For tiny GPT-2 (GPT-2's own BPE), Llama (grouped-query attention, llama3 rope scaling, a BPE
trained here on Llama 3's split pattern) and Qwen3 (QK-norm, a head size that is not emb_dim /
n_heads, tied head, a BPE on Qwen2's pattern) models, the f32 export's greedy continuation of a
prompt equals scratchllm's for 24 tokens, and llama.cpp's tokenizer (the vocabulary, merges and
pre-tokenizer name the file carries) splits three texts into the same ids as ours.

The weights are random but spread (every tensor moved off its init, logits of about ±15): a few
training steps of a 50257-token head cost tens of seconds here and still left near-constant
continuations, while spread random weights give varied tokens whose top-2 logit gaps (≥ 0.05)
sit far above the two libraries' differences (≤ 5e-3 for GPT-2, whose GELU llama.cpp reads
from an f16 table; ~1e-5 for the others). The failure message gives both numbers.

Without llama-cpp-python these tests are skipped; `make interop` builds it and sets
SCRATCHLLM_REQUIRE_LLAMA_CPP=1, under which a missing build is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

_REQUIRED = os.environ.get("SCRATCHLLM_REQUIRE_LLAMA_CPP") == "1"


def _need(module: str, why: str) -> Any:
    """Import `module`, or skip the file (fail it under SCRATCHLLM_REQUIRE_LLAMA_CPP=1)."""
    try:
        return __import__(module)
    except ImportError as exc:
        if _REQUIRED:
            pytest.fail(
                f"SCRATCHLLM_REQUIRE_LLAMA_CPP=1 but {module} does not import ({exc})",
                pytrace=False,
            )
        pytest.skip(f"{module} is not installed: {why}", allow_module_level=True)


_need("gguf", "the GGUF writer (pip install 'scratchllm[gguf]')")
llama_cpp = _need("llama_cpp", "llama-cpp-python is not built here (`make interop` builds it)")

from scratchllm.checkpoint import save_checkpoint  # noqa: E402
from scratchllm.config import ModelConfig  # noqa: E402
from scratchllm.hub.gguf import _PRE_PATTERNS, export_gguf  # noqa: E402
from scratchllm.inference.generate import generate  # noqa: E402
from scratchllm.model import GPTModel  # noqa: E402
from scratchllm.model.layers import LayerNorm  # noqa: E402
from scratchllm.tokenizers.train import train_bpe  # noqa: E402

NEW_TOKENS = 24
LOGIT_SPREAD = 4.0  # the final norm's scale, times: logits of about ±15
N_CTX = 64
PROMPT = "I had always thought Jack Gisburn rather a cheap genius"
TEXTS = {
    "ascii": "Hello, world! It's a plain sentence, and we're testing it.",
    "digits, punctuation and whitespace runs": (
        "Call 555-0123 or 3.14159265... now!!! (yes?)\n\n\n   indented\t\ttabs  \r\n"
        "x=[1,22,333,4444,55555]; 'quoted' ''double''   trailing   "
    ),
    "non-ascii": "Ünïcödé: héllo wörld — naïve café 😀 中文字符 Ελληνικά Привет ½ №",
}


def _verdict(data_dir: Path) -> str:
    return (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")


def _weights(config: ModelConfig) -> GPTModel:
    """A model with every weight moved off its initial value (norm scales, biases and QK-norms
    too, so a mix-up between them shows) and logits spread wide, so that greedy decoding has
    clear winners rather than a tie-break between two libraries' rounding."""
    torch.manual_seed(0)
    model = GPTModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.1))
        norm = model.final_norm
        (norm.scale if isinstance(norm, LayerNorm) else norm.weight).mul_(LOGIT_SPREAD)
    return model.eval()


def _family(tmp_path_factory, name: str, config: ModelConfig, tokenizer):
    """(model, tokenizer, llama.cpp model) for one family: built, saved, exported as f32."""
    model = _weights(config)
    root = tmp_path_factory.mktemp(f"llama-cpp-{name}")
    save_checkpoint(root / "ckpt", model, tokenizer)
    result = export_gguf(root / "ckpt", root / f"{name}.gguf", dtype="f32")
    # f32 keys and values in the KV cache (llama.cpp's default is f16): the parity is f32's.
    llm = llama_cpp.Llama(
        str(result.out),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_threads=max(1, min(2, os.cpu_count() or 1)),
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    yield model, tokenizer, llm
    llm.close()  # now, not in a __del__ at interpreter exit, when ctypes is half torn down


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory, gpt2_tokenizer):
    config = ModelConfig(
        vocab_size=50257,
        context_length=N_CTX,
        emb_dim=64,
        n_heads=4,
        n_layers=2,
        qkv_bias=True,
        drop_rate=0.0,
    )
    yield from _family(tmp_path_factory, "gpt2", config, gpt2_tokenizer)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, data_dir):
    # Llama 3's split pattern (GPT-4's): llama.cpp's "llama-bpe" pre-tokenizer.
    tok = train_bpe([_verdict(data_dir)], 768, pattern="gpt4", workers=1, name="llama-bpe")
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=N_CTX,
        emb_dim=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        hidden_dim=96,
        drop_rate=0.0,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        rope_theta=500000.0,
        rope_scaling=dict(  # original context 16 < 64: every band of the llama3 formula is used
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    )
    yield from _family(tmp_path_factory, "llama", config, tok)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, data_dir):
    # Qwen2's split pattern (single digits): llama.cpp's "qwen2" pre-tokenizer.
    tok = train_bpe([_verdict(data_dir)], 768, pattern=_PRE_PATTERNS["qwen2"], workers=1)
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        context_length=N_CTX,
        emb_dim=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        n_layers=2,
        hidden_dim=96,
        drop_rate=0.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        pos_embedding="rope",
        rope_theta=1000000.0,
        ffn="swiglu",
        bias=False,
        qk_norm=True,
        tie_embeddings=True,
    )
    yield from _family(tmp_path_factory, "qwen3", config, tok)


def _llama_cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax of its own logits) and its prompt logits."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[: len(prompt)])
    out: list[int] = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, first


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_greedy_continuation_matches_llama_cpp(family, request):
    model, tok, llm = request.getfixturevalue(family)
    prompt = tok.encode_ordinary(PROMPT)
    ours = generate(model, torch.tensor([prompt]), NEW_TOKENS)[0, len(prompt) :].tolist()
    theirs, logits = _llama_cpp_greedy(llm, prompt, NEW_TOKENS)
    with torch.no_grad():
        want = model(torch.tensor([prompt]))[0].numpy()
    # The logits first: a layout or metadata slip shows here as a large difference, not as a
    # token that differs somewhere later.
    np.testing.assert_allclose(logits, want, atol=2e-3 * float(np.abs(want).max()), rtol=0)
    assert len(set(ours)) > 3, f"a degenerate continuation proves little: {ours}"
    with torch.no_grad():
        steps = model(torch.tensor([prompt + ours[:-1]]))[0, len(prompt) - 1 :]
    top2 = steps.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    err = float(np.abs(logits - want).max())
    assert theirs == ours, f"smallest top-2 logit gap {margin:.3g}, prompt logit error {err:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_tokenization_matches_llama_cpp(family, text, request):
    _, tok, llm = request.getfixturevalue(family)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tok.encode(text)
    assert llm.detokenize(tok.encode(text)).decode("utf-8") == text


@pytest.mark.parametrize(
    "family, pre", [("gpt2", "gpt-2"), ("llama", "llama-bpe"), ("qwen3", "qwen2")]
)
def test_special_tokens_and_pre_tokenizer_name(family, pre, request):
    """The file names the split pattern llama.cpp knows (an unknown name would silently fall
    back to its default), marks <|endoftext|> special, and asks for no BOS (we add none)."""
    _, tok, llm = request.getfixturevalue(family)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    text = "one<|endoftext|>two"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(
        text, allow_special=True
    )
    eot = tok.special_tokens["<|endoftext|>"]
    assert llm.token_eos() == eot
