"""Peak memory of `scratchllm convert` on a gpt2-medium-sized Hugging Face checkpoint.

Builds a random GPT2LMHeadModel (24 layers, 1024 wide, 355M parameters, ~1.4 GB in float32),
saves it with `save_pretrained`, then runs the import in a fresh subprocess and reads that
child's peak resident set (`ru_maxrss` from `os.wait4`). A second child that only imports
torch + scratchllm gives the baseline, which is subtracted. For contrast it also measures
`load_checkpoint` on the result.

Linux carries a process's pre-exec peak into `ru_maxrss`, and a forked child starts as a copy
of its parent, so this parent never imports torch: the model is built in a child of its own.
Each child also reports VmHWM from /proc/self/status (its own peak after exec) as a cross-check.

    python benchmarks/import_memory.py [--layers 24 --emb 1024] [--keep DIR]

Writes benchmarks/results/import_memory.json. Target: import peak over baseline < 1.3x weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "import_memory.json"

CHILD = r"""
import sys, time
import torch
import scratchllm
import scratchllm.hub.convert
import scratchllm.checkpoint
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if mode == "import":
    from scratchllm.hub.convert import import_hf
    tokenizer = None if len(sys.argv) < 5 else sys.argv[4]
    import_hf(src, out, tokenizer=tokenizer)
elif mode == "load":
    from scratchllm.checkpoint import load_checkpoint
    ckpt = load_checkpoint(src)
elif mode == "make":
    import transformers
    torch.manual_seed(0)
    layers, emb, heads = (int(x) for x in out.split(","))
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=emb, n_head=heads, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
seconds = time.perf_counter() - t0
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) * 1024
print(seconds, hwm)
"""


def run_child(*args: str) -> tuple[int, float, int]:
    """Peak RSS in bytes (Linux ru_maxrss is KiB), wall seconds and VmHWM of a fresh child."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed ({proc.returncode}):\n{err[-2000:]}")
    seconds, hwm = out.strip().splitlines()[-1].split()
    return usage.ru_maxrss * 1024, float(seconds), int(hwm)


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--emb", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="test data folder (its gpt2/ tokenizer files are used if present)",
    )
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="import-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "hf", work / "ckpt"
    shutil.rmtree(out, ignore_errors=True)
    try:
        if not (src / "model.safetensors").exists():
            run_child("make", str(src), f"{args.layers},{args.emb},{args.heads}")
        tokenizer_files = args.data / "gpt2"
        tokenizer = None
        if (tokenizer_files / "encoder.json").exists():
            shutil.copy(tokenizer_files / "encoder.json", src / "vocab.json")
            shutil.copy(tokenizer_files / "vocab.bpe", src / "merges.txt")
        else:
            tokenizer = "bytes"
        weights = (src / "model.safetensors").stat().st_size

        baseline, _, baseline_hwm = run_child("baseline", str(src), str(out))
        extra = [tokenizer] if tokenizer else []
        peak, seconds, peak_hwm = run_child("import", str(src), str(out), *extra)
        load_peak, load_seconds, _ = run_child("load", str(out), "-")
        result = {
            "model": f"GPT2LMHeadModel {args.layers} layers x {args.emb} (random, float32)",
            "weights_bytes": weights,
            "baseline_rss_bytes": baseline,
            "import_peak_rss_bytes": peak,
            "import_peak_over_baseline_bytes": peak - baseline,
            "import_ratio_to_weights": round((peak - baseline) / weights, 3),
            "import_seconds": round(seconds, 2),
            "import_vmhwm_over_baseline_bytes": peak_hwm - baseline_hwm,
            "target_ratio": 1.3,
            "meets_target": (peak - baseline) / weights < 1.3,
            "load_checkpoint_peak_over_baseline_bytes": load_peak - baseline,
            "load_checkpoint_ratio_to_weights": round((load_peak - baseline) / weights, 3),
            "load_checkpoint_seconds": round(load_seconds, 2),
            "tokenizer": tokenizer or "gpt2 (vocab.json + merges.txt)",
            "python": sys.version.split()[0],
            "torch": _torch_version(),
            "date": time.strftime("%Y-%m-%d"),
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    mb = 1024 * 1024
    print(f"weights {weights / mb:.0f} MiB, baseline RSS {baseline / mb:.0f} MiB")
    print(
        f"import: peak {peak / mb:.0f} MiB, {(peak - baseline) / mb:.0f} MiB over baseline = "
        f"{result['import_ratio_to_weights']:.2f}x weights (target < 1.3x), {seconds:.1f} s"
    )
    print(
        f"load_checkpoint of the result: {(load_peak - baseline) / mb:.0f} MiB over baseline = "
        f"{result['load_checkpoint_ratio_to_weights']:.2f}x weights"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
