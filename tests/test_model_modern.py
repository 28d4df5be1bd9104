"""The modern architecture options (issue 15): ReLU², parameter-free RMSNorm, zero-initialised
projections, logit soft-capping, the smear and attention gates and the gpt-modern presets, each
against the formula it names, through training, the decode path, checkpoints and the Hugging
Face export's refusal."""

from __future__ import annotations

import pytest
import torch

from scratchllm import (
    ByteTokenizer,
    GPTModel,
    InputError,
    ModelConfig,
    generate,
    load_checkpoint,
    save_checkpoint,
)
from scratchllm.hub.families import export_spec
from scratchllm.inference.decode import DecodeStep
from scratchllm.model import FeedForward
from scratchllm.model.layers import AttentionGate, RMSNorm, SmearGate, make_norm, softcap
from scratchllm.train.muon import split_for_muon

MODERN = ("gpt-modern-nano", "gpt-modern-micro", "gpt-modern-small")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


def modern_tiny(**kw) -> ModelConfig:
    return ModelConfig.from_preset(
        "gpt-modern-nano", context_length=32, emb_dim=32, n_heads=4, n_layers=2, **kw
    )


# -- ReLU² ------------------------------------------------------------------------------------
def test_relu2_feed_forward_on_a_known_input():
    ff = FeedForward(tiny(emb_dim=2, n_heads=1, hidden_dim=3, ffn="relu2", bias=False))
    with torch.no_grad():
        ff.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        ff.fc2.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.5]]))
    x = torch.tensor([[2.0, -3.0]])
    # fc1: (2, -3, -1) → relu: (2, 0, 0) → square: (4, 0, 0) → fc2: (4, 4)
    assert torch.equal(ff(x), torch.tensor([[4.0, 4.0]]))
    x = torch.tensor([[0.5, 1.5]])
    # fc1: (0.5, 1.5, 2) → square: (0.25, 2.25, 4) → fc2: (6.5, 0.25·1 − 2.25 + 2 = 0)
    assert torch.allclose(ff(x), torch.tensor([[6.5, 0.0]]))
    assert set(dict(ff.named_parameters())) == {"fc1.weight", "fc2.weight"}


# -- logit soft-capping -----------------------------------------------------------------------
def test_softcap_bounds_the_logits_and_is_cap_tanh():
    x = torch.tensor([-1e4, -30.0, -1.0, 0.0, 0.5, 15.0, 1e4])
    capped = softcap(x, 15.0)
    assert torch.allclose(capped, 15.0 * torch.tanh(x / 15.0))
    assert capped.abs().max() <= 15.0
    assert softcap(x, None) is x


def test_softcap_gradient_is_that_of_cap_tanh():
    # The soft-cap has its own one-pass backward: it must equal autograd's through the formula.
    torch.manual_seed(0)
    x = (torch.randn(6, 40, dtype=torch.float64) * 30).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: softcap(t, 15.0), (x,))
    grad = torch.randn(6, 40, dtype=torch.float64)
    (ours,) = torch.autograd.grad(softcap(x, 15.0), x, grad)
    (ref,) = torch.autograd.grad(15.0 * torch.tanh(x / 15.0), x, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_model_logits_are_soft_capped():
    torch.manual_seed(0)
    capped = GPTModel(tiny(logit_softcap=2.0)).eval()
    plain = GPTModel(tiny()).eval()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        capped.out_head.weight.mul_(50)  # raw logits far beyond the cap
        plain.out_head.weight.copy_(capped.out_head.weight)
        idx = torch.randint(0, 257, (2, 10))
        raw, out = plain(idx), capped(idx)
    assert raw.abs().max() > 10
    assert out.abs().max() <= 2.0
    assert torch.allclose(out, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)


def test_config_rejects_a_non_positive_softcap():
    for bad in (0.0, -3.0):
        with pytest.raises(InputError, match="logit_softcap"):
            tiny(logit_softcap=bad)
    with pytest.raises(InputError, match="ffn"):
        tiny(ffn="relu3")


# -- parameter-free RMSNorm -------------------------------------------------------------------
def test_rmsnorm_noparam_has_no_parameters_and_normalises():
    config = tiny(norm="rmsnorm_noparam", qk_norm=True)
    norm = make_norm(config)
    assert isinstance(norm, RMSNorm) and list(norm.parameters()) == []
    x = torch.randn(3, 5, 32) * 7 + 2
    y = norm(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)
    assert torch.allclose(y, x / x.pow(2).mean(-1, keepdim=True).add(config.norm_eps).sqrt())
    model = GPTModel(config)
    names = [n for n, _ in model.named_parameters()]
    assert not any("norm" in n for n in names), names  # block, final and QK norms alike
    with_scale = GPTModel(tiny(norm="rmsnorm", qk_norm=True))
    norm_params = sum(p.numel() for n, p in with_scale.named_parameters() if "norm" in n)
    assert with_scale.num_parameters() - model.num_parameters() == norm_params > 0


# -- zero-initialised projections -------------------------------------------------------------
@pytest.mark.parametrize("ffn", ["gelu", "relu2", "swiglu"])
def test_zero_init_projections_are_zero_and_blocks_start_as_identity(ffn):
    torch.manual_seed(0)
    model = GPTModel(tiny(ffn=ffn, zero_init_proj=True, logit_softcap=15.0)).eval()
    down = "fc3" if ffn == "swiglu" else "fc2"
    for block in model.trf_blocks:
        assert not block.att.out_proj.weight.any()
        assert not getattr(block.ff, down).weight.any()
        assert block.att.qkv.weight.std() > 0.01 and block.ff.fc1.weight.std() > 0.01
    if ffn == "swiglu":
        assert model.trf_blocks[0].ff.fc2.weight.std() > 0.01  # the up projection: not zeroed
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        positions = torch.arange(12)
        hidden = model.final_norm(model.tok_emb(idx) + model.pos_emb(positions))
        expected = 15.0 * torch.tanh(model.out_head(hidden) / 15.0)
        assert torch.allclose(model(idx), expected, atol=1e-6)
    default = GPTModel(tiny(ffn=ffn))
    assert default.trf_blocks[0].att.out_proj.weight.any()  # off by default


# -- presets ----------------------------------------------------------------------------------
def test_modern_presets_combine_the_options_at_the_small_sizes():
    sizes = {"gpt-modern-nano": "gpt-nano", "gpt-modern-micro": "gpt-micro"}
    for name in MODERN:
        c = ModelConfig.from_preset(name)
        # What paid in benchmarks/speedrun.py's ablation rows (config.GPT_MODERN says which).
        assert (c.pos_embedding, c.norm, c.ffn) == ("rope", "layernorm", "gelu")
        assert c.qk_norm and c.zero_init_proj and not c.tie_embeddings
        assert c.logit_softcap is None and not c.bias and not c.qkv_bias and c.smear and c.attn_gate
        classic = ModelConfig.from_preset(sizes.get(name, "gpt2-small"))
        shape = ("context_length", "emb_dim", "n_heads", "n_layers", "vocab_size")
        assert [getattr(c, f) for f in shape] == [getattr(classic, f) for f in shape], name


@pytest.mark.parametrize("name", MODERN)
def test_each_modern_preset_trains_on_bytes(name):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = GPTModel(ModelConfig.from_preset(name, vocab_size=tok.vocab_size))
    ids = torch.tensor(tok.encode("to be or not to be, that is the question. " * 2))
    x, y = ids[None, :32], ids[None, 1:33]
    # gpt2-small-sized rates (GPT-2 used 6e-4): at 3e-3 the 768-wide preset overshoots.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    # The zero-initialised projections learn (they get gradients through the residual stream).
    assert model.trf_blocks[0].att.out_proj.weight.any()
    assert model.trf_blocks[0].ff.fc2.weight.any()


# -- inference paths --------------------------------------------------------------------------
def _trained_modern(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(modern_tiny(logit_softcap=15.0))  # the cap is an option: check its paths
    with torch.no_grad():  # leave the zero init, so that every layer takes part
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.out_head.weight.mul_(100)  # logits large enough for the cap to act
    return model.eval()


def test_decode_step_and_cached_generation_equal_the_full_forward():
    model = _trained_modern()
    prompt = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(prompt, cache=cache)
        step = DecodeStep(model)
        nxt = torch.tensor([9, 10])
        logits = step(nxt, cache)
        full = model(torch.cat([prompt, nxt[:, None]], 1))[:, -1]
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    assert full.abs().max() > 5 and logits.abs().max() <= 15.0  # the cap is in both
    cached = generate(model, prompt, 10, use_cache=True)
    uncached = generate(model, prompt, 10, use_cache=False)
    assert torch.equal(cached, uncached)


# -- smear and attention gates ----------------------------------------------------------------
def test_smear_gate_on_a_known_input():
    gate = SmearGate(4, width=2)
    with torch.no_grad():
        gate.scale.fill_(0.5)
        gate.weight.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[[1.0, 0, 2, 3], [2.0, 2, 0, 1], [0.0, 3, 1, 1]]])
    want = x.clone()
    for t in (1, 2):  # x_t + 0.5·σ(x_t0 − x_t1)·x_{t−1}; the first token has no previous one
        want[0, t] += 0.5 * torch.sigmoid(x[0, t, 0] - x[0, t, 1]) * x[0, t - 1]
    assert torch.allclose(gate(x), want)
    prev = torch.tensor([[1.0, 1, 1, 1]])  # a continuation: x[:, 0] has a previous token too
    want[0, 0] += 0.5 * torch.sigmoid(x[0, 0, 0] - x[0, 0, 1]) * prev[0]
    assert torch.allclose(gate(x, prev), want)


def test_attention_gate_on_a_known_input():
    gate = AttentionGate(4, n_heads=2, width=2)
    with torch.no_grad():
        gate.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
    x = torch.tensor([[[1.0, 0, 2, 3], [2.0, 2, 0, 1], [0.0, 3, 1, 1]]])  # (B, T, d)
    heads = torch.randn(1, 2, 3, 5)  # (B, H, T, head_dim)
    want = heads.clone()
    for t in range(3):  # head 0: σ(x_t0 − x_t1); head 1: σ(2·x_t1)
        want[0, 0, t] *= torch.sigmoid(x[0, t, 0] - x[0, t, 1])
        want[0, 1, t] *= torch.sigmoid(2 * x[0, t, 1])
    assert torch.allclose(gate(x, heads), want)
    model = GPTModel(modern_tiny(attn_gate=True))
    hidden, matrices, _ = split_for_muon(model)  # the gates' small matrices stay with AdamW
    gates = {id(b.att.gate.weight) for b in model.trf_blocks}
    assert gates <= {id(p) for p in matrices} and not gates & {id(p) for p in hidden}


def _open_gates(model: GPTModel) -> None:
    """Gates that act (both start neutral): the smear's scale up, the attention gates drawn."""
    if model.smear is not None:
        model.smear.scale.fill_(2.0)
    for block in model.trf_blocks:
        if block.att.gate is not None:
            block.att.gate.weight.normal_()


@pytest.mark.parametrize("smear, attn_gate", [(True, False), (False, True), (True, True)])
def test_gates_start_neutral_and_cached_decoding_equals_the_full_forward(smear, attn_gate):
    torch.manual_seed(0)
    plain = GPTModel(modern_tiny(smear=False, attn_gate=False))
    torch.manual_seed(0)
    model = GPTModel(modern_tiny(smear=smear, attn_gate=attn_gate))  # zeros draw nothing
    assert (model.smear is not None, model.trf_blocks[0].att.gate is not None) == (smear, attn_gate)
    idx = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))  # a neutral gate (zero projections behind)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        _open_gates(model)
    model.eval()
    with torch.no_grad():
        full = model(idx)[:, 5:]
        assert not torch.allclose(full, plain(idx)[:, 5:], atol=1e-3)  # the gate acts
        decode = DecodeStep(model)  # the one-token path, with the gates in it
        for step in (
            lambda t, cache: model(idx[:, t : t + 1], cache=cache)[:, -1],
            lambda t, cache: decode(idx[:, t], cache),
        ):
            cache = model.new_cache(2, 16)
            model(idx[:, :5], cache=cache)  # a prefill, then one token at a time
            steps = [step(t, cache) for t in range(5, 12)]
            assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)
    assert torch.equal(
        generate(model, idx, 10, use_cache=True), generate(model, idx, 10, use_cache=False)
    )


def test_head_logits_is_the_forward_head():
    model = _trained_modern()
    idx = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model.head_logits(model(idx, return_hidden=True)), model(idx))


def test_modern_checkpoint_and_config_json_round_trip(tmp_path):
    config = modern_tiny(logit_softcap=15.0)
    config.to_json(tmp_path / "c.json")
    back = ModelConfig.from_json(tmp_path / "c.json")
    assert back == config
    assert (back.norm, back.ffn, back.logit_softcap, back.zero_init_proj) == (
        "layernorm",
        "gelu",
        15.0,
        True,
    )
    old = {
        k: v for k, v in tiny().to_dict().items() if k not in ("zero_init_proj", "logit_softcap")
    }
    assert ModelConfig.from_dict(old) == tiny()  # configs written before the options still load
    model = _trained_modern()
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    loaded = load_checkpoint(tmp_path / "ckpt").model
    idx = torch.randint(0, 257, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


@pytest.mark.parametrize(
    "kw, what",
    [
        (dict(ffn="relu2"), "ffn=relu2"),
        (dict(norm="rmsnorm_noparam"), "norm=rmsnorm_noparam"),
        (dict(logit_softcap=30.0), "logit_softcap"),
        (dict(smear=True), "smear"),
        (dict(attn_gate=True), "attn_gate"),
    ],
)
def test_hub_export_refuses_the_modern_options(kw, what):
    with pytest.raises(InputError, match=what):
        export_spec(tiny(**kw), "model")
    rope = dict(pos_embedding="rope", norm="rmsnorm", ffn="swiglu", bias=False)
    with pytest.raises(InputError, match=what):
        export_spec(tiny(**{**rope, **kw}), "model")


def test_hub_export_refuses_the_modern_presets_and_keeps_zero_init():
    with pytest.raises(InputError, match="smear, attn_gate"):
        export_spec(ModelConfig.from_preset("gpt-modern-nano"), "model")
    # Nor has any Hugging Face architecture RoPE with LayerNorm and GELU.
    with pytest.raises(InputError, match="pos_embedding=rope, norm=layernorm"):
        plain = ModelConfig.from_preset("gpt-modern-nano", smear=False, attn_gate=False)
        export_spec(plain, "model")
    assert export_spec(tiny(zero_init_proj=True), "model").family == "gpt2"  # only the init
