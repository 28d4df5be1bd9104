"""Evaluation benchmark: `scratchllm evaluate` against lm-eval's HF backend, and two CORE scores.

    python benchmarks/evaluate.py [--out benchmarks/results/evaluate.json] [--quick]

In one run on one machine:

- speed: items/s of `scratchllm evaluate --task-file` and of lm-eval's HF backend
  (`lm_eval.simple_evaluate(model=HFLM(...))`, a local task YAML) on the same exported
  gpt2-small-shaped model and the same prompts: ARC-Easy rendered 10-shot as CORE runs it (the
  prompts are written into the file, so both read identical text), and COPA 0-shot. lm-eval
  runs at batch size 1 (its default) and 8, scratchllm before and after it; the ratio is the
  slower scratchllm run over the faster lm-eval one. The per-item picks of both are compared
  (lm-eval's `acc` rule).
- CORE: `scratchllm evaluate --tasks core --limit N` on that random gpt2-small-shaped model
  (the chance floor, about 0) and on a quickstart model (`scratchllm quickstart`, a few hundred
  steps).

Data comes from SCRATCHLLM_TEST_DATA (default ../shared/data beside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, write_result  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")

LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
"""


def cli(*args: Any) -> float:
    """Run `scratchllm ...` in a fresh process; its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scratchllm", *map(str, args)], check=True)
    return time.perf_counter() - started


def load_avg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def rendered_task(name: str, limit: int, tmp: Path) -> Path:
    """The first `limit` items of the seeded subset of CORE task `name`, rendered as CORE does
    (few-shot examples included) into 0-shot items with the delimiter ' ', for both tools."""
    from scratchllm.evaluate import core_suite, load_items, render
    from scratchllm.evaluate.tasks import subset

    (spec,) = core_suite([name], data_dir() / "eval")
    items = load_items(spec)
    rows = []
    for index in subset(len(items), limit):
        choices = render(spec, items, index)
        context = choices[0].context
        if not context.endswith(" "):  # the ' ' delimiter of the 0-shot file supplies it
            raise SystemExit(f"{name}: delimiter {spec.delimiter!r} does not end in a space")
        query = context[:-1]
        rows.append(
            {
                "query": query,
                "choices": [c.continuation for c in choices],
                "gold": items[index]["gold"],
            }
        )
    path = tmp / f"{name}_{spec.shots}shot.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def bench_speed(ckpt: Path, hf_dir: Path, task: Path, tmp: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    n = len(task.read_text(encoding="utf-8").splitlines())
    out = tmp / f"ours_{task.stem}"
    load_before = load_avg()
    flags = ["--type", "multiple_choice", "--dtype", "float32", "--log-samples"]
    wall = cli("evaluate", "--checkpoint", ckpt, "--out", out, "--task-file", task, *flags)
    ours = json.loads((out / "results.json").read_text())["tasks"][0]
    ours_samples = [
        json.loads(line)
        for line in (out / "samples" / f"{task.stem}.jsonl").read_text().splitlines()
    ]
    name = f"bench_{task.stem}"
    yaml_dir = tmp / f"yaml_{task.stem}"
    yaml_dir.mkdir(exist_ok=True)
    (yaml_dir / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, data=task))
    runs = {}
    for batch in (1, 8):
        lm = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=batch)
        started = time.perf_counter()
        result = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            num_fewshot=0,
            log_samples=True,
            bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False),
        )
        seconds = time.perf_counter() - started
        samples = sorted(result["samples"][name], key=lambda s: s["doc_id"])
        picks = [
            max(range(len(s["filtered_resps"])), key=lambda k: float(s["filtered_resps"][k][0]))
            for s in samples
        ]
        runs[batch] = {
            "seconds": round(seconds, 2),
            "items_per_s": round(n / seconds, 3),
            "acc": result["results"][name]["acc,none"],
            "picks": picks,
        }
        del lm
    best = max(runs.values(), key=lambda r: r["items_per_s"])
    # Once more after lm-eval, so that a change in the machine's load between the runs shows;
    # the slower of the two counts.
    cli("evaluate", "--checkpoint", ckpt, "--out", out, "--task-file", task, *flags)
    again = json.loads((out / "results.json").read_text())["tasks"][0]
    rates = [ours["items_per_s"], again["items_per_s"]]
    ours_picks = [s["acc_pred"] for s in ours_samples]
    return {
        "task_file": task.name,
        "items": n,
        "scratchllm_items_per_s": round(min(rates), 3),
        "scratchllm_runs_items_per_s": [round(r, 3) for r in rates],
        "scratchllm_task_seconds": ours["seconds"],
        "scratchllm_command_wall_s": round(wall, 2),
        "scratchllm_acc": ours["acc"],
        "lm_eval_batch1_items_per_s": runs[1]["items_per_s"],
        "lm_eval_batch8_items_per_s": runs[8]["items_per_s"],
        "lm_eval_acc": best["acc"],
        "speedup_vs_best_lm_eval": round(min(rates) / best["items_per_s"], 2),
        "same_acc_picks_fraction": sum(
            a == b for a, b in zip(ours_picks, best["picks"], strict=True)
        )
        / n,
        "load_average_before": load_before,
        "load_average_after": load_avg(),
    }


def core_of(ckpt: Path, limit: int, out: Path) -> dict[str, Any]:
    wall = cli(
        "evaluate",
        "--checkpoint",
        ckpt,
        "--out",
        out,
        "--tasks",
        "core",
        "--limit",
        limit,
        "--eval-dir",
        data_dir() / "eval",
        "--dtype",
        "float32",
    )
    results = json.loads((out / "results.json").read_text())
    return {
        "limit": limit,
        "core": round(results["core"], 4),
        "wall_s": round(wall, 1),
        "items": sum(t["items"] for t in results["tasks"]),
        "tasks": {t["name"]: round(t["centered"], 3) for t in results["tasks"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer items and steps")
    parser.add_argument("--arc-items", type=int, default=12, help="ARC-Easy 10-shot items")
    parser.add_argument("--copa-items", type=int, default=100, help="COPA 0-shot items")
    parser.add_argument("--core-limit", type=int, default=8, help="items per CORE task (gpt2)")
    parser.add_argument("--qs-limit", type=int, default=100, help="items per task (quickstart)")
    parser.add_argument("--qs-steps", type=int, default=300, help="quickstart training steps")
    args = parser.parse_args()
    if args.quick:
        args.arc_items, args.copa_items, args.core_limit = 4, 20, 2
        args.qs_limit, args.qs_steps = 10, 50

    import torch

    from scratchllm import GPTModel, ModelConfig
    from scratchllm.checkpoint import save_checkpoint
    from scratchllm.hub.convert import export_hf
    from scratchllm.tokenizers import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="scratchllm-bench-eval-"))
    payload: dict[str, Any] = {"load_average_at_start": load_avg(), "settings": vars(args)}
    torch.manual_seed(0)
    gpt2 = tmp / "gpt2-small-random"
    tokenizer = load_tokenizer(f"gpt2:{data_dir() / 'gpt2'}")
    save_checkpoint(gpt2, GPTModel(ModelConfig.from_preset("gpt2-small", drop_rate=0.0)), tokenizer)
    export_hf(gpt2, tmp / "gpt2-hf", dtype="float32")

    speed = []
    for name, limit in (("arc_easy", args.arc_items), ("copa", args.copa_items)):
        task = rendered_task(name, limit, tmp)
        speed.append(bench_speed(gpt2, tmp / "gpt2-hf", task, tmp))
        print(json.dumps(speed[-1]), flush=True)
    payload["speed_gpt2_small_random"] = speed

    payload["core_gpt2_small_random"] = core_of(gpt2, args.core_limit, tmp / "core_gpt2")
    print(json.dumps(payload["core_gpt2_small_random"]), flush=True)
    started = time.perf_counter()
    cli("quickstart", "--out", tmp / "qs", "--max-steps", args.qs_steps)
    qs = core_of(tmp / "qs", args.qs_limit, tmp / "core_qs")
    qs["train_wall_s"] = round(time.perf_counter() - started - qs["wall_s"], 1)
    qs["steps"] = args.qs_steps
    payload["core_quickstart"] = qs
    print(json.dumps(qs), flush=True)
    payload["load_average_at_end"] = load_avg()
    path = write_result("evaluate", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
