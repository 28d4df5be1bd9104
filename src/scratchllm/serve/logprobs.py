"""Token log-probabilities in OpenAI's two response formats, and prompt scoring for the server.

- Legacy completions (`logprobs: k`): `choices[i].logprobs = {tokens, token_logprobs,
  top_logprobs, text_offset}`, one entry per token. With `echo` the prompt's tokens come first;
  the first prompt token has no context, so its log-probability and top list are null. A sample
  that ended on a stop id (end-of-text) lists that token last, as OpenAI's API did, though its
  text is not in `text`. `top_logprobs[j]` maps the k most likely tokens to their
  log-probabilities. `text_offset[j]` is where token j's text starts in the choice's `text`
  (a token that ends inside a character starts where that character does).
- Chat completions (`logprobs: true`, `top_logprobs: k`): `choices[i].logprobs.content =
  [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]` for the reply's tokens.

A token is named by its text when its bytes are UTF-8 on their own, else as
"bytes:\\xe2\\x80" (OpenAI's convention), so two tokens never share a name.

Every value is log_softmax of the model's raw logits (`scratchllm.inference.scoring`): the model's
distribution, before temperature, top-k, top-p and repetition penalty. Prompts are scored on the
engine's stepping thread (`Engine.call`), one prompt per call, so decode steps of other requests
run between them.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Sequence
from typing import Any

from scratchllm.inference.engine import Completion, Engine, TokenLogprob
from scratchllm.inference.scoring import prompt_logprobs
from scratchllm.tokenizers import Tokenizer


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's name: its text, or "bytes:\\xNN..." when its bytes are not UTF-8 alone."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _offsets(tokenizer: Tokenizer, ids: Sequence[int], base: int = 0) -> list[int]:
    """Where each token's text starts in the incremental UTF-8 decoding of `ids`, plus `base`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, length = [], base
    for token in ids:
        offsets.append(length)
        length += len(decoder.decode(tokenizer.decode_bytes([token])))
    return offsets


def _kept(tokenizer: Tokenizer, completion: Completion) -> tuple[list[TokenLogprob], list[int]]:
    """The generated entries that belong to the choice's text (a stop string cuts the tokens it
    covers; a stop id that ended the sample is kept last) and their offsets in that text."""
    entries = completion.logprobs or []
    ids = completion.token_ids
    offsets = _offsets(tokenizer, ids)
    if tokenizer.decode(ids) != completion.text:  # a stop string cut the text
        keep = sum(1 for o in offsets if o < len(completion.text))
        return entries[:keep], offsets[:keep]
    extra = entries[len(ids) :]  # the stop id
    return entries[: len(ids)] + extra, offsets + [len(completion.text)] * len(extra)


def _top_dict(tokenizer: Tokenizer, entry: TokenLogprob) -> dict[str, float]:
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(token_text(tokenizer, token), logprob)
    return top


def legacy_logprobs(
    tokenizer: Tokenizer,
    completion: Completion,
    prompt_ids: Sequence[int] | None = None,
    prompt_scores: Sequence[TokenLogprob] | None = None,
    echo_length: int = 0,
) -> dict[str, list[Any]]:
    """The legacy `logprobs` object of one choice; with `prompt_ids` (echo) the prompt comes
    first, its text `echo_length` characters long in `text`."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if prompt_ids is not None:
        assert prompt_scores is not None and len(prompt_scores) == len(prompt_ids) - 1
        tokens += [token_text(tokenizer, t) for t in prompt_ids]
        values += [None, *(e.logprob for e in prompt_scores)]
        tops += [None, *(_top_dict(tokenizer, e) for e in prompt_scores)]
        offsets += _offsets(tokenizer, prompt_ids)
    entries, generated = _kept(tokenizer, completion)
    tokens += [token_text(tokenizer, e.token) for e in entries]
    values += [e.logprob for e in entries]
    tops += [_top_dict(tokenizer, e) for e in entries]
    offsets += [echo_length + o for o in generated]
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _chat_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.decode_bytes([token])
    return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(tokenizer: Tokenizer, completion: Completion) -> dict[str, Any]:
    """The chat `logprobs` object of one choice: the reply's tokens (not the stop id)."""
    entries, _ = _kept(tokenizer, completion)
    content = []
    for e in entries[: len(completion.token_ids)]:
        item = _chat_entry(tokenizer, e.token, e.logprob)
        item["top_logprobs"] = [_chat_entry(tokenizer, t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content}


async def score_prompts(
    engine: Engine, prompts: Sequence[Sequence[int]], top: int
) -> list[list[TokenLogprob]]:
    """Each prompt's token log-probabilities (`prompt_logprobs`), one engine call per prompt."""
    futures = [
        engine.call(lambda ids=ids: prompt_logprobs(engine.model, [ids], top)[0]) for ids in prompts
    ]
    return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
