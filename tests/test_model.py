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


# -- regressions: RoPE precision, host syncs, the torch floor ---------------------------------------
ROPE = dict(norm="rmsnorm", pos_embedding="rope", ffn="swiglu", bias=False)


def test_rope_tables_stay_float32_in_a_bfloat16_model():
    from scratchllm.model.layers import rope_inverse_frequencies

    torch.manual_seed(0)
    config = tiny(**ROPE, context_length=4096)
    model = GPTModel(config)
    keys = set(model.state_dict())
    model = model.to(torch.bfloat16)
    # `.to(dtype)` must not round the frequencies: bf16 keeps 8 bits, and angles grow with position.
    assert model.rope.inv_freq.dtype == torch.float32
    assert torch.equal(model.rope.inv_freq, rope_inverse_frequencies(config))
    assert set(model.state_dict()) == keys  # inv_freq is not persistent, nothing was added
    positions = torch.arange(1990, 2010)
    angles = positions.double()[:, None] * rope_inverse_frequencies(config).double()
    angles = torch.cat([angles, angles], -1)
    cos, sin = model.rope(positions)
    # fp32 arithmetic on exact frequencies: within fp32 rounding of the angle (~2000 · 2^-24).
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-3)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-3)
    # The bf16 model's output still follows the fp32 model to bf16 precision at those positions.
    ref = GPTModel(config).eval()
    ref.load_state_dict(model.float().state_dict())
    idx = torch.randint(0, 97, (1, 2010))
    out = model.to(torch.bfloat16).eval()(idx)[0, -20:].float()
    torch.testing.assert_close(out, ref(idx)[0, -20:], rtol=0.05, atol=0.15)


def test_rope_model_rejects_input_longer_than_its_context():
    model = GPTModel(tiny(**ROPE))
    with pytest.raises(InputError, match="exceeds the model's context length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1, max_len=64)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(InputError, match="sequence of 33 tokens exceeds .* context length 32"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("kw", [{}, ROPE])
def test_forward_reads_nothing_back_from_the_device(kw):
    # On the meta device tensors have shapes but no values: any read of a value on the host
    # (`int(t)`, `.item()`, `.tolist()`), which on a GPU would stall each step on a sync, raises.
    with torch.device("meta"):
        model = GPTModel(tiny(**kw, drop_rate=0.1)).train()
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    model(idx).sum().backward()
    model.eval()
    cache = model.new_cache(2)
    model(idx, cache=cache)
    assert model(idx[:, :1], cache=cache).shape == (2, 1, 97)
    assert cache.length == 17


def test_gqa_fallback_matches_sdpa_enable_gqa(monkeypatch):
    from scratchllm.model import attention

    torch.manual_seed(0)
    model = GPTModel(tiny(**ROPE, n_kv_heads=2)).eval()
    idx = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    mask[1, :, :, :3] = False  # a padded row: the masked SDPA call
    mask[1, :, :3, 0] = True
    native = model(idx), model(idx, attn_mask=mask)
    monkeypatch.setattr(attention, "SDPA_HAS_GQA", False)  # as on torch < 2.5
    calls = []
    real = torch.Tensor.repeat_interleave
    monkeypatch.setattr(
        torch.Tensor, "repeat_interleave", lambda t, *a, **k: calls.append(1) or real(t, *a, **k)
    )
    fallback = model(idx), model(idx, attn_mask=mask)
    assert len(calls) == 2 * 2 * 2  # k and v, 2 layers, 2 forwards: the fallback ran
    for a, b in zip(native, fallback, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# The newest torch APIs the package uses, kept by hand with the release that introduced each
# (from torch's release notes). One newer than the floor in pyproject.toml may only be used in a
# file that gates on its version; the ones at or below it are why the floor is what it is.
TORCH_APIS = {
    "enable_gqa": (2, 5),  # F.scaled_dot_product_attention(..., enable_gqa=)
    "fully_shard": (2, 6),  # torch.distributed.fsdp.fully_shard (FSDP2, public)
    "_weight_int8pack_mm": (2, 3),  # int8 weight-only matmul on CPU (inference/weights.py)
    "device_id": (2, 3),  # dist.init_process_group(device_id=)
    "assign=True": (2, 1),  # nn.Module.load_state_dict(assign=True)
}


def test_torch_floor_agrees_with_the_version_gates():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (spec,) = re.findall(
        r'^\s*"torch\s*>=\s*(\d+)\.(\d+)', (root / "pyproject.toml").read_text(), re.M
    )
    floor = (int(spec[0]), int(spec[1]))
    sources = {p: p.read_text() for p in (root / "src" / "scratchllm").rglob("*.py")}
    gate = re.compile(r"TorchVersion\(torch\.__version__\) >= \((\d+), (\d+)\)")
    gates = {p: {(int(a), int(b)) for a, b in gate.findall(s)} for p, s in sources.items()}
    for path, text in sources.items():
        # Every version check is spelled one way, so this test sees them all.
        assert text.count("TorchVersion(") == len(gate.findall(text)), path
        assert not re.search(r"torch\.__version__\s*[<>=!]|parse\(torch\.__version", text), path
        for version in gates[path]:
            assert version > floor, f"{path}: gate {version} is at or below the floor {floor}"
    for api, version in TORCH_APIS.items():
        users = [p for p, s in sources.items() if api in s]
        assert users, f"{api} is no longer used: drop it from TORCH_APIS"
        if version > floor:
            for path in users:
                assert any(g >= version for g in gates[path]), (
                    f"{path} uses {api} (torch {version}) without a gate; floor is {floor}"
                )


def test_no_dead_functions_in_the_model_and_training_wrappers():
    # A public function or class that nothing in the package names is dead code (the old
    # `ceil_to` and `all_reduce_mean` were). The public API names its exports in __init__.py.
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "scratchllm"
    texts = [p.read_text() for p in root.rglob("*.py")]
    files = [root / "config.py", *(root / "model").glob("*.py")]
    files += [root / "train" / "distributed.py", root / "train" / "parallelize.py"]
    files += [root / "inference" / "decode.py"]
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                uses = sum(len(re.findall(rf"\b{node.name}\b", t)) for t in texts)
                assert uses > 1, f"{path.name}: {node.name} is defined and never used"


# -- a classifier is a config field, not an attribute set at run time -------------------------------
def test_num_classes_in_the_config_builds_an_untied_classifier_head(tmp_path):
    config = tiny(tie_embeddings=True, num_classes=3)
    model = GPTModel(config)
    assert tuple(model.out_head.weight.shape) == (3, 32) and model.out_head.bias is not None
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 3)
    config.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json").num_classes == 3
    for bad in (0, True, 2.0):
        with pytest.raises(InputError, match="'num_classes' must be a positive integer"):
            tiny(num_classes=bad)
    lm = GPTModel(tiny(tie_embeddings=True))
    base_config = lm.config
    lm.set_classification_head(4)
    assert lm.config.num_classes == 4 and base_config.num_classes is None  # replaced, not mutated
    assert tuple(lm.out_head.weight.shape) == (4, 32)


def test_classifier_checkpoint_loads_from_its_config_and_old_ones_from_meta(tmp_path):
    from scratchllm import ByteTokenizer
    from scratchllm.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = GPTModel(tiny(vocab_size=300, tie_embeddings=True)).eval()
    model.set_classification_head(3)
    idx = torch.randint(0, 300, (2, 7))
    expected = model(idx)
    save_checkpoint(tmp_path / "new", model, ByteTokenizer(), {"task": "classify"})
    assert json.loads((tmp_path / "new" / "config.json").read_text())["num_classes"] == 3
    loaded = load_checkpoint(tmp_path / "new").model
    torch.testing.assert_close(loaded(idx), expected)
    # Written before config.json carried the field: num_classes only in checkpoint.json.
    save_checkpoint(
        tmp_path / "old", model, ByteTokenizer(), {"task": "classify", "num_classes": 3}
    )
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["num_classes"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = load_checkpoint(tmp_path / "old").model
    assert old.config.num_classes == 3
    torch.testing.assert_close(old(idx), expected)
