"""Fine-tuning checkpoints that load and resume, with LoRA too.

Every save of a fine-tuning run (each evaluation, SIGTERM/Ctrl-C, the end) is a standard
checkpoint that `load_checkpoint`, `scratchllm generate`, `classify` and `chat` read, plus
`train_state.pt` for `finetune TASK ... --resume`. Without LoRA that is the trainer's own save.
With LoRA, `FinetuneTrainer` saves

    model.safetensors      the merged weights (W + alpha/rank · B A), under the plain layer names
    adapters.safetensors   the adapters (and a classification head) alone
    lora.json              rank, alpha, targets, the base checkpoint they apply to and the
                           fingerprint of its weights (`weights_fingerprint`)

and a resume rebuilds the wrapped model from the base checkpoint and reads the adapters back
(the merged weights cannot be split again), so it continues bit for bit; a base whose weights
changed since is refused. `load_with_adapters` rebuilds the unmerged model from a checkpoint
directory as well as from out/adapters/. `scratchllm convert --to peft` turns the adapters into
a PEFT adapter folder, and `convert --adapter` writes these files back (`hub.peft`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from scratchllm.errors import CheckpointError
from scratchllm.model.lora import LoRALinear, adapter_state_dict, has_lora
from scratchllm.train.trainer import Trainer

ADAPTER_FILES = ("adapters.safetensors", "lora.json")


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict `merge_lora(model)` would have, computed the same way (W + scale · B A),
    without changing `model`: each LoRA layer's `base.weight` and `base.bias` under the plain
    layer's names, the adapters left out."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in layers:  # lora_A, lora_B
            continue
        owner, _, part = prefix.rpartition(".")
        if part == "base" and owner in layers:
            if leaf == "weight":
                layer = layers[owner]
                with torch.no_grad():
                    delta = (layer.lora_B @ layer.lora_A).to(tensor.dtype) * layer.scale
                    tensor = tensor + delta
            key = f"{owner}.{leaf}"
        state[key] = tensor
    return state


def weights_fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 of a checkpoint's model.safetensors (first 16 hex digits): which base weights a
    LoRA run's adapters were trained on. The whole file is read, since weights that differ only
    in their values (not their names or shapes) must be told apart."""
    digest = hashlib.sha256()
    with open(Path(checkpoint_dir) / "model.safetensors", "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def lora_spec(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """lora.json: what `load_with_adapters` needs to rebuild the unmerged model."""
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    return {
        "base_checkpoint": str(Path(meta["base_checkpoint"]).resolve()),
        "base_fingerprint": meta.get("base_fingerprint"),
        "rank": first.rank,
        "alpha": first.alpha,
        "targets": meta.get("lora", {}).get("targets", "attn,ff"),
        "meta": {k: v for k, v in meta.items() if k != "lora"},
    }


def lora_checkpoint_files(
    model: torch.nn.Module, meta: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """The merged weights and the files beside them (`ADAPTER_FILES`) of a LoRA checkpoint:
    what `save_checkpoint(..., extra_files, weights)` takes. The trainer's saves and the PEFT
    import (`hub.peft`) both write them through here, so a LoRA checkpoint has one layout."""
    from safetensors.torch import save as save_tensors

    blob = save_tensors(adapter_state_dict(model), metadata={"format": "pt"})
    spec = json.dumps(lora_spec(model, meta), indent=2) + "\n"
    files = dict(zip(ADAPTER_FILES, (blob, spec.encode()), strict=True))
    return merged_state_dict(model), files


class FinetuneTrainer(Trainer):
    """The one `Trainer`, with LoRA-aware saves: merged weights plus the adapters."""

    def checkpoint_files(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, bytes] | None]:
        if not has_lora(self.model):
            return super().checkpoint_files()
        return lora_checkpoint_files(self.model, self.meta)

    def resume_weights(self, path: Path) -> dict[str, torch.Tensor]:
        """With LoRA: the wrapped model's base weights as they are (from the base checkpoint)
        and the saved adapters; `resume` loads them strictly, naming any that do not fit."""
        if not has_lora(self.model):
            return super().resume_weights(path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from scratchllm.checkpoint import model_state_for_saving

        file = path / ADAPTER_FILES[0]
        if not file.exists():
            raise CheckpointError(
                f"{path}: {file.name} is missing: not saved by a LoRA run (resume it with the "
                "LoRA settings it was started with)"
            )
        self._check_base(path)
        try:
            adapters = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{file}: corrupt or truncated safetensors file ({exc})"
            ) from None
        return {**model_state_for_saving(self.model), **adapters}

    def _check_base(self, path: Path) -> None:
        """The adapters continue only on the weights they were trained on: a base checkpoint
        replaced since the run started (same shapes, other values) is refused."""
        spec_file = path / ADAPTER_FILES[1]
        try:
            saved = json.loads(spec_file.read_text(encoding="utf-8")).get("base_fingerprint")
        except (OSError, ValueError, AttributeError):
            raise CheckpointError(f"{spec_file}: missing or not a JSON object") from None
        now = self.meta.get("base_fingerprint")
        if saved and now and saved != now:
            raise CheckpointError(
                f"{spec_file}: base_fingerprint is {saved}, but the base checkpoint "
                f"{self.meta.get('base_checkpoint')} now holds weights {now}; resume with the "
                "base the run started from"
            )
