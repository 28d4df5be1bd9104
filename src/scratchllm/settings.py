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
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from scratchllm.errors import InputError

T = TypeVar("T")
_KEY = "scratchllm.setting"
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


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Any = _MISSING,
    choices: tuple[Any, ...] | list[Any] | None = None,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    nargs: str | None = None,
) -> Any:
    """A dataclass field that is also a flag. `help` is plain text (no %-escaping)."""
    flag = _Flag(help, tuple(choices) if choices else None, metavar, tuple(aliases), nargs)
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_KEY: flag}
    )


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


def _flag_meta(cls: type, name: str) -> _Flag | None:
    # The first class in the MRO that declared this field with `setting` (a subclass may re-default
    # a field with a plain default and keep its help).
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and _KEY in f.metadata:
            return f.metadata[_KEY]
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def specs(cls: type) -> list[_Spec]:
    """The flag-bearing fields of `cls` in --help order: those of the most specific class that
    declares any (what the command is about: data, model, out), then the others from the base up."""
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
    order = [name for group in [*groups[-1:], *groups[:-1]] for name in group]
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
            if spec.scalar in (int, float):
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
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror})") from None
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


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """`cls(**values)`, validated; a required setting left out is a SettingError."""
    for f in dataclasses.fields(cls):
        if f.init and _default(f) is _MISSING and f.name not in values:
            raise SettingError(f.name, "is required")
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings object a command line (and its `--config`) describes."""
    return build(cls, given(cls, args))


def with_defaults(cls: type[T], **defaults: Any) -> type[T]:
    """A subclass of `cls` whose named settings default to other values (for one command)."""
    hints = typing.get_type_hints(cls)
    fields = [(name, hints[name], dataclasses.field(default=v)) for name, v in defaults.items()]
    sub = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))
    sub.__module__, sub.__qualname__ = cls.__module__, cls.__qualname__
    return sub


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
