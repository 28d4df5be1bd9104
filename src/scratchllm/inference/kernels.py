"""Our CPU decode kernels (kernels.c), built on first use with the machine's C compiler.

A decode step is a few rows times every weight matrix; PyTorch's kernels for int8 and fp16
weights (fbgemm's) are built for larger batches and, on the Zen 4 machine of docs/serving.md,
streamed gpt2-small's int8 weights at about 21 GB/s at batch 1, with a few small ops per layer
around them to scale the activations. kernels.c does the whole layer in one call: it quantizes
the rows, streams each weight row once for all of them, and rescales. `Int8Linear` and
`Fp16Linear` bind their weights once (`bind_w8a8`, `bind_f16`) and send decode-sized inputs
(`max_rows`) through them; `DecodeStep` sends its attention through `attend`, whose one query per
row PyTorch's CPU attention handles with a large fixed cost, and, where every linear of a block is
bound to our kernels, the whole block through one C call (`BoundLayer`): at batch 1 the module
calls and small ops between the kernels cost from a tenth (fp16 gpt2-small) to two fifths (int8,
a Llama-style block) of the step.

The library is compiled once per source version and CPU (`-O3 -march=native -fopenmp`) into
`$SCRATCHLLM_CACHE` (default ~/.cache/scratchllm)/kernels and loaded with ctypes. Without a C
compiler, off x86-64, or with SCRATCHLLM_KERNELS=0, `available()` is False and the layers use
PyTorch's kernels, as before: the kernels are a speed-up, never a requirement.
SCRATCHLLM_KERNEL_CFLAGS adds compiler flags (the tests build `-march=skylake-avx512`, `haswell`
and `x86-64` to check the AVX-512-without-VNNI, AVX2 and plain C paths on a newer machine).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# Rows per call up to which the kernels are used (`max_rows`); more go to fbgemm's GEMMs. Each
# weight row is read once for all the rows, but the multiply-adds are not blocked as a GEMM's: on
# the Zen 4 machine of docs/serving.md, gpt2-small's linears took 6.6 / 11.6 ms (int8 with int16
# products / fp16) at 2 rows against fbgemm's 10.7 / 12.8, and 11.3 / 15.4 at 4 rows against 9.4 /
# 10.4. With AVX512-VNNI the int8 kernel multiplies 64 bytes an instruction: 5.0 / 6.8 / 10.3 /
# 17.3 ms at 1 / 4 / 8 / 16 rows against fbgemm's 9.7 / 11.3 / 12.1 / 17.6, so it keeps 8.
MAX_ROWS = 2
INT8_VNNI_MAX_ROWS = 8
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_P = ctypes.c_void_p
_I = ctypes.c_int64


def cache_dir() -> Path:
    root = os.environ.get("SCRATCHLLM_CACHE") or Path.home() / ".cache" / "scratchllm"
    return Path(root) / "kernels"


def _cpu_key() -> str:
    from scratchllm.train.throughput import read_cpu_info

    info = read_cpu_info()
    return "unknown" if info is None else " ".join(sorted(info.flags))


def _build(compiler: str) -> Path:
    """Compile kernels.c for this CPU (once: the file name hashes source, flags and CPU)."""
    flags = _FLAGS + shlex.split(os.environ.get("SCRATCHLLM_KERNEL_CFLAGS", ""))
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), " ".join(flags), compiler, _cpu_key()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: a concurrent process never loads half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, str(SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built CPU decode kernels: %s", out)
    return out


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SCRATCHLLM_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        # Measured on x86 only, and the int8 path matches fbgemm's W8A8 (x86 builds) only.
        log.info("CPU decoding uses PyTorch's kernels: ours are for x86-64")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: CPU decoding uses PyTorch's int8/fp16 kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as err:
        log.warning("CPU decode kernels unavailable, using PyTorch's: %s", err)
        return None
    lib.sl_w8a8.argtypes = [_P, _I, _I, _P, _P, _P, _I, _P, _P]
    lib.sl_f16.argtypes = [_P, _I, _I, _P, _P, _I, _P, _P]
    lib.sl_w8a8.restype = lib.sl_f16.restype = ctypes.c_int
    lib.sl_attend.argtypes = [_P, _I, _I, _I, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I,
                              ctypes.c_float, ctypes.c_int, _P]  # fmt: skip
    lib.sl_layer.argtypes = [ctypes.POINTER(_Layer), _P, _I, _P, _P, _I, _I, _I, ctypes.c_int, _P,
                             _I, _P, _I, _P, _P, _I, _P]  # fmt: skip
    lib.sl_attend.restype = lib.sl_layer.restype = ctypes.c_int
    lib.sl_w8a8_vnni.restype = ctypes.c_int
    lib.vnni = bool(lib.sl_w8a8_vnni())
    return lib


def available() -> bool:
    """Whether the kernels are built and loaded (x86-64 with a C compiler)."""
    return _library() is not None


def max_rows(kind: str) -> int:
    """Rows per call that `kind` ("int8" or "fp16") sends to our kernels (0: none built)."""
    lib = _library()
    if lib is None:
        return 0
    return INT8_VNNI_MAX_ROWS if kind == "int8" and lib.vnni else MAX_ROWS


def usable(x: torch.Tensor, kind: str) -> bool:
    """Whether an input of this shape and device goes through the `kind` kernel."""
    return x.device.type == "cpu" and 0 < x.numel() <= max_rows(kind) * x.shape[-1]


_INT8, _F16 = 1, 2  # kernels.c's SL_INT8, SL_F16: an sl_linear_t's kind


class _Linear(ctypes.Structure):  # kernels.c's sl_linear_t
    _fields_ = [("kind", _I), ("n", _I), ("k", _I), ("w", _P), ("scale", _P), ("bias", _P)]


class _Layer(ctypes.Structure):  # kernels.c's sl_layer_t
    _fields_ = [
        ("norm", _I),
        *[(name, _P) for name in ("n1_w", "n1_b", "n2_w", "n2_b", "qn_w", "kn_w")],
        ("qk_norm", _I),
        ("eps", ctypes.c_double),
        *[(name, _Linear) for name in ("qkv", "out", "fc1", "fc2", "fc3")],
        *[(name, _I) for name in ("heads", "kv_heads", "head_dim", "act")],
        ("gate_w", _P),
        ("gate_width", _I),
    ]


class BoundLinear:
    """One layer bound to a kernel once (its pointers and sizes), so that a decode step's call
    costs little more than the C call itself: `bound(x)` → x Wᵀ + b in fp32, shape (…, out);
    `bound(x, residual)` → x Wᵀ + b + residual (fp32, the output's shape) in the same call.
    Holds references to the tensors it points into; rebind after they change storage."""

    __slots__ = ("_fn", "_tail", "_k", "_n", "_tensors", "_struct")

    def __init__(self, fn: Any, weight: torch.Tensor, extra: list[torch.Tensor | None]) -> None:
        for t in (weight, *extra):
            if t is not None and not (t.is_contiguous() and t.device.type == "cpu"):
                raise ValueError("kernel operands must be contiguous CPU tensors")
        self._n, self._k = weight.shape
        self._fn = fn
        ptrs = [None if t is None else t.data_ptr() for t in extra]
        self._tail = (self._k, weight.data_ptr(), *ptrs, self._n)
        self._tensors = (weight, *extra)  # keep the memory the pointers name alive
        int8 = weight.dtype == torch.int8
        scale, bias = ptrs if int8 else (None, ptrs[0])
        kind = _INT8 if int8 else _F16
        self._struct = _Linear(kind, self._n, self._k, weight.data_ptr(), scale, bias)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = x.new_empty(*x.shape[:-1], self._n)
        res = None
        if residual is not None:
            if residual.shape != y.shape or residual.dtype != y.dtype:
                raise ValueError(f"residual {tuple(residual.shape)} must be fp32 {tuple(y.shape)}")
            residual = residual.contiguous()  # held until the call returns
            res = residual.data_ptr()
        if self._fn(x.data_ptr(), x.numel() // self._k, *self._tail, res, y.data_ptr()):
            raise RuntimeError(f"decode kernel refused {x.numel() // self._k} rows (at most 64)")
        return y


def bind_w8a8(weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> BoundLinear:
    """x Wᵀ + b for W = weight (int8, out × in) · scales (fp32, per output row), each row of x
    rounded to integers on its own scale (absmax · 2/255: the integers `Int8Linear`'s fbgemm
    path gives the row). `scales` and `bias` fp32; all contiguous."""
    lib = _library()
    assert lib is not None, "kernels unavailable: check available() first"
    return BoundLinear(lib.sl_w8a8, weight, [scales, bias])


def bind_f16(weight: torch.Tensor, bias: torch.Tensor | None) -> BoundLinear:
    """x Wᵀ + b with W fp16 (out × in), fp32 bias, activations and accumulation."""
    lib = _library()
    assert lib is not None, "kernels unavailable: check available() first"
    return BoundLinear(lib.sl_f16, weight, [bias])


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Decode attention: softmax(q Kᵀ / √D, mask) V for one query per row, q (B, H, 1, D) fp32, k
    and v (B, KV, S, D) fp32 or fp16 views into a KV cache (KV dividing H), mask None or bool
    (B or 1, 1, 1, S), True = attend; as `F.scaled_dot_product_attention` on k and v in fp32.
    None when the inputs are not ones the kernel takes (not CPU tensors of those dtypes, more
    than one query, another mask): use SDPA then.

    PyTorch's CPU attention has a fixed cost per call that dominates at one query: in a batch-8
    gpt2-small decode step on the Zen 4 machine of docs/serving.md it took 0.36 ms a layer."""
    lib = _library()
    if lib is None or q.shape[2] != 1 or q.device.type != "cpu":
        return None
    if q.dtype != torch.float32 or k.dtype not in (torch.float32, torch.float16):
        return None
    if v.dtype != k.dtype or any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    b, h, _, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    if h % kv or v.shape != k.shape or k.shape[0] != b:
        return None
    mask_ptr, mask_stride = None, 0
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, s):
            return None
        if mask.shape[0] not in (1, b) or mask.stride(-1) != 1:
            return None
        mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0) if mask.shape[0] == b else 0
    q = q.contiguous()
    out = q.new_empty(b, h, 1, d)
    if lib.sl_attend(q.data_ptr(), h * d, b, h, kv, d, s, k.data_ptr(), *k.stride()[:3], v.data_ptr(),
                     *v.stride()[:3], mask_ptr, mask_stride, d**-0.5, k.dtype == torch.float16,
                     out.data_ptr()):  # fmt: skip
        raise MemoryError("decode attention kernel: out of memory")
    return out


# kernels.c's NORM_* and ACT_*: the norms and feed-forwards `sl_layer` computes.
LAYER_NORMS = {"layernorm": 1, "rmsnorm": 2}
LAYER_ACTIVATIONS = {"gelu_tanh": 1, "relu2": 2, "swiglu": 3}
Params = torch.Tensor | None


class BoundLayer:
    """A transformer block bound to `sl_layer` once: `layer(x, keys, values, positions, length,
    mask, rope)` applies the block to x (B, D) fp32 in place, as `TransformerBlock.forward` does
    for one token per row: norm, attention, residual, norm, feed-forward, residual. Each row's key
    and value go into `keys`/`values` (B, KV, capacity, hd), fp32 or fp16, at `positions` (B,)
    int64, and it attends over the first `length` positions under `mask` (None or bool (B or 1,
    1, 1, length), True = attend); `rope` is None or the (cos, sin) tables, (B or 1, hd) fp32.

    `norm`: a key of `LAYER_NORMS`, both norms' (weight, bias) in `norms`; `qk_norm`: the RMSNorm
    weights of queries and keys per head (None: no QK-norm; (None, None): without weights);
    `activation`: a key of `LAYER_ACTIVATIONS`; `linears`: qkv, out, fc1, fc2 (and SwiGLU's fc3)
    bound with `bind_w8a8`/`bind_f16` (the caller checks the rows they take); `gate`: an
    `AttentionGate`'s (heads, width) fp32 weight, or None."""

    def __init__(
        self,
        norm: str,
        norms: tuple[Params, Params, Params, Params],
        qk_norm: tuple[Params, Params] | None,
        eps: float,
        linears: tuple[BoundLinear, ...],
        heads: int,
        kv_heads: int,
        activation: str,
        gate: Params = None,
    ) -> None:
        lib = _library()
        assert lib is not None, "kernels unavailable: check available() first"
        params = (*norms, *(qk_norm or (None, None)), gate)
        for t in params:
            if t is not None and not (t.dtype == torch.float32 and t.is_contiguous()):
                raise ValueError("norm and gate parameters must be contiguous fp32")
        swiglu = activation == "swiglu"
        if gate is not None and (gate.dim() != 2 or gate.shape[0] != heads):
            raise ValueError(f"the attention gate must be ({heads}, width)")
        if len(linears) != (5 if swiglu else 4):
            raise ValueError(f"{activation} takes {5 if swiglu else 4} linears")
        qkv, out, fc1, fc2 = linears[:4]
        last = linears[4] if swiglu else fc2
        head_dim = out._k // heads
        dim = out._n  # the residual stream's width
        if (
            qkv._n != (heads + 2 * kv_heads) * head_dim
            or heads * head_dim != out._k
            or not qkv._k == fc1._k == last._n == dim
            or fc1._n != last._k
            or (swiglu and (fc2._k, fc2._n) != (dim, fc1._n))
        ):
            raise ValueError("the block's linear shapes do not chain")
        if gate is not None and gate.shape[1] > dim:
            raise ValueError(f"the attention gate reads at most {dim} inputs")
        self._fn = lib.sl_layer
        *norm_ptrs, gate_ptr = [None if t is None else t.data_ptr() for t in params]
        structs = [b._struct for b in linears] + ([] if swiglu else [_Linear()])
        self._layer = _Layer(
            LAYER_NORMS[norm], *norm_ptrs, qk_norm is not None, eps, *structs, heads, kv_heads,
            head_dim, LAYER_ACTIVATIONS[activation], gate_ptr, 0 if gate is None else gate.shape[1],
        )  # fmt: skip
        self._ref = ctypes.byref(self._layer)
        self._keep = (params, linears)  # the memory the pointers name
        self._dim, self._head_dim = dim, head_dim
        self._scratch = dim + qkv._n + out._k + 2 * fc1._n

    def __call__(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        mask: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        b = x.shape[0]
        if x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != self._dim:
            raise ValueError(f"x must be contiguous fp32 (B, {self._dim}), got {tuple(x.shape)}")
        if values.stride() != keys.stride() or values.dtype != keys.dtype or keys.stride(-1) != 1:
            raise ValueError("keys and values must share a layout")
        if keys.dtype not in (torch.float32, torch.float16) or not length <= keys.shape[2]:
            raise ValueError(f"KV cache of {keys.shape[2]} positions, asked for {length}")
        if positions.dtype != torch.int64 or positions.shape != (b,):
            raise ValueError("positions must be int64 (B,)")
        mask_ptr, mask_stride = None, 0
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[1:] != (1, 1, length) or mask.stride(-1) != 1:
                raise ValueError(f"mask must be bool (B or 1, 1, 1, {length})")
            mask_ptr, mask_stride = mask.data_ptr(), mask.stride(0) if mask.shape[0] == b else 0
        cos = sin = None
        rope_stride = 0
        if rope is not None:
            cos, sin = (t.to(torch.float32).contiguous() for t in rope)
            if cos.shape != sin.shape or cos.shape not in (
                (b, self._head_dim),
                (1, self._head_dim),
            ):
                raise ValueError(f"rope tables must be (B or 1, {self._head_dim})")
            rope_stride = self._head_dim if cos.shape[0] == b and b > 1 else 0
        positions = positions.contiguous()
        scratch = x.new_empty(b * self._scratch)
        if self._fn(self._ref, x.data_ptr(), b, keys.data_ptr(), values.data_ptr(),
                    *keys.stride()[:3], keys.dtype == torch.float16, positions.data_ptr(), length,
                    mask_ptr, mask_stride, None if cos is None else cos.data_ptr(),
                    None if sin is None else sin.data_ptr(), rope_stride,
                    scratch.data_ptr()):  # fmt: skip
            raise RuntimeError(f"decode layer kernel refused {b} rows")
