"""What training wraps around the model, from outside it (as torchtitan's `parallelize.py` does).

`GPTModel` computes logits and knows nothing of training. `parallelize` applies, in this order:

1. the padded output head: `model.out_head` becomes a `PaddedHead` that multiplies by the weight
   padded to a multiple of `vocab_multiple` rows and drops the extra logits (GPU matmul tiles);
2. activation checkpointing: each `TransformerBlock` becomes a `CheckpointedBlock`, which
   recomputes its activations in backward instead of storing them;
3. DDP, or FSDP2 `fully_shard` per block and then the root, under torchrun;
4. `torch.compile`.

Steps 1 and 2 change the model in place and keep its `state_dict()` keys, its parameters (a
tied head stays tied) and its numbers; checkpoints are unchanged. What comes back is the module
the training step calls; the model passed in stays what evaluation, saving and generation use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.torch_version import TorchVersion

from scratchllm.errors import InputError
from scratchllm.model.attention import KVCache
from scratchllm.model.gpt import TransformerBlock

# `fully_shard` is public in `torch.distributed.fsdp` from torch 2.6 on.
FSDP2_AVAILABLE = TorchVersion(torch.__version__) >= (2, 6)

# The output head's row multiple when `vocab_multiple` is None. Measured: +38% tokens/s on an
# H100 for GPT-2's 50257 -> 50304 (docs/training.md); on a CPU padding only adds work.
AUTO_VOCAB_MULTIPLE = {"cuda": 64}


class PaddedHead(nn.Module):
    """A linear head computed as one matmul over `multiple`-padded rows, cut back to the real ones.

    It holds the head's own `weight` (and `bias`) parameters, so the state-dict keys stay
    `out_head.weight` and a head tied to the embedding stays tied. Outputs and gradients are
    exactly those of the unpadded head: the padded rows are zeros that no logit comes from.
    """

    def __init__(self, head: nn.Linear, multiple: int) -> None:
        super().__init__()
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.register_parameter("bias", head.bias)
        self.pad = -self.out_features % multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.pad(self.weight, (0, 0, 0, self.pad))
        bias = None if self.bias is None else F.pad(self.bias, (0, self.pad))
        return F.linear(x, weight, bias)[..., : self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pad={self.pad}"


class CheckpointedBlock(TransformerBlock):
    """A `TransformerBlock` that, while training with gradients and without a KV cache, keeps
    only its input and recomputes the rest in backward (`torch.utils.checkpoint`, non-reentrant).

    `checkpoint_blocks` turns blocks into this class in place (as FSDP2's `fully_shard` does):
    no wrapper module, so parameter names, state-dict keys and `isinstance` checks are unchanged.
    """

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.training and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                super().forward, x, rope, None, attn_mask, use_reentrant=False
            )
        return super().forward(x, rope, cache, attn_mask)


def pad_output_head(model: nn.Module, multiple: int) -> bool:
    """Swap a vocabulary head (a plain `nn.Linear`) for a `PaddedHead`; True when it did.

    A classifier head (`config.num_classes`), a head already replaced (LoRA, quantized) or a
    vocabulary that is already a multiple is left alone."""
    head = getattr(model, "out_head", None)
    config = getattr(model, "config", None)
    if multiple <= 1 or type(head) is not nn.Linear or getattr(config, "num_classes", None):
        return False
    if head.out_features % multiple == 0:
        return False
    model.out_head = PaddedHead(head, multiple)
    return True


def checkpoint_blocks(model: nn.Module) -> int:
    """Make every `TransformerBlock` of `model` a `CheckpointedBlock`; returns how many there are."""
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        if type(block) is TransformerBlock:
            block.__class__ = CheckpointedBlock
        elif not isinstance(block, CheckpointedBlock):
            raise InputError(
                f"activation checkpointing: {type(block).__name__} is a TransformerBlock "
                "subclass with its own forward; expected plain TransformerBlocks"
            )
    return len(blocks)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def parallelize(
    model: nn.Module,
    device: torch.device,
    *,
    fsdp: bool = False,
    compile: bool = False,
    activation_checkpointing: bool = False,
    vocab_multiple: int | None = None,
) -> nn.Module:
    """Wrap `model` (already on `device`) for training; returns the module the step calls.

    `vocab_multiple` None picks `AUTO_VOCAB_MULTIPLE` for the device type (else 1: off).
    DDP or FSDP2 (`fsdp=True`) only apply when a process group of several ranks is up.
    """
    if vocab_multiple is None:
        vocab_multiple = AUTO_VOCAB_MULTIPLE.get(device.type, 1)
    if isinstance(vocab_multiple, bool) or not isinstance(vocab_multiple, int):
        raise InputError(f"vocab_multiple: expected an integer ≥ 1, got {vocab_multiple!r}")
    if vocab_multiple < 1:
        raise InputError(f"vocab_multiple: expected an integer ≥ 1, got {vocab_multiple}")
    pad_output_head(model, vocab_multiple)
    if activation_checkpointing and checkpoint_blocks(model) == 0:
        raise InputError(
            f"activation checkpointing: {type(model).__name__} has no TransformerBlock to "
            "checkpoint"
        )
    train_model = model
    if _world_size() > 1:
        if fsdp:
            train_model = _fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=ids)
    if compile:
        train_model = torch.compile(train_model)
    return train_model


def _fully_shard(model: nn.Module) -> nn.Module:
    """FSDP2: parameters sharded per transformer block (one all-gather each), then the root."""
    if not FSDP2_AVAILABLE:
        raise InputError(
            f"--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch or train with DDP (leave out --fsdp)"
        )
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "trf_blocks", []):
        fully_shard(block)
    fully_shard(model)
    return model
