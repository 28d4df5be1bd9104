"""Conversations: messages → prompt ids (the checkpoint's chat template or the book's Alpaca format), and a chat session that keeps its history within the context."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# The book's instruction format (ch. 7, Alpaca), used when a tokenizer has no chat template: the
# one copy that instruction tuning trains on (`data/instruction.py`, conversations `data/chat.py`).
from scratchllm.data.chat import alpaca_prompt
from scratchllm.data.instruction import ALPACA_STOPS
from scratchllm.errors import InputError
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.tokenizers import Tokenizer


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A chat as a list of {"role": system|user|assistant, "content": str}; else `InputError`."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {'role', 'content'} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"messages[{i}]: role must be 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}]: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def chat_prompt(
    tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]
) -> tuple[list[int], tuple[str, ...]]:
    """Prompt ids for a conversation and the stop strings its template needs.

    The checkpoint's own chat template when it has one, else the book's Alpaca format, in which
    user text is encoded as plain text (a special token typed by a user stays text).
    """
    messages = check_messages(list(messages))
    if tokenizer.has_chat_template:
        return tokenizer.encode_chat(messages, add_generation_prompt=True), ()
    return tokenizer.encode_ordinary(alpaca_prompt(messages)), ALPACA_STOPS


def default_reply_tokens(context_length: int) -> int:
    """The reply budget when none is given: a quarter of the context, at most 256 tokens."""
    return max(1, min(256, context_length // 4))


@dataclass
class ChatSession:
    """A conversation that keeps its history within the context window (the `chat` command).

    Each prompt is the history plus the new message, the oldest turns dropped until it leaves
    room for `params.max_tokens`. A message that leaves less room even alone gets a shorter
    reply (what is left of the context); one that fills the context is an `InputError`.
    """

    engine: Engine
    params: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0  # turns (a message and its reply) the last `send` dropped to fit
    reply_tokens: int = 0  # the token budget of the last `send`'s reply

    def reset(self) -> None:
        self.history.clear()

    def prompt(self, user: str) -> tuple[list[int], tuple[str, ...], int]:
        """Prompt ids for the history plus `user`, dropping the oldest turns until it fits.

        Returns (ids, stop strings, turns dropped). Without any history the prompt may leave
        less than `params.max_tokens` (see the class docstring); `InputError` if it leaves none.
        """
        context = self.engine.context_length
        room = context - self.params.max_tokens
        dropped = 0
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                *self.history[2 * dropped :],
                {"role": "user", "content": user},
            ]
            ids, stops = chat_prompt(self.engine.tokenizer, messages)
            if len(ids) <= room:
                return ids, stops, dropped
            if 2 * dropped >= len(self.history):
                if len(ids) < context:
                    return ids, stops, dropped
                raise InputError(
                    f"message too long: {len(ids)} tokens with the chat template, and the "
                    f"context holds {context} (a reply needs at least 1)"
                )
            dropped += 1

    def send(self, user: str) -> Iterator[str]:
        """Stream the reply to `user`; both join the history once the reply is complete (a
        reply stopped early, by closing this iterator, leaves the history as it was)."""
        ids, stops, self.dropped = self.prompt(user)
        if self.dropped:
            self.history = self.history[2 * self.dropped :]
        self.reply_tokens = min(self.params.max_tokens, self.engine.context_length - len(ids))
        params = SamplingParams(
            **{
                **self.params.__dict__,
                "max_tokens": self.reply_tokens,
                "stop": (*self.params.stop, *stops),
            }
        )
        reply = ""
        for event in self.engine.stream(ids, params):
            reply += event.text
            yield event.text
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
