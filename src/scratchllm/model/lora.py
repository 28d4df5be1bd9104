"""Low-rank adaptation (appendix E): y = W x + (alpha / rank) · B A x, with W frozen.

A starts random (Kaiming-uniform, as `nn.Linear` initialises its weight) and B at zero, so a freshly
wrapped model computes exactly what the base model did. Only A and B (and whatever the task names,
e.g. a classification head) train. `merge_lora` folds B A into W and puts plain `nn.Linear` layers
back, so a merged model saves as a standard checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from scratchllm.errors import InputError
from scratchllm.settings import SettingError

# Names of linear layers inside a TransformerBlock, by group.
TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("att.qkv", "att.out_proj"),
    "ff": ("ff.fc1", "ff.fc2", "ff.fc3"),
}


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update scaled by `alpha / rank`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise SettingError("lora_rank", f"must be ≥ 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` with W + scale · B A (the base layer, updated in place)."""
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
        return self.base


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'attn', 'ff' or 'attn,ff' → the layer names to wrap."""
    groups = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    names: list[str] = []
    for group in groups:
        if group not in TARGETS:
            raise SettingError("lora_targets", f"unknown group {group!r}; choose from attn, ff")
        names.extend(TARGETS[group])
    if not names:
        raise SettingError("lora_targets", "name at least one of attn, ff")
    return tuple(names)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: str | Iterable[str] = "attn,ff",
    trainable: Iterable[str] = (),
) -> list[str]:
    """Wrap the target linear layers of every block; freeze everything except the adapters and
    the parameters whose names start with one of `trainable` (e.g. 'out_head')."""
    suffixes = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(suffixes):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
    if not wrapped:
        raise SettingError("lora_targets", f"no linear layer in the model matches {suffixes}")
    prefixes = tuple(trainable)
    for name, p in model.named_parameters():
        if "lora_" in name or (prefixes and name.startswith(prefixes)):
            p.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain `nn.Linear` layers."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changed: adapters plus other trainable parameters (a head)."""
    return {
        name: p.detach().contiguous().clone()
        for name, p in model.named_parameters()
        if p.requires_grad or "lora_" in name
    }


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter (and head) tensors into a model already wrapped by `apply_lora`."""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name not in params:
            raise InputError(f"{source}: adapter tensor {name!r} has no place in the model")
        if tuple(params[name].shape) != tuple(tensor.shape):
            raise InputError(
                f"{source}: adapter tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total distinct parameters (shared tensors counted once)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    total = sum(n for n, _ in seen.values())
    trainable = sum(n for n, t in seen.values() if t)
    return {"trainable": trainable, "total": total}
