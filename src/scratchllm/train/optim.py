"""The optimizer the trainer builds: AdamW with decay on ≥2-D weights only, or Muon + AdamW.

A parameter group may carry `lr_scale`: the trainer sets its learning rate to the schedule's
value times that, so one schedule drives AdamW's `lr` and Muon's `muon_lr` alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scratchllm.train.muon import MuonAdamW, muon_ns_dtype, split_for_muon

# -- optimizer ---------------------------------------------------------------------------------
# Measured with benchmarks/train_throughput.py: on CPU the fused AdamW kernel beats the foreach
# one (one pass over memory instead of several); on CUDA fused is the documented fastest.
_AUTO_IMPL = {"cuda": "fused", "cpu": "fused"}

if TYPE_CHECKING:
    from scratchllm.train.settings import TrainConfig


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW; weight decay only on ≥2-D weights (matmuls, embeddings), not on norms or biases.

    With `optimizer="muon"`: Muon on the hidden 2-D weights (no weight decay, as published),
    AdamW as above on embeddings, the output head, norms and biases.
    """
    if config.optimizer == "muon":
        return _muon(model, config, device)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    impl = config.optimizer_impl
    if impl == "auto":
        impl = _AUTO_IMPL.get(device.type, "foreach")
    extra = {"fused": True} if impl == "fused" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **extra)


def _muon(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> MuonAdamW:
    hidden, matrices, vectors = split_for_muon(model)
    adam = dict(betas=(config.beta1, config.beta2), eps=1e-8, lr=config.lr, use_muon=False)
    groups = [
        dict(params=hidden, use_muon=True, lr=config.muon_lr, lr_scale=config.muon_lr / config.lr),
        dict(params=matrices, weight_decay=config.weight_decay, **adam),
        dict(params=vectors, weight_decay=0.0, **adam),
    ]
    return MuonAdamW([g for g in groups if g["params"]], ns_dtype=muon_ns_dtype(device))
