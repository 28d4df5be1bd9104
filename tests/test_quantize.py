"""CPU decoding weight formats: weight-only int8 (error bounds, greedy agreement, engine batching,
the CLI flag) and oneDNN-packed fp32 linears (same outputs as nn.Linear, on by default in the CLI)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.weights import (
    Fp16Linear,
    Int8Linear,
    PackedLinear,
    check_quantize,
    dynamic_int8_available,
    gemv_splits,
    has_onednn,
    int8_weight_levels,
    linear_weight_bytes,
    pack_linears,
    quantize_fp16,
    quantize_int8,
    quantize_weight,
)
from scratchllm.model.lora import LoRALinear, apply_lora, has_lora

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [42], [7, 7, 7, 7], [200, 100]]
GREEDY_TOKENS = 16


def make_model(kind: str = "gpt2", **kw) -> GPTModel:
    torch.manual_seed(0)
    config = dict(
        vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    if kind == "llama":
        config.update(
            pos_embedding="rope",
            norm="rmsnorm",
            ffn="swiglu",
            n_kv_heads=2,
            bias=False,
            hidden_dim=64,
        )
    config.update(kw)
    return GPTModel(ModelConfig(**config)).eval()


def error_bound(x: torch.Tensor, layer: nn.Linear, q: Int8Linear) -> torch.Tensor:
    """Worst-case |int8 output − float output| per element.

    Each dequantized weight is off by at most half a step (scale/2). The CPU kernel also rounds
    the activations and its output to bf16 (relative error ≤ 2⁻⁹ each, taken as 2⁻⁸ here).
    """
    w = layer.weight.detach()
    scales = q.scales.float()
    ax = x.abs()
    per_step = ax.sum(-1, keepdim=True) * scales / 2
    act_rounding = 2.0**-8 * (ax @ (w.abs() + scales[:, None] / 2).T)
    y = nn.functional.linear(x, w, layer.bias)
    return per_step + act_rounding + 2.0**-8 * y.abs() + 1e-6


def dynamic_error_bound(x: torch.Tensor, layer: nn.Linear, q: Int8Linear) -> torch.Tensor:
    """Worst-case |W8A8 output − float output| per element.

    Σ xq·wq − x·w = Σ (xq − x)·wq + Σ x·(wq − w): each activation is off by at most half a step
    of its row's 8-bit grid (absmax/255), each weight by half its row's scale (absmax/127, or
    /63 where the weights get 7 bits)."""
    w = layer.weight.detach()
    scales = q.scales.float()
    half_act = x.abs().amax(-1, keepdim=True) / 255
    act = half_act * q.dequantized_weight().abs().sum(1) * 1.01
    weight = x.abs().sum(-1, keepdim=True) * scales / 2
    y = nn.functional.linear(x, w, layer.bias)
    return act + weight + 1e-5 * y.abs() + 1e-5


needs_w8a8 = pytest.mark.skipif(
    not dynamic_int8_available(), reason="this torch build has no fbgemm dynamic int8 linear"
)


@needs_w8a8
def test_w8a8_linear_is_within_its_bound_and_rounds_each_row_alone(int8_fp16_path):
    torch.manual_seed(0)
    layer = nn.Linear(256, 384)
    q = Int8Linear.from_linear(layer)  # activations="dynamic": W8A8 where fbgemm has it
    # Rows of very different scales: one grid for the batch would round the small rows coarsely.
    x = torch.randn(3, 5, 256) * torch.logspace(-2, 1, 5)[None, :, None]
    with torch.no_grad():
        ref, out = layer(x), q(x)
        alone = torch.cat([q(row[None]) for row in x.reshape(-1, 256)])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ((out - ref).abs() <= dynamic_error_bound(x, layer, q)).all()
    rel = (out - ref).pow(2).mean(-1).sqrt() / ref.pow(2).mean(-1).sqrt()
    assert float(rel.max()) < 0.03  # every row, the small ones too
    # Each row is rounded on its own grid: alone or in a batch, the same output.
    torch.testing.assert_close(alone, out.reshape(-1, 384), rtol=1e-6, atol=1e-6)
    # And not on the weight-only kernel: the activations' rounding shows.
    weight_only = Int8Linear.from_linear(layer, activations="weight")
    with torch.no_grad():
        assert not torch.allclose(weight_only(x.bfloat16()).float(), out, atol=1e-4)


@needs_w8a8
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_w8a8_full_range_products_do_not_saturate(sign, int8_fp16_path):
    # Every activation at its row's absmax and every weight at its largest: without VNNI,
    # 8-bit weights would overflow AVX2's int16 pair sums here; the 7 or 8 bits chosen for
    # this CPU (`int8_weight_levels`) must give the exact sum within the rounding.
    layer = nn.Linear(256, 16, bias=False)
    with torch.no_grad():
        layer.weight.fill_(sign)
    q = Int8Linear.from_linear(layer)
    x = torch.ones(2, 256)
    x[1, ::2] = -1.0  # and a row of mixed signs
    with torch.no_grad():
        torch.testing.assert_close(q(x), layer(x), rtol=0.01, atol=0.01 * 256)


@needs_w8a8
def test_w8a8_repacks_after_an_edit_in_place(int8_fp16_path):
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = q(x)
        q.scales.mul_(2)  # the packed copy is stale now: it must be rebuilt
        torch.testing.assert_close(q(x), 2 * before)


@needs_w8a8
def test_weight_bits_follow_vnni(monkeypatch):
    from scratchllm.inference import weights
    from scratchllm.train import throughput

    def cpu(*flags):
        return lambda: throughput.CpuInfo(2, 3.0, frozenset({"avx2", *flags}))

    cache = weights._saturating_int8_products.cache_clear
    for flags, levels in [((), 63), (("avx512_vnni",), 127), (("avx_vnni",), 63)]:
        monkeypatch.setattr(throughput, "read_cpu_info", cpu(*flags))
        cache()
        assert int8_weight_levels() == levels, flags
        assert int8_weight_levels("weight") == 127  # no int16 pair sums in that kernel
    monkeypatch.setattr(throughput, "read_cpu_info", lambda: None)
    cache()
    assert int8_weight_levels() == 63  # unknown CPU: the safe 7 bits
    monkeypatch.undo()  # this CPU again, so the cache the later tests read is its own
    cache()
    layer = nn.Linear(64, 8)
    assert Int8Linear.from_linear(layer).weight_int8.abs().max() == int8_weight_levels()


@pytest.mark.parametrize("in_features", [256, 100])  # 100: not a kernel width, dequantize path
def test_int8_weight_only_linear_is_within_the_quantization_bound(in_features):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, 384)
    q = Int8Linear.from_linear(layer, activations="weight")
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (384, in_features)
    assert int(q.weight_int8.abs().max()) == 127  # every row uses the full range
    x = torch.randn(3, 5, in_features)
    with torch.no_grad():
        ref = layer(x)
        out = q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out - ref).abs()
    assert (err <= error_bound(x, layer, q)).all()
    # Typical error: the rounding noise of 8-bit weights, ~0.8 % of the output's rms.
    rel = float(err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert 1e-4 < rel < 0.015
    # bf16 activations run through the same kernel; the output keeps the input dtype.
    out16 = q(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    assert float((out16.float() - ref).abs().max() / ref.abs().max()) < 0.03


def test_quantize_weight_round_trips_within_half_a_step():
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    assert (q.float() * scales[:, None] - w).abs().le(scales[:, None] / 2 + 1e-12).all()
    zero_q, zero_s = quantize_weight(torch.zeros(2, 32))  # an all-zero row: no division by zero
    assert (zero_q == 0).all() and torch.isfinite(zero_s).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_quantized_model_shrinks_and_keeps_greedy_tokens(kind):
    model = make_model(kind)
    before = linear_weight_bytes(model)
    quant = quantize_int8(copy.deepcopy(model))
    linears = [n for n, m in quant.named_modules() if isinstance(m, nn.Linear)]
    assert linears == []  # every block linear and the head
    int8 = [m for m in quant.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 2 * (4 if kind == "gpt2" else 5) + 1
    assert all(m.weight_int8.dtype == torch.int8 for m in int8)
    assert torch.equal(quant.tok_emb.weight, model.tok_emb.weight)  # embeddings stay float
    ratio = before / linear_weight_bytes(quant)
    assert 3.5 < ratio <= 4.0  # int8 plus one bf16 scale per output row

    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        a, b = model(ids), quant(ids)
    assert float((a - b).abs().max() / a.std()) < 0.05

    assert _greedy_flips_beyond_near_ties(model, quant) == 0


def _greedy_flips_beyond_near_ties(model: GPTModel, quant: GPTModel) -> int:
    """Steps of fp32's greedy continuations of PROMPTS where the quantized model's top token
    differs although fp32's top two logits are more than a near-tie apart (0.1 of the logits'
    std: twice the 5% error allowed above).

    A random model has near-ties, so a flip there does not mean a bug (where int8 weights get 7
    bits, the llama model flips two, at margins of 0.0004 and 0.004 of the logits' std); a flip
    of a clear winner does."""
    params = SamplingParams(max_tokens=GREEDY_TOKENS, stop_ids=())
    ref = Engine(model, ByteTokenizer()).generate(PROMPTS, params)
    bad = 0
    for prompt, done in zip(PROMPTS, ref, strict=True):
        ids = torch.tensor([prompt + done[0].token_ids[:-1]])
        with torch.no_grad():
            a, b = model(ids)[0, len(prompt) - 1 :], quant(ids)[0, len(prompt) - 1 :]
        top2 = a.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.1 * a.std()
        bad += int(((a.argmax(-1) != b.argmax(-1)) & clear).sum())
    return bad


def test_broken_quantization_would_fail_the_greedy_check():
    # The greedy check above is not vacuous: a wrong scale (here 10 % off in one layer's rows)
    # flips clear winners.
    model = make_model()
    quant = quantize_int8(copy.deepcopy(model))
    with torch.no_grad():
        quant.out_head.scales.mul_(1 + 0.1 * torch.randn_like(quant.out_head.scales.float()))
    assert _greedy_flips_beyond_near_ties(model, quant) > 0


def test_engine_batched_equals_one_by_one_with_int8():
    quant = quantize_int8(make_model("llama"))
    params = SamplingParams(max_tokens=20, stop_ids=())
    alone = [Engine(quant, ByteTokenizer()).generate([p], params)[0][0] for p in PROMPTS]
    engine = Engine(quant, ByteTokenizer(), max_batch=8)
    together = engine.generate(PROMPTS, params)
    assert [c[0].token_ids for c in together] == [c.token_ids for c in alone]
    assert engine.peak_batch == len(PROMPTS)


def test_bfloat16_model_quantizes_and_runs():
    quant = quantize_int8(make_model()).to(torch.bfloat16)
    assert all(
        m.weight_int8.dtype == torch.int8 for m in quant.modules() if isinstance(m, Int8Linear)
    )
    out = Engine(quant, ByteTokenizer()).generate(PROMPTS[:2], SamplingParams(max_tokens=8))
    assert all(len(c[0].token_ids) <= 8 for c in out)


def adapted_model() -> tuple[GPTModel, torch.Tensor, torch.Tensor]:
    """A model with LoRA adapters holding a non-zero update (so merging matters), a prompt and
    the adapted model's logits for it."""
    model = make_model()
    apply_lora(model, rank=2, alpha=4.0)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.05)
        adapted = model(ids)
    return model, ids, adapted


def test_lora_is_merged_before_quantizing():
    model, ids, adapted = adapted_model()
    quant = quantize_int8(model)
    assert not has_lora(quant)
    with torch.no_grad():
        out = quant(ids)
    assert float((out - adapted).abs().max() / adapted.std()) < 0.05


def test_tied_head_gets_its_own_int8_copy():
    model = make_model(tie_embeddings=True)
    assert model.out_head.weight is model.tok_emb.weight
    emb = model.tok_emb.weight.detach().clone()
    quant = quantize_int8(model)
    assert isinstance(quant.out_head, Int8Linear)
    assert quant.tok_emb.weight.dtype == torch.float32 and torch.equal(quant.tok_emb.weight, emb)
    step = quant.out_head.scales.float()[:, None] / 2
    assert (quant.out_head.dequantized_weight() - emb).abs().le(step + 1e-12).all()
    kept = quantize_int8(make_model(tie_embeddings=True), skip=("out_head",))
    assert kept.out_head.weight is kept.tok_emb.weight  # skipped: still tied


def test_skip_keeps_named_layers_in_float():
    model = make_model()
    head = model.out_head.weight.detach().clone()
    quant = quantize_int8(model, skip=("out_head", "ff.fc2"))
    assert type(quant.out_head) is nn.Linear and torch.equal(quant.out_head.weight, head)
    assert all(type(b.ff.fc2) is nn.Linear for b in quant.trf_blocks)
    assert all(isinstance(b.ff.fc1, Int8Linear) for b in quant.trf_blocks)


def test_bad_values_and_devices_are_input_errors():
    assert check_quantize(None) is None and check_quantize("none") is None
    assert check_quantize("int8", "cpu") == "int8"
    with pytest.raises(InputError, match="int8"):
        check_quantize("int4")
    with pytest.raises(InputError, match="CPU"):
        check_quantize("int8", "cuda")


@pytest.fixture
def checkpoint(tmp_path):
    from scratchllm.checkpoint import save_checkpoint

    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    return tmp_path / "ckpt", model


def test_load_checkpoint_quantizes(checkpoint):
    from scratchllm.checkpoint import load_checkpoint

    path, _ = checkpoint
    ckpt = load_checkpoint(path, "cpu", torch.bfloat16, quantize="int8")
    assert isinstance(ckpt.model.out_head, Int8Linear)
    assert ckpt.model.trf_blocks[0].att.qkv.weight_int8.dtype == torch.int8
    assert ckpt.model.tok_emb.weight.dtype == torch.bfloat16


def test_generate_command_with_quantize_flag(checkpoint, capsys):
    from scratchllm.cli import main
    from scratchllm.inference.generate import generate_text

    path, model = checkpoint
    argv = ["generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "12"]
    assert main([*argv, "--quantize", "int8"]) == 0
    text = capsys.readouterr().out
    expected = generate_text(
        quantize_int8(copy.deepcopy(model)), ByteTokenizer(), "abc", max_new_tokens=12
    )
    assert text == expected + "\n"
    assert main([*argv, "--quantize", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize" in err[0] and "int4" in err[0]


# -- oneDNN-packed fp32 linears ---------------------------------------------------------------


def assert_same_greedy_alone_and_batched(model: GPTModel, converted: GPTModel) -> None:
    """`converted` decodes `model`'s greedy tokens for every prompt, one by one and batched."""
    params = SamplingParams(max_tokens=GREEDY_TOKENS, stop_ids=())
    ref = [c[0].token_ids for c in Engine(model, ByteTokenizer()).generate(PROMPTS, params)]
    alone = [Engine(converted, ByteTokenizer()).generate([p], params)[0][0] for p in PROMPTS]
    together = Engine(converted, ByteTokenizer(), max_batch=8).generate(PROMPTS, params)
    assert [c.token_ids for c in alone] == ref
    assert [c[0].token_ids for c in together] == ref


needs_onednn = pytest.mark.skipif(not has_onednn(), reason="this torch build has no oneDNN linear")
LAYOUTS = [
    "gemv",
    pytest.param("onednn", marks=needs_onednn),
    pytest.param("both", marks=needs_onednn),
]


def test_gemv_splits_divide_the_inputs_among_the_threads():
    assert gemv_splits(768, 2) == 2
    assert gemv_splits(768, 5) == 4  # the largest divisor within the thread count
    assert gemv_splits(768, 1) == 1
    assert gemv_splits(100, 3) == 2
    assert gemv_splits(17, 2) == 1  # slices of fewer than 16 inputs: not split
    assert gemv_splits(64, 16) == 4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(33, 17), (768, 3072), (50, 100)])
@pytest.mark.parametrize("rows", [(1,), (1, 1), (3,), (2, 7)])
def test_packed_linear_equals_nn_linear(shape, rows, layout, two_threads):
    torch.manual_seed(0)
    out_f, in_f = shape
    layer = nn.Linear(in_f, out_f)
    packed = PackedLinear(layer, layout=layout)
    x = torch.randn(*rows, in_f)
    with torch.no_grad():
        ref, out = layer(x), packed(x)
    assert out.shape == ref.shape == (*rows, out_f)
    # Same fp32 products, another summation order: a few ulps of the sum of |terms|.
    bound = 4 * in_f * torch.finfo(torch.float32).eps * (x.abs() @ layer.weight.abs().T + 1)
    assert (out - ref).abs().le(bound).all()
    assert not packed.state_dict().keys() - {"bias"}  # the packed weights are not saved


@needs_onednn
def test_both_layouts_route_one_row_to_gemv_and_batches_to_onednn(two_threads):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    packed = PackedLinear(layer, layout="both")
    packed.weight_t.zero_()  # now only the oneDNN layout still holds the real weight
    with torch.no_grad():
        one, many = packed(torch.randn(1, 64)), packed(x := torch.randn(3, 64))
        assert torch.equal(one, layer.bias.expand(1, 48))
        assert torch.allclose(many, layer(x), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_packed_model_keeps_greedy_tokens_and_batching(kind, layout, two_threads):
    model = make_model(kind, tie_embeddings=kind == "gpt2")
    packed = pack_linears(copy.deepcopy(model), layout=layout)
    assert isinstance(packed.out_head, PackedLinear)
    assert all(isinstance(b.ff.fc1, PackedLinear) for b in packed.trf_blocks)
    assert {b.att.qkv.layout for b in packed.trf_blocks} == {layout}
    assert linear_weight_bytes(packed) == linear_weight_bytes(model)
    assert_same_greedy_alone_and_batched(model, packed)


def test_packed_model_refuses_gradients_and_merges_lora():
    model, ids, adapted = adapted_model()
    with torch.no_grad():
        packed = pack_linears(model)
        assert not has_lora(packed)
        assert torch.allclose(packed(ids), adapted, atol=1e-5)
    with pytest.raises(RuntimeError, match="inference-only"):
        packed.trf_blocks[0].ff.fc1(torch.randn(1, 32, requires_grad=True))


def test_models_that_cannot_be_packed_are_left_as_they_are():
    bf16 = pack_linears(make_model().to(torch.bfloat16))
    assert type(bf16.out_head) is nn.Linear
    assert all(type(b.att.qkv) is nn.Linear for b in bf16.trf_blocks)


@needs_onednn
def test_cli_packs_by_default_and_no_pack_gives_the_same_text(checkpoint, capsys):
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.cli import build_parser, main
    from scratchllm.commands._inference import load_model
    from scratchllm.inference.generate import generate_text

    path, model = checkpoint
    argv = ["generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "12"]
    assert main(argv) == 0
    packed_text = capsys.readouterr().out
    assert main([*argv, "--no-pack"]) == 0
    assert capsys.readouterr().out == packed_text
    assert packed_text == generate_text(model, ByteTokenizer(), "abc", max_new_tokens=12) + "\n"
    assert main([*argv, "--pack", "onednn"]) == 0
    assert capsys.readouterr().out == packed_text

    def head(command: list[str], rows: int = 1) -> nn.Module:
        args = build_parser().parse_args([*command, "--checkpoint", str(path)])
        return load_model(args, rows).model.out_head

    generate = ["generate", "--prompt", "x"]
    assert head(generate).layout == "gemv"  # one sequence: the one-row layout alone
    assert head(["serve"], rows=8).layout == "both"
    assert head(["serve", "--pack", "onednn"], rows=8).layout == "onednn"
    assert type(head([*generate, "--no-pack"])) is nn.Linear
    assert type(load_checkpoint(path).model.out_head) is nn.Linear  # the library default
    with pytest.raises(SystemExit) as exit_info:  # argparse: one usage line, exit 2
        main([*argv, "--pack", "rowmajor"])
    assert exit_info.value.code == 2 and "--pack" in capsys.readouterr().err


# -- fp16 weights --------------------------------------------------------------------------------

needs_fbgemm = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm in this torch"
)


@needs_fbgemm
def test_fp16_linear_rounds_only_the_weights(int8_fp16_path):
    torch.manual_seed(0)
    layer = nn.Linear(96, 200)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-3, 1, 200)[:, None])  # rows of very different scale
    q = Fp16Linear(layer)
    w16 = q.weight_fp32()
    assert torch.equal(w16, layer.weight.detach().half().float())  # round-to-nearest fp16
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        ref, out = layer(x), q(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # |ΔW| ≤ 2⁻¹¹|W| per weight, plus fp32 summation rounding.
    bound = (2.0**-11 + 96 * 2.0**-23) * (x.abs() @ layer.weight.detach().abs().T) + 1e-6
    assert ((out - ref).abs() <= bound).all()
    assert (out - ref).abs().max() > 0  # the weights really are rounded
    assert q(x.bfloat16()).dtype == torch.bfloat16


@needs_fbgemm
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_fp16_model_halves_bytes_and_keeps_greedy_tokens(kind):
    model = make_model(kind, tie_embeddings=kind == "gpt2")
    quant = quantize_fp16(copy.deepcopy(model))
    assert [n for n, m in quant.named_modules() if isinstance(m, nn.Linear)] == []
    assert isinstance(quant.out_head, Fp16Linear)
    assert torch.equal(quant.tok_emb.weight, model.tok_emb.weight)  # the embedding stays fp32
    assert linear_weight_bytes(model) == 2 * linear_weight_bytes(quant)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        a, b = model(ids), quant(ids)
    assert 0 < float((a - b).abs().max() / a.std()) < 0.005
    assert_same_greedy_alone_and_batched(model, quant)


@needs_fbgemm
def test_fp16_from_the_cli_and_checkpoint(checkpoint, capsys):
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.cli import main
    from scratchllm.inference.generate import generate_text

    path, model = checkpoint
    ckpt = load_checkpoint(path, "cpu", torch.bfloat16, quantize="fp16")
    assert isinstance(ckpt.model.trf_blocks[0].att.qkv, Fp16Linear)
    assert ckpt.model.tok_emb.weight.dtype == torch.bfloat16
    argv = ["generate", "--checkpoint", str(path), "--prompt", "abc", "--max-new-tokens", "12"]
    assert main([*argv, "--quantize", "fp16"]) == 0
    expected = generate_text(
        quantize_fp16(copy.deepcopy(model)), ByteTokenizer(), "abc", max_new_tokens=12
    )
    assert capsys.readouterr().out == expected + "\n"
    assert check_quantize("fp16", "cpu") == "fp16"
    with pytest.raises(InputError, match="CPU"):
        check_quantize("fp16", "cuda")
