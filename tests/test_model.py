"""The model against known answers (the book's parameter counts) and mathematics."""

import json

import pytest
import torch

from scratchllm import GPTModel, InputError, ModelConfig
from scratchllm.config import PRESETS
from scratchllm.model import FeedForward, LayerNorm, MultiHeadAttention


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tie, expected", [(False, 163_009_536), (True, 124_412_160)])
def test_gpt2_small_parameter_count_matches_book(tie, expected):
    with torch.device("meta"):
        model = GPTModel(ModelConfig.from_preset("gpt2-small", tie_embeddings=tie))
    assert model.num_parameters() == expected


@pytest.mark.parametrize(
    "name, shape",
    [
        ("gpt2-small", (768, 12, 12)),
        ("gpt2-medium", (1024, 24, 16)),
        ("gpt2-large", (1280, 36, 20)),
        ("gpt2-xl", (1600, 48, 25)),
    ],
)
def test_gpt2_presets_have_the_books_numbers(name, shape):
    c = ModelConfig.from_preset(name)
    assert (c.emb_dim, c.n_layers, c.n_heads) == shape
    assert (c.vocab_size, c.context_length) == (50257, 1024)


def test_gpt2_medium_large_xl_counts_match_book():
    # The book's exercise 4.2: total parameters with an untied head.
    expected = {"gpt2-medium": 406_212_608, "gpt2-large": 838_220_800, "gpt2-xl": 1_637_792_000}
    for name, count in expected.items():
        with torch.device("meta"):
            model = GPTModel(ModelConfig.from_preset(name))
        assert model.num_parameters() == count, name


def test_small_presets_sizes():
    with torch.device("meta"):
        nano = GPTModel(ModelConfig.from_preset("gpt-nano", vocab_size=257))
        micro = GPTModel(ModelConfig.from_preset("gpt-micro", vocab_size=257))
    assert 0.8e6 < nano.num_parameters(non_embedding=True) < 1.3e6
    assert 8e6 < micro.num_parameters(non_embedding=True) < 12e6


def test_config_json_round_trip(tmp_path):
    config = ModelConfig.from_preset("qwen3-0.6b")
    config.to_json(tmp_path / "c.json")
    again = ModelConfig.from_json(tmp_path / "c.json")
    assert again == config
    assert json.loads((tmp_path / "c.json").read_text())["qk_norm"] is True


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(InputError, match="emb_dim 30 is not divisible by n_heads 4"):
        tiny(emb_dim=30)
    with pytest.raises(InputError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")
    (tmp_path / "bad.json").write_text('{"emb_dim": 32, "colour": "red"}')
    with pytest.raises(InputError, match="unknown model config field"):
        ModelConfig.from_json(tmp_path / "bad.json")
    assert set(PRESETS) >= {"gpt2-small", "gpt-nano", "gpt-micro", "llama3.2-1b", "qwen3-0.6b"}


def test_output_shapes_and_hidden():
    model = GPTModel(tiny()).eval()
    idx = torch.randint(0, 97, (3, 11))
    assert model(idx).shape == (3, 11, 97)
    assert model(idx, return_hidden=True).shape == (3, 11, 32)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"qkv_bias": True, "tie_embeddings": True},
        dict(norm="rmsnorm", pos_embedding="rope", ffn="swiglu", bias=False, n_kv_heads=2),
        dict(
            norm="rmsnorm",
            pos_embedding="rope",
            ffn="swiglu",
            qk_norm=True,
            head_dim=16,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ],
)
def test_causal_masking_and_sdpa_matches_explicit(kw):
    torch.manual_seed(0)
    model = GPTModel(tiny(**kw)).eval()
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    a, b = model(idx), model(changed)
    # Changing later tokens never changes earlier logits.
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    model.set_attention_impl("explicit")
    torch.testing.assert_close(model(idx), a, rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    for kw in ({}, dict(norm="rmsnorm", pos_embedding="rope", ffn="swiglu", n_kv_heads=1)):
        model = GPTModel(tiny(**kw)).eval()
        idx = torch.randint(0, 97, (2, 20))
        full = model(idx)
        cache = model.new_cache(2)
        parts = [model(idx[:, :7], cache=cache)]
        parts += [model(idx[:, i : i + 1], cache=cache) for i in range(7, 20)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_layer_norm_matches_book_formula():
    x = torch.randn(4, 6, 8)
    ln = LayerNorm(8)
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-5))


def test_feed_forward_width_and_gelu():
    ff = FeedForward(tiny())
    assert ff.fc1.out_features == 4 * 32 and ff.fc2.in_features == 4 * 32
    x = torch.randn(5)
    gelu = (
        0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2 / torch.pi)) * (x + 0.044715 * x**3)))
    )
    torch.testing.assert_close(ff.activation(x), gelu)


def test_attention_weights_are_causal_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(tiny(n_heads=1)).eval()
    x = torch.randn(1, 5, 32)
    out = attn(x)
    # Position 0 attends only to itself: its output is out_proj(v_0).
    v0 = attn.qkv(x)[:, 0, 64:96]
    torch.testing.assert_close(out[:, 0], attn.out_proj(v0), rtol=1e-5, atol=1e-6)


def test_tied_head_shares_storage_and_flops():
    model = GPTModel(tiny(tie_embeddings=True))
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    c = model.config
    # 6N + 12·L·H·Q·T with N = matmul weights (attention, MLP, head).
    n = c.n_layers * (4 * 32 * 32 + 2 * 32 * 128) + 32 * 97
    assert model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 32


def test_too_long_input_is_an_input_error():
    model = GPTModel(tiny())
    with pytest.raises(InputError, match="exceeds the model's context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "name, expected",
    [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824), ("qwen3-0.6b", 596_049_920)],
)
def test_modern_presets_match_published_parameter_counts(name, expected):
    # The sizes Meta and Qwen publish for these checkpoints (tied embeddings counted once).
    with torch.device("meta"):
        model = GPTModel(ModelConfig.from_preset(name))
    assert model.num_parameters() == expected
