"""The one sampler: temperature, top-k, top-p and repetition penalty over a row of logits."""

from __future__ import annotations

import torch

from scratchllm.errors import InputError


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass `top_p`.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to ≥ top_p.
    """
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # Mass strictly before each token: a token is kept while that mass is still below top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL's repetition penalty: divide positive, multiply negative logits of `seen` tokens.

    `seen` is a bool mask shaped like `logits`, True for every id already in the sequence.
    """
    if penalty <= 0:
        raise InputError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return logits
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    # An extreme penalty (1e-40) would overflow to ±inf and turn the softmax into NaN: keep the
    # scores finite, which keeps their order, the only thing such a penalty can mean.
    big = torch.finfo(torch.float32).max
    return torch.where(seen, penalised.clamp(-big, big), logits)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). Temperature 0 means greedy."""
    if temperature < 0:
        raise InputError(f"temperature must be ≥ 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise InputError(f"top_k must be ≥ 0, got {top_k}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    # Shift the best score to 0 before dividing: a tiny temperature (1e-40) then sends every
    # other score to -inf instead of overflowing to inf - inf = NaN. Softmax ignores the shift.
    logits = logits.float()
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
