"""Muon: momentum orthogonalised by a Newton–Schulz iteration, for the 2-D hidden weights.

The published algorithm (Keller Jordan, "Muon: An optimizer for hidden layers in neural
networks", 2024; modded-nanogpt): keep a momentum buffer `m ← β·m + (1-β)·g`, take the Nesterov
look-ahead `u = (1-β)·g + β·m`, replace `u` by the nearest (semi-)orthogonal matrix `U·Vᵀ` of its
SVD — approximated by five steps of a quintic Newton–Schulz iteration with the coefficients
(3.4445, -4.7750, 2.0315), tuned to push every singular value into roughly [0.7, 1.2] fast rather
than to converge to exactly 1 — and step `p ← p - lr·max(1, rows/cols)^½·u`.

Embeddings, the output head, norms and biases are not hidden matrices: they take AdamW. Both live
in one `MuonAdamW` optimizer (each parameter group flagged `use_muon`), so the trainer's
`state_dict` / `load_state_dict` checkpointing and exact resume treat it like any optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from scratchllm.train.throughput import cpu_has_native_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """An approximately orthogonal matrix with `g`'s singular vectors (`U·Vᵀ` of its SVD).

    Computed in `dtype` (bf16 as published; fp32 for a reference) and returned in `g`'s dtype.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: X·Xᵀ is the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def muon_update(
    grad: torch.Tensor,
    momentum: torch.Tensor,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_dtype: torch.dtype = torch.bfloat16,
    row_blocks: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Update `momentum` in place with `grad`; return the orthogonalised, shape-scaled step.

    The step is a whole matrix even where `grad` is an FSDP2 shard (see `_full`). With
    `row_blocks`, each block of rows is a matrix of its own (orthogonalised and scaled apart).
    """
    momentum.lerp_(grad, 1 - beta)
    u = _full(torch.lerp(grad, momentum, beta) if nesterov else momentum)
    return _join(
        {
            j: newton_schulz(block, ns_steps, ns_dtype) * _shape_scale(block)
            for j, block in enumerate(_row_split(u, row_blocks))
        }
    )


def muon_ns_dtype(device: torch.device) -> torch.dtype:
    """The Newton–Schulz dtype: bf16 as published where matmuls are native to it (CUDA with bf16,
    a CPU with AVX512-BF16/AMX), else fp32 (emulated bf16 costs more than it saves)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of an FSDP2-sharded DTensor (every rank gets it); a tensor unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`update` sharded as `param` is (FSDP2: this rank's shard), or unchanged."""
    if not hasattr(param, "device_mesh"):
        return update
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True` (2-D weights), AdamW for the rest.

    Group keys: Muon — `lr`, `momentum`, `nesterov`, `ns_steps`, `weight_decay`; AdamW — `lr`,
    `betas`, `eps`, `weight_decay` (both decoupled: `p ← p·(1 - lr·wd)`). Under DDP every rank
    holds the same averaged gradient and computes the same update; under FSDP2 each rank
    gathers a matrix's momentum look-ahead, orthogonalises it and keeps its own shard.
    `row_blocks` names parameters that stack several matrices by rows (`qkv_row_blocks`).
    """

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        ns_dtype: torch.dtype = torch.bfloat16,
        row_blocks: dict[int, tuple[int, ...]] | None = None,
    ):
        defaults = dict(
            lr=0.02,
            use_muon=False,
            momentum=0.95,
            nesterov=True,
            ns_steps=5,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
        )
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weights only")
        self.ns_dtype = ns_dtype
        # id(param) → row counts of the matrices stacked in it (a fused q/k/v weight), each
        # orthogonalised and scaled on its own; `qkv_row_blocks` builds it.
        self.row_blocks = dict(row_blocks or {})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        sharded = [p for p in params if hasattr(p, "device_mesh")]
        for p in sharded:  # FSDP2: each matrix gathered whole, one at a time
            blocks = self.row_blocks.get(id(p))
            update = muon_update(
                p.grad,
                self.state[p]["momentum_buffer"],
                beta,
                group["nesterov"],
                group["ns_steps"],
                self.ns_dtype,
                blocks,
            )
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(_like(update, p), alpha=-lr)
        plain = [p for p in params if not hasattr(p, "device_mesh")]
        if not plain:
            return
        # The same update as `muon_update`, for many matrices at once: a small model's step is
        # dominated by per-matrix overhead (dozens of tiny Newton–Schulz loops), so matrices of
        # one shape (transposed to their wide orientation) share one batched iteration.
        grads = [p.grad for p in plain]
        momenta = [self.state[p]["momentum_buffer"] for p in plain]
        torch._foreach_lerp_(momenta, grads, 1 - beta)
        looks = torch._foreach_lerp(grads, momenta, beta) if group["nesterov"] else momenta
        # Each matrix to orthogonalise: (parameter index, block index, matrix); a fused
        # parameter contributes one per row block.
        pieces = [
            (i, j, block)
            for i, (p, u) in enumerate(zip(plain, looks, strict=True))
            for j, block in enumerate(_row_split(u, self.row_blocks.get(id(p))))
        ]
        by_shape: dict[tuple, list[int]] = {}
        for k, (_, _, u) in enumerate(pieces):
            by_shape.setdefault((tuple(_wide(u).shape), u.dtype, u.device), []).append(k)
        parts: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(len(plain))}
        for members in by_shape.values():
            wide = torch.stack([_wide(pieces[k][2]) for k in members])
            ortho = newton_schulz(wide, group["ns_steps"], self.ns_dtype)
            for n, k in enumerate(members):
                i, j, u = pieces[k]
                tall = u.size(-2) > u.size(-1)
                parts[i][j] = (ortho[n].mT if tall else ortho[n]) * _shape_scale(u)
        updates = [_join(parts[i]) for i in range(len(plain))]
        if wd:
            torch._foreach_mul_(plain, 1 - lr * wd)
        torch._foreach_add_(plain, updates, alpha=-lr)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        steps = [float(self.state[p]["step"]) for p in params]
        grads = [p.grad for p in params]
        exp_avg = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, [-lr / (1 - beta1**t) for t in steps])


def _shape_scale(u: torch.Tensor) -> float:
    """Muon's step scale for a (rows, cols) matrix: max(1, rows/cols)^½."""
    return max(1.0, u.size(-2) / u.size(-1)) ** 0.5


def _wide(u: torch.Tensor) -> torch.Tensor:
    """`u` in its wide orientation (rows ≤ columns)."""
    return u.mT if u.size(-2) > u.size(-1) else u


def _row_split(u: torch.Tensor, blocks: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    """`u`'s row blocks (views), or `u` alone."""
    return (u,) if blocks is None else torch.split(u, list(blocks), dim=0)


def _join(parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """Row blocks 0, 1, … stacked back into one matrix (one block: itself)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([parts[j] for j in range(len(parts))], dim=0)


def qkv_row_blocks(model: torch.nn.Module) -> dict[int, tuple[int, ...]]:
    """id(weight) → (query, key, value) rows of every fused attention projection: Muon then
    orthogonalises the three apart, as modded-nanogpt's separate projections are."""
    from scratchllm.model.attention import MultiHeadAttention

    return {
        id(m.qkv.weight): (m.q_dim, m.kv_dim, m.kv_dim)
        for m in model.modules()
        if isinstance(m, MultiHeadAttention) and isinstance(m.qkv, torch.nn.Linear)
    }


def split_for_muon(model: torch.nn.Module) -> tuple[list, list, list]:
    """(hidden 2-D weights for Muon, other ≥2-D weights, 1-D parameters) for AdamW.

    Embedding tables and the output head (`out_head`, tied or not) are not hidden layers, nor
    is an attention gate's small (heads × 12) matrix.
    """
    from scratchllm.model.layers import AttentionGate

    kinds = (torch.nn.Embedding, AttentionGate)
    special = {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters()}
    head = getattr(model, "out_head", None)
    if isinstance(head, torch.nn.Module):
        special |= {id(p) for p in head.parameters()}
    hidden, matrices, vectors = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            vectors.append(p)
        elif p.dim() == 2 and id(p) not in special:
            hidden.append(p)
        else:
            matrices.append(p)
    return hidden, matrices, vectors
