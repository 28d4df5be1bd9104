"""Distributed training on PyTorch's own engine: torchrun env vars → the process group.

`torchrun --nproc_per_node=N -m scratchllm pretrain ...` sets RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; `init_distributed()` reads them and joins the group (gloo on CPU,
NCCL on CUDA, each rank on its own GPU `cuda:LOCAL_RANK`). Without those variables everything
here is a no-op and the run is a plain single process. Only rank 0 writes files.

The model is wrapped for DDP or FSDP2 by `scratchllm.train.parallelize`; this module holds the
process-group helpers, and the ones that see through those wrappers (`unwrap`, `is_fsdp`,
`full_state_dict`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scratchllm.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (a single process when unset)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError(
            "torchrun environment: RANK, LOCAL_RANK and WORLD_SIZE must be integers, got "
            f"{os.environ.get('RANK')!r}, {os.environ.get('LOCAL_RANK')!r}, "
            f"{os.environ.get('WORLD_SIZE')!r}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"torchrun environment: RANK {rank} with WORLD_SIZE {world}")
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def device_for_rank(device: torch.device, info: DistInfo) -> torch.device:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if info.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (idempotent); a no-op for one process."""
    info = env_dist_info()
    if not info.enabled:
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return DistInfo(info.rank, info.local_rank, info.world_size, dist.get_backend())


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank: a stop request on one rank stops them all together."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP or torch.compile wrappers (FSDP2 shards in place)."""
    while True:
        # `_orig_mod`: torch.compile's wrapper has no public accessor for the module it wraps.
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(unwrap(model), FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as plain CPU tensors on rank 0 (None on other ranks).

    Under FSDP2 the parameters are DTensor shards: every rank takes part in the gather."""
    base = unwrap(model)
    if is_fsdp(base):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(base, options=opts)
        return state if is_main_process() else None
    return base.state_dict() if is_main_process() else None


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
