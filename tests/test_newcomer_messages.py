"""Messages that guide a newcomer: instruction data of the wrong shape says what shape is
expected, and `convert --tokenizer` says when it is ignored (on export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.data.instruction import load_records
from scratchllm.errors import InputError

EXPECTED = "expected a JSON list of records with fields instruction, input (optional), output"


@pytest.mark.parametrize(
    "content, got",
    [
        # a pretty-printed object: valid JSON, but neither a list nor JSONL
        ('{\n  "instruction": "a",\n  "output": "b"\n}\n', "got an object with keys instruction"),
        ('{\n  "data": [1, 2]\n}', "got an object with keys data"),
        ('["a", "b"]', "got record 1: a string"),
        ('[{"prompt": "a", "response": "b"}]', "got record 1: field 'instruction' is missing"),
        ('[{"instruction": "a", "input": "b"}]', "got record 1: field 'output' is missing"),
        ('{"question": "a"}\n', "got line 1: field 'instruction' is missing"),
        ('"hello"', "got line 1: a string"),
    ],
)
def test_valid_json_of_the_wrong_shape_names_the_shape(tmp_path, content, got):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"--data {path}: {EXPECTED}; ")
    assert got in message
    assert "invalid JSON" not in message


def test_the_shape_names_the_fields_a_preference_record_needs(tmp_path):
    path = tmp_path / "pref.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    with pytest.raises(InputError, match="fields instruction, input \\(optional\\), chosen"):
        load_records(path, ("instruction", "chosen", "rejected"))


def test_jsonl_and_syntax_errors_are_unchanged(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert load_records(path) == [{"instruction": "a", "output": "b", "input": ""}]
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(InputError, match="line 2: invalid JSON"):
        load_records(path)


def test_finetune_cli_prints_the_shape(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"records": []}, indent=2))
    ckpt = _checkpoint(tmp_path / "ckpt")
    argv = ["finetune", "instruct", "--checkpoint", ckpt, "--data", data, "--out", tmp_path / "o"]
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert EXPECTED in err and "got an object with keys records" in err
    assert "invalid JSON" not in err


def _checkpoint(path: Path) -> Path:
    config = ModelConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
    save_checkpoint(path, GPTModel(config), ByteTokenizer())
    return path


def test_convert_tokenizer_on_export_says_it_is_ignored(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    argv = ["convert", "--from", ckpt, "--out", tmp_path / "hf", "--tokenizer", "bytes"]
    assert main([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "ignored" in line]
    assert warnings == [
        "warning: --tokenizer bytes is ignored on export (the checkpoint's own tokenizer is "
        "written)"
    ]
    assert "exported" in out and (tmp_path / "hf" / "config.json").exists()


def test_convert_without_tokenizer_warns_nothing(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt")
    assert main(["convert", "--from", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "ignored" not in capsys.readouterr().err
