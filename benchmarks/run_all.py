"""`make bench`: run every benchmark in turn (one at a time, so timings do not fight) and print
where each wrote its JSON. `--quick` passes --quick to the scripts that have a short mode.

    python benchmarks/run_all.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name → (script, accepts --quick)
BENCHMARKS = {
    "tokenizer": ("tokenizer.py", True),
    "import_memory": ("import_memory.py", False),
    "train_throughput": ("train_throughput.py", True),
    "inference": ("inference.py", True),
    "ch5_verdict": ("ch5_verdict.py", False),
    "finetune_sms": ("finetune_sms.py", True),
    "evaluate": ("evaluate.py", True),
    "data_prepare": ("data_prepare.py", True),
    "speedrun": ("speedrun.py", True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs where supported")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    failed = []
    for name, (script, has_quick) in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        path = HERE / script
        if not path.exists():
            print(f"[{name}] skipped: {script} not present")
            continue
        cmd = [sys.executable, str(path)] + (["--quick"] if args.quick and has_quick else [])
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"[{name}] exit {rc} after {time.perf_counter() - start:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
