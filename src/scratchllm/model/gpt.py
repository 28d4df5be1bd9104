"""The GPT model (ch. 4): embeddings, a stack of transformer blocks, a final norm and the head."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scratchllm.config import ModelConfig
from scratchllm.errors import InputError
from scratchllm.model.attention import KVCache, MultiHeadAttention
from scratchllm.model.layers import (
    AttentionGate,
    FeedForward,
    RotaryEmbedding,
    SmearGate,
    make_norm,
    softcap,
)

if TYPE_CHECKING:
    from scratchllm.tokenizers import Tokenizer

# The checkpoint format and generation sit above the model (scratchllm.checkpoint and
# scratchllm.inference import this module, never the other way round): when imported, as
# `import scratchllm` always does first, they hand in what `from_pretrained`, `save_pretrained`
# and `generate` call.
_PROVIDED: dict[str, Callable[..., Any]] = {}


def provide(name: str, function: Callable[..., Any]) -> None:
    """Register `function` as the model's `name` ("load_checkpoint", "generate", ...)."""
    _PROVIDED[name] = function


def _provided(name: str) -> Callable[..., Any]:
    if name not in _PROVIDED:
        raise RuntimeError(f"GPTModel: {name} is not registered; `import scratchllm` first")
    return _PROVIDED[name]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.att = MultiHeadAttention(config, layer_idx)
        self.norm2 = make_norm(config)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), rope, cache, attn_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """A decoder-only transformer. GPT-2 by default; Llama/Qwen-style when the config says so."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        try:
            self._build(config)
        except (MemoryError, RuntimeError) as exc:  # a size no memory holds: name its field
            error = config.allocation_error(exc)
            if error is None:
                raise
            raise error from None

    def _build(self, config: ModelConfig) -> None:
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.smear = SmearGate(config.emb_dim) if config.smear else None
        learned = config.pos_embedding == "learned"
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim) if learned else None
        self.rope = RotaryEmbedding(config) if not learned else None
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(
            [TransformerBlock(config, i) for i in range(config.n_layers)]
        )
        self.final_norm = make_norm(config)
        if config.num_classes is not None:  # a classifier: its own head, with a bias (ch. 6)
            self.out_head = nn.Linear(config.emb_dim, config.num_classes)
        else:
            self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.out_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # -- initialisation ------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) linears, residual projections scaled by
        1/sqrt(2·layers) (zeros with `zero_init_proj`); embeddings as
        `ModelConfig.emb_init_std` says."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("out_proj", "ff.fc2", "ff.fc3"))
                if name.endswith("ff.fc2") and self.config.ffn == "swiglu":
                    residual = False  # in SwiGLU fc2 is the up projection, fc3 the residual one
                if residual and self.config.zero_init_proj:
                    nn.init.zeros_(module.weight)
                else:
                    std = residual_std if residual else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self._emb_std())
            elif isinstance(module, (SmearGate, AttentionGate)):
                module.reset_parameters()

    def _emb_std(self) -> float:
        # Small-std embeddings (GPT-2) make a deep untied model sit on the unigram plateau for
        # long on small data (the book's ch. 5 run stalls at loss ~6); N(0, 1) learns at once.
        if self.config.emb_init_std is not None:
            return self.config.emb_init_std
        return 0.02 if self.config.tie_embeddings else 1.0

    def set_classification_head(self, num_classes: int) -> None:
        """Make this model a `num_classes` classifier (ch. 6): a new, untied linear head with
        PyTorch's default initialisation, and `config.num_classes` set to match."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        p = self.tok_emb.weight
        self.out_head = nn.Linear(self.config.emb_dim, num_classes, device=p.device, dtype=p.dtype)

    def set_attention_impl(self, impl: str) -> None:
        """'sdpa' (fused kernels) or 'explicit' (the book's masked softmax, for reference)."""
        if impl not in ("sdpa", "explicit"):
            raise ValueError(f"attention impl must be 'sdpa' or 'explicit', got {impl!r}")
        for block in self.trf_blocks:
            block.att.impl = impl

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Token ids (B, T) → logits (B, T, vocab); `return_hidden` gives the final-norm states.

        With a cache, the new tokens follow the `cache.length` positions already stored.
        `positions` (T,) or (B, T) and `attn_mask` (B, 1, T, T_total) serve padded batches;
        explicit positions stay below `cache.length + T`, the host-side length checked against
        the context, so that nothing is read back from the device.
        """
        if idx.dim() != 2:
            raise InputError(
                f"token ids: expected a (batch, time) tensor, got shape {tuple(idx.shape)}"
            )
        b, t = idx.shape
        start = cache.length if cache is not None else 0  # a host int: no device read
        if start + t > self.config.context_length:
            raise InputError(
                f"token ids: sequence of {start + t} tokens exceeds the model's context "
                f"length {self.config.context_length}"
            )
        if positions is None:
            positions = torch.arange(start, start + t, device=idx.device)
        x = self.tok_emb(idx)
        if self.smear is not None:
            prev = cache.previous_tokens() if cache is not None else None
            x = self.smear(x, None if prev is None else self.tok_emb(prev))
            if cache is not None:
                cache.record_tokens(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            cos, sin = self.rope(positions)
            if positions.dim() == 2:  # per-sequence positions: broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            rope = (cos, sin)
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            x = block(x, rope, cache, attn_mask)
        if cache is not None:
            cache.advance(t)
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.head_logits(x)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final-norm states (`return_hidden`), soft-capped when
        `config.logit_softcap` says (the language-model head only, not a classifier's)."""
        logits = self.out_head(hidden)
        if self.config.num_classes is not None:
            return logits
        return softcap(logits, self.config.logit_softcap)

    # -- bookkeeping ---------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied head counts once).

        `non_embedding` leaves out the token and position embeddings and the output head, the
        count that scaling laws and the preset sizes refer to.
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.out_head.weight.numel()
        return total

    def flops_per_token(self, training: bool = True) -> float:
        return self.config.flops_per_token(training)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(
            self.config, batch_size, max_len or self.config.context_length, p.device, p.dtype
        )

    # -- the checkpoint format, from the model (transformers' names) ---------------------------
    # The model package imports neither the checkpoint code nor inference: see `provide`.
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> GPTModel:
        """The model of a scratchllm checkpoint (or run) directory, in eval mode, with its
        tokenizer as `model.tokenizer` (`scratchllm.checkpoint.load_checkpoint` gives both
        and the metadata)."""
        ckpt = _provided("load_checkpoint")(path, device=device, dtype=dtype)
        model = ckpt.model
        model.tokenizer = ckpt.tokenizer
        return model

    def save_pretrained(
        self, path: str | Path, tokenizer: Tokenizer | None = None, meta: dict | None = None
    ) -> Path:
        """Write this model as a checkpoint directory (atomically), with `tokenizer` or the
        one `from_pretrained` attached; `from_pretrained(path)` reads it back."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise InputError(
                "save_pretrained: a checkpoint holds its tokenizer; pass tokenizer=..."
            )
        return _provided("save_checkpoint")(path, self, tokenizer, meta)

    def generate(
        self,
        prompt: str | torch.Tensor,
        max_new_tokens: int = 50,
        tokenizer: Tokenizer | None = None,
        **sampling: Any,
    ) -> str | torch.Tensor:
        """Continue `prompt`: text in, new text out (`generate_text`, with `tokenizer` or the
        model's own); a (batch, time) tensor of ids in, the ids with the new ones appended out
        (`scratchllm.inference.generate.generate`). `sampling`: temperature, top_k, top_p,
        and seed (text) or generator (ids)."""
        if isinstance(prompt, torch.Tensor):
            return _provided("generate")(self, prompt, max_new_tokens, **sampling)
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise InputError("generate: text needs a tokenizer; pass tokenizer=...")
        return _provided("generate_text")(self, tokenizer, prompt, max_new_tokens, **sampling)
