"""Log-probabilities of tokens under the model: of whole prompts (one forward pass), and of the
tokens the engine draws (from the logits it already computed).

Both are log_softmax of the model's raw logits, in float32: the model's own distribution, before
repetition penalty, temperature, top-k and top-p. That is what scoring needs (lm-evaluation-harness
sums them into a continuation's log-likelihood and checks greedy against their argmax); OpenAI's
API reports the distribution it sampled from instead, which differs only when sampling settings
reshape it.

`prompt_logprobs` runs a forward pass of its own. Under a running engine call it through
`Engine.call` (as `score` does), so that it runs on the stepping thread between two decode steps
and never races the decode loop for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from scratchllm.errors import InputError
from scratchllm.inference.requests import TokenLogprob

# Positions whose vocabulary-wide logits are held at once (a 150k vocabulary: 150 MB in fp32).
_HEAD_CHUNK = 256
# Token positions prefilled together when scoring several prompts (rows × longest prompt).
_BATCH_TOKENS = 8192


class _Row(Protocol):
    """What `record_logprobs` needs of an engine sequence."""

    logprobs: list[TokenLogprob] | None
    params: Any  # SamplingParams: its `logprobs` is k


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (id, log-probability) pairs of each row of (N, vocab) log-probs."""
    if k <= 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [
        list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def record_logprobs(
    logits: torch.Tensor, rows: Sequence[_Row], tokens: Sequence[int | None]
) -> None:
    """Append, for every row that asked for them, the drawn token's log-probability and its k
    most likely alternatives, computed from the (rows, vocab) logits the token was drawn from."""
    wanted = [i for i, r in enumerate(rows) if r.logprobs is not None and tokens[i] is not None]
    if not wanted:
        return
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)
    drawn = torch.tensor([tokens[i] for i in wanted], device=logits.device)
    chosen = logprobs.gather(1, drawn[:, None])[:, 0].tolist()
    k = max(rows[i].params.logprobs for i in wanted)
    top = top_logprobs(logprobs, k)
    for j, i in enumerate(wanted):
        row = rows[i]
        assert row.logprobs is not None
        token = tokens[i]
        assert token is not None
        row.logprobs.append(TokenLogprob(token, chosen[j], top[j][: row.params.logprobs]))


def check_prompt(ids: Sequence[int], vocab_size: int, context_length: int, name: str = "prompt"):
    """Raise `InputError` naming `name` unless `ids` is a non-empty run of in-vocabulary ids that
    fits the context."""
    if not ids:
        raise InputError(f"{name}: empty; give at least one token")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise InputError(
                f"{name}[{i}]: token id {t!r} is outside the vocabulary (0..{vocab_size - 1})"
            )
    if len(ids) > context_length:
        raise InputError(
            f"{name}: {len(ids)} tokens exceed the model's context length of {context_length}"
        )


@torch.inference_mode()
def prompt_logprobs(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], top: int = 0
) -> list[list[TokenLogprob]]:
    """For each prompt, the log-probability of every token after the first given the ones before
    it (len(prompt) - 1 entries; the first token has no context to be scored in), and the `top`
    most likely tokens at each of those positions.

    Prompts are prefilled together, right-padded (causal attention: padding never reaches a real
    position), in batches of about 8k token positions; the head runs in chunks of positions.
    """
    config = model.config
    for n, ids in enumerate(prompts):
        check_prompt(list(ids), config.vocab_size, config.context_length, f"prompts[{n}]")
    device = next(model.parameters()).device
    out: list[list[TokenLogprob]] = []
    start = 0
    while start < len(prompts):
        end, width = start, 0
        while end < len(prompts):
            width_next = max(width, len(prompts[end]))
            if end > start and width_next * (end - start + 1) > _BATCH_TOKENS:
                break
            width, end = width_next, end + 1
        batch = prompts[start:end]
        idx = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            idx[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        hidden = model(idx.to(device), return_hidden=True)
        for row, ids in enumerate(batch):
            out.append(_score_row(model, hidden[row], list(ids), top))
        start = end
    return out


def _score_row(
    model: torch.nn.Module, hidden: torch.Tensor, ids: list[int], top: int
) -> list[TokenLogprob]:
    entries: list[TokenLogprob] = []
    for lo in range(0, len(ids) - 1, _HEAD_CHUNK):
        hi = min(lo + _HEAD_CHUNK, len(ids) - 1)
        logprobs = torch.log_softmax(model.head_logits(hidden[lo:hi]).float(), dim=-1)
        targets = ids[lo + 1 : hi + 1]
        index = torch.tensor(targets, device=logprobs.device)[:, None]
        chosen = logprobs.gather(1, index)[:, 0].tolist()
        best = top_logprobs(logprobs, top)
        entries.extend(TokenLogprob(t, c, b) for t, c, b in zip(targets, chosen, best, strict=True))
    return entries


def score(engine: Any, prompts: Sequence[Sequence[int]], top: int = 0) -> list[list[TokenLogprob]]:
    """`prompt_logprobs` over the engine's model, run on the engine's stepping thread."""
    return engine.result(engine.call(lambda: prompt_logprobs(engine.model, prompts, top)))
