"""The one checkpoint format: a directory that holds everything needed to use or resume a model.

    config.json          ModelConfig (JSON)
    model.safetensors    weights (a tied head is stored once)
    tokenizer/           the tokenizer's own files (see `Tokenizer.save`)
    checkpoint.json      format version, task, step and any task metadata (labels, ...)
    train_state.pt       optimizer/schedule/RNG/data position; tensors and plain types only

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
during a save leaves the previous checkpoint whole. Nothing is ever unpickled: weights come from
safetensors and the training state is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError
from scratchllm.model.gpt import GPTModel
from scratchllm.tokenizer import Tokenizer, load_tokenizer
from scratchllm.utils import fsync_dir

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
REQUIRED = ("config.json", "model.safetensors")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its tokenizer and metadata."""

    model: GPTModel
    tokenizer: Tokenizer
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory holding `checkpoint/`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if (path / "config.json").exists():
        return path
    if (path / "checkpoint" / "config.json").exists():
        return path / "checkpoint"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: expected a directory, found a file")
    raise CheckpointError(
        f"checkpoint {path}: no config.json in it (nor in {path / 'checkpoint'}); "
        "expected a directory written by scratchllm"
    )


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied head (safetensors refuses shared storage)."""
    base = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().contiguous() for k, v in base.state_dict().items()}
    tied = getattr(getattr(base, "config", None), "tie_embeddings", False)
    if tied and not getattr(base, "num_classes", None):
        state.pop("out_head.weight", None)
    return state


def save_checkpoint(
    path: str | Path,
    model: GPTModel,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp sibling, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    old = path.parent / f".{path.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    base = getattr(model, "module", model)
    (tmp / "config.json").write_text(json.dumps(base.config.to_dict(), indent=2) + "\n")
    save_file(
        model_state_for_saving(base), str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
    tokenizer.save(tmp / "tokenizer")
    info = {"format_version": FORMAT_VERSION, "task": "lm", **(meta or {})}
    (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as fh:
                import os

                os.fsync(fh.fileno())
    fsync_dir(tmp)
    # Swap: the old checkpoint survives until the new one is in place.
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _recover(path: Path) -> None:
    """Finish a swap that a crash interrupted: the `.old` copy is the last complete checkpoint."""
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.exists():
        log.warning("restoring %s from %s after an interrupted save", path, old)
        old.rename(path)


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / "checkpoint.json"
    if not meta_path.exists():
        return {"format_version": FORMAT_VERSION, "task": "lm"}
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{meta_path}: corrupt JSON at line {exc.lineno}: {exc.msg}"
        ) from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"checkpoint {path}: model.safetensors is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def load_weights_into(
    model: GPTModel, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load `state` strictly, naming the first missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    if model.config.tie_embeddings and not getattr(model, "num_classes", None):
        expected.pop("out_head.weight", None)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=assign)


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Checkpoint:
    """Load model, tokenizer and metadata; raise `CheckpointError` naming what is wrong."""
    path = Path(path)
    _recover(path)
    _recover(path / "checkpoint")
    path = resolve_checkpoint_dir(path)
    for name in REQUIRED:
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
    try:
        config = ModelConfig.from_json(path / "config.json")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad config.json: {exc}") from None
    meta = read_meta(path)
    try:
        tokenizer = load_tokenizer(path / "tokenizer") if (path / "tokenizer").exists() else None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad tokenizer: {exc}") from None
    if tokenizer is None:
        raise CheckpointError(f"checkpoint {path}: tokenizer/ is missing")
    state = load_state_dict(path)
    # Build on the meta device and adopt the loaded tensors (assign=True): one copy in memory.
    with torch.device("meta"):
        model = GPTModel(config)
        if meta.get("num_classes"):
            model.set_classification_head(int(meta["num_classes"]))
    load_weights_into(model, state, str(path / "model.safetensors"), assign=True)
    if config.tie_embeddings and not meta.get("num_classes"):
        model.out_head.weight = model.tok_emb.weight
    if model.rope is not None:  # non-persistent buffers are not in the file: recompute
        from scratchllm.model.layers import rope_inverse_frequencies

        model.rope.inv_freq = rope_inverse_frequencies(config)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    check_tokenizer_fits(tokenizer, config, str(path))
    model.eval()
    return Checkpoint(model=model, tokenizer=tokenizer, path=path, meta=meta)


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    file = resolve_checkpoint_dir(path) / "train_state.pt"
    if not file.exists():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: corrupt training state ({type(exc).__name__})") from None


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, source: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary holds {config.vocab_size}"
        )
