"""Causal multi-head attention (ch. 3) with grouped-query heads, QK-norm, RoPE and a KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from scratchllm.config import ModelConfig
from scratchllm.model.layers import AttentionGate, RMSNorm, apply_rope

# SDPA shares key/value heads among query heads itself (`enable_gqa`) from torch 2.5 on; before,
# the keys and values are repeated to one per query head, the same numbers at more memory.
SDPA_HAS_GQA = TorchVersion(torch.__version__) >= (2, 5)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` over (B, H, T, D) queries and (B, KV, S, D) keys and
    values, KV dividing H (grouped-query attention), on every torch the package supports."""
    if k.shape[1] != q.shape[1]:
        if SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask, dropout_p, is_causal, enable_gqa=True
            )
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)


class KVCache:
    """Keys and values of every layer, preallocated once for `max_len` positions.

    Decoding appends one position per step instead of recomputing the prefix.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, config.kv_heads, max_len, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)
        ]
        self.max_len = max_len
        self.length = 0  # positions already stored
        self.last_tokens: torch.Tensor | None = None  # (B,) ids: the smear gate's input

    def previous_tokens(self) -> torch.Tensor | None:
        """(B,) id of the token before the next one (None at the start): what a `smear` model
        mixes into the next token's embedding. Kept only by such models (`record_tokens`)."""
        return self.last_tokens if self.length else None

    def record_tokens(self, idx: torch.Tensor) -> None:
        """Note the (B, T) ids about to be stored (call before `advance`)."""
        self.last_tokens = idx[:, -1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self.last_tokens = None


class BatchKVCache:
    """A KV cache whose rows (sequences) each have their own length: the serving engine's cache.

    Prompts of different lengths are prefilled right-padded from an empty cache (every row
    writes the same slice, causal attention needs no extra mask); `set_lengths` then records each
    row's true length, so the padding is overwritten by that row's later tokens. A one-token
    decode step writes each row at its own length; `decode_mask` hides what lies beyond it.
    Rows can be dropped (`select`) and batches joined (`merge`), which continuous batching needs.
    Capacity grows on demand, so a 128k-context model does not preallocate 128k positions.
    Storage is zero-filled: masked positions must hold finite numbers (0 · NaN would be NaN).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.max_len = config.context_length
        capacity = max(1, min(capacity, self.max_len))
        shape = (batch_size, config.kv_heads, capacity, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        # Each position's token id, shaped like a key store so that resizing, `select` and
        # `merge` treat it alike: a `smear` model reads the id before each row's next token.
        self.tokens = [torch.zeros((batch_size, 1, capacity, 1), dtype=torch.long, device=device)]
        self.lengths_list = [0] * batch_size  # host copy: no device sync to read a length
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._rows = torch.arange(batch_size, device=device)

    @property
    def batch_size(self) -> int:
        return len(self.lengths_list)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def length(self) -> int:
        """The longest row (what `GPTModel.forward` checks against the context length)."""
        return max(self.lengths_list, default=0)

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths_list)) <= 1

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._put(self.keys[layer], k)
        self._put(self.values[layer], v)
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _put(self, store: torch.Tensor, new: torch.Tensor) -> int:
        """Write `new` (B, h, t, d) at each row's next positions; return the end position."""
        t = new.shape[2]
        if self.uniform:  # every row at the same length: one slice write, nothing to mask
            start = self.lengths_list[0] if self.lengths_list else 0
            end = start + t
        elif t != 1:
            raise ValueError("rows of different lengths can only advance one token at a time")
        else:
            end = self.length + 1
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {end}")
        if self.uniform:
            store[:, :, start:end] = new
        else:  # index_put does not cast: we do
            store[self._rows, :, self.lengths] = new[:, :, 0].to(store.dtype)
        return end

    def previous_tokens(self) -> torch.Tensor | None:
        """(B,) id of the token before each row's next one; None while the cache is empty (a
        row joined for decoding holds at least its prompt's first token)."""
        if not self.length:
            return None
        return self.tokens[0][self._rows, 0, (self.lengths - 1).clamp_min(0), 0]

    def record_tokens(self, idx: torch.Tensor) -> None:
        """Store the (B, T) ids where `update` writes the keys (call before `advance`)."""
        self._put(self.tokens[0], idx[:, None, :, None])

    def advance(self, n: int) -> None:
        self.lengths_list = [n_ + n for n_ in self.lengths_list]
        self.lengths += n

    def set_lengths(self, lengths: list[int]) -> None:
        """Record each row's true length after a right-padded prefill."""
        if len(lengths) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} lengths, got {len(lengths)}")
        self.lengths_list = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.lengths.device)

    def positions(self) -> torch.Tensor:
        """(B, 1) position of each row's next token."""
        return self.lengths[:, None]

    def decode_mask(self) -> torch.Tensor | None:
        """(B, 1, 1, length + 1) bool mask for a one-token step; None when rows are aligned."""
        if self.uniform:
            return None
        keys = torch.arange(self.length + 1, device=self.lengths.device)
        return (keys[None, :] <= self.lengths[:, None])[:, None, None, :]

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions per row (doubling, capped at the context length)."""
        if needed <= self.capacity:
            return
        if needed > self.max_len:
            raise ValueError(f"KV cache: {needed} positions exceed the context {self.max_len}")
        new = min(self.max_len, max(needed, 2 * self.capacity))
        self._resize(new)

    def _resize(self, capacity: int) -> None:
        keep = min(capacity, self.capacity)
        for store in (self.keys, self.values, self.tokens):
            for i, old in enumerate(store):
                b, h, _, d = old.shape
                grown = torch.zeros((b, h, capacity, d), device=old.device, dtype=old.dtype)
                grown[:, :, :keep] = old[:, :, :keep]
                store[i] = grown

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order; a row may repeat, e.g. to fork n samples)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        used = max(1, self.length)
        for store in (self.keys, self.values, self.tokens):
            for i, old in enumerate(store):
                new = torch.zeros((len(rows), *old.shape[1:]), device=old.device, dtype=old.dtype)
                new[:, :, :used] = old[index, :, :used]
                store[i] = new
        self.lengths_list = [self.lengths_list[r] for r in rows]
        self.lengths = self.lengths[index]
        self._rows = torch.arange(len(rows), device=self.lengths.device)

    def merge(self, other: BatchKVCache) -> None:
        """Append the rows of `other` after this cache's rows."""
        capacity = max(self.capacity, other.capacity)
        mine, yours = self.length, other.length
        pairs = (self.keys, other.keys), (self.values, other.values), (self.tokens, other.tokens)
        for store, theirs in pairs:
            for i, old in enumerate(store):
                b, h, _, d = old.shape
                new = torch.zeros(
                    (b + theirs[i].shape[0], h, capacity, d), device=old.device, dtype=old.dtype
                )
                new[:b, :, :mine] = old[:, :, :mine]
                new[b:, :, :yours] = theirs[i][:, :, :yours]
                store[i] = new
        self.lengths_list = self.lengths_list + other.lengths_list
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._rows = torch.arange(len(self.lengths_list), device=self.lengths.device)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed; queries are the last q_len."""
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)


class MultiHeadAttention(nn.Module):
    """Causal self-attention over `n_heads` heads, sharing key/value heads in groups (GQA).

    `impl = "sdpa"` uses PyTorch's fused scaled-dot-product attention (flash / memory-efficient
    kernels where available); `impl = "explicit"` is the book's masked-softmax formula, kept as the
    reference the tests compare against.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_size,
        )
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.kv_heads * self.head_dim
        # One fused projection for queries, keys and values: one matmul instead of three.
        self.qkv = nn.Linear(config.emb_dim, self.q_dim + 2 * self.kv_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(self.q_dim, config.emb_dim, bias=config.bias)
        affine = config.norm != "rmsnorm_noparam"  # a parameter-free model: QK-norm too
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps, affine) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps, affine) if config.qk_norm else None
        self.gate = AttentionGate(config.emb_dim, self.n_heads) if config.attn_gate else None
        self.dropout = config.drop_rate
        self.impl = "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, emb_dim). attn_mask: optional bool (B, 1, T, T_total), True = attend."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            if k.dtype != q.dtype:  # a cache kept in lower precision (the engine's fp16 cache)
                k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        if self.impl == "explicit":
            out = self._explicit(q, k, v, attn_mask, dropout)
        else:
            out = self._sdpa(q, k, v, attn_mask, dropout)
        if self.gate is not None:
            out = self.gate(x, out)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.q_dim))

    def _sdpa(self, q, k, v, attn_mask, dropout) -> torch.Tensor:
        q_len, k_len = q.shape[2], k.shape[2]
        if attn_mask is None and q_len == k_len:
            return scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if attn_mask is None and q_len > 1:
            attn_mask = causal_mask(q_len, k_len, q.device)
        return scaled_dot_product_attention(q, k, v, attn_mask, dropout)

    def _explicit(self, q, k, v, attn_mask, dropout) -> torch.Tensor:
        if self.kv_heads != self.n_heads:
            repeat = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = attn_mask if attn_mask is not None else causal_mask(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v
