"""Instruction data (ch. 7): Alpaca-format records, prompt templates, and the padding collate.

A record is {"instruction": str, "input": str (may be empty or absent), "output": str}; preference
records add "chosen" and "rejected". Files are a JSON list or JSONL (one object per line).

The collate appends one end-of-text token to every example, pads the batch to its longest example,
and sets the targets of padding to -100 (ignored by the loss) except the first end-of-text, which
the model must learn to emit. With `mask_prompt`, the targets of the prompt are -100 too. An
example longer than the limit is cut after that end-of-text is appended, as the book's collate
does: it ends on a response token, and the model is not taught to stop wherever a cut fell.

The Alpaca format is kept here once, for training and for chat (`inference/chat.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchllm.data.classification import read_data_file, split_indices
from scratchllm.errors import InputError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "phi3")

# The book's instruction format (ch. 7, Alpaca): a preamble, then sections under these headers.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_HEADERS = {
    "instruction": "### Instruction:",
    "input": "### Input:",
    "response": "### Response:",
}
# Where a generated response ends: the model starting a section of its own.
ALPACA_STOPS = tuple(f"\n\n{header}" for header in ALPACA_HEADERS.values())


def alpaca_text(sections: Iterable[tuple[str, str]], preamble: str = ALPACA_PREAMBLE) -> str:
    """The preamble, each (kind, text) section under its header (kind: instruction, input or
    response), and an open `### Response:` for the model to fill."""
    text = preamble
    for kind, body in sections:
        text += f"\n\n{ALPACA_HEADERS[kind]}\n{body}"
    return text + f"\n\n{ALPACA_HEADERS['response']}\n"


def check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise InputError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")


def read_records(path: str | Path) -> tuple[Path, list[tuple[str, Any]]]:
    """The (where, record) pairs of a JSON list or JSONL file, `where` naming the line (JSONL)
    or the record number; a JSON syntax error is an `InputError` naming file and line. A file
    that is one JSON value but not a list (a pretty-printed object) is refused for its shape."""
    path, raw = read_data_file(path)
    records: list[tuple[str, Any]] = []
    if raw.lstrip().startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--data {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(data, list):  # "[1] [2]" fails to parse; this is only a safeguard
            raise InputError(f"--data {path}: {expected_shape()}; got {describe_json(data)}")
        records = [(f"record {i + 1}", r) for i, r in enumerate(data)]
    else:
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                whole = _whole_value(raw)
                if whole is not None:  # valid JSON, but one value over many lines: not JSONL
                    raise InputError(
                        f"--data {path}: {expected_shape()}; got {describe_json(whole[0])}"
                    ) from None
                raise InputError(
                    f"--data {path}: line {number}: invalid JSON ({exc.msg})"
                ) from None
    return path, records


def _whole_value(raw: str) -> tuple[Any] | None:
    """(the value,) when the whole text is one JSON value, else None."""
    try:
        return (json.loads(raw),)
    except json.JSONDecodeError:
        return None


def expected_shape(required: tuple[str, ...] = ("instruction", "output")) -> str:
    """What a record file must hold, for messages: the fields in the order a record has them."""
    fields = [k for k in required if k == "instruction"] + ["input (optional)"]
    fields += [k for k in required if k != "instruction"]
    return f"expected a JSON list of records with fields {', '.join(fields)}"


def describe_json(value: Any) -> str:
    """A JSON value in a few words, for a message: "an object with keys a, b", "a string"."""
    if isinstance(value, dict):
        if not value:
            return "an empty object"
        keys = [str(k) for k in value][:6]
        more = ", ..." if len(value) > 6 else ""
        return f"an object with keys {', '.join(keys)}{more} (not a list of them)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def load_records(
    path: str | Path,
    required: tuple[str, ...] = ("instruction", "output"),
    records: list[tuple[str, Any]] | None = None,
) -> list[dict[str, str]]:
    """Read a JSON list or JSONL of records; errors name the file and record (or line).
    `records`: the file's (where, record) pairs when already read (`read_records`)."""
    if records is None:
        path, records = read_records(path)
    out = []
    for where, record in records:
        if not isinstance(record, dict):
            what = describe_json(record)
            raise InputError(f"--data {path}: {expected_shape(required)}; got {where}: {what}")
        for key in required:
            if key not in record:
                has = ", ".join(str(k) for k in record) or "none"
                raise InputError(
                    f"--data {path}: {expected_shape(required)}; got {where}: "
                    f"field {key!r} is missing (its fields: {has})"
                )
        for key in (*required, "input"):
            if key in record and not isinstance(record[key], str):
                raise InputError(f"--data {path}: {where}: field {key!r} must be a string")
        if not record["instruction"].strip():
            raise InputError(f"--data {path}: {where}: field 'instruction' is empty")
        clean = {k: v for k, v in record.items() if isinstance(v, str)}
        clean.setdefault("input", "")
        out.append(clean)
    if not out:
        raise InputError(f"--data {path}: no records in it")
    return out


def format_prompt(entry: dict[str, str], template: str = "alpaca") -> str:
    """The prompt up to and including the response header; the response follows directly."""
    check_template(template)
    if template == "alpaca":
        sections = [("instruction", entry["instruction"])]
        if entry.get("input"):
            sections.append(("input", entry["input"]))
        return alpaca_text(sections)
    text = f"<|user|>\n{entry['instruction']}"  # phi3
    if entry.get("input"):
        text += f"\n{entry['input']}"
    return text + "\n<|assistant|>:\n"


@dataclass
class Example:
    ids: list[int]  # the inputs: prompt + response, no end-of-text (the collate appends it)
    prompt_len: int
    # A cut example's last target: the first token cut away, a response token. None: the example
    # is whole, and its last target is the end-of-text the collate appends.
    cut_target: int | None = None
    # Chat examples: for each token of ids + [end-of-text (or the cut target)], whether it is a
    # target (an assistant token); the other targets are -100 whatever `mask_prompt` says.
    mask: list[bool] | None = None


def encode_examples(
    records: list[dict[str, str]],
    tokenizer,
    template: str,
    max_length: int,
    mask_prompt: bool = False,
    response_key: str = "output",
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize prompt + response; cut examples longer than `max_length` and, with
    `mask_prompt`, drop those with no response token left to predict. Returns examples and counts.

    A cut keeps the first `max_length` tokens as inputs and the next one as the last target, as
    the book's collate does (append end-of-text, then cut): no end-of-text at the cut."""
    examples, cut, dropped = [], 0, 0
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record, template))
        ids = prompt + tokenizer.encode_ordinary(record[response_key])
        cut_target = None
        if len(ids) > max_length:
            ids, cut_target = ids[:max_length], ids[max_length]
            cut += 1
            if mask_prompt and len(prompt) > max_length:
                dropped += 1  # every target predicts a prompt token: nothing left to learn from
                continue
        examples.append(Example(ids, len(prompt), cut_target))
    if cut:  # the counts are returned: the caller reports them once (the CLI prints a warning)
        log.info(
            "cut %d of %d examples to %d tokens (%d dropped: no response left)",
            cut,
            len(records),
            max_length,
            dropped,
        )
    if not examples:
        raise InputError(f"every example is longer than --max-length {max_length}")
    return examples, {"truncated": cut, "dropped": dropped}


def collate_instructions(
    batch: list[Example],
    pad_id: int,
    mask_prompt: bool = False,
    allowed_max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, T): targets are inputs shifted by one; padding after the first
    end-of-text is -100; with `mask_prompt`, so are the targets that predict prompt tokens.
    `pad_id` is the end-of-text id: a whole example's last target is the first padding."""
    seqs = [e.ids + [pad_id if e.cut_target is None else e.cut_target] for e in batch]
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, (e, s) in enumerate(zip(batch, seqs, strict=True)):
        n = len(s) - 1
        inputs[i, :n] = torch.tensor(s[:-1])
        targets[i, :n] = torch.tensor(s[1:])  # ends with the one end-of-text kept, or the cut
        if e.mask is not None:
            keep = torch.tensor(e.mask[1 : n + 1], dtype=torch.bool)
            targets[i, :n][~keep] = IGNORE_INDEX
        elif mask_prompt:
            targets[i, : max(e.prompt_len - 1, 0)] = IGNORE_INDEX
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def split_records(records: list[Any], fractions: tuple[float, ...], seed: int) -> list[list[Any]]:
    """Seeded shuffle, then cut by `fractions` (train, val, test)."""
    parts = split_indices(len(records), fractions, seed, "instruction data")
    return [[records[i] for i in part] for part in parts]
