"""Atomic files and directories (scratchllm.fs): failures and crashes leave a whole copy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scratchllm.errors import InputError
from scratchllm.fs import atomic_dir, atomic_file, atomic_write_text, recover_dir


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in path.rglob("*") if p.is_file()}


def _old_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (out / "sub" / "b.txt").write_text("old b")
    return out


def test_atomic_dir_replaces_the_directory_and_leaves_no_siblings(tmp_path):
    out = _old_dir(tmp_path)
    with atomic_dir(out) as tmp:
        assert tmp != out and tmp.parent == out.parent and not any(tmp.iterdir())
        (tmp / "c.txt").write_text("new c")
    assert _tree(out) == {"c.txt": "new c"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_inside_the_block_leaves_the_old_directory_untouched(tmp_path):
    out = _old_dir(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half-written")
        raise RuntimeError("boom")
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_removes_the_parents_it_created(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "x" / "y" / "out") as tmp:
        (tmp / "f").write_text("f")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_exception_mid_swap_puts_the_old_directory_back(tmp_path):
    out = _old_dir(tmp_path)

    def hook(stage: str) -> None:
        if stage == "swapping":
            assert not out.exists()  # the old copy is aside, the new one not yet in
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"), atomic_dir(out, hook=hook) as tmp:
        (tmp / "c.txt").write_text("new c")
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match="not a directory"), atomic_dir(tmp_path / "out"):
        pass
    assert (tmp_path / "out").read_text() == "a file"


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    from scratchllm.fs import atomic_dir

    def hook(stage):
        if stage == sys.argv[2]:
            os.kill(os.getpid(), signal.SIGKILL)

    with atomic_dir(sys.argv[1], hook=hook) as tmp:
        (tmp / "c.txt").write_text("new c")
    """
)


def _crash_at(stage: str, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, str(out), stage], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_crash_between_the_two_renames_is_recovered(tmp_path):
    out = _old_dir(tmp_path)
    _crash_at("swapping", out)
    assert not out.exists()  # the kill left only the old copy, aside
    assert recover_dir(out) is True
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert recover_dir(out) is False  # nothing left to recover
    # ... and the next write, after another such crash, recovers on its own and succeeds.
    _crash_at("swapping", out)
    with atomic_dir(out) as tmp:
        (tmp / "d.txt").write_text("new d")
    assert _tree(out) == {"d.txt": "new d"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_crash_before_the_swap_leaves_the_old_directory_in_place(tmp_path):
    out = _old_dir(tmp_path)
    _crash_at("written", out)
    assert _tree(out) == {"a.txt": "old a", "sub/b.txt": "old b"}
    assert recover_dir(out) is False
    with atomic_dir(out) as tmp:  # the crash's temporary copy is discarded, not reused
        assert not any(tmp.iterdir())
        (tmp / "d.txt").write_text("new d")
    assert _tree(out) == {"d.txt": "new d"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old"
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write("new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
