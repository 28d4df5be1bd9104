"""Direct preference optimisation (the book's ch. 7 bonus; Rafailov et al. 2023).

    loss = -log σ(β · [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

with a frozen copy of the starting model as π_ref. As in the book, log π(y|x) is the mean
log-probability of the response tokens (prompt and padding masked). Evaluation reports the loss,
the mean rewards β·(log π - log π_ref) of chosen and rejected responses, their margin, and the
share of pairs whose chosen reward beats the rejected one.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchllm.data.instruction import TEMPLATES, format_prompt, load_records, split_records
from scratchllm.errors import InputError
from scratchllm.finetune import (
    FinetuneOptions,
    epoch_history,
    plot_eval_metrics,
    prepare_model,
    run_trainer,
    save_final,
    set_dropout,
    write_results,
)

log = logging.getLogger(__name__)


@dataclass
class DPOOptions(FinetuneOptions):
    beta: float = 0.1
    template: str = "alpaca"
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss, chosen rewards and rejected rewards (per pair) from sequence log-probs."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    return loss, chosen_rewards, rejected_rewards


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of ids[:, 1:] under logits[:, :-1], over positions where mask[:, 1:]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:].to(token_logp.dtype)
    return (token_logp * m).sum(-1) / m.sum(-1).clamp(min=1)


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def encode_pairs(
    records: list[dict[str, str]], tokenizer, template: str, max_length: int
) -> tuple[list[Pair], int]:
    """Prompt and responses as ids (with end-of-text); responses are cut to fit `max_length`.
    Returns the pairs and how many were cut."""
    pairs, cut = [], 0
    eot = tokenizer.eot_id
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record, template))
        if len(prompt) >= max_length:
            prompt = prompt[: max_length // 2]  # keep room for the responses
            cut += 1
        room = max_length - len(prompt)
        chosen = tokenizer.encode_ordinary(record["chosen"]) + [eot]
        rejected = tokenizer.encode_ordinary(record["rejected"]) + [eot]
        if len(chosen) > room or len(rejected) > room:
            cut += 1
        pairs.append(Pair(prompt, chosen[:room], rejected[:room]))
    if cut:
        log.warning(
            "%d of %d preference pairs were cut to %d tokens", cut, len(records), max_length
        )
    return pairs, cut


def collate_pairs(
    pairs: list[Pair], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Padded prompt+chosen and prompt+rejected ids with masks that select the response tokens."""
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [p.prompt + getattr(p, key) for p in pairs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (p, s) in enumerate(zip(pairs, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, len(p.prompt) : len(s)] = True
        out[key], out[f"{key}_mask"] = ids.to(device), mask.to(device)
    return out


class DPOTask:
    """Trainer task: DPO loss of the trained model against a frozen reference copy."""

    def __init__(
        self,
        splits: dict[str, list[Pair]],
        reference: torch.nn.Module,
        pad_id: int,
        batch_size: int,
        beta: float = 0.1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        if not splits.get("train"):
            raise InputError("preference data: the training split is empty")
        self.splits = splits
        self.device = torch.device(device)
        self.reference = reference.to(self.device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.beta = beta
        self.seed = seed
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.splits["train"])))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits["train"]) / self.batch_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return collate_pairs([self.splits["train"][i] for i in idx], self.pad_id, self.device)

    def _logps(self, model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            sequence_logprobs(model(batch[k]), batch[k], batch[f"{k}_mask"])
            for k in ("chosen", "rejected")
        )

    def compute(self, model: torch.nn.Module, batch):
        pc, pr = self._logps(model, batch)
        with torch.no_grad():
            rc, rr = self._logps(self.reference, batch)
        return dpo_loss(pc, pr, rc, rr, self.beta)

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return self.compute(model, batch)[0]

    def tokens_in(self, batch) -> int:
        return int(batch["chosen"].numel() + batch["rejected"].numel())

    @torch.no_grad()
    def split_metrics(self, model, name: str, max_batches: int | None = None) -> dict[str, float]:
        pairs = self.splits.get(name) or []
        n = len(pairs) if max_batches is None else min(len(pairs), max_batches * self.batch_size)
        loss_sum, chosen, rejected, wins = 0.0, 0.0, 0.0, 0
        for start in range(0, n, self.batch_size):
            batch = collate_pairs(
                pairs[start : min(n, start + self.batch_size)], self.pad_id, self.device
            )
            loss, c, r = self.compute(model, batch)
            k = c.shape[0]
            loss_sum += float(loss) * k
            chosen += float(c.sum())
            rejected += float(r.sum())
            wins += int((c > r).sum())
        n = max(n, 1)
        return {
            f"{name}_loss": loss_sum / n,
            f"{name}_chosen_reward": chosen / n,
            f"{name}_rejected_reward": rejected / n,
            f"{name}_reward_margin": (chosen - rejected) / n,
            f"{name}_accuracy": wins / n,
        }

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]:
        out = self.split_metrics(model, "train", max_batches)
        if self.splits.get("val"):
            out.update(self.split_metrics(model, "val", max_batches))
        return out

    def sample(self, model, max_new_tokens: int) -> str | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


def finetune_dpo(opts: DPOOptions, callback=None) -> dict[str, Any]:
    """DPO-tune a checkpoint (usually an instruction-tuned one) on preference pairs."""
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.utils import pick_device, seed_everything

    opts.validate()
    if opts.template not in TEMPLATES:
        raise InputError(f"--template {opts.template!r}: expected one of {', '.join(TEMPLATES)}")
    if not opts.beta > 0:
        raise InputError(f"--beta must be > 0, got {opts.beta}")
    out = Path(opts.out)
    device = pick_device(opts.device)
    records = load_records(opts.data, ("instruction", "chosen", "rejected"))
    parts = split_records(records, opts.split, opts.seed)
    ckpt = load_checkpoint(opts.checkpoint)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    context = model.config.context_length
    max_length = min(opts.max_length or context, context)
    splits, cut = {}, 0
    for name, part in zip(("train", "val", "test"), parts, strict=True):
        splits[name], n = encode_pairs(part, tokenizer, opts.template, max_length)
        cut += n
    seed_everything(opts.seed)
    if opts.dropout is not None:
        set_dropout(model, opts.dropout)
    reference = copy.deepcopy(model)  # frozen before any LoRA wrapping or training
    info: dict[str, Any] = {
        "records": len(records),
        "sizes": {k: len(v) for k, v in splits.items()},
        "truncated": cut,
        "beta": opts.beta,
    }
    info.update(prepare_model(model, opts, "all", ()))
    task = DPOTask(
        splits, reference, tokenizer.eot_id, opts.batch_size, opts.beta, device, opts.seed
    )
    spe = task.steps_per_epoch()
    meta: dict[str, Any] = {
        "task": "dpo",
        "template": opts.template,
        "base_checkpoint": str(ckpt.path),
        "title": f"dpo {Path(opts.data).name}",
    }
    trainer, seconds = run_trainer(
        model, task, opts, out, tokenizer, meta, info, callback, device, max(1, min(spe, 50)), 0
    )
    model = trainer.model
    results: dict[str, Any] = {"task": "dpo", **info}
    for name in ("val", "test"):
        if splits[name]:
            results.update(task.split_metrics(model, name))
    results["first_eval"] = trainer.first_eval
    records_log = trainer.metrics.read()
    results["epochs"] = epoch_history(records_log, spe)
    results["steps"] = trainer.step
    results["train_seconds"] = seconds
    plot_eval_metrics(
        records_log,
        ["train_reward_margin", "val_reward_margin"],
        out / "reward_margin.png",
        "reward margin",
    )
    plot_eval_metrics(
        records_log, ["train_accuracy", "val_accuracy"], out / "accuracy.png", "accuracy"
    )
    results["checkpoint"] = str(save_final(model, tokenizer, out, meta, opts.checkpoint))
    write_results(out, results)
    return results
