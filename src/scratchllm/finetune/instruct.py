"""Instruction fine-tuning (ch. 7): next-token loss on prompt + response, padding ignored.

After training, the test split's responses are generated (greedy, stop at end-of-text) into
`test_responses.json` in the run directory, ready for `judge.py` to score.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchllm.data.instruction import (
    IGNORE_INDEX,
    TEMPLATES,
    Example,
    collate_instructions,
    encode_examples,
    format_prompt,
    load_records,
    split_records,
)
from scratchllm.errors import InputError
from scratchllm.finetune import (
    FinetuneOptions,
    epoch_history,
    prepare_model,
    run_trainer,
    save_final,
    set_dropout,
    write_results,
)

log = logging.getLogger(__name__)


@dataclass
class InstructOptions(FinetuneOptions):
    template: str = "alpaca"
    mask_prompt: bool = False
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)
    generate_tokens: int = 256  # per test response; 0: skip generation


def masked_lm_loss(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


class InstructionTask:
    """Trainer task over encoded examples; evaluation: mean loss on train and val batches."""

    def __init__(
        self,
        splits: dict[str, list[Example]],
        pad_id: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        mask_prompt: bool = False,
        tokenizer=None,
        sample_prompt: str | None = None,
    ) -> None:
        if not splits.get("train"):
            raise InputError("instruction data: the training split is empty")
        self.splits = splits
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.mask_prompt = mask_prompt
        self.tokenizer = tokenizer
        self.sample_prompt = sample_prompt
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.splits["train"])))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.splits["train"]) / self.batch_size)

    def collate(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = collate_instructions(examples, self.pad_id, self.mask_prompt)
        return x.to(self.device), y.to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate([self.splits["train"][i] for i in idx])

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return masked_lm_loss(model, *batch)

    def tokens_in(self, batch) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def split_loss(
        self, model: torch.nn.Module, name: str, max_batches: int | None = None
    ) -> float:
        """Mean token loss over a split (its first `max_batches` batches, in order)."""
        examples = self.splits.get(name) or []
        n = (
            len(examples)
            if max_batches is None
            else min(len(examples), max_batches * self.batch_size)
        )
        total, count = 0.0, 0
        for start in range(0, n, self.batch_size):
            x, y = self.collate(examples[start : min(n, start + self.batch_size)])
            logits = model(x).float()
            tokens = int((y != IGNORE_INDEX).sum())
            if tokens:
                total += float(
                    F.cross_entropy(
                        logits.flatten(0, 1),
                        y.flatten(),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
                count += tokens
        return total / count if count else math.nan

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]:
        out = {"train_loss": self.split_loss(model, "train", max_batches)}
        if self.splits.get("val"):
            out["val_loss"] = self.split_loss(model, "val", max_batches)
        return out

    def sample(self, model, max_new_tokens: int) -> str | None:
        if self.tokenizer is None or not self.sample_prompt:
            return None
        from scratchllm.inference.generate import generate_text

        return generate_text(model, self.tokenizer, self.sample_prompt, max_new_tokens).strip()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    progress=None,
) -> list[dict[str, str]]:
    """Greedy responses to each record's prompt, stopping at end-of-text."""
    from scratchllm.inference.generate import generate

    context = model.config.context_length
    device = next(model.parameters()).device
    out = []
    for record in records:
        prompt = tokenizer.encode_ordinary(format_prompt(record, template))
        prompt = prompt[-(context - 1) :]  # keep room for at least one new token
        budget = max(1, min(max_new_tokens, context - len(prompt)))
        ids = generate(
            model,
            torch.tensor([prompt], device=device),
            budget,
            eos_id=tokenizer.eot_id,
        )[0, len(prompt) :].tolist()
        if tokenizer.eot_id in ids:
            ids = ids[: ids.index(tokenizer.eot_id)]
        out.append({**record, "model_response": tokenizer.decode(ids).strip()})
        if progress is not None:
            progress(1)
    return out


def finetune_instruct(opts: InstructOptions, callback=None, progress=None) -> dict[str, Any]:
    """Instruction-tune a checkpoint; writes checkpoint/, metrics, plots, test_responses.json and
    results.json (val_loss, test_loss) into `opts.out`."""
    import json

    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.fs import atomic_write_text
    from scratchllm.utils import pick_device, seed_everything

    opts.validate()
    if opts.template not in TEMPLATES:
        raise InputError(f"--template {opts.template!r}: expected one of {', '.join(TEMPLATES)}")
    out = Path(opts.out)
    device = pick_device(opts.device)
    records = load_records(opts.data)
    train_r, val_r, test_r = split_records(records, opts.split, opts.seed)
    ckpt = load_checkpoint(opts.checkpoint)
    model, tokenizer = ckpt.model, ckpt.tokenizer
    context = model.config.context_length
    max_length = min(opts.max_length or context, context)
    info: dict[str, Any] = {"records": len(records), "template": opts.template}
    splits, counts = {}, {}
    for name, part in (("train", train_r), ("val", val_r), ("test", test_r)):
        splits[name], counts[name] = encode_examples(
            part, tokenizer, opts.template, max_length, opts.mask_prompt
        )
    info["sizes"] = {k: len(v) for k, v in splits.items()}
    info["truncated"] = sum(c["truncated"] for c in counts.values())
    info["dropped"] = sum(c["dropped"] for c in counts.values())
    seed_everything(opts.seed)
    if opts.dropout is not None:
        set_dropout(model, opts.dropout)
    info.update(prepare_model(model, opts, "all", ()))
    task = InstructionTask(
        splits,
        tokenizer.eot_id,
        opts.batch_size,
        device,
        opts.seed,
        opts.mask_prompt,
        tokenizer,
        format_prompt(val_r[0] if val_r else train_r[0], opts.template),
    )
    spe = task.steps_per_epoch()
    meta: dict[str, Any] = {
        "task": "instruct",
        "template": opts.template,
        "base_checkpoint": str(ckpt.path),
        "title": f"instruct {Path(opts.data).name}",
    }
    trainer, seconds = run_trainer(
        model,
        task,
        opts,
        out,
        tokenizer,
        meta,
        info,
        callback,
        device,
        max(1, min(spe, 50)),
        min(40, opts.generate_tokens),
    )
    model = trainer.model
    results: dict[str, Any] = {"task": "instruct", **info}
    for name in ("train", "val", "test"):
        results[f"{name}_loss"] = task.split_loss(model, name)
    results["first_eval"] = trainer.first_eval
    results["epochs"] = epoch_history(trainer.metrics.read(), spe)
    results["steps"] = trainer.step
    results["train_seconds"] = seconds
    meta["eval"] = {k: results[k] for k in ("val_loss", "test_loss")}
    if opts.generate_tokens > 0 and test_r:
        responses = generate_responses(
            model, tokenizer, test_r, opts.template, opts.generate_tokens, progress
        )
        path = out / "test_responses.json"
        atomic_write_text(path, json.dumps(responses, indent=2, ensure_ascii=False) + "\n")
        results["responses"] = str(path)
    results["checkpoint"] = str(save_final(model, tokenizer, out, meta, opts.checkpoint))
    write_results(out, results)
    return results
