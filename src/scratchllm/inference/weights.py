"""Weight formats for CPU decoding: packed fp32, fp16 weights and int8 weights.

A decode step reads every linear weight once to produce one token per sequence, so its speed is
set by how fast the matmul streams those weights from memory. Three formats speed that up:

**Packed fp32** (`pack_linears`, on by default in `generate`/`chat`/`serve` on the CPU): each
`nn.Linear` becomes a `PackedLinear` holding its weight, once, at load time, in the layouts the
CPU streams fastest: transposed and split across the threads for one row at a time (batch-1
decoding: `torch.bmm` runs one single-threaded GEMV per thread), and/or reordered into oneDNN's
blocked layout for several rows (`torch.ops.mkldnn`, the kernels `torch.compile` uses for frozen
CPU linears). Same fp32 arithmetic, outputs equal to `F.linear` up to summation order; on the
2-core AVX2 machine of docs/serving.md, gpt2-small's layers stream at 15-27 GB/s at batch 1,
against 10-16 GB/s through `F.linear` (MKL's multi-threaded GEMV).

**fp16 weights** (`quantize_fp16`, `--quantize fp16`): each linear's weight is stored in IEEE
half precision (11-bit significand: relative rounding ≤ 2⁻¹¹, 8x finer than bf16) and packed by
fbgemm, whose AVX2 kernel widens it to fp32 on the fly; activations, accumulation and the output
stay fp32. Decode steps of one or two rows go through our kernel instead (`kernels.py`, below).
Half the bytes of fp32, with logits within ~0.1% of fp32's; on the AVX2 machine above it decoded
faster than weight-only int8, whose kernel is compute-bound there.

**int8** (`quantize_int8`, `--quantize int8`): every `nn.Linear` of the transformer blocks
and the output head becomes an `Int8Linear`: an int8 weight (out, in) with one symmetric scale
per output channel (absmax / 127, or / 63: `int8_weight_levels`), so a decode step reads a
quarter of the fp32 weight bytes.
The embeddings, norms, attention and the KV cache are untouched.

Where PyTorch has fbgemm (x86 builds), the matmul is W8A8, as llama.cpp's q8_0 is: each call
quantizes its input rows to 8 bits (one scale per row: each row is rounded on its own grid, so a
request decodes the same whatever else is in the batch) and multiplies int8 × int8 with int32
accumulation in fbgemm's dynamic linear (`torch.ops.quantized.linear_dynamic`). On the AVX512
machine of docs/serving.md it streamed gpt2-small's linears 1.6× (batch 1) and 1.8× (batch 8)
faster than the weight-only kernel below, and a trained model's top-1 token agreed with fp32's
as often (98.2% against 97.9%). Without AVX512-VNNI the weights get 7 bits instead of 8
(`int8_weight_levels`), so that AVX2's int16 pair sums cannot saturate.

Decode steps of up to `kernels.max_rows("int8")` rows go through our own C kernel
(`kernels.py`, built on first use where there is a C compiler): it rounds each row to the same
integers as the fbgemm path and streams each int8 weight row once, with no ops around the call;
fbgemm, a GEMM, is faster for more rows and serves them and prefills.

Elsewhere (`activations="weight"`, or no fbgemm) the int8 weights are used weight-only through
`torch.ops.aten._weight_int8pack_mm`, which accumulates in fp32. On the AVX2 CPU this was
measured on, its bfloat16-activation kernel is the fast one: its fp32-activation kernel was 6-28x
slower and dequantize-then-matmul slower than the fp32 layer it replaces. So fp32 activations
are cast to bf16 for the int8 matmul and the result cast back; the bf16 rounding of the
activations (~0.1 % rms) is small next to the int8 rounding of the weights (~0.8 % rms of a
layer's output). See docs/serving.md for the tolerance and speed measured.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scratchllm.errors import InputError
from scratchllm.inference import kernels

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("int8", "fp16")
INT8_ACTIVATIONS = ("dynamic", "weight")
# oneDNN picks the packed layout for this many rows; 4 was as fast as 1 at batch 1 and faster at
# batch 4 and 8 (gpt2-small decode steps, docs/serving.md); larger inputs still run, a bit slower.
PACK_BATCH_HINT = 4
# The kernel takes its scales in the activation dtype; it runs in bf16 (see the module docstring).
_KERNEL_DTYPE = torch.bfloat16
# The CPU kernel walks the input dimension in whole SIMD vectors with no tail loop: with torch
# 2.13 on AVX2, in_features=33 crashed the process and 100 gave wrong sums (multiples of 8 were
# right). Only multiples of 32 (any x86 vector width) take it; the rest dequantize.
_KERNEL_K_MULTIPLE = 32


def quantize_weight(weight: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight → (int8 weight, per-row scales) with weight ≈ int8 · scale[:, None]
    and the int8 values in [-levels, levels].

    The scales are rounded to bf16 before the weight is divided by them, so the kernel (which
    takes bf16 scales) multiplies by exactly the scale the weight was quantized with.
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = (absmax / levels).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(_KERNEL_DTYPE).float()
    # bf16 may round a scale down a little: clamp the few values that then overflow ±levels.
    q = torch.round(w / scales[:, None]).clamp(-levels, levels).to(torch.int8)
    return q.contiguous(), scales


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W stored as int8 plus one scale per output channel.

    `weight_int8` (out, in) int8 and `scales` (out,) are buffers (not trained); `bias`, if any,
    stays floating point. Output dtype = input dtype. `activations`: "dynamic" (W8A8, where
    fbgemm is available: the input is quantized to 8 bits per call) or "weight" (weight-only:
    the input stays floating point); see the module docstring.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        activations: str = "dynamic",
    ) -> None:
        super().__init__()
        if activations not in INT8_ACTIVATIONS:
            raise ValueError(f"activations must be one of {INT8_ACTIVATIONS}, got {activations!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self._packed: tuple[tuple, torch.ScriptObject] | None = None  # fbgemm's, not state
        self._bound: tuple[tuple, kernels.BoundLinear] | None = None  # our kernel's, not state
        self.register_buffer(
            "weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias: nn.Parameter | None = None
        if bias:  # frozen: an int8 model is for inference
            zeros = torch.zeros(out_features, dtype=dtype, device=device)
            self.bias = nn.Parameter(zeros, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "dynamic") -> Int8Linear:
        """Quantize a float `nn.Linear` (its weight is copied, never shared)."""
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            w.device,
            w.dtype,
            activations,
        )
        q, scales = quantize_weight(w, int8_weight_levels(activations))
        with torch.no_grad():
            layer.weight_int8.copy_(q)
            layer.scales.copy_(scales)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        """fbgemm's dynamic int8 linear with one activation scale per row.

        The kernel quantizes its whole input on one grid, from the input's min and max, so one
        row's rounding would depend on the other rows of the batch (a request's tokens on who
        else is being served). Each row is divided by its own absmax and a last row [1, -1, 0…]
        pins the grid to [-1, 1]: every row is rounded on its own scale, whatever the batch, as
        llama.cpp's q8_0 rounds each block of 32 activations on its own. The output rows are
        scaled back and the bias is added in fp32."""
        # Few ops: at batch 1 each costs as much as a small layer's matmul. `abs().amax` rather
        # than the one-op `vector_norm(x, inf)`: on the AVX2 machine of docs/serving.md the latter
        # took 26-90 us on 8 rows (its inf-norm reduction is not vectorised over rows) against
        # 6-9 us, 2.6 ms of a batch-8 gpt2-small step.
        absmax = x.abs().amax(dim=1, keepdim=True)
        absmax = absmax.clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero row
        rows = torch.cat([x / absmax, self._grid_row(x.shape[1])])
        y = torch.ops.quantized.linear_dynamic(
            rows,
            self._dynamic_params(),
            False,  # 8-bit activations: see int8_weight_levels
        )[:-1]
        if self.bias is None:
            return y.mul_(absmax)
        return torch.addcmul(self.bias.float(), y, absmax)

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def _grid_row(width: int) -> torch.Tensor:
        row = torch.zeros(1, width)
        row[0, :2] = torch.tensor([1.0, -1.0])
        return row

    def _kernel(self) -> kernels.BoundLinear:
        """This layer bound to our W8A8 kernel (fp32 scales and bias): built on first use and
        again whenever a tensor changes (a load, an edit in place)."""
        w, s, b = self._buffers["weight_int8"], self._buffers["scales"], self.bias
        key = (w.data_ptr(), w._version, s.data_ptr(), s._version)
        if b is not None:
            key += (b.data_ptr(), b._version)
        if self._bound is None or self._bound[0] != key:
            bias = None if b is None else b.detach().float().contiguous()
            bound = kernels.bind_w8a8(w.contiguous(), s.float().contiguous(), bias)
            self._bound = (key, bound)
        return self._bound[1]

    def decode_kernel(self) -> tuple[kernels.BoundLinear, int] | None:
        """Our W8A8 kernel bound to this layer, and the rows per call it takes (`forward` sends
        it up to that many), for a caller that skips `forward`; None where it is not used."""
        if self.activations != "dynamic" or not dynamic_int8_available():
            return None
        rows = kernels.max_rows("int8")
        return (self._kernel(), rows) if rows else None

    def _dynamic_params(self) -> torch.ScriptObject:
        """The weight packed for fbgemm's W8A8 kernel: built on first use and again whenever
        the int8 weight or the scales change (a load, an edit in place)."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_int8, self.scales))
        if self._packed is None or self._packed[0] != key:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():
                # torch 2.13 marks quantized tensors deprecated; fbgemm's prepack still takes
                # only them. `dynamic_int8_available` turns this path off once they are gone.
                warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.scales.double(), zeros, 0
                )
            self._packed = (key, torch.ops.quantized.linear_prepack(qweight, None))
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W8A8 (where fbgemm has it): our kernel for a decode step's rows, else fbgemm's
        w8a8 = self.activations == "dynamic" and dynamic_int8_available()
        if w8a8 and kernels.usable(x, "int8"):
            y = self._kernel()(x)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        shape = x.shape
        x2d = x.reshape(-1, self.in_features)
        if w8a8 and x.device.type == "cpu":
            y = self._w8a8(x2d.float())
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if x.device.type == "cpu" and self.in_features % _KERNEL_K_MULTIPLE == 0:
            # The kernel wants a contiguous 2-D input and scales in the input's dtype, and it
            # loads input rows with aligned SIMD loads: give it a fresh (aligned) copy if needed.
            xk = x2d.to(_KERNEL_DTYPE).contiguous()
            if xk.data_ptr() % 64:
                xk = xk.clone()
            # Private op: torch has no public matmul with int8 weights and per-row scales.
            y = torch.ops.aten._weight_int8pack_mm(xk, self.weight_int8, self.scales.to(xk.dtype))
            y = y.to(x.dtype)
        else:  # odd widths (or a device the kernel lacks): dequantize, slower but correct
            y = F.linear(x2d, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 per-channel, activations={self.activations}"
        )


PACK_LAYOUTS = ("both", "gemv", "onednn")


@functools.lru_cache(maxsize=64)
def gemv_splits(in_features: int, threads: int) -> int:
    """Slices of the input dimension for a one-row product on `threads` threads: the largest
    divisor of `in_features` that is at most `threads` (1: no split), slices of ≥ 16 inputs."""
    for s in range(min(threads, in_features // 16), 1, -1):
        if in_features % s == 0:
            return s
    return 1


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W held in the layouts CPU decoding reads fastest (fp32, inference only).

    - **gemv** (`weight_t`): Wᵀ, (in, out) contiguous, for one input row (a batch-1 decode
      step). Its input rows are split into one slice per thread and `torch.bmm` runs the
      slices' products side by side, each thread streaming its own slice through a
      single-threaded MKL GEMV; the partial sums are added. On the 2-core machine of
      docs/serving.md that reads gpt2-small's layers at 15-27 GB/s, against 12-21 GB/s for
      oneDNN's multi-threaded product on one row. Several rows (a prefill) go through one
      `torch.addmm` on the same weight when there is no oneDNN layout.
    - **onednn** (`packed_weight`): W reordered once into oneDNN's blocked layout
      (`torch.ops.mkldnn`, the kernels `torch.compile` uses for frozen CPU linears), for several
      rows: batched decoding and prefill.
    - **both** keeps the two (twice the weight memory) and picks by the number of rows.

    The weights are not in `state_dict` and cannot be moved or trained: pack a model after
    loading it and after any dtype or device change.
    """

    def __init__(
        self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT, layout: str = "both"
    ) -> None:
        super().__init__()
        if layout not in PACK_LAYOUTS:
            raise ValueError(f"pack layout must be one of {PACK_LAYOUTS}, got {layout!r}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        if layout != "gemv" and not has_onednn():
            layout = "gemv"  # a torch without oneDNN still gets the one-row layout
        self.layout = layout
        self.weight_t = weight.t().contiguous() if layout != "onednn" else None
        # Private oneDNN ops (as torch.compile's CPU backend uses them): no public packed linear.
        self.packed_weight = (
            torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            if layout != "gemv"
            else None
        )
        self.bias: nn.Parameter | None = None
        if linear.bias is not None:  # frozen: a packed model is for inference
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # these kernels have no backward: fail loudly, not silently wrong
            raise RuntimeError("PackedLinear is inference-only; run under torch.no_grad()")
        one_row = x.numel() == self.in_features
        if self.packed_weight is not None and (self.weight_t is None or not one_row):
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        x2d = x.reshape(-1, self.in_features)
        splits = gemv_splits(self.in_features, torch.get_num_threads()) if one_row else 1
        if splits > 1:
            parts = torch.bmm(
                x2d.reshape(splits, 1, -1), self.weight_t.view(splits, -1, self.out_features)
            )
            y = parts.sum(0)
            if self.bias is not None:
                y += self.bias
        elif self.bias is not None:
            y = torch.addmm(self.bias, x2d, self.weight_t)
        else:
            y = torch.mm(x2d, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, packed fp32 ({self.layout})"
        )


class Fp16Linear(nn.Module):
    """y = x Wᵀ + b with W rounded to fp16; fp32 arithmetic (CPU, inference).

    The weight and bias are packed by fbgemm (an opaque object) for inputs of several rows.
    With our kernels (`kernels.available()`) the fp16 weight is also kept as a plain tensor and
    decode steps of up to `kernels.max_rows("fp16")` rows go through our kernel: twice the
    fp16 weight memory (as much as the fp32 layer), for the batch-1 speed of docs/serving.md.
    Neither copy is in `state_dict`; `weight_fp32()` returns the stored weight for inspection.
    Inputs of another dtype are computed in fp32 and cast back.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.has_bias = bias is not None
        weight = linear.weight.detach()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)
        self.weight_half: torch.Tensor | None = None
        self._bound: kernels.BoundLinear | None = None
        if kernels.available():
            self.weight_half = weight.to(torch.float16).contiguous()
            self._bound = kernels.bind_f16(self.weight_half, bias)

    def decode_kernel(self) -> tuple[kernels.BoundLinear, int] | None:
        """Our fp16 kernel bound to this layer, and the rows per call it takes (`forward` sends
        it up to that many), for a caller that skips `forward`; None where it is not built."""
        return None if self._bound is None else (self._bound, kernels.max_rows("fp16"))

    def weight_fp32(self) -> torch.Tensor:
        """The stored weight (its fp16 values, as fp32)."""
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:  # neither kernel has a backward
            raise RuntimeError("Fp16Linear is inference-only; run under torch.no_grad()")
        if self._bound is not None and kernels.usable(x, "fp16"):
            y = self._bound(x)
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "fbgemm" if self.weight_half is None else "fbgemm and scratchllm kernels"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.has_bias}, fp16 weights ({kernel})"
        )


def quantize_fp16(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Replace (in place) the `nn.Linear`s of the blocks and the head by `Fp16Linear`s.

    Same rules as `quantize_int8`: `skip` names layers to keep, a tied head gets its own fp16
    copy, LoRA adapters are merged first. CPU only (`InputError` elsewhere or without fbgemm).
    """
    _check_cpu_model(model, "fp16")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InputError("--quantize fp16 needs PyTorch's fbgemm kernels (an x86 CPU build)")
    count = _replace_linears(model, Fp16Linear, skip)
    log.info("fp16: %d block linears stored in fp16", count)
    return model


@functools.lru_cache(maxsize=1)
def dynamic_int8_available() -> bool:
    """Whether fbgemm's dynamic-quantized int8 linear (W8A8) is in this torch (x86 builds, and
    quantized tensors, which torch has deprecated, still there)."""
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(torch, "_make_per_channel_quantized_tensor")
        and hasattr(torch.ops.quantized, "linear_dynamic")
    )


def int8_weight_levels(activations: str = "dynamic") -> int:
    """The largest int8 weight magnitude for `activations`: 127, or 63 for W8A8 on a CPU without
    AVX512-VNNI.

    Without VNNI, fbgemm multiplies uint8 activations by int8 weights with AVX2's `vpmaddubsw`,
    which adds two products into an int16 and saturates when both are near full range
    (255 · 127 · 2 > 32767). PyTorch's own x86 default gives the activations 7 bits; here the
    weights get them instead (255 · 63 · 2 fits): a weight has one scale per output row and few
    outliers, while a row of activations is scaled by its largest value, so the activations' bit
    is worth more. On a Gutenberg checkpoint trained on the AVX2 machine of docs/serving.md, the
    top token given fp32's context matched fp32's 96.9% of the time with 7-bit weights and 95.1%
    with 7-bit activations (8-bit weight-only: 97.7%). With AVX512-VNNI, `vpdpbusd` accumulates
    in int32 and both get 8 bits (tests/test_quantize.py checks full-range products on whatever
    CPU runs it). AVX-VNNI alone (a client CPU's 256-bit form) is not assumed to be used by
    fbgemm. Unknown CPU (no /proc/cpuinfo flags): the safe 7 bits."""
    if activations != "dynamic" or not dynamic_int8_available() or not _saturating_int8_products():
        return 127
    return 63


@functools.lru_cache(maxsize=1)
def _saturating_int8_products() -> bool:
    from scratchllm.train.throughput import read_cpu_info

    info = read_cpu_info()
    return info is None or "avx512_vnni" not in info.flags


def _check_cpu_model(model: nn.Module, quantize: str) -> None:
    p = next(model.parameters(), None)
    if p is not None and p.device.type != "cpu":
        raise InputError(
            f"{quantize} quantization is a CPU decoding feature; the model is on "
            f"{p.device.type} (use --device cpu, or --dtype bfloat16 on a GPU)"
        )


def has_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def can_pack(model: nn.Module) -> bool:
    """Whether `model`'s linears can be packed: fp32 weights on the CPU."""
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _replace_linears(
    model: nn.Module, make: Callable[[nn.Linear], nn.Module], skip: Iterable[str]
) -> int:
    """Replace (in place) each `nn.Linear` of `model.trf_blocks` and the `model.out_head` not in
    `skip` by `make(linear)`, merging LoRA adapters first; returns how many blocks' linears."""
    from scratchllm.model.lora import has_lora, merge_lora

    skip = tuple(skip)
    if has_lora(model):
        log.info("merging LoRA adapters into their base weights")
        merge_lora(model)
    head = getattr(model, "out_head", None)
    if isinstance(head, nn.Linear) and not _skipped("out_head", skip):
        model.out_head = make(head)  # a tied head gets its own copy; the embedding stays
    count = 0
    root = getattr(model, "trf_blocks", None)
    for name, module in [] if root is None else list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            full = ".".join(n for n in ("trf_blocks", name, child_name) if n)
            if isinstance(child, nn.Linear) and not _skipped(full, skip):
                setattr(module, child_name, make(child))
                count += 1
    return count


def pack_linears(
    model: nn.Module,
    skip: Iterable[str] = (),
    batch_hint: int = PACK_BATCH_HINT,
    layout: str = "both",
) -> nn.Module:
    """Replace (in place) the fp32 `nn.Linear`s of the blocks and the head by `PackedLinear`s.

    `layout`: "gemv" for one row at a time (chat, single-prompt generation), "onednn" for
    batches, "both" (twice the linear weights' memory) to serve either. Returns the model; a model
    that cannot be packed (`can_pack`: not fp32, not on the CPU) is returned unchanged. LoRA
    adapters are merged first. A tied head gets its own copy of the embedding (gpt2-small: 154 MB
    a layout).
    """
    if layout not in PACK_LAYOUTS:
        raise InputError(f"pack layout must be one of {', '.join(PACK_LAYOUTS)}, got {layout!r}")
    if not can_pack(model):
        log.info("linears not packed: packing needs fp32 weights on the CPU")
        return model
    count = _replace_linears(model, lambda lin: PackedLinear(lin, batch_hint, layout), skip)
    log.info("packed %d block linears (%s)", count, layout)
    return model


def quantize_int8(
    model: nn.Module, skip: Iterable[str] = (), activations: str = "dynamic"
) -> nn.Module:
    """Replace (in place) every `nn.Linear` in `model.trf_blocks` and `model.out_head` by an
    `Int8Linear`; returns the model.

    `skip`: layer names (or dotted name endings, e.g. "out_head", "ff.fc2") to keep in float.
    A head tied to the token embedding is quantized as its own int8 copy; the embedding stays
    float. LoRA adapters are merged into their base weights first (the merged model decodes the
    same as the adapted one), so the adapters are gone afterwards. `activations`: "dynamic"
    (W8A8 where fbgemm has it) or "weight" (weight-only), as `Int8Linear` says.
    """
    _check_cpu_model(model, "int8")
    count = _replace_linears(model, lambda lin: Int8Linear.from_linear(lin, activations), skip)
    log.info(
        "int8: quantized %d block linears%s",
        count,
        " and the output head" if isinstance(getattr(model, "out_head", None), Int8Linear) else "",
    )
    return model


def check_quantize(quantize: str | None, device: torch.device | str | None = None) -> str | None:
    """Validate a `quantize` option ('int8', 'fp16' or None/'none'); `InputError` otherwise."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise InputError(f"--quantize must be 'int8', 'fp16' or 'none', got {quantize!r}")
    if device is not None and torch.device(device).type != "cpu":
        raise InputError(
            f"--quantize {quantize} is a CPU decoding feature; got device "
            f"{torch.device(device).type} (use --device cpu, or --dtype bfloat16 on a GPU)"
        )
    return quantize


def device_for(device: str, quantize: str | None) -> str:
    """The device name to load on: 'auto' means the CPU when quantizing (a CPU feature)."""
    if device == "auto" and quantize not in (None, "none"):
        return "cpu"
    return device


def apply_quantization(
    model: nn.Module, quantize: str | None, device: torch.device | str | None = None
) -> nn.Module:
    """Quantize `model` as `quantize` says (None: leave it as it is)."""
    kind = check_quantize(quantize, device)
    if kind == "int8":
        quantize_int8(model)
    elif kind == "fp16":
        quantize_fp16(model)
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (and int8 scales) of the block linears and the head: what a decode
    step reads for its matmuls."""
    total = 0
    for name, module in model.named_modules():
        if not (name.startswith("trf_blocks.") or name == "out_head"):
            continue
        if isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, PackedLinear):
            total += module.in_features * module.out_features * 4
        elif isinstance(module, Fp16Linear):
            total += module.in_features * module.out_features * 2
        elif isinstance(module, Int8Linear):
            # Scales: fp32 in fbgemm's W8A8 kernel, bf16 in the weight-only one.
            dynamic = module.activations == "dynamic" and dynamic_int8_available()
            total += module.weight_int8.numel() + module.scales.numel() * (4 if dynamic else 2)
    return total
