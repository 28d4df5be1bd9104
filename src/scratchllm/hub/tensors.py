"""Named tensors on disk, read one at a time: safetensors, pytorch_model.bin, sharded folders.

A `TensorSource` lists its tensors' shapes and dtypes up front (`info`) and reads one tensor on
demand (`read`) with plain file reads, not a memory map: mapped pages count toward the resident
set once touched, so mapping every tensor would show up as a second copy of the weights.
`write_safetensors` is the other direction: tensors produced one at a time, appended to a file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from scratchllm.errors import CheckpointError, InputError
from scratchllm.fs import crash_point

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_exact(fh: BinaryIO, offset: int, dest: torch.Tensor, what: str) -> None:
    if dest.numel() == 0:
        return
    view = bytes_view(dest)
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{what}: file is truncated (read {done} of {len(view)} bytes)")
        done += n


class TensorSource:
    """Named tensors on disk; `read` returns a fresh CPU tensor."""

    path: Path

    def info(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, name: str | None = None) -> str:
        """The file holding `name` (or the source as a whole), for messages."""
        return str(self.path)

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorSource):
    """One .safetensors file, header checked up front (a truncated file is caught here)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise InputError(f"{self.path}: file not found") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open ({exc.strerror})") from None
        try:
            self._parse_header()
        except BaseException:
            self._fh.close()
            raise

    def _parse_header(self) -> None:
        path = self.path
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {n})")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header of {n} bytes, file of {size})"
            )
        try:
            header = json.loads(self._fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header is not valid JSON)"
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_len = size - self._start
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        for name, entry in header.items():
            try:
                info = TensorInfo(tuple(int(d) for d in entry["shape"]), ST_DTYPES[entry["dtype"]])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header entry for tensor {name!r}"
                ) from None
            if begin < 0 or end - begin != info.nbytes or any(d < 0 for d in info.shape):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header: tensor {name!r} spans bytes "
                    f"{begin}..{end}, its shape {info.shape} needs {info.nbytes}"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                    f"{self._start + end}, the file has {size}"
                )
            self._entries[name] = (info, begin)

    def info(self) -> dict[str, TensorInfo]:
        return {k: v[0] for k, v in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        info, begin = self._entries[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        read_exact(self._fh, self._start + begin, out, f"{self.path}: tensor {name!r}")
        return out

    def close(self) -> None:
        self._fh.close()


class TorchBinFile(TensorSource):
    """pytorch_model.bin, read with `torch.load(weights_only=True)` (memory-mapped if possible)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: file not found")
        try:  # memory-mapped when the file is in the zip format (torch >= 1.6)
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(
                    f"{self.path}: corrupt or unreadable PyTorch weights "
                    f"({type(exc).__name__}: {_first_line(exc)})"
                ) from None
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"{self.path}: expected a flat dict of tensors")
        self._state: dict[str, torch.Tensor] = state

    def info(self) -> dict[str, TensorInfo]:
        return {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._state.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._state[name]

    def close(self) -> None:
        self._state = {}


class ShardedSource(TensorSource):
    """Several shard files named by an index (`*.safetensors.index.json` / `*.bin.index.json`)."""

    def __init__(self, index_path: Path) -> None:
        self.path = index_path
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            index = None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: corrupt index (no 'weight_map' object)")
        self._shards: dict[str, TensorSource] = {}
        self._where: dict[str, TensorSource] = {}
        try:
            for name, file in weight_map.items():
                if file not in self._shards:
                    shard_path = _shard_path(index_path, name, file)
                    if not shard_path.exists():
                        raise InputError(f"{index_path}: shard {file} is missing")
                    self._shards[file] = open_weights_file(shard_path)
                shard = self._shards[file]
                if name not in shard.info():
                    raise CheckpointError(
                        f"{shard.path}: tensor {name!r} is missing (named by {index_path.name})"
                    )
                self._where[name] = shard
        except BaseException:
            self.close()
            raise

    def info(self) -> dict[str, TensorInfo]:
        return {k: s.info()[k] for k, s in self._where.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def where(self, name: str | None = None) -> str:
        return str(self._where[name].path) if name in self._where else str(self.path)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def _shard_path(index_path: Path, name: str, file: object) -> Path:
    """The shard `file` that the index names for tensor `name`: a file in the model folder,
    never a path that leaves it (`../../etc/passwd`, `/abs/path`). The check is on the name:
    a shard that is a symlink into a cache (the Hugging Face hub's blobs/) is the folder's own."""
    if not isinstance(file, str) or not file:
        raise CheckpointError(
            f"{index_path}: weight_map entry {name!r} is {file!r}; expected a shard file name"
        )
    parts = Path(file).parts
    if Path(file).is_absolute() or ".." in parts or not parts or "\0" in file:
        raise InputError(
            f"{index_path}: weight_map entry {name!r} names {file!r}, outside the model folder; "
            "expected a shard file in it"
        )
    return index_path.parent / file


def open_weights_file(path: Path) -> TensorSource:
    if path.name.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchBinFile(path)


def open_hf_weights(directory: Path) -> TensorSource:
    """The weights of a Hugging Face model folder, in order of preference."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (directory / name).exists():
            break
    else:
        name = ""
        for candidate in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (directory / candidate).exists():
                name = candidate
                break
        if not name:
            raise InputError(
                f"{directory}: no weights found (model.safetensors, model.safetensors.index.json "
                "or pytorch_model.bin)"
            )
    path = directory / name
    return ShardedSource(path) if name.endswith(".index.json") else open_weights_file(path)


def write_safetensors(
    path: Path,
    items: list[tuple[str, TensorInfo, Callable[[], torch.Tensor]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `items`' callables."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, info, _ in items:
        header[name] = {
            "dtype": ST_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for i, (name, info, produce) in enumerate(items):
            tensor = produce()
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise RuntimeError(
                    f"internal error: {name} produced {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {info.shape} {info.dtype}"
                )
            if tensor.numel():
                fh.write(bytes_view(tensor.contiguous()))
            del tensor
            if i == 0:  # the kill tests' "torn file" moment: one tensor on disk, more to come
                fh.flush()
                crash_point("safetensors:partial")
        fh.flush()
        os.fsync(fh.fileno())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
