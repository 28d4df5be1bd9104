"""Building blocks: normalisations, GELU/ReLU², the feed-forward network, the smear gate,
rotary embeddings and logit soft-capping."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchllm.config import ModelConfig


class LayerNorm(nn.Module):
    """Layer normalisation with a learned scale and shift (the book's `LayerNorm`, ch. 4).

    Computed by `F.layer_norm`, which matches the book's biased-variance formula exactly.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Llama, Qwen): no mean subtraction, no shift.

    Computed in float32 and cast back, as the reference implementations do. `affine=False`:
    no learned scale at all (no parameter), the modern small-model recipe's norm.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return x32.to(dtype)
        return self.weight * x32.to(dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.emb_dim
    if config.norm in ("rmsnorm", "rmsnorm_noparam"):
        return RMSNorm(dim, config.norm_eps, affine=config.norm == "rmsnorm")
    return LayerNorm(dim, config.norm_eps)


class GELU(nn.Module):
    """GELU with the tanh approximation used by GPT-2 (the book's formula, fused by PyTorch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class ReLU2(nn.Module):
    """ReLU squared, relu(x)² (Primer; modded-nanogpt's feed-forward activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class _SoftCap(torch.autograd.Function):
    """cap · tanh(x / cap) with a one-pass backward.

    The three autograd ops (divide, tanh, multiply) each walk the whole batch × vocabulary
    tensor twice; with a 4096-id vocabulary at 128 wide that was a quarter of a training step on
    2 cores. Here the forward saves tanh's output t and the backward is d/dx = 1 - t² (the
    cap cancels), one fused `tanh_backward` pass."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, cap: float) -> torch.Tensor:
        t = logits.mul(1.0 / cap).tanh_()
        ctx.save_for_backward(t)
        return t.mul(cap)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (t,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, t), None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap · tanh(logits / cap): logits bounded by ±cap, near the identity well inside it.
    `cap` None: the logits unchanged."""
    if cap is None:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftCap.apply(logits, cap)
    return logits.mul(1.0 / cap).tanh_().mul_(cap)  # inference: in place, no graph


class FeedForward(nn.Module):
    """Position-wise MLP: GELU at 4x width (GPT-2), ReLU² or SwiGLU (Llama, Qwen).

    GELU: fc2(gelu(fc1(x))).  ReLU²: fc2(relu(fc1(x))²).  SwiGLU: fc3(silu(fc1(x)) * fc2(x)),
    the book's Llama naming.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, h, bias = config.emb_dim, config.ffn_dim, config.bias
        self.swiglu = config.ffn == "swiglu"
        self.fc1 = nn.Linear(d, h, bias=bias)
        if self.swiglu:
            self.fc2 = nn.Linear(d, h, bias=bias)
            self.fc3 = nn.Linear(h, d, bias=bias)
        else:
            self.activation = ReLU2() if config.ffn == "relu2" else GELU()
            self.fc2 = nn.Linear(h, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc3(F.silu(self.fc1(x)) * self.fc2(x))
        return self.fc2(self.activation(self.fc1(x)))


class SmearGate(nn.Module):
    """x_t + λ·σ(w·x_t[:width])·x_{t-1}: each token's embedding takes a gated share of the
    previous token's (modded-nanogpt's smear). λ starts at 0, so the model starts without it.

    A 4-layer model spends attention on "what was the last token" otherwise; here it costs two
    element-wise passes. Both parameters are vectors (AdamW's group, never Muon's).
    """

    def __init__(self, dim: int, width: int = 12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(min(width, dim)))
        self.scale = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.scale)

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d) embeddings; `prev` (B, d): the embedding of the token before x[:, 0]
        (a KV-cache continuation), None where x[:, 0] starts its sequence."""
        w = self.weight.to(x.dtype)
        gate = self.scale.to(x.dtype) * torch.sigmoid(x[..., : w.shape[0]] @ w)[..., None]
        if prev is not None:
            return x + gate * torch.cat([prev[:, None].to(x.dtype), x[:, :-1]], dim=1)
        if x.shape[1] == 1:
            return x
        return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)


class AttentionGate(nn.Module):
    """Each head's output scaled by σ(w_h·x_t[:width]), x the attention's (normed) input: a head
    can switch itself off for a token instead of attending somewhere harmless (Qiu et al. 2025,
    "Gated Attention for LLMs"; modded-nanogpt's attention gate). w = 0 at init: every gate 0.5,
    which the zero-initialised output projection does not notice.

    `weight` is (heads, width): a small matrix, so `split_for_muon` keeps it in AdamW's group
    (where the runs of docs/training.md trained it) rather than orthogonalising it.
    """

    def __init__(self, dim: int, n_heads: int, width: int = 12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_heads, min(width, dim)))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) the attention's input; heads (B, H, T, head_dim) its per-head output."""
        w = self.weight.to(x.dtype)
        gate = torch.sigmoid(x[..., : w.shape[1]] @ w.mT)  # (B, T, H)
        return heads * gate.transpose(1, 2)[..., None].to(heads.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with Llama 3's frequency scaling if configured."""
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    elif scaling:
        raise ValueError(f"unsupported rope_scaling {scaling!r}")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Cos/sin of rotary position embeddings (half-split layout), always in float32.

    Computed per forward from the positions, as transformers does: a few element-wise ops on
    (T, head_size) values, no table to grow (no host read of the largest position) and nothing
    that a long context would preallocate.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> RotaryEmbedding:
        # Overrides nn.Module's private `_apply`: every .to()/.half() lands here, no public hook.
        # `model.to(torch.bfloat16)` would round the frequencies to 8 bits, and the angle error
        # grows with position (0.2 rad at position 2000 for frequency 0.1): keep them fp32.
        exact = self.inv_freq
        super()._apply(fn, recurse)
        moved = self.inv_freq
        if moved.dtype != torch.float32 and not exact.is_meta:
            self.inv_freq = exact.to(device=moved.device, dtype=torch.float32)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) → float32 cos and sin of shape (..., head_size)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by position; `cos`/`sin` are (T, D) or (B, 1, T, D).

    In float32 whatever the dtype of `x` (the tables are float32), cast back to it at the end.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
