"""Instruction data (ch. 7): Alpaca-format records, prompt templates, and the padding collate.

A record is {"instruction": str, "input": str (may be empty or absent), "output": str}; preference
records add "chosen" and "rejected". Files are a JSON list or JSONL (one object per line).

The collate appends one end-of-text token to every example, pads the batch to its longest example,
and sets the targets of padding to -100 (ignored by the loss) except the first end-of-text, which
the model must learn to emit. With `mask_prompt`, the targets of the prompt are -100 too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchllm.errors import InputError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
TEMPLATES = ("alpaca", "phi3")


def load_records(
    path: str | Path, required: tuple[str, ...] = ("instruction", "output")
) -> list[dict[str, str]]:
    """Read a JSON list or JSONL of records; errors name the file and record (or line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--data {path}: not UTF-8 text (byte {exc.start})") from None
    stripped = raw.lstrip()
    records: list[tuple[str, Any]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"--data {path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        records = [(f"record {i + 1}", r) for i, r in enumerate(data)]
    else:
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"--data {path}: line {number}: invalid JSON ({exc.msg})"
                ) from None
    out = []
    for where, record in records:
        if not isinstance(record, dict):
            raise InputError(
                f"--data {path}: {where}: expected an object, got {type(record).__name__}"
            )
        for key in required:
            if key not in record:
                raise InputError(f"--data {path}: {where}: field {key!r} is missing")
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
    if template == "alpaca":
        text = (
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
            f"\n\n### Instruction:\n{entry['instruction']}"
        )
        if entry.get("input"):
            text += f"\n\n### Input:\n{entry['input']}"
        return text + "\n\n### Response:\n"
    if template == "phi3":
        text = f"<|user|>\n{entry['instruction']}"
        if entry.get("input"):
            text += f"\n{entry['input']}"
        return text + "\n<|assistant|>:\n"
    raise InputError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")


@dataclass
class Example:
    ids: list[int]  # prompt + response (no end-of-text yet)
    prompt_len: int


def encode_examples(
    records: list[dict[str, str]],
    tokenizer,
    template: str,
    max_length: int,
    mask_prompt: bool = False,
    response_key: str = "output",
) -> tuple[list[Example], dict[str, int]]:
    """Tokenize prompt + response; cut examples longer than `max_length` (+1 end-of-text) and
    drop those whose response would be cut away entirely. Returns examples and counts."""
    examples, cut, dropped = [], 0, 0
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record, template))
        ids = prompt + tokenizer.encode_ordinary(record[response_key])
        if len(ids) > max_length:
            ids = ids[:max_length]
            cut += 1
            if mask_prompt and len(prompt) >= max_length:
                dropped += 1  # nothing left to learn from
                continue
        examples.append(Example(ids, len(prompt)))
    if cut:
        log.warning(
            "%d of %d examples were longer than %d tokens and were cut (%d dropped: no response "
            "left)",
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
    end-of-text is -100; with `mask_prompt`, so are the targets that predict prompt tokens."""
    seqs = [e.ids + [pad_id] for e in batch]
    width = max(len(s) for s in seqs) - 1
    inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, (e, s) in enumerate(zip(batch, seqs, strict=True)):
        n = len(s) - 1
        inputs[i, :n] = torch.tensor(s[:-1])
        targets[i, :n] = torch.tensor(s[1:])  # ends with the one end-of-text kept
        if mask_prompt:
            targets[i, : max(e.prompt_len - 1, 0)] = IGNORE_INDEX
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def split_records(records: list[Any], fractions: tuple[float, ...], seed: int) -> list[list[Any]]:
    """Seeded shuffle, then cut by `fractions` (train, val, test)."""
    from scratchllm.data.classification import split_indices

    parts = split_indices(len(records), fractions, seed, "instruction data")
    return [[records[i] for i in part] for part in parts]
