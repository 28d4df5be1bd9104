"""OpenAI's original GPT-2 release: a TensorFlow checkpoint read without TensorFlow.

A checkpoint is `PREFIX.index`, an uncompressed LevelDB-style table (sstable) whose values are
BundleEntryProto messages (dtype, shape, shard, offset, size), plus `PREFIX.data-0000N-of-0000M`
files of raw little-endian tensor bytes. `TFGPT2Source` presents OpenAI's variables under
Hugging Face GPT-2 names, so the GPT-2 name map (`scratchllm.hub.names`) imports them.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from scratchllm.errors import CheckpointError, InputError
from scratchllm.hub.tensors import TensorInfo, TensorSource, read_exact

TF_DTYPES = {
    1: torch.float32,
    2: torch.float64,
    3: torch.int32,
    4: torch.uint8,
    5: torch.int16,
    6: torch.int8,
    9: torch.int64,
    10: torch.bool,
    14: torch.bfloat16,
    19: torch.float16,
}
TABLE_MAGIC = struct.pack("<Q", 0xDB4775248B80FB57)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("varint runs past the end")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varint/fixed, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = buf[pos : pos + n]
            pos += n
        elif wire == 5:
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _table_block(buf: bytes, offset: int, size: int) -> bytes:
    if offset + size + 5 > len(buf):
        raise ValueError("block runs past the end of the file")
    if buf[offset + size] != 0:
        raise ValueError("compressed table blocks are not supported")
    return buf[offset : offset + size]


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    (restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + size]
        pos += size


def read_sstable(buf: bytes) -> dict[bytes, bytes]:
    """All key/value pairs of an uncompressed LevelDB-format table (TensorFlow's .index)."""
    if len(buf) < 48 or buf[-8:] != TABLE_MAGIC:
        raise ValueError("not a table file (bad magic number)")
    footer = buf[-48:-8]
    _, pos = _varint(footer, 0)  # metaindex block handle: offset, size
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    entries: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_table_block(buf, index_offset, index_size)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        for key, value in _block_entries(_table_block(buf, offset, size)):
            entries[key] = value
    return entries


class TFCheckpoint(TensorSource):
    """A TensorFlow checkpoint (`PREFIX.index` + `PREFIX.data-0000N-of-0000M`)."""

    def __init__(self, prefix: Path) -> None:
        self.path = prefix
        index = prefix.with_name(prefix.name + ".index")
        try:
            raw = index.read_bytes()
        except FileNotFoundError:
            raise InputError(f"{index}: file not found") from None
        try:
            table = read_sstable(raw)
            header = dict(_proto_fields(table.pop(b"", b"")))
            shards = int(header.get(1, 1))
            if int(header.get(2, 0)) != 0:
                raise ValueError("big-endian checkpoints are not supported")
            self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
            for key, value in table.items():
                fields = list(_proto_fields(value))
                f = dict(fields)
                if 7 in f:
                    raise ValueError(f"tensor {key.decode()!r} is partitioned (sliced)")
                dims = [
                    int(dict(_proto_fields(dim)).get(1, 0))
                    for number, dim in _proto_fields(f.get(2, b""))
                    if number == 2
                ]
                dtype = TF_DTYPES.get(int(f.get(1, 0)))
                if dtype is None:
                    raise ValueError(f"tensor {key.decode()!r} has unsupported dtype {f.get(1)}")
                info = TensorInfo(tuple(dims), dtype)
                if int(f.get(5, 0)) != info.nbytes:
                    raise ValueError(f"tensor {key.decode()!r}: size does not match its shape")
                self._entries[key.decode("utf-8")] = (info, int(f.get(3, 0)), int(f.get(4, 0)))
        except (ValueError, struct.error, UnicodeDecodeError, IndexError) as exc:
            raise CheckpointError(f"{index}: corrupt TensorFlow checkpoint index ({exc})") from None
        self._files: dict[int, BinaryIO] = {}
        try:
            for shard in range(shards):
                data = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{shards:05d}")
                if not data.exists():
                    raise InputError(f"{data}: file not found (TensorFlow checkpoint data)")
                self._files[shard] = open(data, "rb")  # noqa: SIM115 - closed by close()
            for name, (info, shard, offset) in self._entries.items():
                fh = self._files.get(shard)
                size = os.fstat(fh.fileno()).st_size if fh else 0
                if fh is None or offset + info.nbytes > size:
                    raise CheckpointError(
                        f"{prefix}.data-{shard:05d}-of-{shards:05d}: truncated: tensor {name!r} "
                        f"ends at byte {offset + info.nbytes}, the file has {size}"
                    )
        except BaseException:
            self.close()
            raise

    def info(self) -> dict[str, TensorInfo]:
        return {k: v[0] for k, v in self._entries.items()}

    def read(self, name: str) -> torch.Tensor:
        info, shard, offset = self._entries[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        read_exact(self._files[shard], offset, out, f"{self.path}: tensor {name!r}")
        return out

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


_TF_GPT2 = re.compile(
    r"^model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/(g|b|w)$"
)


class TFGPT2Source(TensorSource):
    """OpenAI's GPT-2 variables under Hugging Face names; kernels [1, in, out] become [in, out]."""

    def __init__(self, checkpoint: TFCheckpoint) -> None:
        self.ckpt = checkpoint
        self.path = checkpoint.path
        self._names: dict[str, str] = {}
        for tf_name in checkpoint.info():
            self._names[self._hf_name(tf_name)] = tf_name

    @staticmethod
    def _hf_name(name: str) -> str:
        fixed = {
            "model/wte": "wte.weight",
            "model/wpe": "wpe.weight",
            "model/ln_f/g": "ln_f.weight",
            "model/ln_f/b": "ln_f.bias",
        }
        if name in fixed:
            return fixed[name]
        m = _TF_GPT2.match(name)
        if not m:
            return name
        layer, module, kind = m.groups()
        suffix = "bias" if kind == "b" else "weight"
        return f"h.{layer}.{module.replace('/', '.')}.{suffix}"

    def info(self) -> dict[str, TensorInfo]:
        out = {}
        raw = self.ckpt.info()
        for hf, tf in self._names.items():
            info = raw[tf]
            if len(info.shape) == 3 and info.shape[0] == 1 and tf.endswith("/w"):
                info = TensorInfo(info.shape[1:], info.dtype)
            out[hf] = info
        return out

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.read(self._names[name])
        if t.dim() == 3 and t.shape[0] == 1 and self._names[name].endswith("/w"):
            t = t[0]
        return t

    def close(self) -> None:
        self.ckpt.close()


def find_tf_checkpoint(directory: Path) -> Path | None:
    """The checkpoint prefix in an OpenAI GPT-2 download folder, if there is one."""
    state = directory / "checkpoint"
    if state.is_file():
        m = re.search(r'model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"))
        if m and (directory / (Path(m.group(1)).name + ".index")).exists():
            return directory / Path(m.group(1)).name
    indexes = sorted(directory.glob("*.index"))
    if len(indexes) == 1:
        return indexes[0].with_suffix("")
    return None


def gpt2_config_from_hparams(hp: dict[str, Any], source: str) -> dict[str, Any]:
    """The Hugging Face GPT-2 config.json equivalent of OpenAI's hparams.json."""
    try:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": int(hp["n_vocab"]),
            "n_positions": int(hp["n_ctx"]),
            "n_embd": int(hp["n_embd"]),
            "n_head": int(hp["n_head"]),
            "n_layer": int(hp["n_layer"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{source}: missing or bad field {exc}") from None
