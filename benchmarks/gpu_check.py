"""GPU check for the training loop: NCCL, bf16, flash SDPA, fused AdamW, torch.compile.

Run on a machine with one CUDA GPU (no data files needed: tokens are random):

    python benchmarks/gpu_check.py [--quick] [--out results.json]

It writes JSON (benchmarks/common.write_result) with
  * nccl: a 1-rank NCCL process group (scratchllm.train.distributed), an all-reduce and a DDP
    step, then `torchrun --nproc_per_node=1 -m scratchllm pretrain --dtype bfloat16` end to end,
    the same run stopped by SIGTERM and resumed, compared with an uninterrupted one;
  * gpt2-small bf16 training through scratchllm's Trainer (autocast bf16, fused AdamW, SDPA
    forced onto the flash kernel) vs transformers' GPT2LMHeadModel with AdamW on the same
    batch: tokens/s, MFU against a bf16 matmul peak measured in this process; eager and
    torch.compile; the output head at vocab 50257 vs 50304 (a multiple of 64).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_check() -> dict:
    import torch.distributed as dist

    from scratchllm.train import distributed as D

    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )  # fmt: skip
    try:
        info = D.init_distributed(torch.device("cuda"))
        # WORLD_SIZE=1 means "no group" for the trainer; join one explicitly for the check.
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        t = torch.arange(4.0, device="cuda")
        dist.all_reduce(t)
        model = torch.nn.Linear(8, 8).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        ddp(torch.randn(2, 8, device="cuda")).sum().backward()
        ok = bool(torch.equal(t.cpu(), torch.arange(4.0))) and model.weight.grad is not None
        return {"backend": dist.get_backend(), "all_reduce_ok": ok, "rank_info": str(info)}
    except Exception as exc:  # noqa: BLE001 - report it in the JSON
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)


def torchrun_check(tmp: Path) -> dict:
    """The CLI under torchrun on one GPU (NCCL, DDP, bf16): a full run, and the same run
    stopped by SIGTERM (sent to torchrun, which forwards it) and then resumed."""
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "a",
        "is",
        "that",
        "for",
        "it",
        "as",
        "was",
        "with",
        "be",
        "by",
        "on",
        "not",
        "he",
        "this",
        "are",
    ]
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text(" ".join(rng.choice(words, 60_000)))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))

    def cmd(out: str, *extra: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
            f"--master_port={_free_port()}", "-m", "scratchllm", "pretrain",
            "--data", str(tmp / "corpus.txt"), "--model", "gpt-nano", "--tokenizer", "bytes",
            "--out", str(tmp / out), "--max-steps", "30", "--batch-size", "16",
            "--eval-every", "10", "--eval-batches", "2", "--log-every", "1", "--save-every", "1",
            "--sample-tokens", "8", "--dtype", "bfloat16", "--device", "cuda", *extra,
        ]  # fmt: skip

    def step(out: str) -> int:
        try:
            return json.loads((tmp / out / "checkpoint" / "checkpoint.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return -1

    full = subprocess.run(cmd("full"), env=env, capture_output=True, text=True, timeout=300)
    slow = dict(env, SCRATCHLLM_TEST_CHECKPOINT_DELAY="0.3")
    proc = subprocess.Popen(cmd("cut"), env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while step("cut") < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, cut_err = proc.communicate(timeout=120)
    stopped_at = step("cut")
    resumed = subprocess.run(
        cmd("cut", "--resume"), env=env, capture_output=True, text=True, timeout=300
    )

    def losses(out: str) -> list[float]:
        path = tmp / out / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x)["loss"] for x in path.open() if '"train"' in x]

    a, b = losses("full"), losses("cut")
    result = {
        "returncodes": {
            "full": full.returncode,
            "sigterm": proc.returncode,
            "resume": resumed.returncode,
        },  # fmt: skip
        "stopped_at_step": stopped_at,
        "sigterm_stderr_tail": cut_err.decode(errors="replace")[-600:],
        "stderr_tail": (full.stderr + resumed.stderr)[-1500:],
        "steps_logged": [len(a), len(b)],
        "max_abs_loss_diff_vs_uninterrupted": max(
            (abs(x - y) for x, y in zip(a, b, strict=False)), default=None
        ),
    }
    if full.returncode == 0 and resumed.returncode == 0:
        from scratchllm.checkpoint import load_state_dict

        wa = load_state_dict(tmp / "full" / "checkpoint")
        wb = load_state_dict(tmp / "cut" / "checkpoint")
        result["max_abs_weight_diff_vs_uninterrupted"] = max(
            float((wa[k].float() - wb[k].float()).abs().max()) for k in wa
        )
    return result


def head_padding(batch: int, ctx: int) -> dict:
    import torch.nn.functional as F

    n, d = batch * ctx, 768
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 50257, (n,), device="cuda")
    out = {}
    for vocab in (50257, 50304):
        w = torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for i in range(13):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            F.cross_entropy((h @ w.t())[:, :50257].float(), y).backward()
        torch.cuda.synchronize()
        out[f"vocab_{vocab}_ms"] = (time.perf_counter() - start) / 10 * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        path = write_result("gpu_check", {"skipped": "no CUDA device"}, args.out)
        print(f"no CUDA device; wrote {path}")
        return

    import train_throughput as T
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchllm.tokenizers import ByteTokenizer
    from scratchllm.train.throughput import measure_peak_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    payload: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    payload["nccl"] = nccl_check()
    print("nccl:", payload["nccl"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        payload["torchrun"] = torchrun_check(Path(tmp))
    print("torchrun:", {k: v for k, v in payload["torchrun"].items() if "loss" not in k})
    peak = measure_peak_flops("cuda", torch.bfloat16, 8192, seconds=1.0)
    payload["peak_bf16_flops"] = peak
    shape = dict(emb_dim=768, n_heads=12, n_layers=12, context_length=args.context,
                 batch=args.batch)  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, 50257, 4_000_000).astype(np.uint16)
    tok = ByteTokenizer()
    warmup, steps = (3, 5) if args.quick else (5, 20)
    runs: dict = {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails loudly if flash cannot run
        runs["scratchllm_eager"] = T.scratch_run(shape, tokens, tok, "bfloat16", warmup, steps)
        runs["scratchllm_eager_unpadded_vocab"] = T.scratch_run(
            shape, tokens, tok, "bfloat16", warmup, steps, vocab_multiple=1
        )
        try:
            runs["scratchllm_compiled"] = T.scratch_run(
                shape, tokens, tok, "bfloat16", warmup + 3, steps, compile=True
            )
        except Exception as exc:  # noqa: BLE001
            runs["scratchllm_compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    runs["transformers"] = T.hf_run(shape, tokens, "bfloat16", warmup, steps)
    fpt = runs["scratchllm_eager"]["flops_per_token"]
    summary = {}
    for name, r in runs.items():
        if "tokens_per_s" in r:
            r.pop("losses", None)
            summary[name] = {
                "tokens_per_s": r["tokens_per_s"],
                "mfu_vs_measured_bf16_peak": r["tokens_per_s"] * fpt / peak,
                "mfu_vs_989_tflops": r["tokens_per_s"] * fpt / 989e12,
            }
    base = runs["transformers"]["tokens_per_s"]
    for name in summary:
        summary[name]["vs_transformers"] = summary[name]["tokens_per_s"] / base
    payload.update(
        shape=shape, runs=runs, summary=summary, head_padding=head_padding(8, args.context)
    )
    payload["seconds"] = time.perf_counter() - started
    path = write_result("gpu_check", payload, args.out)
    print(json.dumps(summary, indent=2))
    print("head padding:", payload["head_padding"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
