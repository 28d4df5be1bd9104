"""Labelled text for classification (ch. 6): read TSV/CSV/JSONL, balance, split, pad batches.

Formats:
  TSV (also a file without extension, like the SMS Spam Collection): `label<TAB>text` per line.
  CSV: a header row with `label` and `text` columns (other columns are ignored).
  JSONL: one object per line with "text" and "label".
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from scratchllm.errors import InputError
from scratchllm.utils import plural

log = logging.getLogger(__name__)


@dataclass
class LabeledTexts:
    texts: list[str]
    labels: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> LabeledTexts:
        return LabeledTexts(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], self.source
        )


def read_data_file(path: str | Path) -> tuple[Path, str]:
    """The path and text of a fine-tuning --data file; `InputError` if missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--data {path}: not UTF-8 text (byte {exc.start})") from None


def load_labeled(path: str | Path) -> LabeledTexts:
    """Read labelled texts; raise `InputError` naming the file and line of the first bad record."""
    path, raw = read_data_file(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        texts, labels = _read_jsonl(raw, path)
    elif suffix == ".csv":
        texts, labels = _read_csv(raw, path)
    else:
        texts, labels = _read_tsv(raw, path)
    if not texts:
        raise InputError(f"--data {path}: no labelled texts in it")
    return LabeledTexts(texts, labels, str(path))


def _check(text: str, label: str, path: Path, line: int) -> None:
    if not label.strip():
        raise InputError(f"{path}: line {line}: the label is empty")
    if not text.strip():
        raise InputError(f"{path}: line {line}: the text is empty")


def _read_tsv(raw: str, path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(f"{path}: line {number}: expected 'label<TAB>text', found no tab")
        label, text = line.split("\t", 1)
        _check(text, label, path, number)
        labels.append(label.strip())
        texts.append(text)
    return texts, labels


def _read_csv(raw: str, path: Path) -> tuple[list[str], list[str]]:
    reader = csv.DictReader(raw.splitlines())
    fields = reader.fieldnames or []
    for need in ("label", "text"):
        if need not in fields:
            raise InputError(f"{path}: line 1: the header has no {need!r} column (found {fields})")
    texts, labels = [], []
    for row in reader:
        number = reader.line_num
        label, text = row.get("label"), row.get("text")
        if label is None or text is None:
            raise InputError(f"{path}: line {number}: too few columns")
        _check(text, label, path, number)
        labels.append(label.strip())
        texts.append(text)
    return texts, labels


def _read_jsonl(raw: str, path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}: line {number}: expected an object with text and label")
        for key in ("text", "label"):
            if key not in record:
                raise InputError(f"{path}: line {number}: field {key!r} is missing")
        text, label = record["text"], record["label"]
        if not isinstance(text, str):
            raise InputError(f"{path}: line {number}: field 'text' must be a string")
        label = str(label)
        _check(text, label, path, number)
        labels.append(label.strip())
        texts.append(text)
    return texts, labels


def label_names(data: LabeledTexts) -> list[str]:
    """Sorted distinct labels; a data set needs at least two."""
    names = sorted(set(data.labels))
    if len(names) < 2:
        raise InputError(
            f"--data {data.source}: only one class ({names[0]!r}); classification needs at least two"
        )
    return names


def balance(data: LabeledTexts, seed: int) -> LabeledTexts:
    """Undersample every class to the size of the smallest one (the book's balanced data set)."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    smallest = min(len(v) for v in by_label.values())
    keep: list[int] = []
    for label in sorted(by_label):
        keep.extend(rng.sample(by_label[label], smallest))
    keep.sort()
    return data.subset(keep)


def split_indices(
    n: int, fractions: tuple[float, ...], seed: int, what: str = "data set"
) -> list[list[int]]:
    """Shuffle 0..n-1 with `seed` and cut it by `fractions` (the last part takes the rest)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for frac in fractions[:-1]:
        end = start + int(n * frac)
        parts.append(order[start:end])
        start = end
    parts.append(order[start:])
    if any(not p for p in parts):
        sizes = "/".join(str(len(p)) for p in parts)
        raise InputError(f"{what}: {n} records are too few to split {fractions} ({sizes})")
    return parts


def encode_texts(
    texts: list[str], tokenizer, max_length: int, what: str = "text", append_eot: bool = False
) -> tuple[list[list[int]], int]:
    """Token ids per text, cut to `max_length`; returns the ids and how many were cut.

    `append_eot` ends every text with the end-of-text id (kept after a cut): the classifier
    then reads the same token's state for every text, like GPT-1's "extract" token."""
    out, cut = [], 0
    room = max_length - 1 if append_eot else max_length
    for i, text in enumerate(texts):
        ids = tokenizer.encode_ordinary(text)
        if not ids:
            raise InputError(f"{what} {i + 1}: the text is empty after tokenization")
        if len(ids) > room:
            ids = ids[:room]
            cut += 1
        out.append(ids + [tokenizer.eot_id] if append_eot else ids)
    if cut:
        # The caller reports `cut` (the CLI prints one warning): a log line would say it twice.
        log.info("cut %d of %s to %s", cut, plural(len(texts), "text"), plural(room, "token"))
    return out, cut


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids padded on the right to the longest in the batch, and each sequence's length."""
    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return x, lengths
