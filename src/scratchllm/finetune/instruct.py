"""Instruction fine-tuning (ch. 7): next-token loss on prompt + response, padding ignored.

Records are Alpaca's {"instruction", "input", "output"} or conversations (OpenAI's
{"messages": [...]} or ShareGPT's {"conversations": [...]}, `data/chat.py`), told apart by the
first record; conversations render as `chat` renders them and train on assistant turns only.

After training, the test split's responses are generated (greedy, stop at end-of-text) into
`test_responses.json` in the run directory, ready for `judge.py` to score.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from scratchllm.data.chat import (
    encode_conversations,
    is_chat_record,
    load_conversations,
    reply_prompt,
    template_name,
)
from scratchllm.data.instruction import (
    IGNORE_INDEX,
    Example,
    collate_instructions,
    encode_examples,
    format_prompt,
    load_records,
    read_records,
    split_records,
)
from scratchllm.finetune import FinetuneOptions, PromptSettings
from scratchllm.finetune.runner import FinetuneRun
from scratchllm.finetune.tasks import ShuffledTask
from scratchllm.fs import atomic_write_text
from scratchllm.settings import setting

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InstructOptions(FinetuneOptions, PromptSettings):
    """`scratchllm finetune instruct`: instruction/response records (Alpaca format) or
    conversations (OpenAI messages, ShareGPT), assistant turns trained."""

    mask_prompt: bool = setting(False, help="no loss on the prompt tokens")
    generate_tokens: int = setting(256, help="tokens per test response (0: skip)", ge=0)
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)  # train, val, test
    epochs: float | None = 2.0


def masked_lm_loss(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = model(inputs)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


InstructBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets, lengths


class InstructionTask(ShuffledTask[list[Example], InstructBatch]):
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
        sample_prompt: str | list[int] | None = None,
    ) -> None:
        self.pad_id = pad_id
        self.mask_prompt = mask_prompt
        self.tokenizer = tokenizer
        self.sample_prompt = sample_prompt
        super().__init__(splits, batch_size, device, seed, "instruction data")

    def collate(self, split: list[Example], indices: list[int]) -> InstructBatch:
        examples = [split[i] for i in indices]
        x, y = collate_instructions(examples, self.pad_id, self.mask_prompt)
        lengths = torch.tensor([len(e.ids) for e in examples])  # inputs before the padding
        return x.to(self.device), y.to(self.device), lengths

    def loss(self, model: torch.nn.Module, batch: InstructBatch) -> torch.Tensor:
        return masked_lm_loss(model, batch[0], batch[1])

    def tokens_in(self, batch: InstructBatch) -> int:
        return int(batch[2].sum())

    @torch.no_grad()
    def split_loss(
        self, model: torch.nn.Module, name: str, max_batches: int | None = None
    ) -> float:
        """Mean token loss over a split (its first `max_batches` batches, in order)."""
        examples = self.splits.get(name) or []
        total, count = 0.0, 0
        for idx in self.eval_batches(name, max_batches):
            x, y, _ = self.collate(examples, idx)
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
        """The greedy response to the sample prompt (an instruction in the run's template), the
        prompt cut from the left when it and the response do not fit the context."""
        if self.tokenizer is None or not self.sample_prompt:
            return None
        return _respond(model, self.tokenizer, self.sample_prompt, max_new_tokens)


def fit_prompt(prompt: list[int], context: int, max_new_tokens: int) -> tuple[list[int], int]:
    """`prompt` cut from the left so that at least min(`max_new_tokens`, half the context) new
    tokens fit after it, and how many new tokens then fit (at most `max_new_tokens`)."""
    room = max(1, min(max_new_tokens, context // 2))
    prompt = prompt[-(context - room) :]
    return prompt, max(1, min(max_new_tokens, context - len(prompt)))


@torch.no_grad()
def _respond(
    model: torch.nn.Module, tokenizer, prompt_text: str | list[int], max_new_tokens: int
) -> str:
    """Greedy continuation of `prompt_text` (text, or ids as `chat_prompt` gives) up to
    end-of-text or a stop id of the tokenizer, decoded and stripped."""
    from scratchllm.inference.generate import generate

    device = next(model.parameters()).device
    prompt = tokenizer.encode_ordinary(prompt_text) if isinstance(prompt_text, str) else prompt_text
    prompt, budget = fit_prompt(prompt, model.config.context_length, max_new_tokens)
    stops = {tokenizer.eot_id, *tokenizer.stop_ids}
    ids = generate(model, torch.tensor([prompt], device=device), budget, eos_id=stops)
    new = ids[0, len(prompt) :].tolist()
    end = next((i for i, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:end]).strip()


def record_prompt(record: dict[str, Any], tokenizer, template: str) -> str | list[int]:
    """What a record's response continues: the Alpaca prompt, or for a conversation the ids
    `chat` builds for its history before the last reply."""
    if "messages" not in record:
        return format_prompt(record, template)
    from scratchllm.inference.chat import chat_prompt

    return chat_prompt(tokenizer, reply_prompt(record)[0])[0]


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, str]],
    template: str,
    max_new_tokens: int,
    progress=None,
) -> list[dict[str, str]]:
    """Greedy responses to each record's prompt, stopping at end-of-text (a prompt too long for
    the context and the response loses its beginning: `fit_prompt`)."""
    out = []
    for record in records:
        prompt = record_prompt(record, tokenizer, template)
        response = _respond(model, tokenizer, prompt, max_new_tokens)
        if "messages" in record:  # the judge's fields: the last instruction and its reply
            history, reply = reply_prompt(record)
            users = [m["content"] for m in history if m["role"] == "user"]
            record = {"instruction": users[-1] if users else "", "output": reply, **record}
        out.append({**record, "model_response": response})
        if progress is not None:
            progress(1)
    return out


class InstructRun(FinetuneRun):
    """`scratchllm finetune instruct`: every parameter trains by default."""

    kind = "instruct"
    opts: InstructOptions

    def __init__(self, opts: InstructOptions, progress=None) -> None:
        super().__init__(opts)
        self.progress = progress

    def load_data(self) -> None:
        path, raw = read_records(self.opts.data)
        self.chat = bool(raw) and is_chat_record(raw[0][1])
        if self.chat:
            records: list[dict[str, Any]] = load_conversations(path, raw)
        else:
            records = load_records(path, records=raw)
        self.records = len(records)
        self.train_r, self.val_r, self.test_r = split_records(
            records, self.opts.split, self.opts.seed
        )

    def encode(self) -> dict[str, Any]:
        opts = self.opts
        info: dict[str, Any] = {"records": self.records, "template": self.template}
        if self.chat:
            info["format"] = "chat"
        self.splits, counts = {}, {}
        for name, part in (("train", self.train_r), ("val", self.val_r), ("test", self.test_r)):
            if self.chat:
                self.splits[name], counts[name] = encode_conversations(
                    part, self.tokenizer, self.max_length
                )
                continue
            self.splits[name], counts[name] = encode_examples(
                part, self.tokenizer, opts.template, self.max_length, opts.mask_prompt
            )
        info["sizes"] = {k: len(v) for k, v in self.splits.items()}
        info["truncated"] = sum(c["truncated"] for c in counts.values())
        info["dropped"] = sum(c["dropped"] for c in counts.values())
        return info

    def build_task(self) -> InstructionTask:
        opts = self.opts
        self.task = InstructionTask(
            self.splits,
            self.tokenizer.eot_id,
            opts.batch_size,
            self.device,
            opts.seed,
            opts.mask_prompt,
            self.tokenizer,
            record_prompt((self.val_r or self.train_r)[0], self.tokenizer, opts.template),
        )
        return self.task

    @property
    def template(self) -> str:
        """The run's template: --template, or for conversations the one `chat` renders with."""
        return template_name(self.tokenizer) if self.chat else self.opts.template

    def meta(self) -> dict[str, Any]:
        return {"template": self.template}

    def sample_tokens(self) -> int:
        return min(40, self.opts.generate_tokens)

    def finish(self, model, records, results, meta) -> None:
        for name in ("train", "val", "test"):
            results[f"{name}_loss"] = self.task.split_loss(model, name)
        meta["eval"] = {k: results[k] for k in ("val_loss", "test_loss")}
        if self.opts.generate_tokens > 0 and self.test_r:
            responses = generate_responses(
                model,
                self.tokenizer,
                self.test_r,
                self.opts.template,
                self.opts.generate_tokens,
                self.progress,
            )
            path = self.out / "test_responses.json"
            atomic_write_text(path, json.dumps(responses, indent=2, ensure_ascii=False) + "\n")
            results["responses"] = str(path)


def finetune_instruct(opts: InstructOptions, callback=None, progress=None) -> dict[str, Any]:
    """Instruction-tune a checkpoint; writes checkpoint/, metrics, plots, test_responses.json and
    results.json (val_loss, test_loss) into `opts.out`."""
    return InstructRun(opts, progress).run(callback)
