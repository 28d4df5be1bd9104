"""A one-token decode step over a `GPTModel`'s own modules, without their call overhead.

`GPTModel.forward` is the book's model: modules calling modules on (B, T, D) activations. A
decode step feeds one token per row. At batch 1 on a CPU, a gpt2-small step makes about 150
module calls and several hundred small tensor ops between its matmuls, and while the weights
stream through the caches each of them runs cold: on the 2-core machine of docs/serving.md,
skipping that overhead made the whole step 6% faster.

`DecodeStep` computes the same step for T = 1 on (B, D) activations from a flat plan built once
per model: per layer, the bound `forward` of each norm, linear and feed-forward (so packed,
fp16, int8 and LoRA layers compute exactly as they do inside the model), views of the one qkv
projection, the cache write and one attention: `kernels.attend` where our kernels are built
(one query per row, which PyTorch's CPU attention serves slowly), `scaled_dot_product_attention`
otherwise. What it leaves out is
dropout, hooks and shape checks: a model in training mode or with hooks goes through
`GPTModel.forward`. Tests compare the two for GPT-2 and Llama-style models and every weight
format.

With fp16 or int8 weights on our kernels and no more rows than they take (fp32 activations),
each block is instead one C call (`kernels.BoundLayer`: norm, qkv, QK-norm, RoPE, cache write,
attention, the attention gate, projections with the residual adds, feed-forward): at batch 1
the module calls and small ops cost as much as a fast kernel's streaming of a layer's weights
(docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_hooks

from scratchllm.errors import InputError
from scratchllm.inference import kernels
from scratchllm.model.attention import (
    BatchKVCache,
    KVCache,
    MultiHeadAttention,
    scaled_dot_product_attention,
)
from scratchllm.model.gpt import GPTModel, TransformerBlock
from scratchllm.model.layers import GELU, LayerNorm, ReLU2, RMSNorm, apply_rope, softcap

Rope = tuple[torch.Tensor, torch.Tensor] | None
LayerStep = Callable[
    [torch.Tensor, Rope, KVCache | BatchKVCache, torch.Tensor | None], torch.Tensor
]


def _layer_step(block: TransformerBlock) -> LayerStep:
    """One block for one token per row: x (B, D) → (B, D), as `TransformerBlock.forward`."""
    att = block.att
    norm1, norm2, feed_forward = block.norm1.forward, block.norm2.forward, block.ff.forward
    qkv, out_proj = att.qkv.forward, att.out_proj.forward
    q_norm = att.q_norm.forward if att.q_norm is not None else None
    k_norm = att.k_norm.forward if att.k_norm is not None else None
    gate = att.gate.forward if att.gate is not None else None
    heads, kv_heads, head_dim = att.n_heads, att.kv_heads, att.head_dim
    q_end = att.q_dim
    k_end = att.q_dim + att.kv_dim
    layer = att.layer_idx
    attend_kernel = kernels.available()

    def step(x, rope, cache, mask):
        b = x.shape[0]
        normed = norm1(x)
        proj = qkv(normed)
        # (B, H·hd) → (B, H, 1, hd): for one position this view is forward's transpose.
        q = proj[:, :q_end].view(b, heads, 1, head_dim)
        k = proj[:, q_end:k_end].view(b, kv_heads, 1, head_dim)
        v = proj[:, k_end:].view(b, kv_heads, 1, head_dim)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.update(layer, k, v)
        a = kernels.attend(q, k, v, mask) if attend_kernel else None
        if a is None:  # a cache in another dtype (the engine's fp16 one) is widened first
            a = scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), mask)
        if gate is not None:
            a = gate(normed[:, None], a)
        x = x + out_proj(a.view(b, q_end))
        return x + feed_forward(norm2(x))

    return step


def _kernel_layer(block: TransformerBlock) -> tuple[kernels.BoundLayer, int] | None:
    """The block bound as one call of our C kernels (`kernels.BoundLayer`), and the rows per call
    its linears take; None for a block with another linear (fbgemm-only, LoRA, packed fp32), norm
    or activation than the kernels compute, or parameters not in fp32.

    A batch-1 gpt2-small step spends about 80 us a layer in module calls and small ops around
    the matrix products (on the Zen 4 machine of docs/serving.md); the one call skips them."""
    att, ff = block.att, block.ff
    names = ("fc1", "fc2", "fc3") if ff.swiglu else ("fc1", "fc2")
    modules = [att.qkv, att.out_proj, *(getattr(ff, n) for n in names)]
    linears = [getattr(m, "decode_kernel", lambda: None)() for m in modules]
    activation = "swiglu" if ff.swiglu else _ACTIVATIONS.get(type(ff.activation))
    norms = (block.norm1, block.norm2)
    kind = _NORMS.get(type(norms[0]))
    qk = (att.q_norm, att.k_norm) if att.q_norm is not None else None
    params = [t for n in norms for t in _norm_params(n)]
    qk_params = None if qk is None else tuple(_norm_params(n)[0] for n in qk)
    eps = {n.eps for n in (*norms, *(qk or ()))}
    gate = None if att.gate is None else att.gate.weight.detach()
    if (
        None in linears
        or activation is None
        or kind is None
        or type(norms[1]) is not type(norms[0])
        or len(eps) != 1
        or any(
            t is not None and t.dtype != torch.float32 for t in (*params, *(qk_params or ()), gate)
        )
    ):
        return None
    layer = kernels.BoundLayer(
        kind,
        tuple(params),
        qk_params,
        eps.pop(),
        tuple(b for b, _ in linears),
        att.n_heads,
        att.kv_heads,
        activation,
        gate,
    )
    return layer, min(rows for _, rows in linears)


# The norms and feed-forward activations `kernels.BoundLayer` computes.
_NORMS = {LayerNorm: "layernorm", RMSNorm: "rmsnorm"}
_ACTIVATIONS = {GELU: "gelu_tanh", ReLU2: "relu2"}


def _norm_params(norm: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A norm's (weight, bias), detached; None where it has none."""
    if isinstance(norm, LayerNorm):
        return norm.scale.detach(), norm.shift.detach()
    weight = getattr(norm, "weight", None)
    return (None if weight is None else weight.detach()), None


class DecodeStep:
    """Logits of the next token for one new token per row; see the module docstring.

    Build it after the model is in its final form (packed, quantized, moved): it binds the
    modules it finds then. A model put back in training mode, or given a hook since, is run
    through `GPTModel.forward` instead, so dropout and hooks still apply.
    """

    def __init__(self, model: GPTModel) -> None:
        if not self.supports(model):
            raise ValueError("DecodeStep needs a GPTModel of TransformerBlocks with SDPA attention")
        self.model = model
        self.context_length = model.config.context_length
        self.tok_emb = model.tok_emb.weight
        self.smear = model.smear
        self.pos_emb = model.pos_emb.weight if model.pos_emb is not None else None
        self.rope = model.rope
        self.layers = [_layer_step(block) for block in model.trf_blocks]
        # The same blocks as one C call each (block i's cache is layer i's), for fp32
        # activations of up to `kernel_rows` rows (0: some block cannot; all take one path).
        bound = [_kernel_layer(block) for block in model.trf_blocks]
        self.kernel_layers = [b[0] for b in bound if b is not None]
        self.kernel_rows = 0 if None in bound else min((b[1] for b in bound), default=0)
        self.final_norm = model.final_norm.forward
        self.head = model.out_head.forward
        # `GPTModel.head_logits`: the language-model head's soft-cap (none for a classifier).
        lm_head = model.config.num_classes is None
        self.logit_softcap = model.config.logit_softcap if lm_head else None
        # The hook registries (mutated in place when a hook is added): empty = nothing to run.
        # Private dicts: nn.Module has no public way to list registered hooks.
        self._hooks = [
            d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)
        ] + [module_hooks._global_forward_hooks, module_hooks._global_forward_pre_hooks]

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """A `GPTModel` of plain `TransformerBlock`s with SDPA attention."""
        return isinstance(model, GPTModel) and all(
            type(b) is TransformerBlock
            and type(b.att) is MultiHeadAttention
            and b.att.impl == "sdpa"
            for b in model.trf_blocks
        )

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache | BatchKVCache,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B,) → logits (B, vocab), appending each row's key and value to `cache`.

        `positions` (B,): each row's position (default: all at `cache.length`); `attn_mask`
        (B, 1, 1, length + 1), True = attend, for rows of different lengths.
        """
        if self.model.training or any(self._hooks):
            pos = positions[:, None] if positions is not None else None
            return self.model(tokens[:, None], cache, pos, attn_mask)[:, -1]
        length = cache.length  # the longest row: positions never exceed it
        if length >= self.context_length:
            raise InputError(
                f"token ids: sequence of {length + 1} tokens exceeds the model's context "
                f"length {self.context_length}"
            )
        x = F.embedding(tokens, self.tok_emb)
        if self.smear is not None:  # as `GPTModel.forward`: the previous ids from the cache
            prev = cache.previous_tokens()
            prev = None if prev is None else F.embedding(prev, self.tok_emb)
            x = self.smear(x[:, None], prev)[:, 0]
            cache.record_tokens(tokens[:, None])
        tables = None
        if self.pos_emb is not None:
            x = x + self.pos_emb[positions if positions is not None else length]
        else:
            if positions is None:
                positions = torch.arange(length, length + 1, device=tokens.device)
            tables = self.rope(positions)  # (B, hd) or (1, hd), fp32 as in GPTModel.forward
        if x.dtype == torch.float32 and x.shape[0] <= self.kernel_rows:
            # Where each row's key goes: its own length (BatchKVCache) or the cache's one length.
            at = getattr(cache, "lengths", None)
            if at is None:
                at = torch.full((x.shape[0],), length, dtype=torch.long)
            for i, layer in enumerate(self.kernel_layers):  # x in place
                layer(x, cache.keys[i], cache.values[i], at, length + 1, attn_mask, tables)
        else:
            # (B, hd) → (B, 1, 1, hd): broadcast over (B, H, 1, hd)
            rope = None if tables is None else tuple(t[:, None, None] for t in tables)
            for step in self.layers:
                x = step(x, rope, cache, attn_mask)
        cache.advance(1)
        return softcap(self.head(self.final_norm(x)), self.logit_softcap)
