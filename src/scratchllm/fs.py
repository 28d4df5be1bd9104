"""Files and folders a user keeps: written atomically (temporary sibling, fsync, rename).

- `atomic_file(path)` / `atomic_write(path, write)`: one file; a crash leaves the old file or
  the new one, never a torn one.
- `atomic_dir(path)`: a whole directory (a checkpoint, a converted model). It is built in
  `.NAME.tmp`, then swapped in: the old `path` is renamed to `.NAME.old`, the new one renamed
  to `path`, and only then is the old one deleted. A crash between the two renames leaves just
  `.NAME.old`, which `recover_dir(path)` (and the next `atomic_dir(path)`) puts back.

An OSError that leaves a writer names what was being written (a full disk under torch.save's
RuntimeError or safetensors' error included: `os_error_of`), and the CLI maps it to one line.
`crash_point(stage)` is the crash injection of the kill tests (off unless SCRATCHLLM_TEST_KILL).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scratchllm.errors import InputError, ScratchLLMError

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over
    `path`, on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    _check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # a read-only folder, say: name the file the user asked for
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _chmod_for_umask(tmp_path)  # mkstemp made it 0600: the user's umask decides instead
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        named = os_error_of(exc, path, tmp_path)
        if named is not None and named is not exc:
            raise named from exc
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
    if path.name in ("", ".."):  # "." or "..": the folder has a name its parent knows it by
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")
    _check_parents(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    tmp = temp_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover: never a complete copy
        tmp.mkdir()
        yield tmp
        for file in [tmp, *tmp.rglob("*")]:  # writers such as safetensors make files 0600
            _chmod_for_umask(file)
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        for directory in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
            fsync_dir(directory)
        if hook is not None:
            hook("written")
        _swap_in(tmp, path, hook)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(path)  # an exception mid-swap: the old copy goes back
        for p in created:  # innermost first; stop at the first that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        named = os_error_of(exc, path, tmp)
        if named is not None and named is not exc:
            raise named from exc
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


def file_in_the_way(path: str | Path) -> Path | None:
    """The first of `path` and its parents that exists and is not a directory (so no folder
    can be made at `path`), or None."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def _check_parents(path: Path) -> None:
    """InputError when a parent of `path` exists as a file (mkdir would fail with EEXIST)."""
    blocker = file_in_the_way(path.parent)
    if blocker is not None:
        raise InputError(f"{path}: {blocker} exists and is not a directory")


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # safetensors' (Rust's) io::Error


def os_error_of(exc: BaseException, path: Path, tmp: Path | None = None) -> OSError | None:
    """The OSError behind `exc`, naming the file it was writing (`path`, or the file under it
    when the error names one inside the temporary copy `tmp`); None when no OSError is.

    torch.save reports a full disk as RuntimeError("... unexpected pos ...") whose context is
    the OSError; safetensors as an error whose text holds "(os error 28)". An InputError (or
    anything raised `from None`, or an interrupt) is left as it is."""
    if isinstance(exc, ScratchLLMError) or not isinstance(exc, Exception):
        return None
    found: BaseException | None = exc
    for _ in range(4):  # the chain of causes, not an endless one
        if found is None or isinstance(found, OSError):
            break
        found = found.__cause__ or (None if found.__suppress_context__ else found.__context__)
    if isinstance(found, OSError):
        os_error = found
    elif (m := _OS_ERROR_IN_TEXT.search(str(exc))) is not None:
        os_error = OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    else:
        return None
    if os_error.errno is None:  # OSError("...") without an errno: nothing to name
        return None
    name = os_error.filename
    if name is not None and tmp is not None and _inside(Path(name), tmp):
        name = str(path / Path(name).relative_to(tmp))  # the file as the user will know it
    name = str(path) if name is None else name
    if name == os_error.filename:
        return os_error
    return OSError(os_error.errno, os_error.strerror or os.strerror(os_error.errno), name)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def crash_point(stage: str) -> None:
    """Crash injection for the kill tests: SIGKILL this process at `stage` when
    SCRATCHLLM_TEST_KILL names it ("tokenizer:written", "convert:swapping", ...)."""
    if os.environ.get("SCRATCHLLM_TEST_KILL") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_hook(label: str) -> Callable[[str], None]:
    """An `atomic_dir` hook that calls `crash_point("LABEL:STAGE")` at each of its stages."""
    return lambda stage: crash_point(f"{label}:{stage}")


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


def current_umask() -> int:
    """The process's umask, read without changing it where /proc says (Linux); elsewhere by
    setting and restoring it (a brief window another thread could see)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_for_umask(path: Path) -> None:
    """Give a file written here the mode `open()` would have: 0666 (0777 for folders and
    executables) less the umask, so outputs can be shared as the user's other files are."""
    if path.is_symlink():
        return
    try:
        mode = path.stat().st_mode
        full = 0o777 if (path.is_dir() or mode & 0o111) else 0o666
        wanted = full & ~current_umask()
        if mode & 0o777 != wanted:
            os.chmod(path, wanted)
    except OSError:  # a file system without modes: nothing to set
        pass


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
