"""GGUF export (`scratchllm convert --to gguf`): read back with gguf.GGUFReader, tensor by tensor
against what our weights say llama.cpp should hold, plus the metadata llama.cpp requires."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from scratchllm.checkpoint import save_checkpoint  # noqa: E402
from scratchllm.cli import main  # noqa: E402
from scratchllm.config import ModelConfig  # noqa: E402
from scratchllm.hub.gguf import permute_rotary, rope_factors  # noqa: E402
from scratchllm.model import GPTModel  # noqa: E402
from scratchllm.tokenizers import ByteTokenizer  # noqa: E402

T = gguf.GGMLQuantizationType


def _model(config: ModelConfig) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(config)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, so a mix-up shows
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory, gpt2_tokenizer):
    config = ModelConfig(
        vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True
    )
    path = tmp_path_factory.mktemp("gguf") / "gpt2"
    save_checkpoint(path, _model(config), gpt2_tokenizer)
    return path


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory, gpt2_tokenizer):
    config = ModelConfig(
        vocab_size=50257,
        context_length=64,
        emb_dim=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        hidden_dim=96,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    )
    path = tmp_path_factory.mktemp("gguf") / "llama"
    save_checkpoint(path, _model(config), gpt2_tokenizer)
    return path


@pytest.fixture(scope="module")
def qwen3_ckpt(tmp_path_factory, gpt2_tokenizer):
    config = ModelConfig(
        vocab_size=50257,
        context_length=64,
        emb_dim=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        n_layers=1,
        hidden_dim=96,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        qk_norm=True,
        tie_embeddings=True,
    )
    path = tmp_path_factory.mktemp("gguf") / "qwen3"
    save_checkpoint(path, _model(config), gpt2_tokenizer)
    return path


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from scratchllm.checkpoint import resolve_checkpoint_dir

    return load_file(resolve_checkpoint_dir(ckpt) / "model.safetensors")


def _export(ckpt: Path, out: Path, dtype: str, *extra: str) -> gguf.GGUFReader:
    argv = ["convert", "--from", str(ckpt), "--to", "gguf", "--out", str(out), "--dtype", dtype]
    assert main([*argv, *extra]) == 0
    return gguf.GGUFReader(out)


def _field(reader, key):
    assert key in reader.fields, f"missing metadata {key}"
    return reader.fields[key].contents()


def _values(t) -> np.ndarray:
    """A tensor's values in torch layout (shape reversed from ggml's)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == T.Q8_0:
        return gguf.quants.dequantize(t.data, T.Q8_0).reshape(shape)
    return np.asarray(t.data).reshape(shape)


def _gpt2_expected(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    exp = {
        "token_embd.weight": state["tok_emb.weight"],
        "position_embd.weight": state["pos_emb.weight"],
        "output_norm.weight": state["final_norm.scale"],
        "output_norm.bias": state["final_norm.shift"],
        "output.weight": state.get("out_head.weight", state["tok_emb.weight"]),
    }
    for i in range(n_layers):
        p, b = f"trf_blocks.{i}.", f"blk.{i}."
        for g, ours in (
            ("attn_norm", ("norm1.scale", "norm1.shift")),
            ("attn_qkv", ("att.qkv.weight", "att.qkv.bias")),
            ("attn_output", ("att.out_proj.weight", "att.out_proj.bias")),
            ("ffn_norm", ("norm2.scale", "norm2.shift")),
            ("ffn_up", ("ff.fc1.weight", "ff.fc1.bias")),
            ("ffn_down", ("ff.fc2.weight", "ff.fc2.bias")),
        ):
            exp[f"{b}{g}.weight"], exp[f"{b}{g}.bias"] = state[p + ours[0]], state[p + ours[1]]
    return exp


def _llama_expected(state, config: ModelConfig, permute: bool) -> dict[str, torch.Tensor]:
    exp = {
        "token_embd.weight": state["tok_emb.weight"],
        "output_norm.weight": state["final_norm.weight"],
    }
    if "out_head.weight" in state:
        exp["output.weight"] = state["out_head.weight"]
    if config.rope_scaling:
        exp["rope_freqs.weight"] = torch.from_numpy(rope_factors(config))
    hd, nh, nkv = config.head_size, config.n_heads, config.kv_heads
    for i in range(config.n_layers):
        p, b = f"trf_blocks.{i}.", f"blk.{i}."
        q, k, v = torch.split(state[p + "att.qkv.weight"], [nh * hd, nkv * hd, nkv * hd])
        if permute:
            q, k = permute_rotary(q, nh), permute_rotary(k, nkv)
        exp |= {
            f"{b}attn_norm.weight": state[p + "norm1.weight"],
            f"{b}attn_q.weight": q,
            f"{b}attn_k.weight": k,
            f"{b}attn_v.weight": v,
            f"{b}attn_output.weight": state[p + "att.out_proj.weight"],
            f"{b}ffn_norm.weight": state[p + "norm2.weight"],
            f"{b}ffn_gate.weight": state[p + "ff.fc1.weight"],
            f"{b}ffn_up.weight": state[p + "ff.fc2.weight"],
            f"{b}ffn_down.weight": state[p + "ff.fc3.weight"],
        }
        if config.qk_norm:
            exp[f"{b}attn_q_norm.weight"] = state[p + "att.q_norm.weight"]
            exp[f"{b}attn_k_norm.weight"] = state[p + "att.k_norm.weight"]
    return exp


def _check_tensors(reader, expected: dict[str, torch.Tensor], dtype: str) -> None:
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)
    for name, want in expected.items():
        t, want = got[name], want.float().numpy()
        values = _values(t)
        assert values.shape == want.shape, name
        if dtype == "f32" or want.ndim == 1:
            assert t.tensor_type == T.F32, name
            np.testing.assert_array_equal(values, want, err_msg=name)
        elif dtype == "f16":
            assert t.tensor_type == T.F16, name
            np.testing.assert_array_equal(values, want.astype(np.float16), err_msg=name)
        else:
            assert t.tensor_type == T.Q8_0, name
            # Q8_0: per block of 32, d = max|x| / 127 stored in f16; the error is at most d/2
            # from rounding to int8 plus 127 * d * 2**-11 from d's own f16 rounding.
            blocks = want.reshape(-1, 32)
            bound = (
                np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2**-11) * 1.001
                + 1e-7
            )
            err = np.abs(values.reshape(-1, 32) - blocks)
            assert (err <= bound).all(), name


def _check_vocab(reader, tok) -> None:
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[15496] == "Hello" and tokens[50256] == "<|endoftext|>"
    assert tokens[220] == "Ġ"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == 3 and types[0] == 1
    merges = _field(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 50256


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gpt2_gguf_round_trip(tmp_path, gpt2_ckpt, gpt2_tokenizer, dtype):
    reader = _export(gpt2_ckpt, tmp_path / "model.gguf", dtype)
    state = _state(gpt2_ckpt)
    _check_tensors(reader, _gpt2_expected(state, 2), dtype)
    assert _field(reader, "general.architecture") == "gpt2"
    for key, want in (
        ("gpt2.context_length", 64),
        ("gpt2.embedding_length", 64),
        ("gpt2.block_count", 2),
        ("gpt2.feed_forward_length", 256),
        ("gpt2.attention.head_count", 4),
        ("general.file_type", {"f32": 0, "f16": 1, "q8_0": 7}[dtype]),
    ):
        assert _field(reader, key) == want, key
    assert _field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    _check_vocab(reader, gpt2_tokenizer)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_gguf_round_trip(tmp_path, llama_ckpt, dtype):
    from scratchllm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir

    config, _, _ = read_checkpoint_config(resolve_checkpoint_dir(llama_ckpt))
    reader = _export(llama_ckpt, tmp_path / "llama.gguf", dtype)
    _check_tensors(reader, _llama_expected(_state(llama_ckpt), config, permute=True), dtype)
    assert _field(reader, "general.architecture") == "llama"
    for key, want in (
        ("llama.context_length", 64),
        ("llama.embedding_length", 64),
        ("llama.block_count", 2),
        ("llama.feed_forward_length", 96),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.dimension_count", 16),
        ("llama.rope.freq_base", 500000.0),
    ):
        assert _field(reader, key) == want, key
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    factors = _values(next(t for t in reader.tensors if t.name == "rope_freqs.weight"))
    # llama.cpp's convert_hf_to_gguf.py formula for llama3 rope_freqs, written out here.
    freqs = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    want = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < 16 / 4.0:
            want.append(1.0)
        elif wavelen > 16 / 1.0:
            want.append(8.0)
        else:
            smooth = (16 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    np.testing.assert_allclose(factors, want, rtol=1e-5)
    assert factors[-1] == 8.0 and 1.0 < factors[0] < 8.0  # the blend band is exercised


def test_permute_matches_llama_cpp_layout():
    """Each head's rows [x0..x(d/2-1), y0..] become interleaved pairs [x0, y0, x1, y1, ...]."""
    w = torch.arange(2 * 8).float().reshape(2 * 8, 1)  # 2 heads of size 8
    got = permute_rotary(w, 2).flatten().tolist()
    assert got[:8] == [0, 4, 1, 5, 2, 6, 3, 7] and got[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_qwen3_gguf_round_trip(tmp_path, qwen3_ckpt):
    from scratchllm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir

    config, _, _ = read_checkpoint_config(resolve_checkpoint_dir(qwen3_ckpt))
    reader = _export(qwen3_ckpt, tmp_path / "qwen3.gguf", "f16", "--ollama")
    _check_tensors(reader, _llama_expected(_state(qwen3_ckpt), config, permute=False), "f16")
    assert _field(reader, "general.architecture") == "qwen3"
    assert _field(reader, "qwen3.attention.key_length") == 32
    assert _field(reader, "qwen3.attention.value_length") == 32
    assert _field(reader, "qwen3.rope.dimension_count") == 32
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./qwen3.gguf\n")
    assert "TEMPLATE" in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dtype", "q4_k"], "--dtype 'q4_k'"),
        (["--dtype", "bfloat16"], "--dtype 'bfloat16'"),
    ],
)
def test_bad_dtype_refused_without_file(tmp_path, gpt2_ckpt, capsys, argv, needle):
    out = tmp_path / "model.gguf"
    argv = ["convert", "--from", str(gpt2_ckpt), "--to", "gguf", "--out", str(out), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_byte_tokenizer_refused_without_file(tmp_path, capsys):
    config = ModelConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
    save_checkpoint(tmp_path / "ckpt", GPTModel(config), ByteTokenizer())
    out = tmp_path / "out" / "model.gguf"
    argv = ["convert", "--from", str(tmp_path / "ckpt"), "--to", "gguf", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "byte tokenizer" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, gpt2_ckpt, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep")
    argv = ["convert", "--from", str(gpt2_ckpt), "--to", "gguf", "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
