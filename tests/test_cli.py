"""End-to-end CLI: the happy path and every bad input named in the core issue (exit 2)."""

import json
import subprocess
import sys

import pytest

from scratchllm.cli import main

PY = [sys.executable, "-m", "scratchllm"]


def run_cli(*args, timeout=300):
    return subprocess.run([*PY, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A tiny run through the real CLI, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    config = tmp / "tiny.json"
    config.write_text(json.dumps(dict(context_length=32, emb_dim=32, n_heads=2, n_layers=1)))
    out = tmp / "run"
    proc = run_cli(
        "pretrain",
        "--data",
        data_dir / "corpora" / "the-verdict.txt",
        "--model",
        config,
        "--tokenizer",
        "bytes",
        "--out",
        out,
        "--max-steps",
        4,
        "--batch-size",
        2,
        "--eval-every",
        2,
        "--eval-batches",
        1,
        "--sample-tokens",
        5,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp, out, proc


def test_pretrain_prints_summary_and_writes_run(trained):
    _, out, proc = trained
    assert "done: 4 steps" in proc.stdout and "val_loss:" in proc.stdout
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()


def test_generate_is_reproducible_with_a_seed(trained):
    _, out, _ = trained
    args = [
        "generate",
        "--checkpoint",
        out,
        "--prompt",
        "It was",
        "--max-new-tokens",
        8,
        "--temperature",
        1.0,
        "--seed",
        3,
    ]
    a, b = run_cli(*args), run_cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_a_reader_that_closes_the_pipe_gets_no_traceback(trained):
    _, out, _ = trained
    argv = ["generate", "--checkpoint", out, "--prompt", "a", "--max-new-tokens", "20"]
    proc = subprocess.Popen([*PY, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` exiting before the text is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_reads_well():
    proc = run_cli("pretrain", "--help")
    assert proc.returncode == 0
    for flag in (
        "--data",
        "--model",
        "--tokenizer",
        "--out",
        "--max-steps",
        "--epochs",
        "--batch-size",
        "--context-length",
        "--lr",
        "--seed",
        "--eval-every",
        "--save-every",
        "--dtype",
        "--config",
        "--resume",
    ):
        assert flag in proc.stdout


def expect_input_error(capsys, argv, *fragments):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err


def test_missing_file(capsys, tmp_path):
    expect_input_error(
        capsys, ["pretrain", "--data", tmp_path / "nope.txt", "--out", tmp_path / "o"], "nope.txt"
    )


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    expect_input_error(
        capsys, ["pretrain", "--data", tmp_path / "empty.txt", "--out", tmp_path / "o"], "empty.txt"
    )


def test_corpus_shorter_than_context(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    expect_input_error(
        capsys,
        [
            "pretrain",
            "--data",
            tmp_path / "short.txt",
            "--model",
            "gpt-nano",
            "--out",
            tmp_path / "o",
        ],
        "context",
    )


def test_undecodable_bytes_name_file_and_offset(capsys, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello world\n\xff\xfe more")
    expect_input_error(
        capsys,
        ["pretrain", "--data", tmp_path / "bad.txt", "--out", tmp_path / "o"],
        "bad.txt",
        "12",
    )


def test_tokenizer_that_does_not_fit_the_model(capsys, tmp_path, data_dir):
    config = tmp_path / "small_vocab.json"
    config.write_text(
        json.dumps(dict(vocab_size=100, context_length=32, emb_dim=32, n_heads=2, n_layers=1))
    )
    expect_input_error(
        capsys,
        [
            "pretrain",
            "--data",
            data_dir / "corpora" / "the-verdict.txt",
            "--model",
            config,
            "--tokenizer",
            "bytes",
            "--out",
            tmp_path / "o",
        ],
        "257",
        "100",
    )


def test_prompt_longer_than_context(capsys, trained):
    _, out, _ = trained
    expect_input_error(
        capsys,
        ["generate", "--checkpoint", out, "--prompt", "x" * 40],
        "40 tokens",
        "context length of 32",
    )


def test_checkpoint_missing_or_corrupt_files(capsys, trained, tmp_path):
    import shutil

    _, out, _ = trained
    expect_input_error(
        capsys,
        ["generate", "--checkpoint", tmp_path / "none", "--prompt", "a"],
        "no such directory",
    )
    broken = tmp_path / "broken"
    shutil.copytree(out / "checkpoint", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    expect_input_error(
        capsys, ["generate", "--checkpoint", broken, "--prompt", "a"], "model.safetensors"
    )
    (broken / "model.safetensors").unlink()
    expect_input_error(
        capsys,
        ["generate", "--checkpoint", broken, "--prompt", "a"],
        "model.safetensors is missing",
    )
    shutil.copy(out / "checkpoint" / "model.safetensors", broken / "model.safetensors")
    (broken / "config.json").write_text("{not json")
    expect_input_error(capsys, ["generate", "--checkpoint", broken, "--prompt", "a"], "config.json")


def test_resume_without_a_run_and_unknown_preset(capsys, tmp_path):
    expect_input_error(capsys, ["pretrain", "--out", tmp_path / "fresh", "--resume"], "fresh")
    expect_input_error(
        capsys, ["pretrain", "--model", "gpt-9000", "--out", tmp_path / "o"], "gpt-9000"
    )


def test_version_and_the_short_public_api(capsys):
    from pathlib import Path

    import tomllib

    import scratchllm

    declared = tomllib.loads(
        (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    )["project"]["version"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"scratchllm {declared}"
    assert scratchllm.__version__ == declared
    for name in ("load_checkpoint", "save_checkpoint", "generate", "GPTModel", "load_tokenizer"):
        assert callable(getattr(scratchllm, name)), name
