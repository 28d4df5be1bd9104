"""Reliability: every bad input, full disk or read-only folder is one line and an exit code,
never a traceback, and leaves nothing half-written; a checkpoint knows its tokenizer.

Tiny models only; commands run in-process through `scratchllm.cli.main`.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.cli import main
from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError, InputError
from scratchllm.model import GPTModel
from scratchllm.tokenizers import ByteTokenizer, load_tokenizer

TINY = dict(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
BINARY = bytes(range(256)) * 4  # not UTF-8 from byte 128 on


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """lm/: a tiny language model; clf/: a tiny classifier (2 classes); text.txt, bin.dat."""
    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    save_checkpoint(root / "lm", GPTModel(ModelConfig(**TINY)), ByteTokenizer())
    clf = GPTModel(ModelConfig(**TINY, num_classes=2))
    save_checkpoint(root / "clf", clf, ByteTokenizer(), meta={"task": "classify", "labels": "ab"})
    (root / "text.txt").write_text("I HAD always thought Jack Gisburn rather a cheap genius. " * 20)
    (root / "bin.dat").write_bytes(BINARY)
    return root


def fails(capsys, argv, *fragments, code=2) -> str:
    """Run the CLI in-process: exit `code`, one line on stderr holding every fragment."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- ModelConfig: every field's type, and sizes no memory holds (item 8) ------------------------
@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("norm_eps", "abc", "a number"),
        ("norm_eps", math.nan, "a finite number"),
        ("rope_theta", [1], "a number"),
        ("qkv_bias", 1, "true or false"),
        ("n_kv_heads", "2", "a positive integer or null"),
        ("n_kv_heads", -1, "a positive integer or null"),
        ("hidden_dim", 2.5, "a positive integer or null"),
        ("rope_scaling", [1, 2], "a JSON object or null"),
        ("norm", "batchnorm", "one of layernorm, rmsnorm"),
        ("name", 3, "a string"),
    ],
)
def test_model_config_checks_every_field_against_its_type(field, value, expected):
    with pytest.raises(InputError) as info:
        ModelConfig.from_dict({**TINY, field: value}, source="cfg.json")
    message = str(info.value)
    assert message.startswith("cfg.json: ") and f"'{field}' must be {expected}" in message


def test_a_bad_type_in_a_checkpoints_config_is_one_line(ckpts, tmp_path, capsys):
    bad = tmp_path / "bad"
    save_checkpoint(bad, GPTModel(ModelConfig(**TINY)), ByteTokenizer())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "norm_eps": "abc"}))
    fails(capsys, ["generate", "--checkpoint", bad, "--prompt", "a"], "config.json", "'norm_eps'")


def test_a_context_length_no_memory_holds_names_the_field_and_the_size(ckpts, tmp_path, capsys):
    with pytest.raises(InputError, match=r"'context_length' 1000000000000 .* 64\.0 TB"):
        GPTModel(ModelConfig(**{**TINY, "context_length": 10**12}))
    config = tmp_path / "huge.json"
    config.write_text(json.dumps({**TINY, "context_length": 10**12}))
    out = tmp_path / "run"
    argv = ["pretrain", "--data", ckpts / "text.txt", "--model", config, "--tokenizer", "bytes"]
    fails(capsys, [*argv, "--out", out, "--max-steps", 1], "context_length", "TB")
    assert not out.exists()


# -- inputs that are not what they should be (item 8) -------------------------------------------
def test_config_naming_a_binary_file_or_a_folder(ckpts, capsys):
    for config, what in [(ckpts / "bin.dat", "not UTF-8"), (ckpts, "is a folder")]:
        fails(capsys, ["pretrain", "--config", config, "--out", ckpts / "x"], "--config", what)
    assert not (ckpts / "x").exists()


def test_out_naming_an_existing_file_is_refused_before_any_work(ckpts, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    data = tmp_path / "inst.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 30))
    text = ckpts / "text.txt"
    for argv in [
        ["pretrain", "--data", text, "--model", "gpt-nano", "--tokenizer", "bytes"],
        ["finetune", "instruct", "--checkpoint", ckpts / "lm", "--data", data],
        ["convert", "--from", ckpts / "lm"],
        ["tokenizer", "train", "--data", text, "--vocab-size", 260],
    ]:
        fails(capsys, [*argv, "--out", file], f"--out {file}")
        assert file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst.json", "taken"]


def test_a_non_finite_temperature_is_one_line(ckpts, capsys):
    argv = ["generate", "--checkpoint", ckpts / "lm", "--prompt", "a", "--temperature", "nan"]
    fails(capsys, argv, "--temperature", "finite")


def test_an_argument_with_bytes_that_are_not_utf8_names_the_argument(ckpts, tmp_path, capsys):
    # argv carries undecodable bytes as lone surrogates (b"\xff" -> "\udcff").
    prompt = b"caf\xff".decode("utf-8", "surrogateescape")
    argv = ["generate", "--checkpoint", ckpts / "lm", "--prompt", prompt]
    fails(capsys, argv, "--prompt", "byte 0xff at character 3")
    fails(capsys, ["classify", "--checkpoint", ckpts / "clf", prompt], "TEXT", "0xff")
    # A path need not be UTF-8: an existing file with such a name is read as usual.
    odd = tmp_path / b"texts-\xff.txt".decode("utf-8", "surrogateescape")
    odd.write_text("hello\nworld\n")
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(ckpts / "clf"), "--file", str(odd)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_binary_files_and_binary_stdin_are_one_line(ckpts, monkeypatch, capsys):
    binary = ckpts / "bin.dat"
    fails(capsys, ["classify", "--checkpoint", ckpts / "clf", "--file", binary], "--file", "UTF-8")
    fails(capsys, ["finetune", "judge", "--responses", binary], "--responses", "UTF-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n" + BINARY)))
    fails(capsys, ["chat", "--checkpoint", ckpts / "lm"], "stdin line 2", "UTF-8")


# -- a classifier is not a language model (item 10) ---------------------------------------------
def test_generate_chat_and_serve_refuse_a_classifier(ckpts, capsys):
    clf = ckpts / "clf"
    message = "is a classifier with 2 classes"
    fails(capsys, ["generate", "--checkpoint", clf, "--prompt", "a"], message, "classify")
    fails(capsys, ["chat", "--checkpoint", clf], message)
    fails(capsys, ["serve", "--checkpoint", clf, "--port", 0], message)


# -- a checkpoint knows its tokenizer (item 6) ---------------------------------------------------
def test_a_checkpoint_refuses_a_tokenizer_folder_it_was_not_trained_with(ckpts, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, GPTModel(ModelConfig(**TINY)), ByteTokenizer())
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert meta["tokenizer_fingerprint"] == ByteTokenizer().fingerprint()
    # Training a tokenizer into its tokenizer/ is refused without --force ...
    train = ["tokenizer", "train", "--data", ckpts / "text.txt", "--vocab-size", 257]
    fails(capsys, [*train, "--out", ckpt / "tokenizer"], "already holds a tokenizer", "--force")
    assert load_checkpoint(ckpt).tokenizer.fingerprint() == ByteTokenizer().fingerprint()
    # ... and with it, the checkpoint no longer loads: its ids would mean other text.
    assert main([*map(str, train), "--out", str(ckpt / "tokenizer"), "--force"]) == 0
    replaced = load_tokenizer(ckpt / "tokenizer").fingerprint()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    assert str(info.value) == (
        f"{ckpt / 'tokenizer'}: tokenizer/ does not match the one this checkpoint was trained "
        f"with (fingerprint {meta['tokenizer_fingerprint']}, this one's is {replaced})"
    )
    fails(capsys, ["convert", "--from", ckpt, "--out", tmp_path / "hf"], "does not match")
    # A checkpoint written before fingerprints were recorded still loads.
    del meta["tokenizer_fingerprint"]
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    assert load_checkpoint(ckpt).tokenizer.fingerprint() == replaced


# -- read-only folders and full disks (item 8) ---------------------------------------------------
def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root'})")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs folder; unmounted afterwards. Skips where mount is not
    permitted (it needs root)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        path = tmp_path / f"mnt{len(mounted)}"
        _mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def _simulate_read_only(monkeypatch, folder: Path) -> None:
    """os.mkdir and os.open fail with EROFS below `folder`, as on a read-only mount."""
    real_mkdir, real_open = os.mkdir, os.open

    def below(path) -> bool:
        return os.path.abspath(os.fsdecode(path)).startswith(str(folder) + os.sep)

    def mkdir(path, *args, **kw):
        if below(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_mkdir(path, *args, **kw)

    def open_(path, flags, *args, **kw):
        if below(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("how", ["simulated", "mounted"])
def test_a_read_only_output_folder_is_one_line_naming_it(
    ckpts, tmp_path, monkeypatch, capsys, how, tmpfs
):
    if how == "mounted":
        folder = tmpfs("size=1m,ro")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        _simulate_read_only(monkeypatch, folder)
    train = ["tokenizer", "train", "--data", ckpts / "text.txt", "--vocab-size", 260]
    fails(capsys, [*train, "--out", folder / "tok"], f"--out {folder / 'tok'}", "read-only")
    out = folder / "a" / "hf"
    fails(capsys, ["convert", "--from", ckpts / "lm", "--out", out], f"--out {out}", "read-only")
    assert list(folder.iterdir()) == []


def test_a_full_disk_under_torch_save_is_an_oserror_naming_the_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError("... unexpected pos ..."); the checkpoint
    writer raises the OSError(ENOSPC) behind it, and leaves the previous checkpoint whole."""
    import scratchllm.checkpoint as checkpoint

    model = GPTModel(ModelConfig(**TINY))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, ByteTokenizer(), meta={"step": 1})

    def torch_save(obj, f):
        fh = f if hasattr(f, "write") else open(f, "wb")  # noqa: SIM115 (a file object or a path)
        fh.write(b"PK\x03\x04 part of a zip")
        fh.flush()
        try:  # torch's writer: the OSError becomes the context of its own RuntimeError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904

    monkeypatch.setattr(checkpoint.torch, "save", torch_save)
    with pytest.raises(OSError) as info:
        save_checkpoint(ckpt, model, ByteTokenizer(), meta={"step": 2}, train_state={"step": 2})
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(ckpt / "train_state.pt")
    assert load_checkpoint(ckpt).meta["step"] == 1
    assert _siblings(tmp_path) == []


def test_a_full_disk_is_exit_1_naming_the_output(ckpts, tmp_path, monkeypatch, capsys):
    """Simulated: the weights' write fails as a plain write() does, with no file name on it."""
    import scratchllm.hub.tensors as tensors

    def full(path, items, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensors, "write_safetensors", full)
    monkeypatch.setattr("scratchllm.hub.convert.write_safetensors", full)
    out = tmp_path / "hf"
    err = fails(capsys, ["convert", "--from", ckpts / "lm", "--out", out], code=1)
    assert err.endswith(f"--out {out}: cannot write it: no space left on device"), err
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk(ckpts, tmp_path, capsys, tmpfs):
    """A 2 MB tmpfs: an export of a ~3.5 MB model, and a checkpoint whose training state does
    not fit, each fail whole and leave the disk as it was."""
    disk = tmpfs("size=2m")
    torch.manual_seed(0)
    big = GPTModel(ModelConfig(**{**TINY, "emb_dim": 192, "n_heads": 4, "n_layers": 2}))
    save_checkpoint(tmp_path / "big", big, ByteTokenizer())
    out = disk / "hf"
    fails(
        capsys,
        ["convert", "--from", tmp_path / "big", "--out", out],
        "--out",
        "no space left on device",
        code=1,
    )
    assert list(disk.iterdir()) == []
    small = GPTModel(ModelConfig(**{**TINY, "emb_dim": 96, "n_layers": 2}))
    state = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(OSError) as info:
        save_checkpoint(disk / "ckpt", small, ByteTokenizer(), train_state={"a": state, "b": state})
    assert info.value.errno == errno.ENOSPC and str(disk / "ckpt") in info.value.filename
    assert list(disk.iterdir()) == []
