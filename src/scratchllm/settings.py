"""Typed settings, declared once: each becomes a command-line flag, a YAML key and a library field.

A setting is a dataclass field declared with `setting(default, help=...)`. From that one line come

  - its flag: `max_steps` → `--max-steps`; the type from the annotation (int, float, str; bool →
    a switch, `--x` or `--x/--no-x` when it defaults to True; `list[X]` → one or more values;
    `X | None`), the choices and metavar given, and the dataclass default shown in --help;
  - its key in a YAML `--config` file (`max_steps:` or `max-steps:`);
  - its value in the object the library receives.

Values merge as dataclass defaults < YAML < flags given on the command line: the flags' argparse
defaults are None, so "not given" is visible and YAML can fill it. A plain field (no `setting`) is
a library-only setting (YAML may still set it); a subclass may give a setting a new plain default
(`lr: float = 5e-5`) and keeps its help. Validation lives in the dataclasses, which raise
`SettingError(field, problem)`: "max_steps must be ≥ 1, got 0"; `flags_in_errors` shows that on
the command line as "--max-steps must be ≥ 1, got 0". Help texts and problems name other settings
in backticks (`epochs`); on the command line those read as flags (--epochs).

A numeric setting declares its range where it is declared: `setting(0.1, help=..., ge=0)`,
`setting(None, help=..., ge=0, lt=1)` (`ge` ≥, `gt` >, `le` ≤, `lt` <; None passes). `check`
tests every range and every `choices` before any work starts: `build` calls it, and so does
`Settings.validate`, the base of the settings classes. `setting(..., flag=False)` declares a
library-only setting (a YAML key, no flag) with its range.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from scratchllm.errors import InputError

T = TypeVar("T")
_KEY = "scratchllm.setting"
_PLAIN = "scratchllm.setting.plain"  # a setting without a flag
_RANGE = "scratchllm.range"
_MISSING = dataclasses.MISSING


class SettingError(InputError):
    """A setting holds a value out of range. The message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class _Flag:
    help: str
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    nargs: str | None = None
    # Reads a text value (a flag, a YAML string) into the field's type, e.g. "10m" → 600.0;
    # raises ValueError with the problem ("must be ..., got '10x'"). Numbers pass through it.
    parse: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: ≥ `ge`, > `gt`, ≤ `le`, < `lt` (None: no bound)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (
            self.le is not None and self.lt is not None
        ):
            raise ValueError("a range has at most one lower and one upper bound")

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` ("must be ≥ 1, got 0"), or None when it is in range."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        ok = math.isfinite(value)
        ok = ok and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        ok = ok and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        return None if ok else f"must be {self}, got {value}"

    def __str__(self) -> str:
        lo = self.ge if self.ge is not None else self.gt
        hi = self.le if self.le is not None else self.lt
        if lo is not None and hi is not None:
            left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'≥' if self.ge is not None else '>'} {_num(lo)}"
        if hi is not None:
            return f"{'≤' if self.le is not None else '<'} {_num(hi)}"
        return "a finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Any = _MISSING,
    choices: tuple[Any, ...] | list[Any] | None = None,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    nargs: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    flag: bool = True,
    parse: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field that is also a flag (unless `flag=False`: a library and YAML setting).
    `help` is plain text (no %-escaping); `ge`/`gt`/`le`/`lt` bound a numeric value; `parse`
    reads the text a flag or YAML gives (a duration "10m") before the range is checked."""
    info = _Flag(help, tuple(choices) if choices else None, metavar, tuple(aliases), nargs, parse)
    meta: dict[str, Any] = {_KEY if flag else _PLAIN: info}
    if (ge, gt, le, lt) != (None, None, None, None):
        meta[_RANGE] = Range(ge, gt, le, lt)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _flags_in(text: str, names: set[str]) -> str:
    # Help and messages refer to other settings as `name`; on the command line that is its flag.
    return re.sub(r"`(\w+)`", lambda m: flag_name(m[1]) if m[1] in names else m[1], text)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One flag-bearing field, its annotation taken apart."""

    name: str
    flag: _Flag
    scalar: Any  # int, float, str, bool, or the annotation itself when it is none of those
    is_list: bool
    default: Any  # _MISSING when the field is required


def _split(hint: Any) -> tuple[Any, bool, bool]:
    """(scalar type, optional, list) of an annotation such as `int | None` or `list[str]`."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        return item, optional, True
    return hint, optional, False


def _meta(cls: type, name: str, key: str) -> Any:
    # From the first class in the MRO whose declaration of this field has it (a subclass may
    # re-default a field with a plain default and keep its help and range).
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and key in f.metadata:
            return f.metadata[key]
    return None


def _flag_meta(cls: type, name: str) -> _Flag | None:
    return _meta(cls, name, _KEY)


def range_of(cls: type, name: str) -> Range | None:
    """The range field `name` of settings class `cls` declares (None: it declares none)."""
    return _meta(cls, name, _RANGE)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def specs(cls: type) -> list[_Spec]:
    """The flag-bearing fields of `cls` in --help order: those of the classes that declare a
    required setting and of the most specific class that declares any (what the command is
    about: data, model, out), then the others from the base up."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    by_class: dict[type, list[str]] = {}
    seen: set[str] = set()
    for klass in reversed(cls.__mro__):  # base first: a field belongs to the class that began it
        for name in klass.__dict__.get("__annotations__", {}):
            if name in fields and name not in seen and _flag_meta(cls, name) is not None:
                by_class.setdefault(klass, []).append(name)
                seen.add(name)
    groups = list(by_class.values())
    lead = [g for g in groups if any(_default(fields[n]) is _MISSING for n in g)]
    lead += [g for g in groups[-1:] if g not in lead]
    order = [name for group in [*lead, *(g for g in groups if g not in lead)] for name in group]
    out = []
    for name in order:
        scalar, _, is_list = _split(hints[name])
        out.append(_Spec(name, _flag_meta(cls, name), scalar, is_list, _default(fields[name])))
    return out


def _worth_showing(default: Any) -> bool:
    # No "(default ...)" for a switch that is off, an unset value or a required setting.
    if default is _MISSING or default is None or default is False:
        return False
    return not (isinstance(default, list | tuple) and not default)


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, config: bool = False) -> None:
    """Add one flag per setting of `cls` (and `--config FILE` when `config`)."""
    if config:
        parser.add_argument(
            "--config", help="YAML file with any of these options (flags win over it)"
        )
    all_specs = specs(cls)
    names = {s.name for s in all_specs}
    for spec in all_specs:
        flag = spec.flag
        text = _flags_in(flag.help, names)
        if _worth_showing(spec.default):
            default = f"default {_shown(spec.default)}"
            # "(0 = off)" becomes "(0 = off; default 1.0)"
            text = f"{text[:-1]}; {default})" if text.endswith(")") else f"{text} ({default})"
        kw: dict[str, Any] = {"dest": spec.name, "default": None, "help": text.replace("%", "%%")}
        if spec.scalar is bool:
            kw["action"] = argparse.BooleanOptionalAction if spec.default is True else "store_const"
            if spec.default is not True:
                kw["const"] = True
        else:
            if spec.scalar in (int, float) and flag.parse is None:  # else `build` parses it
                kw["type"] = spec.scalar
            if flag.choices:
                kw["choices"] = list(flag.choices)
            if flag.metavar:
                kw["metavar"] = flag.metavar
            if spec.is_list or flag.nargs:
                kw["nargs"] = flag.nargs or "+"
            # Without --config a flag is the only way to give a required setting.
            kw["required"] = spec.default is _MISSING and not config
        parser.add_argument(flag_name(spec.name), *flag.aliases, **kw)


def load_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings a YAML file gives: keys are field names (`-` or `_`), values checked by type."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InputError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"--config {path}: is a folder; expected a YAML file") from None
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:  # a binary file
        raise InputError(
            f"--config {path}: not UTF-8 text (byte {exc.start}); expected a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"--config {path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise InputError(f"--config {path}: expected a mapping of option: value")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise InputError(f"--config {path}: unknown option {key!r}")
        if _parser(cls, name) is not None:  # `build` parses it (and names the field)
            values[name] = value
            continue
        values[name] = _coerce(value, hints[name], f"--config {path}: {key}")
    return values


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotation wants it, or an InputError naming `where`."""
    scalar, optional, is_list = _split(hint)
    if value is None:
        if optional:
            return None
        raise InputError(f"{where}: a value is required")
    if is_list:
        items = value if isinstance(value, list) else [value]  # `data: a.txt` means [a.txt]
        return [_scalar(v, scalar, where) for v in items]
    if typing.get_origin(scalar) is tuple and isinstance(value, list):
        args = typing.get_args(scalar)
        item = args[0] if args else Any
        return tuple(_scalar(v, item, where) for v in value)
    return _scalar(value, scalar, where)


def _scalar(value: Any, kind: Any, where: str) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if kind in ok:
        if not ok[kind]:
            raise InputError(f"{where}: expected {kind.__name__}, got {value!r}")
        return value
    if kind is float:
        # YAML 1.1 reads `1e-3` (no dot) as a string; float() reads it as Python does.
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise InputError(f"{where}: expected a number, got {value!r}")
    return value


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """What the user set: the `--config` file's values, then the flags given (None: not given)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(cls, args.config))
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.init and value is not None:
            values[f.name] = value
    return values


def check(obj: Any) -> None:
    """Every setting of `obj` in its declared range and among its choices, or a SettingError
    naming the first that is not."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        bounds = range_of(cls, f.name)
        if bounds is not None:
            for item in value if isinstance(value, list | tuple) else [value]:  # each share
                problem = bounds.problem(item)
                if problem:
                    raise SettingError(f.name, problem)
        info = _flag_meta(cls, f.name) or _meta(cls, f.name, _PLAIN)
        if info is not None and info.choices:
            for item in value if isinstance(value, list) else [value]:
                if item not in info.choices:
                    *rest, last = map(str, info.choices)
                    names = f"{', '.join(rest)} or {last}" if rest else last
                    raise SettingError(f.name, f"must be {names}, got {item!r}")


class Settings:
    """Base of the settings classes: `validate` checks the declared ranges and choices; a
    subclass adds its own checks after calling `super().validate()`."""

    def validate(self) -> None:
        check(self)


def _parser(cls: type, name: str) -> Callable[[Any], Any] | None:
    info = _flag_meta(cls, name) or _meta(cls, name, _PLAIN)
    return info.parse if info is not None else None


def parse_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with each setting that declares a `parse` read by it (a SettingError naming the
    field when it cannot be read)."""
    out = dict(values)
    for name, value in values.items():
        parse = _parser(cls, name)
        if parse is not None and value is not None:
            try:
                out[name] = parse(value)
            except ValueError as exc:
                raise SettingError(name, str(exc)) from None
    return out


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """`cls(**values)`, checked (`parse_values`, `check`, then its `validate`); a required
    setting left out is a SettingError."""
    for f in dataclasses.fields(cls):
        if f.init and _default(f) is _MISSING and f.name not in values:
            raise SettingError(f.name, "is required")
    obj = cls(**parse_values(cls, values))
    check(obj)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings object a command line (and its `--config`) describes."""
    return build(cls, given(cls, args))


def with_saved_settings(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """With `resume` set, the run's saved settings (OUT/run.json) are the base; `values` (YAML,
    flags) still win. Keys `cls` no longer has are left out."""
    import json

    if not values.get("resume"):
        return dict(values)
    out = values.get("out")
    if out is None:
        out = next((_default(f) for f in dataclasses.fields(cls) if f.name == "out"), None)
    if out is None or out is _MISSING:
        return dict(values)  # `build` says that `out` is required
    saved = Path(out) / "run.json"
    if not saved.exists():
        return dict(values)  # the recipe's checkpoint check names what is missing
    try:
        raw = json.loads(saved.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{saved}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {**{k: v for k, v in raw.items() if k in names}, **values}


def project(obj: Any, cls: type[T], **changes: Any) -> T:
    """The `cls` part of settings object `obj`: every field of `cls` that `obj` has, plus `changes`."""
    mine = {f.name for f in dataclasses.fields(obj)}
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.name in mine}
    return cls(**{**values, **changes})


@contextmanager
def flags_in_errors(cls: type) -> Iterator[None]:
    """Inside a command: a SettingError about a flag of `cls` names the flag, not the field."""
    try:
        yield
    except SettingError as exc:
        names = {s.name for s in specs(cls)}
        if exc.field not in names:
            raise
        raise InputError(f"{flag_name(exc.field)} {_flags_in(exc.problem, names)}") from None
