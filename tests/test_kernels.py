"""Our CPU decode kernels (inference/kernels.c) against exact arithmetic, and their fallback."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchllm.inference import kernels
from scratchllm.inference.weights import Fp16Linear, Int8Linear, dynamic_int8_available

# (rows, in, out): a gpt2-small layer, a head-like wide output, and widths that leave a tail
# after the 32-, 16- and 8-wide vector loops.
SHAPES = [(1, 768, 2304), (8, 768, 300), (3, 100, 37), (5, 33, 7), (16, 48, 9), (2, 7, 3)]


def _cpu_has(*flags: str) -> bool:
    from scratchllm.train.throughput import read_cpu_info

    info = read_cpu_info()
    return info is not None and all(f in info.flags for f in flags)


# The paths kernels.c has: what this CPU builds natively, AVX-512 without VNNI (int16 products),
# AVX2, plain C; each where this CPU can run it.
ISAS = {
    "native": ("", ()),
    "avx512": ("-march=skylake-avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    "avx2": ("-march=haswell", ("avx2", "fma", "f16c")),
    "plain": ("-march=x86-64", ()),
}


@pytest.fixture(params=list(ISAS))
def built(request, monkeypatch):
    """The kernels built for each path this CPU can run, once per machine into the cache; a
    missing compiler skips, a failed build fails."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the layers use PyTorch's kernels")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("our kernels are built for x86-64 only")
    flags, needs = ISAS[request.param]
    if needs and not _cpu_has(*needs):
        pytest.skip(f"this CPU cannot run the {request.param} path")
    monkeypatch.setenv("SCRATCHLLM_KERNELS", "1")
    monkeypatch.setenv("SCRATCHLLM_KERNEL_CFLAGS", flags)
    kernels._library.cache_clear()
    yield
    kernels._library.cache_clear()


def _inputs(m: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[0, : min(k, 4)] *= 20  # an outlier sets the row's scale, as in real activations
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    return x, w, scales, bias


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_is_exact_integer_arithmetic(built, shape, with_bias):
    """Each row rounded to integers on the grid absmax · 2/255 (half to even, clamped to
    [-128, 127]), then an exact integer dot product and fp32 rescaling: only the final fp32
    products and the bias add round."""
    assert kernels.available()
    x, w, scales, bias = _inputs(*shape)
    bias = bias if with_bias else None
    y = kernels.bind_w8a8(w, scales, bias)(x)
    absmax = x.abs().amax(dim=1, keepdim=True)
    step = torch.tensor(2.0 / 255.0, dtype=torch.float32)
    q = torch.round(x / absmax * (1 / step)).clamp(-128, 127).to(torch.int64)
    assert (q.abs().amax(dim=1) >= 127).all() and q.min() >= -128  # the absmax at an end
    exact = (q @ w.to(torch.int64).T).double() * (absmax * step).double() * scales.double()
    if bias is not None:
        exact = exact + bias.double()
    assert y.shape == (shape[0], shape[2]) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not dynamic_int8_available(), reason="no fbgemm dynamic int8 linear")
def test_w8a8_gives_the_integers_of_the_fbgemm_path(built):
    """The kernel (decode rows) and fbgemm (`Int8Linear._w8a8`: prefill, larger batches) round
    a row to the same integers, so a request's tokens do not depend on which one served it;
    the outputs differ only by fp32 rounding of the rescaling."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(768, 300))
    rows = kernels.max_rows("int8")
    x = torch.randn(rows, 768) * torch.logspace(-2, 1, rows)[:, None]
    with torch.no_grad():
        ours = layer._kernel()(x)
        theirs = layer._w8a8(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


def test_w8a8_row_is_independent_of_the_batch(built):
    """A request decodes the same whatever else is in the batch: bit for bit."""
    x, w, scales, bias = _inputs(8, 768, 257)  # 8 rows: more than the layers send, still right
    together = kernels.bind_w8a8(w, scales, bias)(x)
    for i in range(8):
        alone = kernels.bind_w8a8(w, scales, bias)(x[i : i + 1])
        assert torch.equal(alone[0], together[i])


def test_w8a8_refuses_more_rows_than_it_holds(built):
    x, w, scales, bias = _inputs(65, 64, 5)
    with pytest.raises(RuntimeError, match="65 rows"):
        kernels.bind_w8a8(w, scales, bias)(x)


def test_w8a8_zero_row(built):
    x, w, scales, bias = _inputs(2, 64, 5)
    x[1] = 0
    y = kernels.bind_w8a8(w, scales, bias)(x)
    torch.testing.assert_close(y[1], bias)


@pytest.mark.parametrize("shape", SHAPES)
def test_f16_matches_float64_of_the_rounded_weight(built, shape):
    m, k, n = shape
    x, _, _, bias = _inputs(m, k, n)
    w = (torch.randn(n, k) * 0.05).half()
    w[0, 0] = 6e-6  # a subnormal in fp16: the tail's own conversion must get it right
    y = kernels.bind_f16(w, bias)(x)
    exact = x.double() @ w.double().T + bias.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernels.bind_f16(w, None)(x).double(), exact - bias.double(),
                               rtol=1e-5, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_residual_is_added_in_the_call(built, kind):
    """`bound(x, residual)` is `bound(x) + residual` to the bit (the same fp32 adds in order);
    a residual of another shape or dtype is refused before the kernel writes."""
    x, w, scales, bias = _inputs(3, 100, 37)
    bound = (
        kernels.bind_w8a8(w, scales, bias)
        if kind == "int8"
        else kernels.bind_f16((w.float() * 1e-3).half(), bias)
    )
    residual = torch.randn(3, 37)
    assert torch.equal(bound(x, residual), bound(x) + residual)
    assert torch.equal(bound(x, residual.T.contiguous().T), bound(x) + residual)  # strided
    for bad in (torch.randn(3, 36), residual.double()):
        with pytest.raises(ValueError, match="residual"):
            bound(x, bad)


def test_layers_take_the_kernels_for_decode_rows_only(built, monkeypatch):
    """Int8Linear/Fp16Linear send up to `max_rows` rows to the kernels and longer inputs to
    PyTorch's, and both give the same layer: the same integers for W8A8, fp32 sums for fp16."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q8, q16 = Int8Linear.from_linear(linear), Fp16Linear(linear)
    assert q16.weight_half is not None and "scratchllm kernels" in repr(q16)
    calls = []
    real = kernels.BoundLinear.__call__
    monkeypatch.setattr(kernels.BoundLinear, "__call__", lambda b, x: calls.append(1) or real(b, x))
    long_rows = max(kernels.max_rows("int8"), kernels.max_rows("fp16")) + 1
    x = torch.randn(2, long_rows, 96)
    with torch.no_grad():
        long8, long16 = q8(x), q16(x)  # PyTorch's kernels
        assert calls == []
        short8 = torch.cat([q8(x[:, i : i + 1]) for i in range(long_rows)], dim=1)
        short16 = torch.cat([q16(x[:, i : i + 1]) for i in range(long_rows)], dim=1)
    assert len(calls) == 2 * long_rows  # two rows a call, through both layers
    torch.testing.assert_close(short16, long16, rtol=1e-5, atol=1e-5)
    scale = linear(x).detach().abs().max()
    torch.testing.assert_close(short8, long8, rtol=1e-4, atol=1e-5 * scale)
    assert (short8 - linear(x)).abs().max() < 0.02 * scale  # and W8A8 is the layer


def test_no_kernels_falls_back(monkeypatch, tmp_path):
    """SCRATCHLLM_KERNELS=0 or a compiler that fails: PyTorch's kernels, same layer results."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(1, 64)
    for env in ({"SCRATCHLLM_KERNELS": "0"}, {"CC": "false"}):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path))
        kernels._library.cache_clear()
        assert not kernels.available() and not kernels.usable(x, "int8")
        q16 = Fp16Linear(linear)
        assert q16.weight_half is None and "fbgemm" in repr(q16)
        with torch.no_grad():
            y = q16(x)
            y8 = Int8Linear.from_linear(linear)(x)
        torch.testing.assert_close(y, linear(x).detach(), rtol=1e-3, atol=1e-3)
        assert (y8 - y).abs().max() < 0.05 * y.abs().max()
        monkeypatch.undo()
    kernels._library.cache_clear()


@pytest.mark.parametrize("b,h,kv,s", [(1, 12, 12, 64), (8, 4, 4, 100), (3, 8, 2, 37), (2, 2, 1, 1)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_attend_matches_sdpa(built, b, h, kv, s, masked, kv_dtype):
    """One query per row over a cache view (strided, grouped heads, a per-row mask), an fp32 or
    fp16 cache: the fp16 one against SDPA on its values widened to fp32 (exactly representable)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, 1, 64, generator=g)
    cache = torch.randn(2, b, kv, s + 9, 64, generator=g).to(kv_dtype)
    k, v = cache[0, :, :, :s], cache[1, :, :, :s]  # a cache holds more positions than it uses
    out = kernels.attend(q, k, v, None)
    k, v = k.float(), v.float()
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, generator=g) > 0.4
        mask[..., 0] = True
        mask[-1] = False  # a row with nothing to attend to: zeros, as PyTorch's
        out = kernels.attend(q, cache[0, :, :, :s], cache[1, :, :, :s], mask)
    rep = h // kv
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask
    )
    assert out is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if masked:  # the mask broadcast over the batch
        one = mask[:1]
        torch.testing.assert_close(
            kernels.attend(q, cache[0, :, :, :s], cache[1, :, :, :s], one),
            F.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), one
            ),
            rtol=1e-5,
            atol=1e-5,
        )


def test_attend_declines_what_it_does_not_take(built):
    q, (k, v) = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 2, 4, 16)
    assert kernels.attend(q, k, v, None) is not None
    assert kernels.attend(torch.randn(2, 2, 2, 16), k, v, None) is None  # two queries
    assert kernels.attend(q.double(), k.double(), v.double(), None) is None
    assert kernels.attend(q, k.bfloat16(), v.bfloat16(), None) is None
    assert kernels.attend(q, k.half(), v, None) is None  # keys and values of different dtypes
    assert kernels.attend(q, k, v, torch.zeros(2, 1, 1, 4)) is None  # an additive float mask
    assert kernels.attend(q, k, v, torch.ones(2, 2, 1, 4, dtype=torch.bool)) is None


BLOCKS = {
    "gpt2": {},  # LayerNorm, learned positions, GELU's tanh form
    # the speedrun recipe's: RoPE, QK-norm, the attention gate (and the smear before the block)
    "gated": dict(pos_embedding="rope", qk_norm=True, attn_gate=True, smear=True, bias=False),
    # RMSNorm, RoPE with llama3 scaling, grouped queries, QK-norm, SwiGLU
    "llama": dict(
        norm="rmsnorm",
        pos_embedding="rope",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        n_kv_heads=2,
        qk_norm=True,
        ffn="swiglu",
        hidden_dim=96,
        bias=False,
    ),  # fmt: skip
}


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
@pytest.mark.parametrize("arch", list(BLOCKS))
def test_one_call_block_is_the_block(built, fmt, kv_dtype, arch, monkeypatch):
    """`BoundLayer` (a block in one C call: its norms, RoPE, QK-norm, the attention gate, GELU's
    tanh form or SwiGLU from our exp, the cache write rounding to fp16 as torch's `.half()` does)
    against the modules' forward, on each build."""
    from scratchllm import GPTModel, ModelConfig
    from scratchllm.inference.decode import DecodeStep
    from scratchllm.inference.weights import quantize_fp16, quantize_int8
    from scratchllm.model.attention import KVCache

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=97, context_length=16, emb_dim=64, n_heads=4, n_layers=2, **BLOCKS[arch]
    )
    model = GPTModel(config).eval()
    with torch.no_grad():  # activations across the activation's range, both signs, tails included
        for name, p in model.named_parameters():
            if "ff.fc1" in name:
                p.mul_(8)
            elif "norm" in name:  # norm weights that are not all ones
                p.add_(0.2 * torch.randn_like(p))
            elif "gate" in name or "smear" in name:  # gates that act (both start neutral)
                p.normal_()
    model = (quantize_int8 if fmt == "int8" else quantize_fp16)(model)
    step = DecodeStep(model)
    assert step.kernel_rows >= 1
    calls = []
    real = kernels.BoundLayer.__call__
    monkeypatch.setattr(kernels.BoundLayer, "__call__", lambda *a: calls.append(1) or real(*a))
    ours, theirs = (KVCache(config, 1, 16, dtype=kv_dtype) for _ in range(2))
    tokens = torch.tensor([5])
    with torch.no_grad():
        for _ in range(6):
            got = step(tokens, ours)
            want = model(tokens[:, None], cache=theirs)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tokens = want.argmax(-1)
    assert len(calls) == 6 * config.n_layers
    for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=True):
        a, b = a[:, :, :6].float(), b[:, :, :6].float()
        if kv_dtype == torch.float16:  # fp32 inputs a rounding apart rarely round apart in fp16
            assert (a != b).float().mean() < 0.01
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
