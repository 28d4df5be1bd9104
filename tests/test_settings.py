"""Settings declared once: dataclass field → flag, YAML key and library value; errors name fields."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import scratchllm.checkpoint
import scratchllm.commands.pretrain as pretrain_command
from scratchllm.cli import build_parser, main
from scratchllm.finetune.classify import ClassifyOptions
from scratchllm.settings import SettingError, setting
from scratchllm.train.pretrain import PretrainOptions, pretrain
from scratchllm.train.trainer import TrainerCallback


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare words


def _resolve(argv: list[str]) -> PretrainOptions:
    return pretrain_command.resolve_options(build_parser().parse_args(["pretrain", *argv]))


def test_a_field_added_to_the_settings_is_a_flag_a_yaml_key_and_a_library_value(
    capsys, tmp_path, monkeypatch
):
    @dataclass
    class WithRatio(PretrainOptions):
        warmup_ratio: float = setting(0.05, help="share of the steps spent warming up")

    # The one edit: the new field. The command is told nothing else about it.
    monkeypatch.setattr(pretrain_command, "PretrainOptions", WithRatio)
    text = _help(capsys, ["pretrain", "--help"])
    assert "--warmup-ratio WARMUP_RATIO share of the steps spent warming up (default 0.05)" in text

    config = tmp_path / "run.yaml"
    config.write_text("warmup-ratio: 0.25\n")
    seen = []

    def fake_pretrain(opts, callback=None, on_header=None, explicit=None):
        seen.append(opts)
        return {"rank": 1}  # a non-zero rank reports nothing: the command exits 0 at once

    monkeypatch.setattr(pretrain_command, "pretrain", fake_pretrain)
    assert main(["pretrain", "--config", str(config)]) == 0
    assert main(["pretrain", "--config", str(config), "--warmup-ratio", "0.5"]) == 0
    assert main(["pretrain"]) == 0
    assert [type(o) for o in seen] == [WithRatio] * 3
    assert [o.warmup_ratio for o in seen] == [0.25, 0.5, 0.05]


def test_defaults_then_yaml_then_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    # `1e-3` without a dot is a string to YAML 1.1; a float field still reads it as a number.
    config.write_text("lr: 1e-3\nbatch_size: 4\nmax-steps: 7\ndata: notes.txt\ncompile: true\n")
    opts = _resolve(["--config", str(config), "--batch-size", "2"])
    assert opts.lr == 1e-3 and opts.max_steps == 7 and opts.compile is True  # from the YAML
    assert opts.batch_size == 2  # the flag beats the YAML
    assert opts.data == ["notes.txt"]  # one path in YAML: a list of one
    assert opts.eval_every == 100 and opts.model == "gpt-micro"  # left to the defaults

    config.write_text("lr: 1e-3\nwarmup_ratoi: 0.1\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(config) in err and "'warmup_ratoi'" in err, err

    config.write_text("batch_size: eight\n")
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(config) in err and "batch_size" in err and "'eight'" in err, err


def test_resume_takes_the_saved_run_json_under_yaml_and_flags(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"lr": 0.01, "batch_size": 3, "seed": 9, "old": 1}))
    config = tmp_path / "more.yaml"
    config.write_text("batch_size: 5\n")
    opts = _resolve(["--out", str(out), "--resume", "--config", str(config), "--seed", "1"])
    assert (opts.lr, opts.batch_size, opts.seed) == (0.01, 5, 1)  # run.json < YAML < flags


def test_the_library_names_the_field_and_the_command_line_the_flag(capsys, tmp_path):
    with pytest.raises(SettingError) as exc:
        PretrainOptions(max_steps=0).validate()
    assert exc.value.field == "max_steps"
    assert str(exc.value) == "max_steps must be ≥ 1, got 0"
    with pytest.raises(SettingError, match=r"^lora_rank must be ≥ 0, got -1$"):
        ClassifyOptions(checkpoint="c", data="d", out="o", lora_rank=-1).validate()

    assert main(["pretrain", "--max-steps", "0", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --max-steps must be ≥ 1, got 0")
    argv = ["finetune", "classify", "--checkpoint", "c", "--data", "d", "--out", "o"]
    assert main([*argv, "--lora-rank", "-1"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --lora-rank must be ≥ 0, got -1")
    assert main([*argv, "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: --batch-size must be ≥ 1, got 0")

    # Other settings a message mentions read as flags too.
    out = tmp_path / "taken"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "train_state.pt").write_bytes(b"")
    with pytest.raises(SettingError, match="pass `resume` to continue it or pick a new `out`"):
        pretrain(PretrainOptions(out=str(out)))
    assert main(["pretrain", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"--out {out} already holds a run; pass --resume to continue it or pick a new --out"
    ), err


def test_finetune_tasks_keep_their_own_defaults(capsys):
    from scratchllm.finetune import FinetuneOptions
    from scratchllm.finetune.instruct import InstructOptions
    from scratchllm.finetune.preference import DPOOptions

    assert "passes over the training split (default 5.0)" in _help(
        capsys, ["finetune", "classify", "--help"]
    )
    dpo = _help(capsys, ["finetune", "dpo", "--help"])
    assert "(default 1.0)" in dpo and "peak learning rate (default 5e-06)" in dpo
    # The defaults live in the options classes: the library and the command line agree.
    given = dict(checkpoint="c", data="d", out="o")
    assert FinetuneOptions(**given).epochs == 3.0
    assert ClassifyOptions(**given).epochs == 5.0 and InstructOptions(**given).epochs == 2.0
    assert (DPOOptions(**given).epochs, DPOOptions(**given).lr) == (1.0, 5e-6)
    # The task flags are fields too: their defaults show in --help and reach the library.
    instruct = _help(capsys, ["finetune", "instruct", "--help"])
    assert "tokens per test response (0: skip; default 256)" in instruct
    assert "prompt style (default alpaca)" in instruct and "DPO temperature β (default 0.1)" in dpo


def test_resume_reads_the_weights_once(tmp_path, data_dir, monkeypatch):
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(dict(context_length=16, emb_dim=16, n_heads=2, n_layers=1)))
    opts = dict(
        data=[str(data_dir / "corpora" / "the-verdict.txt")],
        model=str(model),
        out=str(tmp_path / "run"),
        batch_size=2,
        eval_every=100,
        eval_batches=1,
        sample_tokens=0,
        keep_last=0,
    )
    pretrain(PretrainOptions(max_steps=2, **opts), TrainerCallback())
    reads = []
    real = scratchllm.checkpoint.load_file

    def counting_load_file(path, *args, **kwargs):
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(scratchllm.checkpoint, "load_file", counting_load_file)
    monkeypatch.setattr("safetensors.torch.load_file", counting_load_file)
    result = pretrain(PretrainOptions(max_steps=3, resume=True, **opts), TrainerCallback())
    assert result["steps"] == 3
    assert len(reads) == 1 and reads[0].endswith("model.safetensors"), reads


def test_flags_follow_the_annotations():
    import argparse

    from scratchllm.settings import add_flags, from_args

    @dataclass(kw_only=True)
    class Demo:
        name: str = setting(help="required: no default")
        shuffle: bool = setting(True, help="shuffle the data")
        tags: list[str] = setting(default_factory=list, help="one or more tags", aliases=("-t",))
        mode: str = setting("a", help="the mode", choices=("a", "b"))
        limit: int | None = setting(None, help="at most this many")
        plain: int = 3  # no `setting`: library-only, not a flag

    parser = argparse.ArgumentParser()
    add_flags(parser, Demo)
    demo = from_args(Demo, parser.parse_args(["--name", "x", "--no-shuffle", "-t", "p", "q"]))
    assert (demo.name, demo.shuffle, demo.tags, demo.mode, demo.limit) == (
        "x",
        False,
        ["p", "q"],
        "a",
        None,
    )
    assert from_args(Demo, parser.parse_args(["--name", "x", "--limit", "4"])).limit == 4
    text = " ".join(parser.format_help().split())
    assert "--plain" not in text and "the mode (default a)" in text
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --name is required
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "x", "--mode", "c"])  # not a choice


def test_library_messages_name_fields_and_the_command_line_shows_flags(tmp_path, capsys):
    import torch

    from scratchllm import ByteTokenizer, GPTModel, ModelConfig
    from scratchllm.checkpoint import save_checkpoint
    from scratchllm.finetune import select_trainable
    from scratchllm.finetune.instruct import InstructionTask
    from scratchllm.model.lora import LoRALinear, parse_targets

    config = ModelConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=2)
    model = GPTModel(config)
    cases = [
        (lambda: select_trainable(model, "last-9"), "train", "train last-9: N must be 1..2"),
        (lambda: select_trainable(model, "middle"), "train", "train 'middle': expected head"),
        (lambda: LoRALinear(torch.nn.Linear(2, 2), 0, 1.0), "lora_rank", "lora_rank must be ≥ 1"),
        (lambda: parse_targets("attention"), "lora_targets", "lora_targets unknown group"),
        (lambda: InstructionTask({"train": [1]}, 0, 0), "batch_size", "batch_size must be ≥ 1"),
    ]
    for call, field, message in cases:
        with pytest.raises(SettingError) as exc:
            call()
        assert exc.value.field == field and str(exc.value).startswith(message), str(exc.value)

    save_checkpoint(tmp_path / "base", model, ByteTokenizer(), {})
    data = tmp_path / "texts.tsv"
    data.write_text("".join(f"{'ab'[i % 2]}\ttext {i}\n" for i in range(20)))
    argv = ["finetune", "classify", "--checkpoint", str(tmp_path / "base"), "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "run"), "--train", "last-9"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: --train last-9: N must be 1..2 (the model's blocks)")
    )
    assert (
        main([*argv, "--out", str(tmp_path / "run2"), "--lora-rank", "2", "--lora-targets", "x"])
        == 2
    )
    assert "error: --lora-targets unknown group 'x'" in capsys.readouterr().err
    assert main(["pretrain", "--model", "nope", "--out", str(tmp_path / "p")]) == 2
    assert "error: --model 'nope': not a preset" in capsys.readouterr().err
    assert main(["finetune", "dpo", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "error: --checkpoint is required" in capsys.readouterr().err  # no run.json to read
