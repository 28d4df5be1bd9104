"""Text classification (ch. 6): a `num_classes` head on the hidden state of the last real token.

Batches are padded on the right. The book reads the logits at position -1, which for every
shorter sequence in a padded batch is a padding token; here each sequence is read at its own last
token (`pool_last`), which a causal model computes without ever seeing the padding.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchllm.data.classification import (
    LabeledTexts,
    balance,
    encode_texts,
    label_names,
    load_labeled,
    pad_right,
    split_indices,
)
from scratchllm.errors import InputError
from scratchllm.finetune import FinetuneOptions, plot_eval_metrics
from scratchllm.finetune.runner import FinetuneRun
from scratchllm.finetune.tasks import ShuffledTask
from scratchllm.settings import setting

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClassifyOptions(FinetuneOptions):
    """`scratchllm finetune classify`: labelled texts, a `num_classes` head."""

    balance: bool = setting(False, help="undersample classes to the smallest")
    append_eot: bool = setting(
        False, help="end each text with <|endoftext|> and classify from that token's state"
    )
    epochs: float | None = 5.0


def pool_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states → (B, D): each row's state at its last real token (index length - 1)."""
    idx = (lengths - 1).clamp(min=0).to(hidden.device)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def classify_logits(model: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (B, num_classes) for right-padded ids `x` with true `lengths`."""
    hidden = model(x, return_hidden=True)
    return model.out_head(pool_last(hidden, lengths))


@dataclass
class Split:
    ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


def length_bucketed_batches(
    lengths: list[int], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of similar length (less padding): shuffle, sort within chunks of 50
    batches, cut, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


ClassBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, lengths, labels


class ClassificationTask(ShuffledTask[Split, ClassBatch]):
    """Trainer task: cross-entropy of the class logits; evaluation reports loss and accuracy."""

    def __init__(
        self,
        splits: dict[str, Split],
        pad_id: int,
        batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        bucket: bool = False,
    ) -> None:
        # Length buckets save padding, but length often tracks the class (spam is long), so
        # bucketed batches lean to one class; plain shuffled batches are the default.
        self.bucket = bucket
        self.pad_id = pad_id
        super().__init__(splits, batch_size, device, seed, "classification data")

    def epoch_batches(self, rng: random.Random) -> list[list[int]]:
        if self.bucket:
            return length_bucketed_batches([len(s) for s in self.train.ids], self.batch_size, rng)
        return super().epoch_batches(rng)

    def collate(self, split: Split, indices: list[int]) -> ClassBatch:
        x, lengths = pad_right([split.ids[i] for i in indices], self.pad_id)
        y = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
        return x.to(self.device), lengths.to(self.device), y.to(self.device)

    def loss(self, model: torch.nn.Module, batch: ClassBatch) -> torch.Tensor:
        x, lengths, y = batch
        return F.cross_entropy(classify_logits(model, x, lengths).float(), y)

    def tokens_in(self, batch: ClassBatch) -> int:
        return int(batch[1].sum())  # the texts' own lengths: padding excluded

    @torch.no_grad()
    def run_split(
        self, model: torch.nn.Module, name: str, max_batches: int | None = None
    ) -> tuple[float, float, list[int]]:
        """Mean loss, accuracy and predictions over a split (its first `max_batches` batches,
        in a fixed order, as the book evaluates)."""
        split = self.splits[name]
        batches = self.eval_batches(name, max_batches, key=lambda i: len(split.ids[i]))
        n = sum(map(len, batches))
        preds = [0] * n
        total, correct = 0.0, 0
        for idx in batches:  # sorted by length: little padding
            x, lengths, y = self.collate(split, idx)
            logits = classify_logits(model, x, lengths).float()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            p = logits.argmax(-1)
            correct += int((p == y).sum())
            for i, v in zip(idx, p.tolist(), strict=True):
                preds[i] = v
        return total / max(n, 1), correct / max(n, 1), preds

    def evaluate(self, model: torch.nn.Module, max_batches: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in ("train", "val", "test"):
            if name in self.splits and len(self.splits[name]):
                loss, acc, _ = self.run_split(model, name, max_batches)
                out[f"{name}_loss"], out[f"{name}_accuracy"] = loss, acc
        return out


def confusion_matrix(true: list[int], pred: list[int], num_classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    cm = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true, pred, strict=True):
        cm[t][p] += 1
    return cm


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchllm.fs import atomic_write

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in cm) or 1
    for i in range(n):
        for j in range(n):
            color = "white" if cm[i][j] > top / 2 else "black"
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", color=color)
    ax.set_title(title or "confusion matrix (test)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def prepare_splits(
    data: LabeledTexts, opts: ClassifyOptions, tokenizer, max_length: int
) -> tuple[dict[str, Split], list[str], dict[str, Any]]:
    labels = label_names(data)
    info: dict[str, Any] = {"records": len(data)}
    if opts.balance:
        data = balance(data, opts.seed)
        info["balanced_records"] = len(data)
    parts = split_indices(len(data), opts.split, opts.seed, f"--data {data.source}")
    what = f"--data {data.source}: record"
    ids, cut = encode_texts(data.texts, tokenizer, max_length, what, opts.append_eot)
    info["truncated"] = cut
    index = {name: i for i, name in enumerate(labels)}
    splits = {
        name: Split([ids[i] for i in part], [index[data.labels[i]] for i in part])
        for name, part in zip(("train", "val", "test"), parts, strict=True)
    }
    if len(set(splits["train"].labels)) < 2:
        raise InputError(f"--data {data.source}: the training split holds a single class")
    info["sizes"] = {k: len(v) for k, v in splits.items()}
    return splits, labels, info


class ClassifyRun(FinetuneRun):
    """`scratchllm finetune classify`: the vocabulary head becomes a `num_classes` head."""

    kind = "classify"
    default_train = "last-1"  # the book's choice: the last block, the final norm and the head
    head = ("out_head",)
    opts: ClassifyOptions

    def load_data(self) -> None:
        self.data = load_labeled(self.opts.data)

    def encode(self) -> dict[str, Any]:
        self.splits, self.labels, info = prepare_splits(
            self.data, self.opts, self.tokenizer, self.max_length
        )
        return {"labels": self.labels, **info}

    def adapt(self, model: torch.nn.Module) -> None:
        model.set_classification_head(len(self.labels))

    def build_task(self) -> ClassificationTask:
        self.task = ClassificationTask(
            self.splits, self.tokenizer.eot_id, self.opts.batch_size, self.device, self.opts.seed
        )
        return self.task

    def meta(self) -> dict[str, Any]:
        return {
            "num_classes": len(self.labels),
            "labels": self.labels,
            "max_length": self.max_length,
            "append_eot": self.opts.append_eot,
        }

    def eval_every(self, steps_per_epoch: int) -> int:
        return steps_per_epoch  # once per epoch, as the book

    def finish(self, model, records, results, meta) -> None:
        for name in ("train", "val", "test"):
            loss, acc, preds = self.task.run_split(model, name)
            results[f"{name}_loss"], results[f"{name}_accuracy"] = loss, acc
            if name == "test":
                truth = self.splits["test"].labels[: len(preds)]
                cm = confusion_matrix(truth, preds, len(self.labels))
                results["confusion_matrix"] = cm
                plot_confusion(cm, self.labels, self.out / "confusion_matrix.png")
        keys = ["train_accuracy", "val_accuracy", "test_accuracy"]
        plot_eval_metrics(records, keys, self.out / "accuracy.png", "accuracy")
        meta["eval"] = {k: results[k] for k in keys}


def finetune_classify(opts: ClassifyOptions, callback=None) -> dict[str, Any]:
    """Fine-tune a checkpoint as a classifier; writes checkpoint/, metrics, plots, results.json."""
    return ClassifyRun(opts).run(callback)


class Classifier:
    """Predict labels with a checkpoint saved by `finetune_classify`."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        from scratchllm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
        if ckpt.meta.get("task") != "classify" or not ckpt.meta.get("labels"):
            raise InputError(
                f"--checkpoint {checkpoint}: not a classifier (checkpoint.json task is "
                f"{ckpt.meta.get('task')!r}); train one with `scratchllm finetune classify`"
            )
        self.model, self.tokenizer = ckpt.model, ckpt.tokenizer
        self.labels: list[str] = list(ckpt.meta["labels"])
        self.max_length = int(ckpt.meta.get("max_length", self.model.config.context_length))
        self.append_eot = bool(ckpt.meta.get("append_eot", False))
        self.device = torch.device(device)
        self.truncated = 0

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        ids, self.truncated = encode_texts(
            texts, self.tokenizer, self.max_length, "text", self.append_eot
        )
        out = torch.empty(len(texts), len(self.labels))
        for start in range(0, len(ids), batch_size):
            x, lengths = pad_right(ids[start : start + batch_size], self.tokenizer.eot_id)
            logits = classify_logits(self.model, x.to(self.device), lengths.to(self.device))
            out[start : start + len(x)] = torch.softmax(logits.float(), -1).cpu()
        return out

    def predict(self, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if not text.strip():
                raise InputError(f"text {i + 1} is empty")
        probs = self.probabilities(texts)
        return [self.labels[i] for i in probs.argmax(-1).tolist()]

    def label_ids(self, labels: list[str], source: str) -> list[int]:
        """Map gold labels to ids; a label the model never saw is an error naming its record."""
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for n, label in enumerate(labels, start=1):
            if label not in index:
                raise InputError(
                    f"{source}: record {n}: label {label!r} is not one the model was trained on "
                    f"({', '.join(self.labels)})"
                )
            out.append(index[label])
        return out
