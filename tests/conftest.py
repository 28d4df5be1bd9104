"""Shared fixtures. Real data comes from SCRATCHLLM_TEST_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _data_dir() -> Path:
    return Path(os.environ.get("SCRATCHLLM_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "README.md").exists():
        pytest.fail(f"test data not found at {path}; set SCRATCHLLM_TEST_DATA")
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer(data_dir):
    from scratchllm.tokenizers import load_tokenizer

    return load_tokenizer(f"gpt2:{data_dir / 'gpt2'}")


def _threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models run as fast on one thread, and one thread does not stall on a busy CPU."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """Two threads: a packed one-row product then runs as two slices (`gemv_splits`)."""
    yield from _threads(2)


@pytest.fixture(params=["kernels", "torch"])
def int8_fp16_path(request, monkeypatch):
    """Run a test once through our decode kernels (inference/kernels.c; skipped without a C
    compiler) and once through PyTorch's (fbgemm), which prefills always use."""
    import platform
    import shutil

    from scratchllm.inference import kernels

    if request.param == "kernels" and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler for the decode kernels")
    if request.param == "kernels" and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("our decode kernels are built for x86-64 only")
    monkeypatch.setenv("SCRATCHLLM_KERNELS", "1" if request.param == "kernels" else "0")
    kernels._library.cache_clear()
    assert kernels.available() == (request.param == "kernels")
    yield request.param
    monkeypatch.undo()
    kernels._library.cache_clear()
