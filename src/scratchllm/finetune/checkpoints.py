"""Fine-tuning checkpoints that load and resume, with LoRA too.

Every save of a fine-tuning run (each evaluation, SIGTERM/Ctrl-C, the end) is a standard
checkpoint that `load_checkpoint`, `scratchllm generate`, `classify` and `chat` read, plus
`train_state.pt` for `finetune TASK ... --resume`. Without LoRA that is the trainer's own save.
With LoRA, `FinetuneTrainer` saves

    model.safetensors      the merged weights (W + alpha/rank · B A), under the plain layer names
    adapters.safetensors   the adapters (and a classification head) alone
    lora.json              rank, alpha, targets and the base checkpoint they apply to

and a resume rebuilds the wrapped model from the base checkpoint and reads the adapters back
(the merged weights cannot be split again), so it continues bit for bit. `load_with_adapters`
rebuilds the unmerged model from a checkpoint directory as well as from out/adapters/.
"""

from __future__ import annotations

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


def lora_spec(model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """lora.json: what `load_with_adapters` needs to rebuild the unmerged model."""
    first = next(m for m in model.modules() if isinstance(m, LoRALinear))
    return {
        "base_checkpoint": str(Path(meta["base_checkpoint"]).resolve()),
        "rank": first.rank,
        "alpha": first.alpha,
        "targets": meta.get("lora", {}).get("targets", "attn,ff"),
        "meta": {k: v for k, v in meta.items() if k != "lora"},
    }


class FinetuneTrainer(Trainer):
    """The one `Trainer`, with LoRA-aware saves: merged weights plus the adapters."""

    def checkpoint_files(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, bytes] | None]:
        if not has_lora(self.model):
            return super().checkpoint_files()
        from safetensors.torch import save as save_tensors

        blob = save_tensors(adapter_state_dict(self.model), metadata={"format": "pt"})
        spec = json.dumps(lora_spec(self.model, self.meta), indent=2) + "\n"
        files = dict(zip(ADAPTER_FILES, (blob, spec.encode()), strict=True))
        return merged_state_dict(self.model), files

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
        try:
            adapters = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{file}: corrupt or truncated safetensors file ({exc})"
            ) from None
        return {**model_state_for_saving(self.model), **adapters}
