"""LoRA (appendix E): zero start, the alpha/rank formula, merge parity, only adapters learn."""

import math

import pytest
import torch

from scratchllm import GPTModel, InputError, ModelConfig
from scratchllm.model.lora import (
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    has_lora,
    load_adapter_state_dict,
    merge_lora,
    parameter_counts,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    torch.manual_seed(0)
    config = dict(
        vocab_size=97, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0
    )
    config.update(kw)
    return GPTModel(ModelConfig(**config))


def randomize_b(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)


def test_lora_linear_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(1)
    base = torch.nn.Linear(6, 4)
    layer = LoRALinear(base, rank=2, alpha=8.0)
    assert layer.scale == 4.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))  # B = 0: nothing changes
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + 4.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


def test_fresh_adapters_leave_the_model_unchanged():
    model = tiny()
    x = torch.randint(0, 97, (2, 16))
    before = model(x)
    wrapped = apply_lora(model, rank=4, alpha=8, targets="attn,ff")
    assert len(wrapped) == 2 * 4  # qkv, out_proj, fc1, fc2 in each of 2 blocks
    assert has_lora(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_merged_and_unmerged_give_the_same_logits():
    model = tiny()
    apply_lora(model, rank=4, alpha=16, targets="attn,ff")
    randomize_b(model)
    x = torch.randint(0, 97, (2, 16))
    unmerged = model(x)
    merge_lora(model)
    assert not has_lora(model)
    assert "trf_blocks.0.att.qkv.weight" in model.state_dict()  # plain layout again
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    fresh = tiny()
    fresh.load_state_dict(model.state_dict())  # loads into a standard model
    torch.testing.assert_close(fresh(x), unmerged, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_receive_gradients():
    model = tiny()
    model.set_classification_head(3)
    apply_lora(model, rank=2, alpha=4, targets="attn", trainable=("out_head",))
    randomize_b(model)
    hidden = model(torch.randint(0, 97, (2, 8)), return_hidden=True)
    model.out_head(hidden[:, -1]).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("out_head"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any("ff.fc1.lora" in n for n, _ in model.named_parameters())  # attn only


def test_parameter_counts_match_hand_count():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    apply_lora(model, rank=4, alpha=8, targets="attn")
    d = 32  # qkv: 32 -> 96, out_proj: 32 -> 32
    per_block = 4 * (d + 3 * d) + 4 * (d + d)
    counts = parameter_counts(model)
    assert counts["trainable"] == 2 * per_block
    assert counts["total"] == total + 2 * per_block


def test_adapters_save_and_load_alone():
    model = tiny()
    apply_lora(model, rank=4, alpha=8)
    randomize_b(model)
    state = adapter_state_dict(model)
    assert all("lora_" in k for k in state)
    other = tiny()
    apply_lora(other, rank=4, alpha=8)
    load_adapter_state_dict(other, state, "adapters")
    x = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(other(x), model(x))
    bad = {"trf_blocks.0.att.qkv.lora_A": torch.zeros(3, 32)}
    with pytest.raises(InputError, match="shape"):
        load_adapter_state_dict(other, bad, "adapters")


def test_bad_targets_and_rank_are_input_errors():
    with pytest.raises(InputError, match="unknown group"):
        apply_lora(tiny(), rank=2, alpha=2, targets="attention")
    with pytest.raises(InputError, match="rank"):
        LoRALinear(torch.nn.Linear(2, 2), rank=0, alpha=1)


def test_kaiming_init_of_a():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(256, 8), rank=64, alpha=1)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.abs().max() > 0.9 * bound
