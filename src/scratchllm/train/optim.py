"""The optimizer the trainer builds: AdamW with decay on ≥2-D weights only, or Muon + AdamW.

A parameter group may carry `lr_scale`: the trainer sets its learning rate to the schedule's
value times that, so one schedule drives AdamW's `lr` and Muon's `muon_lr` alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scratchllm.train.muon import MuonAdamW, muon_ns_dtype, qkv_row_blocks, split_for_muon

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

    With `optimizer="muon"`: Muon on the hidden 2-D weights (weight decay `muon_weight_decay`,
    0 by default, as published), AdamW as above on embeddings, the output head, norms and biases.
    """
    if config.optimizer == "muon":
        return _muon(model, config, device)
    embeddings = _own_lr_embeddings(model, config)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in embeddings:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *_embedding_group(embeddings, config, {}),
    ]
    impl = config.optimizer_impl
    if impl == "auto":
        impl = _AUTO_IMPL.get(device.type, "foreach")
    extra = {"fused": True} if impl == "fused" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), **extra)


def _muon(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> MuonAdamW:
    hidden, matrices, vectors = split_for_muon(model)
    embeddings = _own_lr_embeddings(model, config)
    matrices = [p for p in matrices if id(p) not in embeddings]
    adam = dict(betas=(config.beta1, config.beta2), eps=1e-8, lr=config.lr, use_muon=False)
    groups = [
        dict(
            params=hidden,
            use_muon=True,
            lr=config.muon_lr,
            lr_scale=config.muon_lr / config.lr,
            weight_decay=config.muon_weight_decay,
        ),
        dict(params=matrices, weight_decay=config.weight_decay, **adam),
        dict(params=vectors, weight_decay=0.0, **adam),
        *_embedding_group(embeddings, config, adam),
    ]
    return MuonAdamW(
        [g for g in groups if g["params"]],
        ns_dtype=muon_ns_dtype(device),
        row_blocks=qkv_row_blocks(model) if config.muon_split_qkv else None,
    )


def _own_lr_embeddings(
    model: torch.nn.Module, config: TrainConfig
) -> dict[int, torch.nn.Parameter]:
    """The embedding tables that take `embedding_lr` (none when it is unset): every
    `nn.Embedding` weight except one tied to the output head, which stays at the head's rate.

    An embedding row moves only when its token occurs, so at the hidden weights' rate a small
    budget leaves most rows near their initialisation; modded-nanogpt and nanochat give the
    table a learning rate tens of times the head's."""
    if config.embedding_lr is None:
        return {}
    head = getattr(model, "out_head", None)
    tied = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    return {
        id(m.weight): m.weight
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight.requires_grad and id(m.weight) not in tied
    }


def _embedding_group(
    embeddings: dict[int, torch.nn.Parameter], config: TrainConfig, adam: dict
) -> list[dict]:
    if not embeddings:
        return []
    lr = config.embedding_lr
    assert lr is not None
    group = {**adam, "lr": lr, "lr_scale": lr / config.lr}
    return [dict(group, params=list(embeddings.values()), weight_decay=0.0)]
