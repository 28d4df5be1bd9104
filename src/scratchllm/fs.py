"""Files and folders a user keeps: written atomically (temporary sibling, fsync, rename).

- `atomic_file(path)` / `atomic_write(path, write)`: one file; a crash leaves the old file or
  the new one, never a torn one.
- `atomic_dir(path)`: a whole directory (a checkpoint, a converted model). It is built in
  `.NAME.tmp`, then swapped in: the old `path` is renamed to `.NAME.old`, the new one renamed
  to `path`, and only then is the old one deleted. A crash between the two renames leaves just
  `.NAME.old`, which `recover_dir(path)` (and the next `atomic_dir(path)`) puts back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scratchllm.errors import InputError

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over
    `path`, on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(tmp_path)`, fsync it, then rename over `path`."""
    with atomic_file(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def temp_sibling(path: Path) -> Path:
    """Where `atomic_dir` builds the new copy of `path` (never complete while it exists)."""
    return path.parent / f".{path.name}.tmp"


def old_sibling(path: Path) -> Path:
    """Where `atomic_dir` keeps the previous `path` while the new one is renamed in."""
    return path.parent / f".{path.name}.old"


@contextmanager
def atomic_dir(path: str | Path, hook: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory that replaces `path` when the block succeeds.

    On success every file in it is fsynced and it is swapped in for `path` (see the module
    docstring). On an exception in the block the temporary directory is removed, `path` is
    left untouched, and parent directories this call created are removed again.
    `hook(stage)`, for crash-injection tests, is called at "written" (the new copy is complete,
    nothing renamed) and at "swapping" (the old `path` moved aside, the new one not yet in).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover: never a complete copy
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        for directory in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
            fsync_dir(directory)
        if hook is not None:
            hook("written")
        _swap_in(tmp, path, hook)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)  # an exception mid-swap: the old copy goes back
        for p in created:  # innermost first; stop at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _swap_in(tmp: Path, path: Path, hook: Callable[[str], None] | None) -> None:
    recover_dir(path)  # an earlier crash mid-swap: its .old copy is the one to replace
    old = old_sibling(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
        if hook is not None:
            hook("swapping")
    tmp.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> bool:
    """Finish a swap a crash interrupted: with `path` gone, its `.old` copy is the last whole
    one and is renamed back. Returns whether anything was restored."""
    path = Path(path)
    old = old_sibling(path)
    if path.exists() or not old.is_dir():
        return False
    log.warning("restoring %s from %s after an interrupted write", path, old)
    old.rename(path)
    fsync_dir(path.parent)
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
