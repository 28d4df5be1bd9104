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
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from scratchllm.data.instruction import format_prompt, load_records, split_records
from scratchllm.finetune import FinetuneOptions, PromptSettings, plot_eval_metrics
from scratchllm.finetune.runner import FinetuneRun
from scratchllm.finetune.tasks import ShuffledTask
from scratchllm.settings import setting

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DPOOptions(FinetuneOptions, PromptSettings):
    """`scratchllm finetune dpo`: preference records (instruction, chosen, rejected)."""

    beta: float = setting(0.1, help="DPO temperature β", gt=0)
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)  # train, val, test
    epochs: float | None = 1.0
    lr: float = 5e-6


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
    A prompt that fills `max_length` alone keeps its last `max_length // 2` tokens: the response
    header and the text nearest it, which the responses follow. Returns the pairs and how many
    were cut."""
    pairs, cut = [], 0
    eot = tokenizer.eot_id
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record, template))
        if len(prompt) >= max_length:
            prompt = prompt[-(max_length // 2) :]  # the end; the rest is room for the responses
            cut += 1
        room = max_length - len(prompt)
        chosen = tokenizer.encode_ordinary(record["chosen"]) + [eot]
        rejected = tokenizer.encode_ordinary(record["rejected"]) + [eot]
        if len(chosen) > room or len(rejected) > room:
            cut += 1
        pairs.append(Pair(prompt, chosen[:room], rejected[:room]))
    if cut:
        # The count is returned: the caller reports it once (the CLI prints a warning).
        log.info("cut %d of %d preference pairs to %d tokens", cut, len(records), max_length)
    return pairs, cut


def collate_pairs(
    pairs: list[Pair], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Padded prompt+chosen and prompt+rejected ids with masks that select the response tokens,
    and each sequence's length before the padding (`chosen_lengths`, `rejected_lengths`)."""
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
        out[f"{key}_lengths"] = torch.tensor([len(s) for s in seqs])
    return out


PairBatch = dict[str, torch.Tensor]  # collate_pairs


class DPOTask(ShuffledTask[list[Pair], PairBatch]):
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
        super().__init__(splits, batch_size, device, seed, "preference data")
        self.reference = reference.to(self.device).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        self.pad_id = pad_id
        self.beta = beta

    def collate(self, split: list[Pair], indices: list[int]) -> PairBatch:
        return collate_pairs([split[i] for i in indices], self.pad_id, self.device)

    def _logps(self, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(
            sequence_logprobs(model(batch[k]), batch[k], batch[f"{k}_mask"])
            for k in ("chosen", "rejected")
        )

    def compute(self, model: torch.nn.Module, batch: PairBatch):
        pc, pr = self._logps(model, batch)
        with torch.no_grad():
            rc, rr = self._logps(self.reference, batch)
        return dpo_loss(pc, pr, rc, rr, self.beta)

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
        return self.compute(model, batch)[0]

    def tokens_in(self, batch: PairBatch) -> int:
        # The policy reads both sequences of every pair (the reference's passes are not counted).
        return int(batch["chosen_lengths"].sum() + batch["rejected_lengths"].sum())

    @torch.no_grad()
    def split_metrics(self, model, name: str, max_batches: int | None = None) -> dict[str, float]:
        pairs = self.splits.get(name) or []
        loss_sum, chosen, rejected, wins, n = 0.0, 0.0, 0.0, 0, 0
        for idx in self.eval_batches(name, max_batches):
            loss, c, r = self.compute(model, self.collate(pairs, idx))
            k = c.shape[0]
            loss_sum += float(loss) * k
            chosen += float(c.sum())
            rejected += float(r.sum())
            wins += int((c > r).sum())
            n += k
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


class DPORun(FinetuneRun):
    """`scratchllm finetune dpo`: usually from an instruction-tuned checkpoint."""

    kind = "dpo"
    opts: DPOOptions

    def load_data(self) -> None:
        self.records = load_records(self.opts.data, ("instruction", "chosen", "rejected"))
        self.parts = split_records(self.records, self.opts.split, self.opts.seed)

    def encode(self) -> dict[str, Any]:
        self.splits, cut = {}, 0
        for name, part in zip(("train", "val", "test"), self.parts, strict=True):
            self.splits[name], n = encode_pairs(
                part, self.tokenizer, self.opts.template, self.max_length
            )
            cut += n
        return {
            "records": len(self.records),
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "truncated": cut,
            "beta": self.opts.beta,
        }

    def adapt(self, model: torch.nn.Module) -> None:
        self.reference = copy.deepcopy(model)  # frozen before any LoRA wrapping or training

    def build_task(self) -> DPOTask:
        opts = self.opts
        self.task = DPOTask(
            self.splits,
            self.reference,
            self.tokenizer.eot_id,
            opts.batch_size,
            opts.beta,
            self.device,
            opts.seed,
        )
        return self.task

    def meta(self) -> dict[str, Any]:
        return {"template": self.opts.template}

    def finish(self, model, records, results, meta) -> None:
        for name in ("val", "test"):
            if self.splits[name]:
                results.update(self.task.split_metrics(model, name))
        plot_eval_metrics(
            records,
            ["train_reward_margin", "val_reward_margin"],
            self.out / "reward_margin.png",
            "reward margin",
        )
        plot_eval_metrics(
            records, ["train_accuracy", "val_accuracy"], self.out / "accuracy.png", "accuracy"
        )


def finetune_dpo(opts: DPOOptions, callback=None) -> dict[str, Any]:
    """DPO-tune a checkpoint (usually an instruction-tuned one) on preference pairs."""
    return DPORun(opts).run(callback)
