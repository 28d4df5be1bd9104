"""CUDA checks of the core, for a lent GPU: SDPA flash vs the explicit path in bf16, a bf16
pretraining run through the CLI code path, and generation on the GPU. Writes JSON.

    python benchmarks/gpu_core_check.py [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchllm import GPTModel, ModelConfig
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.inference.generate import generate_text
    from scratchllm.train.pretrain import PretrainOptions, pretrain
    from scratchllm.train.trainer import TrainerCallback

    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    result: dict = {"device": torch.cuda.get_device_name(0)}

    # 1. Flash SDPA in bf16 against the explicit masked softmax in fp32.
    torch.manual_seed(0)
    config = ModelConfig.from_preset("gpt2-small", drop_rate=0.0)
    model = GPTModel(config).to(dev).eval()
    idx = torch.randint(0, config.vocab_size, (4, 1024), device=dev)
    with torch.no_grad():
        model.set_attention_impl("explicit")
        ref = model(idx).float()
        model.set_attention_impl("sdpa")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", torch.bfloat16):
            flash = model(idx).float()
    rel = float((flash - ref).norm() / ref.norm())
    result["flash_vs_explicit_rel_error_bf16"] = rel

    # 2. Training step throughput in bf16 autocast with flash attention.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, config.vocab_size, (8, 1024), device=dev)
    times = []
    for i in range(8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    tokens_per_s = x.numel() / step
    result["gpt2_small_bf16_train_tokens_per_s"] = round(tokens_per_s)
    result["gpt2_small_bf16_model_tflops"] = round(model.flops_per_token() * tokens_per_s / 1e12, 1)
    del model, opt

    # 3. The CLI's pretrain path on CUDA with bf16, then generation from the checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        opts = PretrainOptions(
            data=["builtin:python-docs"],
            model="gpt-micro",
            tokenizer="bytes",
            out=tmp,
            max_steps=args.steps,
            batch_size=32,
            context_length=256,
            lr=1e-3,
            dtype="bfloat16",
            device="cuda",
            eval_every=100,
            eval_batches=10,
            sample_tokens=30,
            sampling="random",
        )
        t = time.perf_counter()
        run = pretrain(opts, callback=TrainerCallback())
        result["pretrain_seconds"] = round(time.perf_counter() - t, 1)
        result["pretrain_val_loss"] = [
            round(run["first_eval"]["val_loss"], 3),
            round(run["last_eval"]["val_loss"], 3),
        ]
        ckpt = load_checkpoint(tmp, device="cuda")
        sample = generate_text(
            ckpt.model, ckpt.tokenizer, "The object", 60, temperature=0.8, top_k=40, seed=1
        )
        again = generate_text(
            ckpt.model, ckpt.tokenizer, "The object", 60, temperature=0.8, top_k=40, seed=1
        )
        result["cuda_sample"] = sample
        result["cuda_sample_reproducible"] = sample == again
    path = write_result("gpu_core_check", result, args.out)
    for key, value in result.items():
        print(f"{key}: {value}")
    print(path)


if __name__ == "__main__":
    main()
