"""`scratchllm classify`: label texts with a checkpoint from `scratchllm finetune classify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scratchllm.errors import InputError

HELP = "predict a label for each text with a fine-tuned classifier"
DESCRIPTION = """Print one predicted label per text (one line each, in order).

examples:
  scratchllm classify --checkpoint runs/spam "You won a prize! Call now" "see you at 6?"
  scratchllm classify --checkpoint runs/spam --file messages.txt      # one text per line
  scratchllm classify --checkpoint runs/spam --eval labelled.tsv      # accuracy on gold labels
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--checkpoint", required=True, help="classifier checkpoint (or run) directory")
    p.add_argument("--file", help="a file with one text per line (blank lines are skipped)")
    p.add_argument("--eval", metavar="DATA", help="labelled TSV/CSV/JSONL: print the accuracy")
    p.add_argument("--probs", action="store_true", help="also print the predicted probability")
    p.add_argument("--device", default="cpu", help="cpu | cuda | mps (default cpu)")


def run(args: argparse.Namespace) -> int:
    from scratchllm.finetune.classify import Classifier
    from scratchllm.utils import plural

    texts = list(args.texts)
    if args.file:
        texts += _read_lines(Path(args.file))
    if not texts and not args.eval:
        raise InputError("give texts to classify, --file FILE or --eval DATA")
    clf = Classifier(args.checkpoint, device=args.device)
    if texts:
        for i, text in enumerate(texts):
            if not text.strip():
                raise InputError(f"text {i + 1} is empty")
        probs = clf.probabilities(texts)
        for row in probs:
            k = int(row.argmax())
            print(f"{clf.labels[k]}\t{float(row[k]):.4f}" if args.probs else clf.labels[k])
    if args.eval:
        from scratchllm.data.classification import load_labeled

        data = load_labeled(args.eval)
        gold = clf.label_ids(data.labels, args.eval)
        pred = clf.probabilities(data.texts).argmax(-1).tolist()
        correct = sum(int(a == b) for a, b in zip(gold, pred, strict=True))
        print(f"accuracy {correct / len(gold):.4f} ({correct} of {len(gold)})")
    if clf.truncated:
        print(
            f"warning: {plural(clf.truncated, 'text')} longer than {clf.max_length} tokens "
            f"{'was' if clf.truncated == 1 else 'were'} cut",
            file=sys.stderr,
        )
    return 0


def _read_lines(path: Path) -> list[str]:
    """The non-blank lines of --file; a missing, unreadable or binary file is an InputError."""
    from scratchllm.data.text import decode_text, read_error

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise read_error(path, exc, "--file") from None
    return [line for line in decode_text(data, f"--file {path}").splitlines() if line.strip()]
