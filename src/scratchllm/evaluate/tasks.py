"""In-context task files: the three DCLM/CORE shapes, read and checked, few-shot prompts built.

One JSON object per line, in one of three shapes (the data README's `eval/` section):

- multiple_choice: `{"query": str, "choices": [str, ...], "gold": int}`
- schema: `{"context_options": [str, ...], "continuation": str, "gold": int}`
- language_modeling: `{"context": str, "continuation": str}`

A prompt is few-shot examples, each rendered as the item is but with its gold answer, joined by
a blank line, then the item. An example is `query + delimiter + choices[gold]` (multiple
choice), `context_options[gold] + delimiter + continuation` (schema) or
`context.strip() + delimiter + continuation` (language modelling: nanochat trims those contexts,
some carry trailing whitespace). Few-shot examples come from the same file, never the item
itself, drawn with `random.Random(seed + index)` (nanochat's draw with its seed 1234), so a
run is reproducible and an item's examples do not depend on which other items are evaluated.

Each item becomes `Choice`s: a (context, continuation) pair of strings per answer option. The
scorer decides which tokens are the continuation's (`scoring.py`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scratchllm.errors import InputError
from scratchllm.evaluate.text import read_utf8

TaskType = Literal["multiple_choice", "schema", "language_modeling"]
TASK_TYPES: tuple[str, ...] = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEPARATOR = "\n\n"  # a blank line between examples (DCLM, nanochat)
DEFAULT_SEED = 1234

# The fields of each shape, and what each must hold.
SHAPES: dict[str, dict[str, str]] = {
    "multiple_choice": {"query": "str", "choices": "list", "gold": "int"},
    "schema": {"context_options": "list", "continuation": "str", "gold": "int"},
    "language_modeling": {"context": "str", "continuation": "str"},
}


@dataclass(frozen=True)
class TaskSpec:
    """A task: its file and the settings it is run with (DCLM `heavy.yaml` for the CORE ones)."""

    name: str
    path: Path
    type: str
    shots: int = 0
    delimiter: str = " "
    baseline: float = 0.0  # random-guess accuracy in percent (CORE centres on it)

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise InputError(
                f"task {self.name!r}: type {self.type!r}; expected one of {', '.join(TASK_TYPES)}"
            )
        if self.shots < 0:
            raise InputError(f"task {self.name!r}: shots must be ≥ 0, got {self.shots}")
        if not 0.0 <= self.baseline < 100.0:
            raise InputError(
                f"task {self.name!r}: baseline must be a percentage in [0, 100), "
                f"got {self.baseline}"
            )


@dataclass(frozen=True)
class Choice:
    """One answer option of an item as text: the model reads `context`, is scored on
    `continuation`. `answer` is the option's own text (what lm-eval's acc_norm divides by)."""

    context: str
    continuation: str
    answer: str


def load_items(spec: TaskSpec) -> list[dict[str, Any]]:
    """The items of `spec.path`, each checked against the shape of `spec.type`.

    Raises `InputError` naming the file, the line and the field that is wrong."""
    path = Path(spec.path)
    text = read_utf8(path, "task file", "a JSONL file")
    items: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are no items
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        _check_item(item, spec.type, f"{path}:{number}")
        items.append(item)
    if not items:
        raise InputError(f"task file {path}: no items (the file is empty)")
    if spec.shots >= len(items):
        raise InputError(
            f"task file {path}: {spec.shots}-shot prompts need at least {spec.shots + 1} items "
            f"(the examples never include the item itself), found {len(items)}"
        )
    return items


def _check_item(item: Any, task_type: str, where: str) -> None:
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    shape = SHAPES[task_type]
    for field, kind in shape.items():
        if field not in item:
            other = _guess_shape(item)
            hint = f" (its fields fit the {other} shape)" if other else ""
            raise InputError(
                f"{where}: field {field!r} is missing; a {task_type} item has "
                f"{', '.join(shape)}{hint}"
            )
        value = item[field]
        if kind == "str" and not isinstance(value, str):
            raise InputError(f"{where}: field {field!r} must be a string, got {_kind(value)}")
        if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise InputError(f"{where}: field {field!r} must be an integer, got {_kind(value)}")
        if kind == "list":
            if not isinstance(value, list) or len(value) < 2:
                raise InputError(
                    f"{where}: field {field!r} must be a list of at least 2 strings, "
                    f"got {_kind(value)}"
                )
            for i, entry in enumerate(value):
                if not isinstance(entry, str):
                    raise InputError(
                        f"{where}: field {field!r}[{i}] must be a string, got {_kind(entry)}"
                    )
    options = "choices" if task_type == "multiple_choice" else "context_options"
    if "gold" in shape and not 0 <= item["gold"] < len(item[options]):
        raise InputError(
            f"{where}: field 'gold' is {item['gold']}, expected an index into {options!r} "
            f"(0..{len(item[options]) - 1})"
        )
    scored = "choices" if task_type == "multiple_choice" else "continuation"
    values = item[scored] if isinstance(item[scored], list) else [item[scored]]
    if any(not v for v in values):
        raise InputError(f"{where}: field {scored!r} holds an empty string; nothing to score")


def _guess_shape(item: dict[str, Any]) -> str | None:
    for name, shape in SHAPES.items():
        if all(field in item for field in shape):
            return name
    return None


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "null" if value is None else type(value).__name__


def subset(n_items: int, limit: int | None, seed: int = DEFAULT_SEED) -> list[int]:
    """Indices of the items to evaluate: all, or `limit` of them drawn with `seed` (a shuffle
    then the first `limit`, as nanochat's 500-item CORE), so every run sees the same ones."""
    indices = list(range(n_items))
    if limit is None or limit >= n_items:
        return indices
    if limit < 1:
        raise InputError(f"--limit must be ≥ 1, got {limit}")
    random.Random(seed).shuffle(indices)
    return indices[:limit]


def fewshot_indices(n_items: int, index: int, shots: int, seed: int = DEFAULT_SEED) -> list[int]:
    """`shots` distinct indices of other items than `index`, the same on every call."""
    if shots <= 0:
        return []
    others = [i for i in range(n_items) if i != index]
    return random.Random(seed + index).sample(others, shots)


def _example(item: dict[str, Any], task_type: str, delimiter: str) -> str:
    if task_type == "multiple_choice":
        return item["query"] + delimiter + item["choices"][item["gold"]]
    if task_type == "schema":
        return item["context_options"][item["gold"]] + delimiter + item["continuation"]
    return item["context"].strip() + delimiter + item["continuation"]


def render(
    spec: TaskSpec, items: list[dict[str, Any]], index: int, seed: int = DEFAULT_SEED
) -> list[Choice]:
    """The options of item `index` as (context, continuation) text, few-shot examples first."""
    shots = fewshot_indices(len(items), index, spec.shots, seed)
    prefix = "".join(
        _example(items[i], spec.type, spec.delimiter) + FEWSHOT_SEPARATOR for i in shots
    )
    item, delim = items[index], spec.delimiter
    if spec.type == "multiple_choice":
        context = prefix + item["query"] + delim
        return [Choice(context, choice, choice) for choice in item["choices"]]
    if spec.type == "schema":
        cont = item["continuation"]
        return [Choice(prefix + option + delim, cont, cont) for option in item["context_options"]]
    cont = item["continuation"]
    return [Choice(prefix + item["context"].strip() + delim, cont, cont)]
