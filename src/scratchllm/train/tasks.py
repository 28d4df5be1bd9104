"""Language modelling (pretraining) as a trainer task: next-token cross-entropy on windows."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scratchllm.data.loader import BatchLoader, SlidingWindowDataset
from scratchllm.errors import InputError
from scratchllm.inference.generate import generate_text
from scratchllm.model.gpt import GPTModel
from scratchllm.tokenizers import Tokenizer


class FusedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bf16/fp16 logits (N, V) against ids (N,), fused.

    The same numbers as `F.cross_entropy(logits.float(), target)` and its gradient cast back
    to the logits' dtype (the fp32 path under autocast), in fewer passes over the N × V block:
    the log-softmax is read from the low-precision logits straight into fp32, and backward
    turns it into `softmax - one_hot` in place and casts once, instead of an fp32 copy, a zero
    fill, a scatter, the log-softmax backward and a cast.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        ctx.save_for_backward(logp, target)
        ctx.dtype = logits.dtype
        return logp.gather(1, target[:, None]).mean().neg()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        logp, target = ctx.saved_tensors
        n = logp.shape[0]
        scale = grad / n
        # In place on the saved log-softmax: a second backward through this graph would fail
        # autograd's version check rather than read it changed.
        out = logp.exp_().mul_(scale)
        rows = torch.arange(n, device=logp.device)
        out.index_put_((rows, target), -scale.expand(n), accumulate=True)
        return out.to(ctx.dtype), None


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. Training with bf16/fp16 logits (autocast) takes the fused
    `FusedCrossEntropy` (the same numbers): with a 4096-id vocabulary the separate
    passes over the batch × vocabulary block cost 10% of a CPU training step."""
    logits = model(x).flatten(0, 1)
    if logits.dtype in (torch.bfloat16, torch.float16) and logits.requires_grad:
        return FusedCrossEntropy.apply(logits, y.flatten())
    return F.cross_entropy(logits.float(), y.flatten())


class LMTask:
    """Next-token prediction over a training and a validation token array."""

    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray | None,
        tokenizer: Tokenizer,
        batch_size: int,
        context_length: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        mode: str = "sliding",
        stride: int | None = None,
        sample_prompt: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        extra_eval: Any | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        # scratchllm.evaluate.training.TrainingEvaluation: in-context tasks and bpb at each eval
        self.extra_eval = extra_eval
        self.context_length = context_length
        self.batch_size = batch_size
        self.loader = BatchLoader(
            train_tokens,
            batch_size,
            context_length,
            mode=mode,
            stride=stride,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        self.train_eval = SlidingWindowDataset(train_tokens, context_length, context_length)
        self.val_eval = None
        if val_tokens is not None and len(val_tokens) > 0:
            if len(val_tokens) < context_length + 1:
                raise InputError(
                    f"validation split has {len(val_tokens)} tokens, fewer than one context window "
                    f"of {context_length + 1}; lower --context-length or raise --val-fraction"
                )
            self.val_eval = SlidingWindowDataset(val_tokens, context_length, context_length)
        if sample_prompt is None:
            source = val_tokens if val_tokens is not None and len(val_tokens) else train_tokens
            sample_prompt = tokenizer.decode(source[:8].tolist()).strip() or "The"
        self.sample_prompt = sample_prompt
        self._bytes_per_id: torch.Tensor | None = None

    def steps_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(
        self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        return lm_loss(model, *batch)

    def tokens_in(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def _dataset_loss(
        self, model: torch.nn.Module, dataset, max_batches: int, bpb: bool = False
    ) -> tuple[float, float]:
        """(mean loss, bits per byte or NaN without `bpb`) over the first `max_batches` batches
        of `dataset`."""
        total, count, nats, nbytes = 0.0, 0, 0.0, 0
        n = min(len(dataset), max_batches * self.batch_size)
        for start in range(0, n, self.batch_size):
            items = [dataset[i] for i in range(start, min(n, start + self.batch_size))]
            x = torch.stack([a for a, _ in items]).to(self.device)
            y = torch.stack([b for _, b in items])
            logits = model(x).flatten(0, 1).float()
            nll = F.cross_entropy(logits, y.flatten().to(self.device), reduction="none")
            total += float(nll.mean()) * len(items)
            count += len(items)
            if bpb:  # from the same forward pass: special tokens count neither nats nor bytes
                weight = self._token_bytes(logits.size(-1))[y.flatten()]
                nats += float(nll.double().cpu()[weight > 0].sum())
                nbytes += int(weight.sum())
        bpb = nats / (math.log(2) * nbytes) if nbytes else math.nan
        return total / max(count, 1), bpb

    def _token_bytes(self, vocab_size: int) -> torch.Tensor:
        if self._bytes_per_id is None:  # once, at the first evaluation
            from scratchllm.evaluate.training import token_byte_lengths

            lengths = token_byte_lengths(self.tokenizer, vocab_size)  # ids past the tokenizer's: 0
            self._bytes_per_id = torch.from_numpy(lengths)
        return self._bytes_per_id

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]:
        """Mean loss over the first `max_batches` batches of each split (in order, as the book),
        and the validation bits per byte (`val_bpb`: comparable across tokenizers)."""
        out = {"train_loss": self._dataset_loss(model, self.train_eval, max_batches)[0]}
        if self.val_eval is not None:
            val, bpb = self._dataset_loss(model, self.val_eval, max_batches, bpb=True)
            out["val_loss"] = val
            out["val_ppl"] = math.exp(min(val, 50.0))
            out["val_bpb"] = bpb
        if self.extra_eval is not None:  # its CORE tasks (val_bpb is the one above)
            out.update(self.extra_eval.run(model, None, self.batch_size, max_batches))
        return out

    def sample(self, model: GPTModel, max_new_tokens: int) -> str:
        text = generate_text(model, self.tokenizer, self.sample_prompt, max_new_tokens)
        return self.sample_prompt + text

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
