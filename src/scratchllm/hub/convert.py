"""Open weights: Hugging Face (and OpenAI TensorFlow) checkpoints ⇄ scratchllm checkpoints.

Import reads GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM and Qwen2ForCausalLM folders
(config.json + model.safetensors, sharded safetensors with an index, or pytorch_model.bin) and
OpenAI's original GPT-2 TensorFlow release (hparams.json + model.ckpt.*, read without TensorFlow).
Export writes the folder `transformers.AutoModelForCausalLM.from_pretrained` loads.

Conversion streams: the expected names and shapes come from a `GPTModel` built on the meta
device, every source tensor is checked before anything is written, and then one tensor at a time
is read from disk (plain reads, no memory map), renamed, transposed or fused as the target needs,
and appended to the output safetensors file. Peak memory is about one tensor, not the model.
Output goes to a temporary sibling directory that is renamed into place, so a failed conversion
leaves `--out` as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError, InputError
from scratchllm.fs import fsync_dir

# ============================================================================================
# Tensor sources: named tensors read one at a time
# ============================================================================================

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


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _read_exact(fh, offset: int, dest: torch.Tensor, what: str) -> None:
    if dest.numel() == 0:
        return
    view = _bytes_view(dest)
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
        _read_exact(self._fh, self._start + begin, out, f"{self.path}: tensor {name!r}")
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
                    shard_path = index_path.parent / file
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
        for name, info, produce in items:
            tensor = produce()
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise RuntimeError(
                    f"internal error: {name} produced {tuple(tensor.shape)} {tensor.dtype}, "
                    f"planned {info.shape} {info.dtype}"
                )
            if tensor.numel():
                fh.write(_bytes_view(tensor.contiguous()))
            del tensor
        fh.flush()
        os.fsync(fh.fileno())


# ============================================================================================
# OpenAI's GPT-2 TensorFlow checkpoint (tensor bundle), read without TensorFlow
# ============================================================================================

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
        self._files: dict[int, Any] = {}
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
        _read_exact(self._files[shard], offset, out, f"{self.path}: tensor {name!r}")
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


# ============================================================================================
# Architectures: configs and tensor name maps
# ============================================================================================

ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}  # config "model_type"


@dataclass
class HFSpec:
    """How a Hugging Face model maps onto a `ModelConfig`."""

    family: str  # gpt2 | llama | qwen3 | qwen2
    architecture: str
    config: ModelConfig
    tied: bool
    qkv_bias: bool = False  # the source has q/k/v biases
    o_bias: bool = False  # ... an attention output bias
    mlp_bias: bool = False  # ... feed-forward biases


@dataclass(frozen=True)
class Rule:
    """One output tensor: `op` over `sources` (whose shapes must be `expect`)."""

    target: str
    shape: tuple[int, ...]
    op: str  # copy | t (transpose) | cat (rows) | rows (a slice of rows) | zeros
    sources: tuple[str, ...] = ()
    expect: tuple[tuple[int, ...], ...] = ()
    rows: tuple[int, int] = (0, 0)


def _need(hf: dict[str, Any], key: str, source: str, arch: str) -> Any:
    if key not in hf or hf[key] is None:
        raise InputError(f"{source}: field {key!r} is missing (needed for {arch})")
    return hf[key]


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and Llama 3 scaling from a v4 (`rope_theta`/`rope_scaling`) or v5
    (`rope_parameters`) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params or None
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    partial = (scaling or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InputError(f"{source}: partial_rotary_factor {partial} is not supported")
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise InputError(
            f"{source}: rope scaling type {kind!r} is not supported (only 'llama3' and none)"
        )
    try:
        out = dict(
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        )
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{source}: incomplete llama3 rope scaling {scaling!r}") from None
    return theta, out


def hf_spec(hf: dict[str, Any], source: str, name: str = "hf") -> HFSpec:
    """Parse a Hugging Face config.json (as a dict) into an `HFSpec`; refuse what we cannot run."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None and not archs:
        arch = MODEL_TYPES.get(hf.get("model_type", ""))
    if arch is None:
        found = ", ".join(archs) or repr(hf.get("model_type"))
        raise InputError(
            f"{source}: unsupported architecture {found}; scratchllm imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[arch]
    try:
        if family == "gpt2":
            return _gpt2_spec(hf, source, arch, name)
        return _llama_spec(hf, source, arch, family, name)
    except InputError:
        raise
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: bad value in config for {arch} ({exc})") from None


def _gpt2_spec(hf: dict[str, Any], source: str, arch: str, name: str) -> HFSpec:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise InputError(
            f"{source}: activation_function {act!r} is not supported (scratchllm's GELU is the "
            "tanh approximation, 'gelu_new')"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise InputError(f"{source}: non-standard GPT-2 attention scaling is not supported")
    if hf.get("add_cross_attention"):
        raise InputError(f"{source}: GPT-2 with cross-attention is not supported")
    emb = int(_need(hf, "n_embd", source, arch))
    inner = hf.get("n_inner")
    config = ModelConfig(
        vocab_size=int(_need(hf, "vocab_size", source, arch)),
        context_length=int(hf.get("n_positions") or _need(hf, "n_ctx", source, arch)),
        emb_dim=emb,
        n_heads=int(_need(hf, "n_head", source, arch)),
        n_layers=int(_need(hf, "n_layer", source, arch)),
        drop_rate=float(hf.get("resid_pdrop") or 0.0),
        qkv_bias=True,
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        hidden_dim=None if inner in (None, 4 * emb) else int(inner),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        name=name,
    )
    return HFSpec("gpt2", arch, config, config.tie_embeddings, True, True, True)


def _llama_spec(hf: dict[str, Any], source: str, arch: str, family: str, name: str) -> HFSpec:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{source}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
    if hf.get("use_sliding_window"):
        raise InputError(f"{source}: sliding-window attention is not supported")
    emb = int(_need(hf, "hidden_size", source, arch))
    heads = int(_need(hf, "num_attention_heads", source, arch))
    head_dim = int(hf.get("head_dim") or emb // heads)
    theta, scaling = _rope(hf, source)
    if family == "qwen2":
        qkv_b, o_b, mlp_b = True, False, False
    elif family == "qwen3":
        qkv_b = o_b = bool(hf.get("attention_bias", False))
        mlp_b = False
    else:
        qkv_b = o_b = bool(hf.get("attention_bias", False))
        mlp_b = bool(hf.get("mlp_bias", False))
    default_ctx = {"llama": 2048, "qwen3": 32768, "qwen2": 32768}[family]
    config = ModelConfig(
        vocab_size=int(_need(hf, "vocab_size", source, arch)),
        context_length=int(hf.get("max_position_embeddings") or default_ctx),
        emb_dim=emb,
        n_heads=heads,
        n_layers=int(_need(hf, "num_hidden_layers", source, arch)),
        drop_rate=0.0,
        qkv_bias=qkv_b,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim * heads == emb else head_dim,
        hidden_dim=int(_need(hf, "intermediate_size", source, arch)),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        pos_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        ffn="swiglu",
        bias=o_b or mlp_b,
        qk_norm=family == "qwen3",
        name=name,
    )
    return HFSpec(family, arch, config, config.tie_embeddings, qkv_b, o_b, mlp_b)


def export_spec(config: ModelConfig, source: str) -> HFSpec:
    """The Hugging Face architecture a `ModelConfig` exports to; refuse shapes none can hold."""
    c = config
    if c.pos_embedding == "learned" and c.norm == "layernorm" and c.ffn == "gelu":
        problems = []
        if c.kv_heads != c.n_heads:
            problems.append("grouped-query attention (n_kv_heads)")
        if c.head_size * c.n_heads != c.emb_dim:
            problems.append("head_dim other than emb_dim / n_heads")
        if c.qk_norm:
            problems.append("qk_norm")
        if problems:
            raise InputError(f"{source}: GPT-2 export cannot hold {', '.join(problems)}")
        return HFSpec("gpt2", "GPT2LMHeadModel", c, c.tie_embeddings, True, True, True)
    if c.pos_embedding == "rope" and c.norm == "rmsnorm" and c.ffn == "swiglu":
        if c.qk_norm:
            if c.bias:
                raise InputError(
                    f"{source}: Qwen3 has no feed-forward biases; this model has bias=True"
                )
            attn_bias = c.qkv_bias
            return HFSpec("qwen3", "Qwen3ForCausalLM", c, c.tie_embeddings, attn_bias, attn_bias)
        attn_bias = c.qkv_bias or c.bias
        return HFSpec(
            "llama", "LlamaForCausalLM", c, c.tie_embeddings, attn_bias, attn_bias, c.bias
        )
    raise InputError(
        f"{source}: no Hugging Face architecture for pos_embedding={c.pos_embedding}, "
        f"norm={c.norm}, ffn={c.ffn}; export supports learned+layernorm+gelu (GPT-2) and "
        "rope+rmsnorm+swiglu (Llama, Qwen3 with qk_norm)"
    )


def hf_config_dict(spec: HFSpec, dtype: torch.dtype, eos_id: int | None, bos_id: int | None):
    """config.json for `spec` (v4 key names, which transformers 4.x and 5.x both read)."""
    c = spec.config
    dtype_name = str(dtype).removeprefix("torch.")
    if spec.family == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.context_length,
            "n_ctx": c.context_length,
            "n_embd": c.emb_dim,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_inner": None if c.ffn_dim == 4 * c.emb_dim else c.ffn_dim,
            "activation_function": "gelu_new",
            "resid_pdrop": c.drop_rate,
            "embd_pdrop": c.drop_rate,
            "attn_pdrop": c.drop_rate,
            "layer_norm_epsilon": c.norm_eps,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": dtype_name,
            "use_cache": True,
        }
    out = {
        "architectures": [spec.architecture],
        "model_type": spec.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.emb_dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "attention_bias": spec.qkv_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype_name,
        "use_cache": True,
    }
    if spec.family == "llama":
        out["mlp_bias"] = spec.mlp_bias
        out["pretraining_tp"] = 1
    else:
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    return out


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes (a tied head is stored once), from a meta-device model."""
    from scratchllm.model.gpt import GPTModel

    class ShapesOnly(GPTModel):
        def reset_parameters(self) -> None:  # nothing to initialise on the meta device
            pass

    with torch.device("meta"):
        model = ShapesOnly(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("out_head.weight", None)
    return shapes


def _detect_prefix(keys: set[str], probe: str, prefix: str) -> str:
    return prefix if prefix + probe in keys or probe not in keys else ""


def import_rules(spec: HFSpec, shapes: dict[str, tuple[int, ...]], keys: set[str]) -> list[Rule]:
    """Ours ← theirs, for every tensor of our model."""
    c = spec.config
    rules: list[Rule] = []

    def copy(ours: str, theirs: str) -> None:
        rules.append(Rule(ours, shapes[ours], "copy", (theirs,), (shapes[ours],)))

    def t(ours: str, theirs: str) -> None:
        s = shapes[ours]
        rules.append(Rule(ours, s, "t", (theirs,), (s[::-1],)))

    def cat(ours: str, theirs: list[str], parts: list[int]) -> None:
        s = shapes[ours]
        rules.append(Rule(ours, s, "cat", tuple(theirs), tuple((p, *s[1:]) for p in parts)))

    def zeros(ours: str) -> None:
        rules.append(Rule(ours, shapes[ours], "zeros"))

    def copy_or_zeros(ours: str, theirs: str, present: bool) -> None:
        copy(ours, theirs) if present else zeros(ours)

    q_dim, kv_dim = c.n_heads * c.head_size, c.kv_heads * c.head_size
    if spec.family == "gpt2":
        p = _detect_prefix(keys, "wte.weight", "transformer.")
        copy("tok_emb.weight", p + "wte.weight")
        copy("pos_emb.weight", p + "wpe.weight")
        for i in range(c.n_layers):
            h, b = f"{p}h.{i}.", f"trf_blocks.{i}."
            copy(b + "norm1.scale", h + "ln_1.weight")
            copy(b + "norm1.shift", h + "ln_1.bias")
            t(b + "att.qkv.weight", h + "attn.c_attn.weight")
            copy(b + "att.qkv.bias", h + "attn.c_attn.bias")
            t(b + "att.out_proj.weight", h + "attn.c_proj.weight")
            copy(b + "att.out_proj.bias", h + "attn.c_proj.bias")
            copy(b + "norm2.scale", h + "ln_2.weight")
            copy(b + "norm2.shift", h + "ln_2.bias")
            t(b + "ff.fc1.weight", h + "mlp.c_fc.weight")
            copy(b + "ff.fc1.bias", h + "mlp.c_fc.bias")
            t(b + "ff.fc2.weight", h + "mlp.c_proj.weight")
            copy(b + "ff.fc2.bias", h + "mlp.c_proj.bias")
        copy("final_norm.scale", p + "ln_f.weight")
        copy("final_norm.shift", p + "ln_f.bias")
    else:
        p = _detect_prefix(keys, "embed_tokens.weight", "model.")
        copy("tok_emb.weight", p + "embed_tokens.weight")
        for i in range(c.n_layers):
            h, b = f"{p}layers.{i}.", f"trf_blocks.{i}."
            a = h + "self_attn."
            copy(b + "norm1.weight", h + "input_layernorm.weight")
            proj = [a + "q_proj.", a + "k_proj.", a + "v_proj."]
            cat(b + "att.qkv.weight", [x + "weight" for x in proj], [q_dim, kv_dim, kv_dim])
            if c.qkv_bias:
                if spec.qkv_bias:
                    cat(b + "att.qkv.bias", [x + "bias" for x in proj], [q_dim, kv_dim, kv_dim])
                else:
                    zeros(b + "att.qkv.bias")
            copy(b + "att.out_proj.weight", a + "o_proj.weight")
            if c.bias:
                copy_or_zeros(b + "att.out_proj.bias", a + "o_proj.bias", spec.o_bias)
            if c.qk_norm:
                copy(b + "att.q_norm.weight", a + "q_norm.weight")
                copy(b + "att.k_norm.weight", a + "k_norm.weight")
            copy(b + "norm2.weight", h + "post_attention_layernorm.weight")
            for ours, theirs in (("fc1", "gate_proj"), ("fc2", "up_proj"), ("fc3", "down_proj")):
                copy(f"{b}ff.{ours}.weight", f"{h}mlp.{theirs}.weight")
                if c.bias:
                    copy_or_zeros(f"{b}ff.{ours}.bias", f"{h}mlp.{theirs}.bias", spec.mlp_bias)
        copy("final_norm.weight", p + "norm.weight")
    if not spec.tied:
        copy("out_head.weight", "lm_head.weight")
    _check_cover(rules, shapes)
    return rules


def export_rules(spec: HFSpec, shapes: dict[str, tuple[int, ...]]) -> list[Rule]:
    """Theirs ← ours, for every tensor of the Hugging Face model."""
    c = spec.config
    rules: list[Rule] = []

    def copy(theirs: str, ours: str) -> None:
        rules.append(Rule(theirs, shapes[ours], "copy", (ours,), (shapes[ours],)))

    def t(theirs: str, ours: str) -> None:
        s = shapes[ours]
        rules.append(Rule(theirs, s[::-1], "t", (ours,), (s,)))

    def bias(theirs: str, ours: str, size: int) -> None:
        if ours in shapes:
            copy(theirs, ours)
        else:
            rules.append(Rule(theirs, (size,), "zeros"))

    def rows(theirs: str, ours: str, start: int, end: int) -> None:
        s = shapes[ours]
        rules.append(Rule(theirs, (end - start, *s[1:]), "rows", (ours,), (s,), (start, end)))

    d, f = c.emb_dim, c.ffn_dim
    q_dim, kv_dim = c.n_heads * c.head_size, c.kv_heads * c.head_size
    if spec.family == "gpt2":
        p = "transformer."
        copy(p + "wte.weight", "tok_emb.weight")
        copy(p + "wpe.weight", "pos_emb.weight")
        for i in range(c.n_layers):
            h, b = f"{p}h.{i}.", f"trf_blocks.{i}."
            copy(h + "ln_1.weight", b + "norm1.scale")
            copy(h + "ln_1.bias", b + "norm1.shift")
            t(h + "attn.c_attn.weight", b + "att.qkv.weight")
            bias(h + "attn.c_attn.bias", b + "att.qkv.bias", 3 * d)
            t(h + "attn.c_proj.weight", b + "att.out_proj.weight")
            bias(h + "attn.c_proj.bias", b + "att.out_proj.bias", d)
            copy(h + "ln_2.weight", b + "norm2.scale")
            copy(h + "ln_2.bias", b + "norm2.shift")
            t(h + "mlp.c_fc.weight", b + "ff.fc1.weight")
            bias(h + "mlp.c_fc.bias", b + "ff.fc1.bias", f)
            t(h + "mlp.c_proj.weight", b + "ff.fc2.weight")
            bias(h + "mlp.c_proj.bias", b + "ff.fc2.bias", d)
        copy(p + "ln_f.weight", "final_norm.scale")
        copy(p + "ln_f.bias", "final_norm.shift")
    else:
        p = "model."
        copy(p + "embed_tokens.weight", "tok_emb.weight")
        for i in range(c.n_layers):
            h, b = f"{p}layers.{i}.", f"trf_blocks.{i}."
            a = h + "self_attn."
            copy(h + "input_layernorm.weight", b + "norm1.weight")
            spans = {"q": (0, q_dim), "k": (q_dim, q_dim + kv_dim), "v": (q_dim + kv_dim, None)}
            for x, (start, end) in spans.items():
                end = end or q_dim + 2 * kv_dim
                rows(f"{a}{x}_proj.weight", b + "att.qkv.weight", start, end)
                if spec.qkv_bias:
                    if c.qkv_bias:
                        rows(f"{a}{x}_proj.bias", b + "att.qkv.bias", start, end)
                    else:
                        rules.append(Rule(f"{a}{x}_proj.bias", (end - start,), "zeros"))
            copy(a + "o_proj.weight", b + "att.out_proj.weight")
            if spec.o_bias:
                bias(a + "o_proj.bias", b + "att.out_proj.bias", d)
            if c.qk_norm:
                copy(a + "q_norm.weight", b + "att.q_norm.weight")
                copy(a + "k_norm.weight", b + "att.k_norm.weight")
            copy(h + "post_attention_layernorm.weight", b + "norm2.weight")
            for ours, theirs in (("fc1", "gate_proj"), ("fc2", "up_proj"), ("fc3", "down_proj")):
                copy(f"{h}mlp.{theirs}.weight", f"{b}ff.{ours}.weight")
                if spec.mlp_bias:
                    copy(f"{h}mlp.{theirs}.bias", f"{b}ff.{ours}.bias")
        copy(p + "norm.weight", "final_norm.weight")
    if not spec.tied:
        copy("lm_head.weight", "out_head.weight")
    return rules


def _check_cover(rules: list[Rule], shapes: dict[str, tuple[int, ...]]) -> None:
    targets = {r.target for r in rules}
    if targets != set(shapes):
        missing = sorted(set(shapes) - targets) + sorted(targets - set(shapes))
        raise RuntimeError(f"internal error: name map does not cover {missing[:3]}")


_IGNORED = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"rotary_emb\.inv_freq$"),
}


def check_source(
    rules: list[Rule], src: TensorSource, ignore: Callable[[str], bool], what: str
) -> None:
    """Every needed tensor present with its shape and a float dtype, nothing unexpected."""
    info = src.info()
    needed: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        needed.update(zip(rule.sources, rule.expect, strict=True))
    missing = [name for name in needed if name not in info]
    if missing:
        raise CheckpointError(
            f"{src.where()}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        )
    for name, shape in needed.items():
        if info[name].shape != shape:
            raise CheckpointError(
                f"{src.where(name)}: tensor {name!r} has shape {info[name].shape}, expected {shape}"
            )
        if not info[name].dtype.is_floating_point:
            raise CheckpointError(
                f"{src.where(name)}: tensor {name!r} has dtype {info[name].dtype}, expected floats"
            )
    unexpected = [k for k in info if k not in needed and not ignore(k)]
    if unexpected:
        raise CheckpointError(
            f"{src.where(unexpected[0])}: unexpected tensor {unexpected[0]!r} for {what} "
            f"({len(unexpected)} unexpected in all)"
        )


def _plan(
    rules: list[Rule], src: TensorSource, dtype: torch.dtype
) -> list[tuple[str, TensorInfo, Callable[[], torch.Tensor]]]:
    def producer(rule: Rule) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if rule.op == "zeros":
                return torch.zeros(rule.shape, dtype=dtype)
            if rule.op == "cat":
                out = torch.cat([src.read(s).to(dtype) for s in rule.sources], dim=0)
            else:
                out = src.read(rule.sources[0])
                if rule.op == "t":
                    out = out.t()
                elif rule.op == "rows":
                    out = out[rule.rows[0] : rule.rows[1]]
            return out.to(dtype).contiguous()

        return produce

    return [(r.target, TensorInfo(r.shape, dtype), producer(r)) for r in rules]


# ============================================================================================
# Output directories: staged, then renamed into place
# ============================================================================================


@contextmanager
def staged_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """A temporary sibling of `out` that becomes `out` on success and vanishes on failure."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out}: already exists and is not empty; pass --force to replace")
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.convert-tmp"
    old = out.parent / f".{out.name}.convert-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # parents we made, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise


# ============================================================================================
# Import and export
# ============================================================================================


@dataclass
class ConvertResult:
    direction: str  # import | export
    source: Path
    out: Path
    architecture: str
    config: ModelConfig
    dtype: torch.dtype
    parameters: int
    tokenizer: str | None
    notes: list[str] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """'scratchllm' (a checkpoint or run directory), 'hf' (a Hugging Face folder) or 'tf'."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--from {path}: no such directory")
    if not path.is_dir():
        raise InputError(f"--from {path}: expected a directory, found a file")
    if (path / "checkpoint" / "config.json").exists() and not (path / "config.json").exists():
        return "scratchllm"
    config = path / "config.json"
    if config.exists():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{config}: invalid JSON ({exc})") from None
        if isinstance(data, dict) and "emb_dim" in data:
            return "scratchllm"
        if isinstance(data, dict) and ("architectures" in data or "model_type" in data):
            return "hf"
        raise InputError(
            f"{config}: neither a scratchllm config (emb_dim) nor a Hugging Face one "
            "(architectures / model_type)"
        )
    if (path / "hparams.json").exists() and find_tf_checkpoint(path) is not None:
        return "tf"
    raise InputError(
        f"--from {path}: no config.json (Hugging Face or scratchllm) and no TensorFlow GPT-2 "
        "checkpoint (hparams.json + model.ckpt.index)"
    )


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    from scratchllm.utils import parse_dtype

    return parse_dtype(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _tf_hf_config(directory: Path) -> dict[str, Any]:
    hp = _read_json(directory / "hparams.json")
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
        raise InputError(f"{directory / 'hparams.json'}: missing or bad field {exc}") from None


def import_hf(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
    force: bool = False,
    fmt: str = "auto",
) -> ConvertResult:
    """Convert a Hugging Face (or OpenAI TensorFlow GPT-2) folder into a scratchllm checkpoint."""
    from scratchllm.checkpoint import FORMAT_VERSION, check_tokenizer_fits
    from scratchllm.tokenizers import load_tokenizer
    from scratchllm.tokenizers.hf import merges_file_of, save_tokenizer, tokenizer_from_model_dir

    source, out = Path(source), Path(out)
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "tf":
        hf = _tf_hf_config(source)
        config_source = str(source / "hparams.json")
    else:
        hf = _read_json(source / "config.json")
        config_source = str(source / "config.json")
    name = str(hf.get("_name_or_path") or source.resolve().name)
    spec = hf_spec(hf, config_source, name=name)
    shapes = _expected_shapes(spec.config)
    if fmt == "tf":
        prefix = find_tf_checkpoint(source)
        if prefix is None:
            raise InputError(f"{source}: no TensorFlow checkpoint (model.ckpt.index)")
        src: TensorSource = TFGPT2Source(TFCheckpoint(prefix))
    else:
        src = open_hf_weights(source)
    with src:
        keys = set(src.info())
        rules = import_rules(spec, shapes, keys)
        pattern = _IGNORED["gpt2" if spec.family == "gpt2" else "llama"]

        def ignore(k: str) -> bool:
            return bool(pattern.search(k)) or (spec.tied and k == "lm_head.weight")

        check_source(rules, src, ignore, spec.architecture)
        emb_source = rules[0].sources[0]
        out_dtype = _parse_dtype(dtype) or src.info()[emb_source].dtype
        merges = None
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            merges = merges_file_of(source)
            tok = tokenizer_from_model_dir(source, hf, spec.family)
            if tok is None:
                raise InputError(
                    f"{source}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt, "
                    "or encoder.json + vocab.bpe); pass --tokenizer SPEC"
                )
        check_tokenizer_fits(tok, spec.config, str(source))
        with staged_dir(out, force) as tmp:
            (tmp / "config.json").write_text(json.dumps(spec.config.to_dict(), indent=2) + "\n")
            write_safetensors(tmp / "model.safetensors", _plan(rules, src, out_dtype))
            save_tokenizer(tok, tmp / "tokenizer", merges)
            meta = {
                "format_version": FORMAT_VERSION,
                "task": "lm",
                "source": {
                    "format": fmt,
                    "architecture": spec.architecture,
                    "path": str(source.resolve()),
                },
                "dtype": str(out_dtype).removeprefix("torch."),
            }
            (tmp / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    params = sum(math.prod(s) for s in shapes.values())
    return ConvertResult(
        "import", source, out, spec.architecture, spec.config, out_dtype, params, tok.name
    )


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> ConvertResult:
    """Write a scratchllm checkpoint as a Hugging Face folder (config, safetensors, tokenizer)."""
    from scratchllm.checkpoint import resolve_checkpoint_dir
    from scratchllm.tokenizers import load_tokenizer
    from scratchllm.tokenizers.hf import export_tokenizer

    ckpt = resolve_checkpoint_dir(checkpoint)
    out = Path(out)
    try:
        config = ModelConfig.from_json(ckpt / "config.json")
    except InputError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: bad config.json: {exc}") from None
    spec = export_spec(config, str(ckpt / "config.json"))
    shapes = _expected_shapes(config)
    rules = export_rules(spec, shapes)
    if not (ckpt / "tokenizer").exists():
        raise CheckpointError(f"checkpoint {ckpt}: tokenizer/ is missing")
    tok = load_tokenizer(ckpt / "tokenizer")
    with SafetensorsFile(ckpt / "model.safetensors") as src:
        what = f"a scratchllm {spec.architecture}-shaped model"
        check_source(rules, src, lambda k: spec.tied and k == "out_head.weight", what)
        out_dtype = _parse_dtype(dtype) or src.info()["tok_emb.weight"].dtype
        with staged_dir(out, force) as tmp:
            eos_id, bos_id = export_tokenizer(tok, ckpt / "tokenizer", tmp, config.context_length)
            hf = hf_config_dict(spec, out_dtype, eos_id, bos_id)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            gen = {"bos_token_id": bos_id, "eos_token_id": eos_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            write_safetensors(tmp / "model.safetensors", _plan(rules, src, out_dtype))
    params = sum(math.prod(s) for s in shapes.values())
    return ConvertResult(
        "export", ckpt, out, spec.architecture, config, out_dtype, params, tok.name
    )


def convert(
    source: str | Path,
    out: str | Path,
    *,
    fmt: str = "auto",
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """`scratchllm convert`: import a Hugging Face/TensorFlow folder or export a checkpoint."""
    if fmt not in ("auto", "hf", "scratchllm", "tf"):
        raise InputError(f"--format {fmt!r}: expected auto, hf, scratchllm or tf")
    detected = detect_format(source) if fmt == "auto" else fmt
    to = to or ("hf" if detected == "scratchllm" else "scratchllm")
    if to not in ("hf", "scratchllm"):
        raise InputError(f"--to {to!r}: expected hf or scratchllm")
    if detected == "scratchllm" and to == "scratchllm":
        raise InputError(f"--from {source}: is already a scratchllm checkpoint (use --to hf)")
    if detected in ("hf", "tf") and to == "hf":
        raise InputError(f"--from {source}: is already a Hugging Face folder (use --to scratchllm)")
    if Path(out).resolve() == Path(source).resolve():
        raise InputError(f"--out {out}: must differ from --from")
    if detected == "scratchllm":
        return export_hf(source, out, dtype=dtype, force=force)
    return import_hf(source, out, dtype=dtype, tokenizer=tokenizer, force=force, fmt=detected)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
