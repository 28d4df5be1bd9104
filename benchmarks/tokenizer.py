"""Tokenizer benchmark: BPE training time and GPT-2 encoding speed, scratchllm vs the references.

    python benchmarks/tokenizer.py [--out benchmarks/results/tokenizer.json] [--quick]

In one run on the same files:

- training: scratchllm's byte-level BPE trainer vs Hugging Face tokenizers' BpeTrainer (ByteLevel
  pre-tokenizer, same vocab size and special token) on the Gutenberg novels;
- encoding MB/s: scratchllm's GPT-2 `BPETokenizer` vs tiktoken's GPT-2 vs Hugging Face's GPT-2
  (all three built from the same local encoder.json / vocab.bpe), one text at a time and batched.

Data comes from SCRATCHLLM_TEST_DATA (default ../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


def _data_dir() -> Path:
    return Path(os.environ.get("SCRATCHLLM_TEST_DATA", ROOT.parent / "shared" / "data")).resolve()


def _pieces(text: str, size: int = 8192) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), times, result


def _machine() -> dict[str, Any]:
    import regex
    import tiktoken
    import tokenizers

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "usable_cores": cores,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "tiktoken": tiktoken.__version__,
        "tokenizers": tokenizers.__version__,
        "regex": regex.__version__,
    }


def bench_training(files: list[str], vocab_size: int, repeats: int) -> dict[str, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from scratchllm.tokenizers.train import default_workers, train_bpe_files

    def ours() -> Any:
        return train_bpe_files(files, vocab_size, [EOT])

    def hf() -> Any:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train(files, trainer)
        return tok

    ours_s, ours_all, ours_tok = _best(ours, repeats)
    hf_s, hf_all, hf_tok = _best(hf, repeats)
    from scratchllm.tokenizers.files import token_to_str

    ours_vocab = {token_to_str(t) for t in ours_tok.mergeable_ranks}
    hf_vocab = set(hf_tok.get_vocab()) - {EOT}
    return {
        "files": len(files),
        "bytes": sum(os.path.getsize(f) for f in files),
        "vocab_size": vocab_size,
        "workers": default_workers(),
        "scratchllm_s": round(ours_s, 3),
        "scratchllm_runs_s": [round(t, 3) for t in ours_all],
        "hf_tokenizers_s": round(hf_s, 3),
        "hf_tokenizers_runs_s": [round(t, 3) for t in hf_all],
        "scratchllm_over_hf": round(ours_s / hf_s, 2),
        "vocab_sizes": {"scratchllm": ours_tok.vocab_size, "hf": hf_tok.get_vocab_size()},
        # How alike the two vocabularies are (HF reads files line by line, so they differ a bit).
        "shared_tokens_fraction": round(len(ours_vocab & hf_vocab) / len(ours_vocab), 3),
    }


def bench_encoding(data: Path, texts: list[str], repeats: int) -> dict[str, Any]:
    import tiktoken
    import tiktoken.load
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from scratchllm.tokenizers import GPT2_PATTERN, gpt2_tokenizer

    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    gpt2 = data / "gpt2"
    ours = gpt2_tokenizer(gpt2)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(gpt2 / "vocab.bpe"), encoder_json_file=str(gpt2 / "encoder.json")
    )
    tik = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )
    hf = Tokenizer(models.BPE.from_file(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    encoders: dict[str, dict[str, Callable[[], Any]]] = {
        "scratchllm": {
            "single": lambda: [ours.encode_ordinary(t) for t in texts],
            "batch": lambda: ours.encode_batch(texts),
        },
        "tiktoken": {
            "single": lambda: [tik.encode_ordinary(t) for t in texts],
            "batch": lambda: tik.encode_ordinary_batch(texts),
        },
        "hf_tokenizers": {
            "single": lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts],
            "batch": lambda: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)],
        },
    }
    results: dict[str, Any] = {"mb": round(mb, 3), "texts": len(texts)}
    ids: dict[str, Any] = {}
    for name, modes in encoders.items():
        for mode, fn in modes.items():
            best, runs, out = _best(fn, repeats)
            results[f"{name}_{mode}_mb_s"] = round(mb / best, 2)
            results[f"{name}_{mode}_runs_s"] = [round(t, 3) for t in runs]
            ids[f"{name}_{mode}"] = out
    reference = ids["tiktoken_single"]
    results["ids_identical"] = {key: value == reference for key, value in ids.items()}
    for mode in ("single", "batch"):
        ours_speed = results[f"scratchllm_{mode}_mb_s"]
        results[f"scratchllm_over_tiktoken_{mode}"] = round(
            ours_speed / results[f"tiktoken_{mode}_mb_s"], 2
        )
        results[f"scratchllm_over_hf_{mode}"] = round(
            ours_speed / results[f"hf_tokenizers_{mode}_mb_s"], 2
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tokenizer.json"))
    parser.add_argument("--quick", action="store_true", help="3 novels, vocab 2048, 1 repeat")
    args = parser.parse_args(argv)

    data = _data_dir()
    files = sorted(glob.glob(str(data / "corpora" / "gutenberg" / "*.txt")))
    if not files:
        print(f"no Gutenberg files under {data}; set SCRATCHLLM_TEST_DATA", file=sys.stderr)
        return 2
    vocab_size, repeats = 8192, 2
    if args.quick:
        files, vocab_size, repeats = files[:3], 2048, 1
    # Encoding runs on documents of about 8 KB (cut at line ends), as a data pipeline feeds them;
    # whole 1 MB novels in one call would mostly measure how each library copes with huge strings.
    texts = [piece for f in files for piece in _pieces(Path(f).read_bytes().decode("utf-8"))]

    report: dict[str, Any] = {"machine": _machine(), "quick": args.quick}
    print(f"training on {len(files)} files, vocab {vocab_size} ...", file=sys.stderr)
    report["training"] = bench_training(files, vocab_size, repeats)
    print("encoding ...", file=sys.stderr)
    report["encoding"] = bench_encoding(data, texts, repeats + 1)
    report["machine"]["load_average_at_end"] = (
        os.getloadavg() if hasattr(os, "getloadavg") else None
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    train, enc = report["training"], report["encoding"]
    print(
        f"training: scratchllm {train['scratchllm_s']}s, HF tokenizers {train['hf_tokenizers_s']}s "
        f"→ {train['scratchllm_over_hf']}x"
    )
    for mode in ("single", "batch"):
        print(
            f"encoding ({mode}): scratchllm {enc[f'scratchllm_{mode}_mb_s']} MB/s, "
            f"tiktoken {enc[f'tiktoken_{mode}_mb_s']} MB/s, "
            f"HF {enc[f'hf_tokenizers_{mode}_mb_s']} MB/s"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
