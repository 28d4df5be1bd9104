"""`DecodeStep` against `GPTModel.forward`: the same logits and cache for every architecture,
weight format and cache kind, and the fallback to `forward` where hooks or dropout must run."""

from __future__ import annotations

import copy

import pytest
import torch

from scratchllm import GPTModel, ModelConfig
from scratchllm.inference import kernels
from scratchllm.inference.decode import DecodeStep
from scratchllm.inference.weights import pack_linears, quantize_fp16, quantize_int8
from scratchllm.model.attention import BatchKVCache
from scratchllm.model.lora import apply_lora

ARCHS = {
    "gpt2": {"tie_embeddings": True},
    # ReLU² in the GPT-2 block; RoPE, QK-norm and the smear and attention gates (the speedrun
    # recipe's) with ReLU²; parameter-free RMSNorm (QK-norm without weights too).
    "gpt2-relu2": {"ffn": "relu2"},
    "modern": dict(
        pos_embedding="rope", qk_norm=True, ffn="relu2", bias=False, smear=True, attn_gate=True
    ),
    "noparam": dict(pos_embedding="rope", norm="rmsnorm_noparam", ffn="gelu", qk_norm=True),
    # RoPE, RMSNorm, SwiGLU, grouped-query heads, QK-norm (Qwen3): every branch of the block.
    "llama": dict(
        pos_embedding="rope",
        norm="rmsnorm",
        ffn="swiglu",
        n_kv_heads=2,
        bias=False,
        hidden_dim=64,
        qk_norm=True,
    ),
}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7, 7, 7, 7, 7]]


def make_model(arch: str) -> GPTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257,
        context_length=32,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.1,
        **ARCHS[arch],
    )
    model = GPTModel(config).eval()
    with torch.no_grad():  # non-trivial norm weights and open gates, so a skipped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "gate" in name or "smear" in name:  # both start neutral (zeros)
                p.normal_()
    return model


def convert(model: GPTModel, fmt: str) -> GPTModel:
    if fmt == "plain":
        return model
    if fmt == "lora":
        apply_lora(model, rank=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # B starts at zero: make the adapters count
        return model.eval()
    if fmt.startswith("packed-"):
        return pack_linears(model, layout=fmt.removeprefix("packed-"))
    if fmt == "fp16" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm in this torch")
    return quantize_fp16(model) if fmt == "fp16" else quantize_int8(model)


def prefill(
    model: GPTModel, prompts: list[list[int]], kv_dtype: torch.dtype = torch.float32
) -> BatchKVCache:
    """Right-padded prefill of `prompts` into a fresh cache, as the engine does it."""
    lengths = [len(p) for p in prompts]
    idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, : len(p)] = torch.tensor(p)
    cache = BatchKVCache(model.config, len(prompts), 24, dtype=kv_dtype)
    with torch.no_grad():
        model(idx, cache=cache)
    cache.set_lengths(lengths)
    return cache


def forward_step(model: GPTModel, tokens: torch.Tensor, cache: BatchKVCache) -> torch.Tensor:
    return model(
        tokens[:, None], cache=cache, positions=cache.positions(), attn_mask=cache.decode_mask()
    )[:, -1]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "fmt", ["plain", "lora", "packed-gemv", "packed-onednn", "packed-both", "fp16", "int8"]
)
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one-row", "ragged"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
def test_decode_step_equals_forward(arch, fmt, prompts, kv_dtype, monkeypatch):
    """Both paths of the step: module calls, or (fp16/int8 weights, rows our kernels take) each
    block as one C call; over an fp32 or an fp16 cache."""
    model = convert(make_model(arch), fmt)
    step = DecodeStep(model)
    c_calls = []
    real = kernels.BoundLayer.__call__
    monkeypatch.setattr(kernels.BoundLayer, "__call__", lambda *a: c_calls.append(1) or real(*a))
    one_call = fmt in ("fp16", "int8") and kernels.available()
    assert (step.kernel_rows > 0) == one_call
    if one_call and fmt == "int8" and kernels.max_rows("int8") >= len(PROMPTS):
        assert step.kernel_rows >= len(PROMPTS)  # with VNNI: ragged rows take the kernels too
    ours, theirs = prefill(model, prompts, kv_dtype), prefill(model, prompts, kv_dtype)
    tokens = torch.tensor([p[-1] for p in prompts])
    with torch.no_grad():
        for _ in range(6):
            got = step(tokens, ours, ours.lengths, ours.decode_mask())
            want = forward_step(model, tokens, theirs)
            assert got.shape == want.shape == (len(prompts), 257)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
            assert ours.lengths_list == theirs.lengths_list
            tokens = want.argmax(-1)
    # Within one rounding of the cache's dtype (an fp32 value at a boundary may round apart).
    tol = {"atol": 1e-6} if kv_dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-4}
    for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=True):
        assert a.dtype == kv_dtype and torch.allclose(a.float(), b.float(), **tol)
    assert bool(c_calls) == (one_call and len(prompts) <= step.kernel_rows)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_decode_step_with_a_plain_kv_cache_in_bf16(arch):
    """The book loop's `KVCache` (every row at one length, no positions given), in bf16."""
    model = make_model(arch).to(torch.bfloat16)
    step = DecodeStep(model)
    prompt = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    ours, theirs = model.new_cache(2, 16), model.new_cache(2, 16)
    with torch.no_grad():
        model(prompt, cache=ours)
        model(prompt, cache=theirs)
        tokens = prompt[:, -1]
        for _ in range(4):
            got = step(tokens, ours)
            want = model(tokens[:, None], cache=theirs)[:, -1]
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, want)  # the same ops in the same order
            tokens = want.argmax(-1)
    assert ours.length == theirs.length == len(PROMPTS[0]) + 4


def test_hooks_and_training_mode_go_through_forward():
    model = make_model("gpt2")
    step = DecodeStep(model)
    tokens = torch.tensor([3])
    cache = prefill(model, PROMPTS[:1])
    handle = model.out_head.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        assert torch.equal(step(tokens, cache, cache.lengths), torch.zeros(1, 257))
        handle.remove()
        assert step(tokens, cache, cache.lengths).abs().sum() > 0
        model.train()  # dropout 0.1 applies again: two runs of one step differ
        a = step(tokens, copy.deepcopy(cache), cache.lengths)
        b = step(tokens, copy.deepcopy(cache), cache.lengths)
        assert not torch.equal(a, b)


def test_unsupported_models_are_refused():
    model = make_model("gpt2")
    model.set_attention_impl("explicit")  # the book's reference formula: forward only
    assert not DecodeStep.supports(model)
    with pytest.raises(ValueError, match="SDPA"):
        DecodeStep(model)
    assert not DecodeStep.supports(torch.nn.Linear(2, 2))


def test_a_full_context_is_refused_with_a_clear_error():
    from scratchllm.errors import InputError

    model = make_model("gpt2")
    cache = model.new_cache(1, 32)
    with torch.no_grad():
        model(torch.zeros(1, 32, dtype=torch.long), cache=cache)
        with pytest.raises(InputError, match="context length 32"):
            DecodeStep(model)(torch.tensor([1]), cache)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_engine_decodes_the_same_tokens_without_the_decode_step(arch, temperature):
    from scratchllm import ByteTokenizer
    from scratchllm.inference.engine import Engine, SamplingParams

    model = make_model(arch)
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=5, stop_ids=(), n=2)

    def tokens(**kw) -> list[list[int]]:
        engine = Engine(model, ByteTokenizer(), max_batch=8, **kw)
        return [c.token_ids for r in engine.generate(PROMPTS, params) for c in r]

    assert tokens() == tokens(decode_step=False)


def test_the_engine_keeps_an_fp16_cache_for_fp16_and_int8_weights():
    """As llama.cpp's default: half the bytes a decode step reads; fp32 and bf16 models keep
    their activation dtype (their cache rounds nothing the model does not)."""
    from scratchllm import ByteTokenizer
    from scratchllm.inference.engine import Engine, SamplingParams

    def engine(model: GPTModel) -> Engine:
        return Engine(model, ByteTokenizer(), max_batch=4)

    assert engine(make_model("gpt2")).kv_dtype == torch.float32
    assert engine(make_model("gpt2").to(torch.bfloat16)).kv_dtype == torch.bfloat16
    params = SamplingParams(max_tokens=6, temperature=0.0, stop_ids=())
    for fmt in ("fp16", "int8"):
        quantized = engine(convert(make_model("gpt2"), fmt))
        assert quantized.kv_dtype == torch.float16
        [done] = quantized.generate(PROMPTS[:1], params)
        assert len(done[0].token_ids) == 6
    wide = Engine(convert(make_model("gpt2"), "int8"), ByteTokenizer(), kv_dtype=torch.float32)
    assert wide.kv_dtype == torch.float32
