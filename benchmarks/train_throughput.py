"""Training throughput: scratchllm's Trainer vs transformers' GPT2LMHeadModel, same batch.

For each model shape and precision (fp32, bf16 autocast) it trains both implementations with
AdamW on the same token batches (Tiny Shakespeare, GPT-2 BPE) and reports tokens/s, the ratio,
and MFU = model FLOPs/token x tokens/s / a matmul peak measured in this same process. It also
measures the choices the trainer makes (AdamW kernel, SDPA vs explicit attention, torch.compile,
a vocabulary padded to a multiple of 64) and checks that gpt2-medium at batch 4 x 1024 trains
within 24 GiB with activation checkpointing (peak RSS of a child process).

    flock /tmp/scratchllm-bench.lock .venv/bin/python benchmarks/train_throughput.py [--quick]

scratchllm is timed through the real `Trainer.fit` loop (its own tokens/s records, evaluation
and saving excluded); transformers through a plain loop doing the same work (autocast forward,
cross-entropy, backward, clip at 1.0, AdamW step). Both models are GPT-2 with tied embeddings,
dropout 0 and SDPA attention.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_dir, write_result  # noqa: E402

SHAPES = {
    # (a) the small config, GPT-2 vocabulary; (b) gpt2-small at batch 4 x 256.
    "6L-6H-384-ctx256-b8": dict(emb_dim=384, n_heads=6, n_layers=6, context_length=256, batch=8),
    "gpt2-small-b4x256": dict(emb_dim=768, n_heads=12, n_layers=12, context_length=256, batch=4),
}


def gpt2_tokens() -> np.ndarray:
    from scratchllm.tokenizers import load_tokenizer

    tok = load_tokenizer(f"gpt2:{data_dir() / 'gpt2'}")
    text = (data_dir() / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return np.array(tok.encode_ordinary(text[:300_000]), dtype=np.uint16), tok


def model_config(shape: dict, vocab: int = 50257):
    from scratchllm.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab,
        context_length=shape["context_length"],
        emb_dim=shape["emb_dim"],
        n_heads=shape["n_heads"],
        n_layers=shape["n_layers"],
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings=True,
        name="bench",
    )


def scratch_run(shape, tokens, tok, dtype, warmup, steps, **train_kw) -> dict:
    """Train through the real Trainer; tokens/s of the steps after `warmup`."""
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train.settings import TrainConfig
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import Trainer

    attention = train_kw.pop("attention", "sdpa")
    torch.manual_seed(0)
    model = GPTModel(model_config(shape))
    model.set_attention_impl(attention)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = LMTask(
        tokens, None, tok, shape["batch"], shape["context_length"], device, sample_prompt="a"
    )
    config = TrainConfig(
        max_steps=warmup + steps,
        warmup_steps=0,
        eval_every=10_000,
        eval_batches=1,
        log_every=1,
        sample_tokens=0,
        keep_last=0,
        dtype=dtype,
        device=device,
        **train_kw,
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, task, config, out, tok)
        started = time.perf_counter()
        trainer.fit()
        total = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    timed = train[warmup:]
    rate = statistics.median(r["tokens_per_s"] for r in timed)
    first = train[0]["tokens"] / train[0]["tokens_per_s"]
    return {
        "tokens_per_s": rate,
        "step_s": shape["batch"] * shape["context_length"] / rate,
        "first_step_s": first,
        "trainer_mfu": statistics.median(r.get("mfu", float("nan")) for r in timed),
        "trainer_peak_flops": trainer.peak_flops,
        "flops_per_token": model.flops_per_token(),
        "losses": [r["loss"] for r in train],
        "wall_s": total,
        "steps_timed": len(timed),
    }


def hf_run(shape, tokens, dtype, warmup, steps, optimizer_impl="auto") -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchllm.data.loader import BatchLoader
    from scratchllm.train.optim import build_optimizer
    from scratchllm.train.settings import TrainConfig

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=shape["context_length"],
        n_embd=shape["emb_dim"],
        n_layer=shape["n_layers"],
        n_head=shape["n_heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)  # transformers' default attention here is SDPA (recorded)
    model.train()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    opt = build_optimizer(model, TrainConfig(optimizer_impl=optimizer_impl), device)
    loader = BatchLoader(tokens, shape["batch"], shape["context_length"], seed=0)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    )
    times, losses = [], []
    for _ in range(warmup + steps):
        x, y = (t.to(device) for t in loader.next_batch())
        start = time.perf_counter()
        with autocast:
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:])
    return {
        "tokens_per_s": shape["batch"] * shape["context_length"] / step_s,
        "step_s": step_s,
        "first_step_s": times[0],
        "losses": losses,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def adamw_kernels(shape, reps: int) -> dict:
    """Optimizer step alone on this model's parameters (random gradients): fused vs foreach."""
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train.optim import build_optimizer
    from scratchllm.train.settings import TrainConfig

    model = GPTModel(model_config(shape))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for impl in ("foreach", "fused"):
        opt = build_optimizer(model, TrainConfig(optimizer_impl=impl), torch.device("cpu"))
        opt.step()  # allocates the state
        start = time.perf_counter()
        for _ in range(reps):
            opt.step()
        out[f"{impl}_ms"] = (time.perf_counter() - start) / reps * 1e3
    return out


def vocab_padding(shape, reps: int) -> dict:
    """Output head + cross-entropy forward/backward at 50257 vs 50304 (= 64 x 786) rows."""
    n = shape["batch"] * shape["context_length"]
    h = torch.randn(n, shape["emb_dim"], requires_grad=True)
    y = torch.randint(0, 50257, (n,))
    out = {}
    for vocab in (50257, 50304):
        w = (torch.randn(vocab, shape["emb_dim"]) * 0.02).requires_grad_()
        for i in range(reps + 1):
            if i == 1:
                start = time.perf_counter()
            logits = h @ w.t()
            F.cross_entropy(logits[:, :50257], y).backward()
        out[f"vocab_{vocab}_ms"] = (time.perf_counter() - start) / reps * 1e3
    return out


def medium_child(steps: int) -> None:
    """gpt2-medium, batch 4 x 1024, activation checkpointing, fp32: print peak RSS as JSON."""
    from scratchllm.config import ModelConfig
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train.optim import build_optimizer
    from scratchllm.train.parallelize import checkpoint_blocks
    from scratchllm.train.settings import TrainConfig

    torch.manual_seed(0)
    config = ModelConfig.from_preset("gpt2-medium", drop_rate=0.0)
    model = GPTModel(config)
    checkpoint_blocks(model)
    model.train()
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    tokens = torch.randint(0, config.vocab_size, (4, 1025))
    x, y = tokens[:, :-1], tokens[:, 1:]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "steps": steps,
                "step_s": times,
                "loss": float(loss),
                "peak_rss_gib": rss,
                "parameters": model.num_parameters(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 1 timed step; no compile")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/train_throughput.json)")
    ap.add_argument("--max-step-seconds", type=float, default=150.0, help="skip slower cases")
    ap.add_argument("--medium-steps", type=int, default=1, help="gpt2-medium steps (0: skip)")
    ap.add_argument("--medium-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.medium_child:
        medium_child(args.medium_child)
        return

    from scratchllm.train.throughput import cpu_has_native_bf16, measure_peak_flops

    started = time.perf_counter()
    warmup, steps = (1, 1) if args.quick else (1, 2)
    peaks = {
        "fp32_1024": measure_peak_flops("cpu", torch.float32, 1024, seconds=1.0),
        "fp32_2048": measure_peak_flops("cpu", torch.float32, 2048, seconds=2.0),
        "bf16": measure_peak_flops("cpu", torch.bfloat16, 1024, seconds=1.0),
    }
    peak = {"float32": max(peaks["fp32_1024"], peaks["fp32_2048"]), "bfloat16": peaks["bf16"]}
    tokens, tok = gpt2_tokens()
    results: dict = {}
    notes: list[str] = []
    payload = {
        "quick": args.quick,
        "conditions": "2-core shared CPU; other engineers' work may have run concurrently",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "peak_flops": peaks,
        "results": results,
        "notes": notes,
    }

    def save(**more) -> Path:  # after every section: a late failure keeps what was measured
        payload.update(more, seconds=time.perf_counter() - started)
        return write_result("train_throughput", payload, args.out)

    bf16_ratio = None
    for name, shape in SHAPES.items():
        results[name] = {}
        for dtype in ("float32", "bfloat16"):
            est = None
            if dtype == "bfloat16" and bf16_ratio is not None:
                est = results[name]["float32"]["scratchllm"]["step_s"] * bf16_ratio
                if est > args.max_step_seconds:
                    results[name][dtype] = {"skipped": f"estimated {est:.0f}s per step"}
                    notes.append(
                        f"{name} {dtype}: skipped, estimated {est:.0f} s/step (bf16 is "
                        "emulated on this CPU)"
                    )
                    continue
            w = warmup if dtype == "float32" else 0  # a bf16 step is long: overheads vanish
            n = steps if dtype == "float32" else 1
            ours = scratch_run(shape, tokens, tok, dtype, w, n)
            theirs = hf_run(shape, tokens, dtype, w, n)
            fpt = ours["flops_per_token"]
            entry = {
                "scratchllm": ours,
                "transformers": theirs,
                "speedup_vs_transformers": ours["tokens_per_s"] / theirs["tokens_per_s"],
                "mfu_vs_dtype_peak": ours["tokens_per_s"] * fpt / peak[dtype],
                "mfu_vs_fp32_peak": ours["tokens_per_s"] * fpt / peak["float32"],
                "transformers_mfu_vs_dtype_peak": theirs["tokens_per_s"] * fpt / peak[dtype],
                "loss_first_step_diff": abs(ours["losses"][0] - theirs["losses"][0]),
                "warmup_steps": w,
                "timed_steps": n,
            }
            results[name][dtype] = entry
            if dtype == "bfloat16" and bf16_ratio is None:
                bf16_ratio = ours["step_s"] / results[name]["float32"]["scratchllm"]["step_s"]
            print(
                f"{name} {dtype}: scratchllm {ours['tokens_per_s']:.0f} tok/s, transformers "
                f"{theirs['tokens_per_s']:.0f} tok/s, x{entry['speedup_vs_transformers']:.2f}, "
                f"MFU {entry['mfu_vs_dtype_peak']:.2f}",
                flush=True,
            )
            save()

    # The trainer's choices, measured on shape (a) in fp32 (and gpt2-small for the kernels).
    a = SHAPES["6L-6H-384-ctx256-b8"]
    choices: dict = {
        "adamw_gpt2_small": adamw_kernels(SHAPES["gpt2-small-b4x256"], 3 if args.quick else 5),
        "vocab_padding_a": vocab_padding(a, 2 if args.quick else 4),
    }
    explicit = scratch_run(a, tokens, tok, "float32", warmup, steps, attention="explicit")
    choices["attention_a_fp32"] = {
        "sdpa_tokens_per_s": results["6L-6H-384-ctx256-b8"]["float32"]["scratchllm"][
            "tokens_per_s"
        ],
        "explicit_tokens_per_s": explicit["tokens_per_s"],
    }
    foreach = scratch_run(a, tokens, tok, "float32", warmup, steps, optimizer_impl="foreach")
    choices["adamw_in_loop_a_fp32"] = {
        "fused_tokens_per_s": choices["attention_a_fp32"]["sdpa_tokens_per_s"],
        "foreach_tokens_per_s": foreach["tokens_per_s"],
    }
    if not args.quick:
        try:
            compiled = scratch_run(a, tokens, tok, "float32", 2, steps, compile=True)
            choices["compile_a_fp32"] = {
                "eager_tokens_per_s": choices["attention_a_fp32"]["sdpa_tokens_per_s"],
                "compiled_tokens_per_s": compiled["tokens_per_s"],
                "first_step_s_incl_compile": compiled["first_step_s"],
            }
        except Exception as exc:  # noqa: BLE001 - report, don't die: compile needs a toolchain
            choices["compile_a_fp32"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("choices:", json.dumps(choices), flush=True)
    save(choices=choices)

    medium = None
    if args.medium_steps > 0:
        done = subprocess.run(
            [sys.executable, __file__, "--medium-child", str(args.medium_steps)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        try:
            medium = json.loads(done.stdout.strip().splitlines()[-1])
            medium["within_24_gib"] = medium["peak_rss_gib"] <= 24
        except (IndexError, ValueError):
            medium = {"error": done.stderr[-1000:]}
        print("gpt2-medium 4x1024 + activation checkpointing:", medium, flush=True)

    path = save(gpt2_medium_activation_checkpointing=medium)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
