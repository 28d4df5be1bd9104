"""Text generation (ch. 4–5): greedy, temperature, top-k and top-p sampling with a KV cache.

While generating, the context slides to the model's length as in the book; a prompt that alone
exceeds the context length is an error. Sampling is reproducible through a `torch.Generator`.
This is the one sampler: `scratchllm.inference.engine` (batched serving, streaming, stop strings) draws
its tokens through `sample_next`, `filter_logits` and `apply_repetition_penalty`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from scratchllm.errors import InputError
from scratchllm.inference.decode import DecodeStep
from scratchllm.inference.sampling import sample_next
from scratchllm.model.gpt import GPTModel, provide
from scratchllm.tokenizers import Tokenizer


@torch.no_grad()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Collection[int] | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Append up to `max_new_tokens` ids to `idx` (B, T) and return the (B, T + n) tensor.

    A sequence that emits `eos_id` (or any id of a collection of stop ids) is finished: its later positions are padded with `eos_id`,
    and generation stops when every sequence is finished. With `use_cache`, each step feeds one
    token through the KV cache; once the window is full it slides, recomputing over the last
    `context_size` tokens exactly as the book's loop does.
    """
    ctx = context_size or model.config.context_length
    if idx.dim() != 2:
        raise InputError(f"prompt ids: expected shape (batch, time), got {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise InputError("prompt is empty: give at least one token")
    if idx.shape[1] > ctx:
        raise InputError(
            f"prompt of {idx.shape[1]} tokens exceeds the model's context length of {ctx}"
        )
    was_training = model.training
    model.eval()
    try:
        idx = idx.to(next(model.parameters()).device)
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        stop = None
        if eos_id is not None:
            ids = [eos_id] if isinstance(eos_id, int) else sorted(eos_id)
            stop = torch.tensor(ids, device=idx.device)
        # The cache holds only what this call can reach, not the whole (maybe 128k) context.
        cache_len = min(ctx, idx.shape[1] + max_new_tokens)
        cache = model.new_cache(idx.shape[0], cache_len) if use_cache else None
        logits = model(idx, cache=cache)[:, -1]
        decode = DecodeStep(model) if DecodeStep.supports(model) else None
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if stop is not None:
                nxt = torch.where(finished, stop[0], nxt)
                finished |= torch.isin(nxt, stop)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if cache is not None and cache.length < cache.max_len:
                if decode is not None:
                    logits = decode(nxt, cache)
                else:
                    logits = model(nxt[:, None], cache=cache)[:, -1]
            else:
                cache = None  # the window is full: slide it as the book does
                logits = model(idx[:, -ctx:])[:, -1]
        return idx
    finally:
        model.train(was_training)


def generate_text(
    model: GPTModel,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
) -> str:
    """Continue `prompt` and return only the new text, up to (not including) the first of the
    tokenizer's `stop_ids` unless `stop_at_eos` is False."""
    ids = tokenizer.encode(prompt, allow_special=True)
    if not ids:
        raise InputError("prompt is empty: give some text to continue")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stops = set(tokenizer.stop_ids) if stop_at_eos else set()
    out = generate(
        model,
        torch.tensor([ids], dtype=torch.long, device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=stops or None,
        generator=generator,
    )
    new = out[0, len(ids) :].tolist()
    for i, token in enumerate(new):
        if token in stops:
            new = new[:i]
            break
    return tokenizer.decode(new)


provide("generate", generate)  # GPTModel.generate: ids in, ids out
provide("generate_text", generate_text)  # GPTModel.generate: text in, text out
