"""The one checkpoint format: a directory that holds everything needed to use or resume a model.

    config.json          ModelConfig (JSON)
    model.safetensors    weights (a tied head is stored once)
    tokenizer/           the tokenizer's own files (see `Tokenizer.save`)
    checkpoint.json      format version, task, step, task metadata (labels, ...) and the
                         tokenizer's fingerprint (a replaced tokenizer/ is refused at load)
    train_state.pt       optimizer/schedule/RNG/data position; tensors and plain types only

A checkpoint is written into a temporary sibling directory and renamed into place
(`scratchllm.fs.atomic_dir`), so a crash during a save leaves the previous checkpoint whole.
`write_checkpoint` is the one writer; `save_checkpoint` (a model) and the hub's import
(streamed, converted tensors) both go through it. A training run keeps `checkpoint/` as the
latest, the last K as `checkpoints/step-NNNNNN/` and the best by validation loss as `best/`;
those copies are hard links to the same (never rewritten) files, so they cost no extra disk.
Nothing is ever unpickled: weights come from safetensors and the training state is read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError
from scratchllm.fs import atomic_dir, os_error_of, recover_dir
from scratchllm.model.gpt import GPTModel, provide
from scratchllm.tokenizers import Tokenizer, load_tokenizer

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

    def generate(self, prompt: str, max_new_tokens: int = 50, **sampling: Any) -> str:
        """Continue `prompt` with this checkpoint's model and tokenizer and return the new
        text (`scratchllm.inference.generate.generate_text`: temperature, top_k, top_p, seed)."""
        from scratchllm.inference.generate import generate_text

        return generate_text(self.model, self.tokenizer, prompt, max_new_tokens, **sampling)


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


def model_state_for_saving(
    model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """State dict without the tied head (safetensors refuses shared storage).

    `state` replaces `model.state_dict()` when given (a full state gathered from FSDP shards).
    """
    base = getattr(model, "module", model)  # unwrap DDP
    base = getattr(base, "_orig_mod", base)  # unwrap torch.compile
    source = state if state is not None else base.state_dict()
    state = {k: v.detach().contiguous() for k, v in source.items()}
    tied = getattr(getattr(base, "config", None), "tie_embeddings", False)
    if tied and not getattr(getattr(base, "config", None), "num_classes", None):
        state.pop("out_head.weight", None)
    return state


def save_checkpoint(
    path: str | Path,
    model: GPTModel,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (temp sibling, fsync, rename).

    `weights` overrides the model's own state dict (FSDP: the gathered full state)."""
    base = getattr(model, "module", model)
    # torch.compile's OptimizedModule: `_orig_mod` is the only way back to the module (no public
    # accessor in torch 2.x).
    base = getattr(base, "_orig_mod", base)
    state = model_state_for_saving(base, weights)

    def write_weights(file: Path) -> None:
        save_file(state, str(file), metadata={"format": "pt"})

    return write_checkpoint(
        path, base.config, tokenizer, write_weights, meta, train_state, extra_files
    )


def write_checkpoint(
    path: str | Path,
    config: ModelConfig,
    tokenizer: Tokenizer,
    write_weights: Callable[[Path], None],
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """The one writer of the checkpoint format, atomically (`scratchllm.fs.atomic_dir`).

    `write_weights(file)` writes model.safetensors: `save_checkpoint` saves a model's state
    dict, the hub's import streams converted tensors one at a time without holding a model."""
    path = Path(path)
    with atomic_dir(path, hook=_test_hook) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        write_weights(tmp / "model.safetensors")
        (tmp / "tokenizer").mkdir()
        tokenizer.write_files(tmp / "tokenizer")
        info = {"format_version": FORMAT_VERSION, "task": "lm", **(meta or {})}
        info["tokenizer_fingerprint"] = tokenizer.fingerprint()  # checked by every load
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")
        if train_state is not None:
            _save_train_state(train_state, tmp / "train_state.pt")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return path


def _save_train_state(state: dict[str, Any], file: Path) -> None:
    """torch.save, with a full disk raised as the OSError(ENOSPC) naming `file`: torch turns it
    into RuntimeError("... unexpected pos ..."), its context the OSError when torch writes
    through a Python file object."""
    try:
        with open(file, "wb") as fh:
            torch.save(state, fh)
    except RuntimeError as exc:
        os_error = os_error_of(exc, file)
        if os_error is None:
            raise
        raise os_error from exc


_saves = {"count": 0}


def _test_hook(stage: str) -> None:
    """Crash injection for the crash-safety tests, off unless the variable is set.

    SCRATCHLLM_TEST_CHECKPOINT_CRASH="STAGE:N" SIGKILLs this process at STAGE ("written": the
    temporary copy is complete, nothing renamed; "swapping": the old checkpoint has been moved
    aside, the new one not yet renamed in) of its N-th checkpoint save.
    SCRATCHLLM_TEST_CHECKPOINT_DELAY=SECONDS sleeps at "written" (slows saves down)."""
    delay = os.environ.get("SCRATCHLLM_TEST_CHECKPOINT_DELAY")
    if delay and stage == "written":
        import time

        time.sleep(float(delay))
    spec = os.environ.get("SCRATCHLLM_TEST_CHECKPOINT_CRASH")
    if not spec:
        return
    if stage == "written":
        _saves["count"] += 1
    want, _, nth = spec.partition(":")
    if want == stage and _saves["count"] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def link_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make `dst` an atomic copy of checkpoint `src` made of hard links (a real copy where the
    filesystem has none). Safe because checkpoint files are only ever replaced, never edited."""
    src, dst = Path(src), Path(dst)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    with atomic_dir(dst, hook=_link_hook) as tmp:
        shutil.copytree(src, tmp, copy_function=link, dirs_exist_ok=True)
    return dst


def _link_hook(stage: str) -> None:
    # A link is not a save: it neither counts nor sleeps at "written", but it can be killed
    # mid-swap like one.
    if stage == "swapping":
        _test_hook(stage)


_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_STEP_DIR = re.compile(r"^\.(step-\d+)\.(tmp|old)$")


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` `step-NNNNNN` snapshots in `directory`; the removed.

    Leftovers of a save that a crash cut short go too: a `.tmp` is never complete, and an
    `.old` is only kept (as the snapshot itself) when its swap did not finish."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for p in directory.iterdir():
        if m := _PARTIAL_STEP_DIR.match(p.name):
            if m.group(2) == "old":
                recover_dir(directory / m.group(1))
            if p.exists():
                shutil.rmtree(p, ignore_errors=True)
    snaps = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    )
    removed = [p for _, p in snaps[: max(0, len(snaps) - keep)]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def update_meta(dirs: list[Path], changes: dict[str, Any]) -> None:
    """Merge `changes` into checkpoint.json of each directory, atomically (new file, rename)."""
    from scratchllm.fs import atomic_write_text

    for d in dirs:
        if not (d / "checkpoint.json").exists():
            continue
        meta = {**read_meta(d), **changes}
        atomic_write_text(d / "checkpoint.json", json.dumps(meta, indent=2) + "\n")


def recover_interrupted_save(path: str | Path) -> None:
    """Finish a swap that a crash interrupted (for a checkpoint dir or a run dir)."""
    path = Path(path)
    recover_dir(path)
    recover_dir(path / "checkpoint")


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
    if model.config.tie_embeddings and model.config.num_classes is None:
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


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, Tokenizer, dict[str, Any]]:
    """The model config, tokenizer and checkpoint.json of a checkpoint (or run) directory,
    without reading its weights; a save that a crash interrupted is finished first. What
    `load_checkpoint` and `--resume` (which reads the weights with the optimizer state) share."""
    path = Path(path)
    recover_interrupted_save(path)
    path = resolve_checkpoint_dir(path)
    for name in REQUIRED:
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
    try:
        config = ModelConfig.from_json(path / "config.json")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad config.json: {exc}") from None
    meta = read_meta(path)
    if not (path / "tokenizer").exists():
        raise CheckpointError(f"checkpoint {path}: tokenizer/ is missing")
    try:
        tokenizer = load_tokenizer(path / "tokenizer")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: bad tokenizer: {exc}") from None
    check_tokenizer_fingerprint(tokenizer, meta, path / "tokenizer")
    if config.num_classes is None and meta.get("num_classes"):  # a classifier saved before
        config = config.replace(num_classes=int(meta["num_classes"]))  # config.json held it
    check_tokenizer_fits(tokenizer, config, str(path))
    return config, tokenizer, meta


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    pack: bool | str = False,
) -> Checkpoint:
    """Load model, tokenizer and metadata; raise `CheckpointError` naming what is wrong.

    `quantize="fp16"` or `"int8"`: smaller linear weights for CPU decoding (`scratchllm.inference.weights`).
    `pack=True` (or a layout, "gemv" | "onednn" | "both" = True): fp32 linears on the CPU are
    packed for faster decoding (`scratchllm.inference.weights.pack_linears`, inference only); anything else
    is left as it is.
    """
    from scratchllm.inference.weights import apply_quantization, check_quantize, pack_linears

    check_quantize(quantize, device)  # before the (slow) load
    config, tokenizer, meta = read_checkpoint_config(path)
    path = resolve_checkpoint_dir(path)
    state = load_state_dict(path)
    # Build on the meta device and adopt the loaded tensors (assign=True): one copy in memory.
    with torch.device("meta"):
        model = GPTModel(config)
    load_weights_into(model, state, str(path / "model.safetensors"), assign=True)
    if config.tie_embeddings and config.num_classes is None:
        model.out_head.weight = model.tok_emb.weight
    if model.rope is not None:  # non-persistent buffers are not in the file: recompute
        from scratchllm.model.layers import rope_inverse_frequencies

        model.rope.inv_freq = rope_inverse_frequencies(config)
    model = model.to(device)
    # Quantize from the stored weights, before any cast to a lower precision.
    apply_quantization(model, quantize, device)
    if dtype is not None:
        model = model.to(dtype)
    if pack:  # last: packed weights are opaque to later casts and moves
        pack_linears(model, layout="both" if pack is True else pack)
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


def check_tokenizer_fingerprint(tokenizer: Tokenizer, meta: dict[str, Any], folder: Path) -> None:
    """CheckpointError when `folder` holds another tokenizer than the one the checkpoint was
    written with (whose fingerprint checkpoint.json records); older checkpoints recorded none."""
    want = meta.get("tokenizer_fingerprint")
    if want is not None and tokenizer.fingerprint() != want:
        raise CheckpointError(
            f"{folder}: tokenizer/ does not match the one this checkpoint was trained with "
            f"(fingerprint {want}, this one's is {tokenizer.fingerprint()})"
        )


def check_tokenizer_fits(tokenizer: Tokenizer, config: ModelConfig, source: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{source}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary holds {config.vocab_size}"
        )


provide("load_checkpoint", load_checkpoint)  # GPTModel.from_pretrained
provide("save_checkpoint", save_checkpoint)  # GPTModel.save_pretrained
