"""SIGKILL at chosen moments of `tokenizer train` and `convert`: the output folder is the previous
one (or absent) or the new one complete, never a mix.

The kill comes from the process itself at a named stage (`scratchllm.fs.crash_point`, set by
SCRATCHLLM_TEST_KILL; `SCRATCHLLM_TEST_CHECKPOINT_CRASH` for the checkpoint writer):
  trained / written / swapping   tokenizer train: before writing, the new folder complete but
                                 not renamed in, the old one moved aside and the new not yet in
  safetensors:partial            mid-write: one tensor of model.safetensors on disk
  convert:swapping, swapping:1   an export's, an import's swap between its two renames
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.config import ModelConfig
from scratchllm.fs import recover_dir
from scratchllm.hub.convert import export_hf, import_hf
from scratchllm.model import GPTModel
from scratchllm.tokenizers import ByteTokenizer, load_tokenizer

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
SRC = Path(__file__).resolve().parents[1] / "src"


def _scratchllm(*argv, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    environ.update(OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "scratchllm", *map(str, argv)]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300)


def _killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# -- tokenizer train ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(data_dir) -> Path:
    return data_dir / "bpe_reference" / "address.txt"


def test_tokenizer_train_killed_at_any_stage_leaves_the_previous_folder(tmp_path, corpus):
    out = tmp_path / "tok"
    ByteTokenizer().save(out)  # the previous tokenizer
    before = _tree(out)
    argv = ["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--workers", 1]
    for stage in ("trained", "written", "swapping"):
        proc = _scratchllm(
            *argv, "--out", out, "--force", SCRATCHLLM_TEST_KILL=f"tokenizer:{stage}"
        )
        _killed(proc)
        if stage == "swapping":
            assert not out.exists()  # the kill left only the previous copy, aside
        # Loading puts the previous folder back when the kill came between the two renames.
        assert load_tokenizer(out).fingerprint() == ByteTokenizer().fingerprint(), stage
        assert _tree(out) == before, stage
    # The next run completes, and what it leaves is whole and loadable.
    done = _scratchllm(*argv, "--out", out, "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_tokenizer(out).vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_tokenizer_train_killed_before_its_first_swap_leaves_no_folder(tmp_path, corpus):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--data", corpus, "--vocab-size", 300, "--workers", 1]
    _killed(_scratchllm(*argv, "--out", out, SCRATCHLLM_TEST_KILL="tokenizer:written"))
    assert not out.exists()  # only the incomplete .tok.tmp, which the next run discards
    assert [p.name for p in tmp_path.iterdir()] == [".tok.tmp"]


# -- convert --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """ckpt/ and ckpt2/ (two tiny checkpoints), hf/ (ckpt exported), previous/ (hf imported)."""
    root = tmp_path_factory.mktemp("kill-convert")
    config = ModelConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=2)
    for seed, name in [(0, "ckpt"), (1, "ckpt2")]:
        torch.manual_seed(seed)
        save_checkpoint(root / name, GPTModel(config), ByteTokenizer())
    export_hf(root / "ckpt", root / "hf")
    import_hf(root / "hf", root / "previous", tokenizer="bytes")
    return root


def test_export_killed_mid_write_or_at_the_swap_leaves_the_previous_folder(models, tmp_path):
    out = tmp_path / "hf"
    export_hf(models / "ckpt", out)
    before = _tree(out)
    argv = ["convert", "--from", models / "ckpt2", "--out", out, "--force"]
    for stage in ("safetensors:partial", "convert:swapping"):
        _killed(_scratchllm(*argv, SCRATCHLLM_TEST_KILL=stage))
        recover_dir(out)  # what the next convert does first (a cut-short swap: old copy back)
        assert _tree(out) == before, stage
    done = _scratchllm(*argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _tree(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize(
    "env",
    [
        {"SCRATCHLLM_TEST_KILL": "safetensors:partial"},
        {"SCRATCHLLM_TEST_CHECKPOINT_CRASH": "swapping:1"},
    ],
    ids=["partial", "swapping"],
)
def test_import_killed_mid_write_or_at_the_swap_leaves_the_previous_checkpoint(
    models, tmp_path, env
):
    out = tmp_path / "ckpt"
    shutil.copytree(models / "previous", out)
    before = _tree(out)
    argv = ["convert", "--from", models / "hf", "--out", out, "--tokenizer", "bytes", "--force"]
    _killed(_scratchllm(*argv, **env))
    ckpt = load_checkpoint(out)  # recovers a swap cut short, then loads the previous one whole
    assert _tree(out) == before
    assert torch.isfinite(ckpt.model(torch.tensor([[1, 2, 3]]))).all()
    assert sorted(p.name for p in tmp_path.iterdir()) in (["ckpt"], [".ckpt.tmp", "ckpt"])
