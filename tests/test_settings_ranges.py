"""Every numeric setting declares its range where it is declared; a value outside it is exit 2.

The settings classes are introspected: a numeric field added without a range fails
`test_every_numeric_setting_declares_a_range`, and every declared bound is tried on the command
line (`--grad-clip -1`, `--min-lr -0.01`, `--warmup-steps -3`, `--generate-tokens -5`,
`--dropout 5`, ... used to be accepted and, for the first two, to train backwards).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from scratchllm.cli import main
from scratchllm.finetune.classify import ClassifyOptions
from scratchllm.finetune.instruct import InstructOptions
from scratchllm.finetune.preference import DPOOptions
from scratchllm.settings import Range, SettingError, build, flag_name, range_of, setting, specs
from scratchllm.train.pretrain import PretrainOptions

COMMANDS = {
    PretrainOptions: ["pretrain"],
    ClassifyOptions: ["finetune", "classify"],
    InstructOptions: ["finetune", "instruct"],
    DPOOptions: ["finetune", "dpo"],
}


def _numeric_fields(cls: type) -> dict[str, type]:
    """The int and float settings of `cls` (optional ones too), by name."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kinds = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}
        if f.init and len(kinds) == 1 and kinds <= {int, float}:
            out[f.name] = kinds.pop()
    return out


def _outside(bounds: Range, kind: type) -> list:
    """One value just outside each bound the range declares."""
    step = 1 if kind is int else 0.5
    values = []
    if bounds.ge is not None:
        values.append(bounds.ge - step)
    if bounds.gt is not None:
        values.append(bounds.gt)
    if bounds.le is not None:
        values.append(bounds.le + step)
    if bounds.lt is not None:
        values.append(bounds.lt)
    return [kind(v) for v in values]


CASES = [
    (cls, name, value)
    for cls in COMMANDS
    for name, kind in _numeric_fields(cls).items()
    if range_of(cls, name) is not None
    for value in _outside(range_of(cls, name), kind)
]


@pytest.mark.parametrize("cls", list(COMMANDS), ids=lambda c: c.__name__)
def test_every_numeric_setting_declares_a_range(cls):
    fields = _numeric_fields(cls)
    assert {"lr", "epochs", "batch_size", "grad_clip", "warmup_steps"} <= set(fields)
    missing = [name for name in fields if range_of(cls, name) is None]
    assert not missing, f"{cls.__name__}: numeric settings without a range: {missing}"


def _argv(cls: type, tmp_path, name: str, value) -> list[str]:
    # Inputs that do not exist: were the value let through, the run would fail on them, later
    # and with another message.
    argv = [*COMMANDS[cls], "--out", str(tmp_path / "run"), "--data", "no-such-data"]
    if cls is not PretrainOptions:
        argv += ["--checkpoint", "no-such-checkpoint"]
    if name in {s.name for s in specs(cls)}:
        return [*argv, flag_name(name), str(value)]
    config = tmp_path / "settings.yaml"  # a library-only setting (no flag): from a YAML file
    shares = isinstance(getattr(cls, name, None), tuple)  # `split`: each share is checked
    config.write_text(f"{name}: [{value}, 0.5, 0.5]\n" if shares else f"{name}: {value}\n")
    return [*argv, "--config", str(config)]


@pytest.mark.parametrize(
    "cls, name, value", CASES, ids=[f"{c.__name__}-{n}={v}" for c, n, v in CASES]
)
def test_a_value_outside_its_range_exits_2_naming_the_flag(cls, name, value, tmp_path, capsys):
    assert main(_argv(cls, tmp_path, name, value)) == 2
    err = capsys.readouterr().err.strip()
    shown = flag_name(name) if name in {s.name for s in specs(cls)} else name
    assert len(err.splitlines()) == 1 and f"error: {shown} must be " in err, err
    assert err.endswith(f", got {value}"), err
    assert not (tmp_path / "run").exists()  # refused before any work started


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--grad-clip", "-1"], "--grad-clip must be ≥ 0, got -1.0"),
        (["pretrain", "--min-lr", "-0.01"], "--min-lr must be ≥ 0, got -0.01"),
        (["pretrain", "--warmup-steps", "-3"], "--warmup-steps must be ≥ 0, got -3"),
        (["finetune", "instruct", "--generate-tokens", "-5"], "--generate-tokens must be ≥ 0"),
        (["finetune", "classify", "--dropout", "5"], "--dropout must be in [0, 1), got 5.0"),
        (["finetune", "dpo", "--beta", "-0.1"], "--beta must be > 0, got -0.1"),
    ],
)
def test_the_flags_that_trained_backwards_are_refused(argv, message, tmp_path, capsys):
    extra = ["--checkpoint", "no-such-checkpoint"] if argv[0] == "finetune" else []
    out = ["--out", str(tmp_path / "run"), "--data", "no-such-data", *extra]
    assert main([*argv, *out]) == 2
    assert message in capsys.readouterr().err


def test_the_library_names_the_field_and_checks_before_any_work(tmp_path):
    from scratchllm.train.pretrain import pretrain

    with pytest.raises(SettingError) as exc:
        # (were the value let through, the missing data would stop the run, with another error)
        pretrain(PretrainOptions(grad_clip=-1.0, out=str(tmp_path / "run"), data=["no-such"]))
    assert (exc.value.field, str(exc.value)) == ("grad_clip", "grad_clip must be ≥ 0, got -1.0")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SettingError, match=r"^dropout must be in \[0, 1\), got 5.0$"):
        InstructOptions(checkpoint="c", data="d", out="o", dropout=5.0).validate()
    with pytest.raises(SettingError, match=r"^lr must be a finite number|^lr must be > 0"):
        PretrainOptions(lr=math.inf).validate()
    with pytest.raises(SettingError, match=r"^lr must be > 0, got nan$"):
        PretrainOptions(lr=math.nan).validate()
    with pytest.raises(SettingError, match=r"^dtype must be float32 or bfloat16, got 'fp8'$"):
        PretrainOptions(dtype="fp8").validate()
    with pytest.raises(SettingError, match=r"^template must be alpaca or phi3, got 'x'$"):
        DPOOptions(checkpoint="c", data="d", out="o", template="x").validate()
    # The edges of the ranges are in them: 0 turns clipping, warmup and samples off.
    opts = dict(grad_clip=0.0, min_lr=0.0, warmup_steps=0, sample_tokens=0, val_fraction=0.0)
    build(PretrainOptions, opts)
    build(InstructOptions, dict(checkpoint="c", data="d", out="o", generate_tokens=0))


def test_a_range_is_declared_with_the_setting():
    @dataclasses.dataclass
    class Demo:
        rate: float = setting(0.5, help="a rate", ge=0, lt=1)
        count: int | None = setting(None, help="a count", gt=0)

    assert build(Demo, {"rate": 0.0}).rate == 0.0
    assert build(Demo, {"count": None}).count is None  # None: unset, nothing to check
    with pytest.raises(SettingError, match=r"^rate must be in \[0, 1\), got 1.0$"):
        build(Demo, {"rate": 1.0})
    with pytest.raises(SettingError, match=r"^count must be > 0, got 0$"):
        build(Demo, {"count": 0})
    with pytest.raises(ValueError):
        setting(1, help="two lower bounds", ge=0, gt=0)
