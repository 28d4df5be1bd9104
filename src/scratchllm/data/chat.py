"""Chat data for instruction tuning: conversations, their one rendering, and the assistant mask.

Two record forms are read, from a JSON list or JSONL (one object per line):

- OpenAI's chat fine-tuning format: {"messages": [{"role": "system"|"user"|"assistant",
  "content": str}, ...]}, multi-turn, the system message optional;
- ShareGPT's: {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}.

A conversation renders with the checkpoint's chat template when its tokenizer has one (imported
models), else with the book's Alpaca format for conversations (`alpaca_prompt`): each user
message an `### Instruction:` section, each assistant message a `### Response:`, a system message
in place of the preamble. `chat` and `serve` render a history the same way
(`inference/chat.py`, `chat_prompt`), so a model tuned here chats as it was trained: the tokens
before each assistant reply are the prompt `chat` builds for the history up to that reply.

Only assistant turns are trained (with a template, each reply's end-of-turn text too); after the
last reply the collate appends end-of-text, which the model learns to emit, as for Alpaca records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scratchllm.data.instruction import ALPACA_PREAMBLE, Example, alpaca_text
from scratchllm.errors import InputError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
CHAT_KEYS = ("messages", "conversations")


def alpaca_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """The book's instruction format for a conversation (a system message replaces the preamble).

    A user message's content is an instruction with no input (an `### Instruction:` section,
    never an `### Input:`), each assistant turn a `### Response:`; the text ends with an open
    `### Response:` for the model to fill. One user message thus gives exactly the prompt that
    instruction tuning trained on for the record {"instruction": content, "input": ""}.
    """
    system = [m["content"] for m in messages if m["role"] == "system"]
    kinds = {"user": "instruction", "assistant": "response"}
    sections = [(kinds[m["role"]], m["content"]) for m in messages if m["role"] in kinds]
    return alpaca_text(sections, system[0] if system else ALPACA_PREAMBLE)


def is_chat_record(record: Any) -> bool:
    return isinstance(record, dict) and any(key in record for key in CHAT_KEYS)


def conversation(record: Any, path: str | Path, where: str) -> list[dict[str, str]]:
    """A record's messages as [{"role", "content"}], cut after the last assistant turn (what
    follows it trains nothing); `InputError` naming `path` and `where` (the line) if malformed."""
    at = f"--data {path}: {where}"
    if not isinstance(record, dict):
        raise InputError(f"{at}: expected an object, got {type(record).__name__}")
    if "messages" in record:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in ROLES}
    elif "conversations" in record:
        key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise InputError(f"{at}: field 'messages' (or ShareGPT's 'conversations') is missing")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{at}: field {key!r} must be a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InputError(f"{at}: {key}[{i}]: expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise InputError(
                f"{at}: {key}[{i}]: unknown role {role!r} in {role_key!r} (expected "
                f"{', '.join(roles)})"
            )
        if not isinstance(turn.get(text_key), str):
            raise InputError(f"{at}: {key}[{i}]: {text_key!r} must be a string")
        out.append({"role": roles[role], "content": turn[text_key]})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        raise InputError(f"{at}: no assistant turn (nothing to train on)")
    return out[: last + 1]


def load_conversations(path: str | Path, records: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Each (where, record) of a chat file as {"messages": [...]}; errors name file and line."""
    out = [{"messages": conversation(record, path, where)} for where, record in records]
    if not out:
        raise InputError(f"--data {path}: no records in it")
    return out


def template_name(tokenizer) -> str:
    """How conversations render with `tokenizer`: its own chat template, or the Alpaca format."""
    return "chat_template" if tokenizer.has_chat_template else "alpaca"


def _render(tokenizer, messages: list[dict[str, str]], open_reply: bool) -> str:
    """The text of `messages`; `open_reply`: up to where the next assistant reply starts."""
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=open_reply)
    if open_reply:
        return alpaca_prompt(messages)
    *history, reply = messages  # ends on an assistant turn: its open header, then its text
    return alpaca_prompt(history) + reply["content"]


def segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces: every assistant reply trained, the rest not.

    Piece by piece, the text before reply k is the prompt for the history up to it (with the
    open reply of `add_generation_prompt`), and the reply is what the full render adds to it. A
    template whose render of a longer history does not extend a shorter one (one that rewrites
    past turns) trains the last reply only, after the prompt for its history."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for k in replies:
        prompt = _render(tokenizer, messages[:k], open_reply=True)
        full = _render(tokenizer, messages[: k + 1], open_reply=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            log.info("chat template rewrites past turns: training the last reply only")
            prompt = _render(tokenizer, messages[: replies[-1]], open_reply=True)
            full = _render(tokenizer, messages, open_reply=False)
            if not full.startswith(prompt):
                raise InputError("chat template: a reply's render does not extend its prompt")
            return [(prompt, False), (full[len(prompt) :], True)]
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return pieces


def encode_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per id, whether it is a trained (assistant) token.

    Template text holds special tokens and encodes with them; Alpaca text encodes as plain text
    (a special token typed in a message stays text), both as `chat_prompt` encodes a prompt."""
    templated = tokenizer.has_chat_template
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segments(tokenizer, messages):
        if not text:
            continue
        piece = (
            tokenizer.encode(text, allow_special=True)
            if templated
            else (tokenizer.encode_ordinary(text))
        )
        ids += piece
        trained += [train] * len(piece)
    return ids, trained


def encode_conversations(
    records: list[dict[str, Any]], tokenizer, max_length: int
) -> tuple[list[Example], dict[str, int]]:
    """Examples whose targets are the assistant tokens and the end-of-text after the last reply.

    An example longer than `max_length` keeps its first `max_length` ids and the next one as its
    last target (as `encode_examples` cuts); one with no assistant token left is dropped."""
    examples, cut, dropped = [], 0, 0
    for record in records:
        ids, trained = encode_conversation(tokenizer, record["messages"])
        # mask[j]: whether token j of ids + [end-of-text] is a target; the end is trained.
        mask = [*trained, True]
        cut_target = None
        if len(ids) > max_length:
            ids, cut_target, mask = ids[:max_length], ids[max_length], mask[: max_length + 1]
            cut += 1
            if not any(mask[1:]):
                dropped += 1
                continue
        prompt_len = trained.index(True) if True in trained else len(ids)
        examples.append(Example(ids, prompt_len, cut_target, mask))
    if cut:
        log.info(
            "cut %d of %d conversations to %d tokens (%d dropped: no reply left)",
            cut,
            len(records),
            max_length,
            dropped,
        )
    if records and not examples:
        raise InputError(f"every conversation's first reply starts after --max-length {max_length}")
    return examples, {"truncated": cut, "dropped": dropped}


def reply_prompt(record: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """A conversation's history before its last reply, and that reply (the test-split target)."""
    *history, reply = record["messages"]
    return history, reply["content"]
