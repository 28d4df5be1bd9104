"""The best model per CPU-minute: the classic recipe against `--recipe speedrun`, in one process.

Tiny Shakespeare (bytes tokenizer, the last 10% held out):
  (a) classic — nanoGPT's CPU Shakespeare settings reproduced in scratchllm: GPT-2 style model
      (learned positions, GELU, LayerNorm, tied head, no biases), 4 layers, 4 heads, 128 wide,
      context 64, batch 12, AdamW lr 1e-3 cosine to 1e-4 (100 warmup steps), β2 0.99, weight
      decay 0.1, clip 1.0, dropout 0, 2000 steps;
  (b) `--recipe speedrun --time-budget` (a)'s training seconds, and (b') with a third of them
      (a budgeted run decays to its end: its best at a third of the time is a third-budget run);
  (c) one ablation row per trick: (b)'s model and settings with that one choice made the
      other way (a trick it uses taken out, one it leaves off put in), at the same budget.
Gutenberg novels (a 4096-id BPE trained by our trainer on the training novels, one novel held
out as `--val-data`): classic against speedrun at a 10-minute budget.

Every evaluation scores the same validation text (its first 36,864 tokens) and carries val_bpb;
times are training seconds (`train_s`: evaluation and saving excluded). Reports final bpb
and time, the time at which (b) first reaches (a)'s final bpb, (b')'s final bpb, (b)'s bpb at
(a)'s time, and the issue's targets.
Writes benchmarks/results/speedrun.json and speedrun.png (bpb against seconds).

    python benchmarks/speedrun.py [--part shakespeare|gutenberg|all] [--skip-ablations]
                                  [--quick] [--threads 2] [--out PATH]

A full run takes about 40 minutes on 2 cores and wants a quiet machine (its figures are
timings); --quick shortens every budget for development.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, data_dir, write_result  # noqa: E402

# The classic model: nanoGPT's GPT (GPT-2 style) at its Shakespeare CPU size.
CLASSIC_MODEL = dict(
    context_length=64,
    emb_dim=128,
    n_heads=4,
    n_layers=4,
    drop_rate=0.0,
    bias=False,
    qkv_bias=False,
    tie_embeddings=True,
)
CLASSIC = dict(
    batch_size=12,
    lr=1e-3,
    min_lr=1e-4,
    beta2=0.99,
    warmup_steps=100,
    schedule="cosine",
    weight_decay=0.1,
    grad_clip=1.0,
    optimizer="adamw",
    dtype="float32",
)
CLASSIC_STEPS, QUICK_STEPS = 2000, 200
# name → (what it changes in the recipe, model fields changed, run settings changed): one row
# each, the recipe with that one choice made the other way (a trick it uses taken out, or one
# it leaves off put in).
ABLATIONS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "adamw": ("AdamW instead of Muon", {}, {"optimizer": "adamw"}),
    "learned_pos": ("learned positions instead of RoPE", {"pos_embedding": "learned"}, {}),
    "no_qk_norm": ("no QK-norm", {"qk_norm": False}, {}),
    "cosine": ("cosine instead of WSD", {}, {"schedule": "cosine"}),
    "no_zero_init": (
        "random instead of zero-initialised projections",
        {"zero_init_proj": False},
        {},
    ),
    "relu2": ("ReLU² instead of GELU", {"ffn": "relu2"}, {}),
    "rmsnorm": ("parameter-free RMSNorm instead of LayerNorm", {"norm": "rmsnorm_noparam"}, {}),
    "softcap": ("logits soft-capped at 15", {"logit_softcap": 15.0}, {}),
    "tied_head": ("tied head instead of untied", {"tie_embeddings": True}, {}),
    "no_smear": ("no smear gate", {"smear": False}, {}),
    "no_attn_gate": ("no attention gate", {"attn_gate": False}, {}),
    "fused_qkv_muon": ("Muon steps the fused qkv weight whole", {}, {"muon_split_qkv": False}),
    "muon_lr_003": ("Muon rate 0.03 instead of 0.05", {}, {"muon_lr": 0.03}),
    "no_muon_wd": ("no Muon weight decay (recipe 0.01)", {}, {"muon_weight_decay": 0.0}),
}
# Validation tokens each evaluation scores (the training split is scored on as many): all of
# Tiny Shakespeare's 111k would make evaluation cost more than the training between two of them.
SCORED_TOKENS = 3 * 12288  # 12288 = lcm(64·12, 256·16)
NOISE_BPB = 0.01  # a gap smaller than this is not counted as a gain


def _eval_batches(val_tokens: int, context: int, batch: int) -> int:
    """Batches that score the first `SCORED_TOKENS` of the validation text: the same text for
    every run (a whole number of windows at context 64 × batch 12 and 256 × 16 alike)."""
    return -(-(min(val_tokens, SCORED_TOKENS) // context) // batch)


def _run(name: str, work: Path, val_tokens: int, **settings: Any) -> dict[str, Any]:
    """One pretrain run; its evaluations as (train_s, val_bpb) and its result."""
    import torch

    from scratchllm.train import recipe
    from scratchllm.train.pretrain import PretrainOptions, pretrain
    from scratchllm.train.trainer import TrainerCallback

    out = work / name
    explicit = set(settings)  # what the benchmark sets wins over a recipe
    opts = PretrainOptions(out=str(out), sample_tokens=0, log_every=1, **settings)
    reasons: list[str] = []
    start = time.perf_counter()
    recipe_s = 0.0
    if opts.recipe is not None:
        # The recipe's own function, called here (pretrain calls the same) so that the batch it
        # picks is known before the run: every run scores the same validation text.
        from scratchllm.tokenizers import load_tokenizer

        vocab = load_tokenizer(opts.tokenizer).vocab_size
        opts, choice = recipe.apply_recipe(opts, vocab, torch.device("cpu"), explicit)
        recipe_s = time.perf_counter() - start  # its speed calibration: not training time
        reasons = choice.reasons
        explicit = {f.name for f in dataclasses.fields(opts)}  # all chosen: no second pick
    context = json.loads(Path(opts.model).read_text())["context_length"]
    opts.eval_batches = _eval_batches(val_tokens, context, opts.batch_size)
    result = pretrain(opts, TrainerCallback(), explicit=explicit)
    wall = time.perf_counter() - start
    if result["interrupted"]:  # a half run would make every comparison after it wrong
        raise SystemExit(f"{name}: stopped by {result['interrupted']}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert all("val_bpb" in r for r in evals), f"{name}: an evaluation without val_bpb"
    # Training seconds at each evaluation: the train line of its step (log_every=1).
    seconds = {r["step"]: r["train_s"] for r in records if r["kind"] == "train"}
    curve = [(seconds.get(r["step"], 0.0), r["val_bpb"]) for r in evals]
    run = json.loads((out / "run.json").read_text())
    model = json.loads((out / "checkpoint" / "config.json").read_text())
    row = {
        "name": name,
        "recipe": reasons,
        "train_s": curve[-1][0],
        "wall_s": wall,
        "recipe_s": recipe_s,
        "steps": result["steps"],
        "tokens": result["tokens"],
        "final_bpb": curve[-1][1],
        "curve": curve,
        "parameters": result["parameters"],
        "model": {k: model.get(k) for k in ("n_layers", "emb_dim", "n_heads", "context_length")},
        "settings": {
            k: run[k]
            for k in (
                "optimizer",
                "lr",
                "muon_lr",
                "muon_split_qkv",
                "muon_weight_decay",
                "embedding_lr",
                "schedule",
                "batch_size",
                "dtype",
                "eval_every",
            )
        },
    }
    print(
        f"  {name}: {row['final_bpb']:.4f} bpb after {row['train_s']:.0f}s of training "
        f"({row['steps']} steps, {row['tokens']:,} tokens; {wall:.0f}s wall)",
        flush=True,
    )
    return row


def first_time_at(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training time at which `curve` first reaches `target` bpb, interpolated linearly
    between evaluations (None: never)."""
    for (t0, b0), (t1, b1) in zip(curve, curve[1:], strict=False):
        if b1 <= target:
            if b0 <= target or b0 == b1:
                return t1 if b0 > target else t0
            return t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def bpb_at(curve: list[tuple[float, float]], seconds: float) -> float:
    """The best bpb `curve` has by `seconds` of training."""
    return min(b for t, b in curve if t <= seconds + 1e-6)


def _classic_model(work: Path) -> str:
    path = work / "classic-model.json"
    path.write_text(json.dumps({**CLASSIC_MODEL, "name": "classic-nanogpt"}))
    return str(path)


def _ablation_model(work: Path, base: Path, name: str, changes: dict[str, Any]) -> str:
    model = json.loads((base / "recipe-model.json").read_text())
    path = work / f"ablation-{name}-model.json"
    path.write_text(json.dumps({**model, **changes, "name": f"{model['name']}-{name}"}))
    return str(path)


def shakespeare(work: Path, quick: bool, ablations: bool) -> dict[str, Any]:
    text = data_dir() / "corpora" / "tinyshakespeare.txt"
    size = len(text.read_bytes())  # bytes tokenizer: a token per byte
    val_tokens = size - int(size * 0.9)
    common = dict(data=[str(text)], tokenizer="bytes", val_fraction=0.1, val_tokens=val_tokens)
    steps = QUICK_STEPS if quick else CLASSIC_STEPS
    print(f"shakespeare (a) classic: {steps} steps", flush=True)
    classic = _run(
        "shakespeare-classic",
        work,
        model=_classic_model(work),
        max_steps=steps,
        eval_every=max(10, steps // (5 if quick else 20)),
        **CLASSIC,
        **common,
    )
    budget = classic["train_s"]
    print(f"shakespeare (b) speedrun: --time-budget {budget:.0f}s", flush=True)
    speed = _run("shakespeare-speedrun", work, recipe="speedrun", time_budget=budget, **common)
    # A budgeted recipe spends its budget: its model at a third of the time is the run given a
    # third of the budget (decayed at its end), not the longer run's curve mid-schedule.
    print(f"shakespeare (b') speedrun: --time-budget {budget / 3:.0f}s", flush=True)
    third = _run(
        "shakespeare-speedrun-third", work, recipe="speedrun", time_budget=budget / 3, **common
    )
    rows = []
    if ablations:
        base = work / "shakespeare-speedrun"
        run = json.loads((base / "run.json").read_text())
        keep = {k: run[k] for k in ("batch_size", "eval_every", "dtype")}
        for name, (what, model_changes, changes) in ABLATIONS.items():
            print(f"shakespeare (c) ablation {name}: {what}", flush=True)
            row = _run(
                f"shakespeare-ablation-{name}",
                work,
                recipe="speedrun",
                time_budget=budget,
                model=_ablation_model(work, base, name, model_changes),
                **{**keep, **changes},
                **common,
            )
            row["what"] = what
            row["bpb_cost"] = row["final_bpb"] - speed["final_bpb"]
            row["helps"] = row["bpb_cost"] > NOISE_BPB  # the recipe's choice pays
            row["verdict"] = (
                "the recipe's choice helps"
                if row["helps"]
                else "the change is better here"
                if row["bpb_cost"] < -NOISE_BPB
                else "within noise"
            )
            rows.append(row)
    reach = first_time_at(speed["curve"], classic["final_bpb"])
    at_a = bpb_at(speed["curve"], budget)
    return {
        "classic": classic,
        "speedrun": speed,
        "speedrun_third": third,
        "ablations": rows,
        "speedrun_reaches_classic_s": reach,
        "speedrun_reaches_classic_fraction": reach / budget if reach is not None else None,
        "speedrun_third_budget_bpb": third["final_bpb"],
        "speedrun_bpb_at_classic_time": at_a,
        "bpb_gain_at_classic_time": classic["final_bpb"] - at_a,
        "targets": {
            "reach_within_a_third": third["final_bpb"] <= classic["final_bpb"]
            or (reach is not None and reach <= budget / 3),
            "gain_at_least_0.25": classic["final_bpb"] - at_a >= 0.25,
        },
    }


def gutenberg(work: Path, quick: bool) -> dict[str, Any]:
    from scratchllm.cli import main as cli

    novels = sorted((data_dir() / "corpora" / "gutenberg").glob("*.txt"))
    held = next(p for p in novels if "frankenstein" in p.name)  # mid-sized: a quick full eval
    train = [str(p) for p in novels if p != held]
    tok = work / "gutenberg-bpe4096"
    print(f"gutenberg: training a 4096-id BPE on {len(train)} novels", flush=True)
    argv = ["tokenizer", "train", "--data", *train, "--vocab-size", "4096", "--out", str(tok)]
    if cli([*argv, "--force"]) != 0:
        raise SystemExit("tokenizer training failed")
    budget = 60.0 if quick else 600.0
    from scratchllm.data.corpus import read_text_file
    from scratchllm.tokenizers import load_tokenizer

    val_tokens = len(load_tokenizer(str(tok)).encode(read_text_file(held, strip_gutenberg=True)))
    common = dict(
        data=train,
        val_data=[str(held)],
        tokenizer=str(tok),
        strip_gutenberg=True,
        time_budget=budget,
        val_tokens=val_tokens,
    )
    print(f"gutenberg (a) classic at {budget:.0f}s", flush=True)
    classic = _run(
        "gutenberg-classic", work, model=_classic_model(work), eval_every=250, **CLASSIC, **common
    )
    print(f"gutenberg (b) speedrun at {budget:.0f}s", flush=True)
    speed = _run("gutenberg-speedrun", work, recipe="speedrun", **common)
    gain = classic["final_bpb"] - speed["final_bpb"]
    return {
        "held_out": held.name,
        "budget_s": budget,
        "classic": classic,
        "speedrun": speed,
        "bpb_gain": gain,
        "targets": {"gain_at_least_0.2": gain >= 0.2},
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("shakespeare", "gutenberg") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        keys = (("classic", "(a) classic"), ("speedrun", "(b) speedrun"))
        keys += (("speedrun_third", "(b) speedrun, a third of the budget"),)
        for key, label in keys:
            if key not in result[part]:
                continue
            t, b = zip(*result[part][key]["curve"], strict=True)
            ax.plot(t, b, marker=".", label=label)
        ax.set(title=part, xlabel="training seconds", ylabel="validation bits per byte")
        ax.set_ylim(top=min(8.5, max(b for _, b in result[part]["classic"]["curve"][1:]) + 0.5))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"scratchllm speedrun vs classic, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(result: dict[str, Any]) -> str:
    lines = []
    if "shakespeare" in result:
        s = result["shakespeare"]
        lines.append("| Tiny Shakespeare | val bpb | training s | steps |")
        lines.append("|---|---|---|---|")
        for row in (s["classic"], s["speedrun"], s["speedrun_third"]):
            lines.append(
                f"| {row['name']} | {row['final_bpb']:.3f} | {row['train_s']:.0f} "
                f"| {row['steps']} |"
            )
        for row in s["ablations"]:
            lines.append(
                f"| {row['what']} | {row['final_bpb']:.3f} ({row['bpb_cost']:+.3f}: "
                f"{row['verdict']}) "
                f"| {row['train_s']:.0f} | {row['steps']} |"
            )
        reach = s["speedrun_reaches_classic_s"]
        lines.append(
            f"speedrun reaches classic's {s['classic']['final_bpb']:.3f} bpb at "
            + (f"{reach:.0f}s ({s['speedrun_reaches_classic_fraction']:.0%})" if reach else "never")
            + f"; with a third of the budget it ends at {s['speedrun_third_budget_bpb']:.3f}"
            + f"; at classic's {s['classic']['train_s']:.0f}s it is "
            f"{s['bpb_gain_at_classic_time']:+.3f} bpb better; targets {s['targets']}"
        )
    if "gutenberg" in result:
        g = result["gutenberg"]
        lines.append(
            f"Gutenberg at {g['budget_s']:.0f}s: classic {g['classic']['final_bpb']:.3f}, "
            f"speedrun {g['speedrun']['final_bpb']:.3f} bpb ({g['bpb_gain']:+.3f}); "
            f"targets {g['targets']}"
        )
    return "\n".join(lines)


def _cpu() -> dict[str, Any]:
    from scratchllm.train.throughput import cpu_has_native_bf16

    flags: set[str] = set()
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "model": model,
        "features": sorted(f for f in wanted if f in flags),
        "native_bf16": cpu_has_native_bf16(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("shakespeare", "gutenberg", "all"), default="all")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short budgets, for development")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue: 2)")
    parser.add_argument("--work", default=None, help="run folders (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON path (default results/speedrun.json)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the parts not run this time from the JSON already at --out (each part records "
        "its own date and machine)",
    )
    args = parser.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"threads": args.threads, "quick": args.quick, "cpu": _cpu()}
        out = Path(args.out) if args.out else RESULTS / "speedrun.json"
        if args.update and out.exists():
            kept = json.loads(out.read_text())
            result.update({p: kept[p] for p in ("shakespeare", "gutenberg") if p in kept})
        stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": result["cpu"]}
        if args.part in ("shakespeare", "all"):
            part = shakespeare(work, args.quick, not args.skip_ablations)
            result["shakespeare"] = {**part, **stamp}
        if args.part in ("gutenberg", "all"):
            result["gutenberg"] = {**gutenberg(work, args.quick), **stamp}
    png = out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    _plot(result, png)
    result["table"] = _table(result)
    result["plot"] = str(png)
    path = write_result("speedrun", result, out)
    print(result["table"])
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
