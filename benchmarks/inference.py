"""Decode speed: scratchllm's engine vs transformers' `generate` and llama.cpp, on the same weights.

Random gpt2-small-shaped weights are saved as a scratchllm checkpoint, exported to a Hugging Face
folder with `scratchllm.hub.export_hf` and loaded by both libraries (their logits are checked to
agree first). For batch 1 and 8, fp32 and bf16, it measures decode tokens/s (prefill excluded:
the time for 1 + N new tokens minus the time for 1), greedy, no early stop:

- scratchllm `Engine.generate` (preallocated per-row KV cache), loaded as `serve` loads it: on
  the CPU in fp32 its linears are packed in both layouts (one row, i.e. batch 1: the split GEMV
  that `chat` and `generate` use alone; several rows: oneDNN). The fp32 rows also time the
  engine with plain `nn.Linear`s (`--no-pack`) and with the oneDNN layout alone (`--pack
  onednn`) and with `GPTModel.forward` as its decode step instead of `DecodeStep`
  (`decode_step=False`), and compare the packed and plain engines' greedy tokens,
- scratchllm `generate()` without the KV cache (the book's loop, recomputing the prefix),
- transformers `GPT2LMHeadModel.generate(use_cache=True)`.

It also estimates the memory-bandwidth floor of a decode step: the bytes of weights every step
must read (plus the KV cache), divided by a measured copy bandwidth (bytes read + written by a
large copy; the better of a copy timed before and one after the decode timings; the floors
printed during the run use the first). A decode step only reads its weights, and on the CPU a
read-only stream (a large `sum`) is faster than a copy, so each row also gives the stricter
floor at that read bandwidth (`read_bandwidth_floor`).

`quantized_results` adds the engine with fp16 weights (`--quantize fp16`, fp32 activations) and
with weight-only int8 linears (`--quantize int8`, each activation dtype): decode tokens/s, its own
bandwidth floor (the smaller weights + scales + KV cache), the speedup over transformers fp32 at
the same batch, and the fraction of greedy tokens identical to the fp32 engine's on the
benchmark prompts (bf16's agreement is given for scale: random weights have near-ties).

`llama_cpp` (when llama-cpp-python imports; `make interop` builds it) adds llama.cpp on the same
weights: the checkpoint exported as f32, f16 and q8_0 GGUF and decoded by llama.cpp's batch API
with every core, at each batch (8: one sequence id per prompt), in a process of its own
(`llama_cpp_bench.py`), with its bandwidth floor (the file's own weight bytes, f16 KV cache),
its greedy agreement with the fp32 engine. The ratios scratchllm/llama.cpp at the same weight
precision (fp32/f32, fp16/f16, int8/q8_0) are timed again in alternation (`interleaved_ratios`:
`--repeats` rounds, each one run of ours and one of llama.cpp per pair, the ratio the median
of the rounds' ratios), so that the machine's drift over the run (10% within an hour, seen
here) falls on both sides; `ratios_sequential` keeps the ratios of the rows timed one engine
after the other. Each cell is timed `--repeats` times (default 5) after a warm-up. `--quick`
is a smoke test (gpt-nano, a scratch output file). The real run wants a quiet machine —
llama.cpp's spinning thread pool loses several-fold to any other load — under the bench lock:

    flock /tmp/scratchllm-bench.lock .venv/bin/python benchmarks/inference.py
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, write_result  # noqa: E402

from scratchllm.inference import kernels as decode_kernels  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_seconds(fn, device: str, repeats: int) -> float:
    """Best wall time of `fn` after one warm-up call, waiting for the device each time."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: str = "cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once)."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), device, repeats)


def read_bandwidth(device: str = "cpu", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large tensor sum (each byte read once): what a decode step's matmuls do."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    return src.numel() * 4 / best_seconds(src.sum, device, repeats)


def bandwidth_floor(
    config, args, batch: int, weight_bytes: int, elem: int, bandwidth: float
) -> dict[str, float]:
    """The fastest a decode step can be: it reads every matmul weight once (`weight_bytes`) plus
    this batch's KV cache (`elem` bytes per value, at the mean decode length)."""
    kv_len = args.prompt_len + args.new_tokens // 2
    kv = 2 * config.n_layers * batch * kv_len * config.emb_dim * elem
    return floor_for(weight_bytes + kv, batch, bandwidth)


def floor_for(step_bytes: int, batch: int, bandwidth: float) -> dict[str, float]:
    floor_s = step_bytes / bandwidth
    return {
        "bytes_per_step": step_bytes,
        "ms_per_step": round(floor_s * 1e3, 3),
        "max_tokens_per_s": round(batch / floor_s, 2),
    }


def refloor(row: dict, bandwidth: float, read: float) -> None:
    """Recompute `row`'s floors and its decoder's share of them for the run's final bandwidths."""
    rate = (row.get("scratchllm_engine") or row["llama_cpp"])["tokens_per_s"]
    for key, bw in (("bandwidth_floor", bandwidth), ("read_bandwidth_floor", read)):
        row[key] = floor_for(row["bandwidth_floor"]["bytes_per_step"], row["batch"], bw)
        row[f"fraction_of_{key}"] = round(rate / row[key]["max_tokens_per_s"], 3)


def timed(fn, repeats: int) -> list[float]:
    """Wall times of `repeats` calls of `fn` after one warm-up call (each decoder syncs: it
    reads its tokens back every step)."""
    fn()  # warm up: allocations, kernels, lazy tables
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens/s of decoding alone: (time for 1 + N tokens − time for 1 token), from the best
    times (`tokens_per_s`) and from the median ones (`median_tokens_per_s`: what the
    scratchllm/llama.cpp ratios use, as a spinning thread pool's best run flatters it)."""
    t1 = timed(lambda: run(1), repeats)
    tn = timed(lambda: run(1 + new_tokens), repeats)
    return rate_from_times(t1, tn, batch, new_tokens)


def rate_from_times(
    t1: list[float], tn: list[float], batch: int, new_tokens: int
) -> dict[str, float]:
    """`decode_rate`'s numbers from the times of 1 token and of 1 + `new_tokens` tokens."""
    step = (min(tn) - min(t1)) / new_tokens
    median_step = (statistics.median(tn) - statistics.median(t1)) / new_tokens
    return {
        "tokens_per_s": round(batch / step, 2),
        "median_tokens_per_s": round(batch / median_step, 2),
        "ms_per_step": round(step * 1e3, 3),
        "prefill_ms": round(min(t1) * 1e3, 2),
    }


def measure(ours, theirs, engine, x: torch.Tensor, args, bandwidth: float, variants=None) -> dict:
    """One (dtype, batch) cell: the three decoders, the bandwidth floor and the engine `variants`
    ({name: Engine}: fp32 CPU with plain `nn.Linear`s, with the oneDNN layout alone)."""
    from scratchllm.inference.engine import SamplingParams
    from scratchllm.inference.generate import generate

    config = ours.config
    batch = x.shape[0]
    rows = x.tolist()
    elem = next(ours.parameters()).element_size()

    def run_engine(n: int) -> None:
        engine.generate(rows, SamplingParams(max_tokens=n, stop_ids=()))

    def run_hf(n: int) -> None:
        with torch.inference_mode():
            theirs.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            ).cpu()  # wait for the GPU

    def run_nocache(n: int) -> None:
        with torch.inference_mode():
            generate(ours, x, n, use_cache=False).cpu()

    row = {
        "batch": batch,
        "bandwidth_floor": bandwidth_floor(
            config, args, batch, config.matmul_parameters() * elem, elem, bandwidth
        ),
        "scratchllm_engine": decode_rate(run_engine, batch, args.new_tokens, args.repeats),
        "transformers_generate": decode_rate(run_hf, batch, args.new_tokens, args.repeats),
        "scratchllm_no_kv_cache": decode_rate(run_nocache, batch, max(4, args.new_tokens // 4), 1),
    }
    for name, variant in (variants or {}).items():

        def run_variant(n: int, variant=variant) -> None:
            variant.generate(rows, SamplingParams(max_tokens=n, stop_ids=()))

        row[f"scratchllm_engine_{name}"] = decode_rate(
            run_variant, batch, args.new_tokens, args.repeats
        )
    ours_rate = row["scratchllm_engine"]["tokens_per_s"]
    row["speedup_vs_transformers"] = round(
        ours_rate / row["transformers_generate"]["tokens_per_s"], 3
    )
    row["speedup_vs_no_cache"] = round(ours_rate / row["scratchllm_no_kv_cache"]["tokens_per_s"], 3)
    row["fraction_of_bandwidth_floor"] = round(
        ours_rate / row["bandwidth_floor"]["max_tokens_per_s"], 3
    )
    return row


def greedy_tokens(engine, rows: list[list[int]], n: int) -> list[list[int]]:
    from scratchllm.inference.engine import SamplingParams

    return [
        c[0].token_ids for c in engine.generate(rows, SamplingParams(max_tokens=n, stop_ids=()))
    ]


def agreement(ref: list[list[int]], out: list[list[int]]) -> dict[str, float]:
    """Fraction of positions with the same greedy token, and of prompts identical throughout."""
    same = sum(a == b for r, o in zip(ref, out, strict=True) for a, b in zip(r, o, strict=True))
    total = sum(len(r) for r in ref)
    first = [  # tokens before the first difference, per prompt
        next((i for i, (a, b) in enumerate(zip(r, o, strict=True)) if a != b), len(r))
        for r, o in zip(ref, out, strict=True)
    ]
    return {
        "tokens_identical": round(same / total, 4),
        "prompts_identical": round(
            sum(r == o for r, o in zip(ref, out, strict=True)) / len(ref), 4
        ),
        "median_identical_prefix": statistics.median(first),
    }


def teacher_forced_agreement(model, rows: list[list[int]], ref: list[list[int]]) -> float:
    """Fraction of positions where `model`'s top token, given the reference's own context (the
    prompt plus the reference greedy tokens so far), is the reference token: no cascade after a
    first difference."""
    device = next(model.parameters()).device
    seqs = torch.tensor([r + t for r, t in zip(rows, ref, strict=True)], device=device)
    with torch.inference_mode():
        logits = model(seqs[:, :-1])
    n = len(ref[0])
    top = logits[:, -n:].argmax(-1).cpu()
    return round(float((top == torch.tensor(ref)).float().mean()), 4)


def measure_quantized(ours, engine, x: torch.Tensor, args, bandwidth: float) -> dict:
    """One fp16/int8-weights cell: the engine's decode rate and its bandwidth floor."""
    from scratchllm.inference.engine import SamplingParams
    from scratchllm.inference.weights import linear_weight_bytes

    config = ours.config
    batch = x.shape[0]
    rows = x.tolist()
    elem = next(ours.parameters()).element_size()  # the KV cache keeps the activation dtype

    def run_engine(n: int) -> None:
        engine.generate(rows, SamplingParams(max_tokens=n, stop_ids=()))

    row = {
        "batch": batch,
        "bandwidth_floor": bandwidth_floor(
            config, args, batch, linear_weight_bytes(ours), elem, bandwidth
        ),
        "scratchllm_engine": decode_rate(run_engine, batch, args.new_tokens, args.repeats),
    }
    row["fraction_of_bandwidth_floor"] = round(
        row["scratchllm_engine"]["tokens_per_s"] / row["bandwidth_floor"]["max_tokens_per_s"], 3
    )
    return row


def trained_agreement(checkpoint: str, args) -> dict:
    """Greedy agreement of the fp16- and int8-weight engines with the fp32 engine on a trained
    checkpoint, prompted with The Verdict: on the benchmark's random weights near-ties make the
    agreement a measure of rounding, not of what a user would see."""
    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.inference.engine import Engine
    from scratchllm.inference.weights import quantize_int8

    ref = load_checkpoint(checkpoint, "cpu", torch.float32, pack=True)
    tok, n_prompts = ref.tokenizer, 16
    ids = tok.encode_ordinary((data_dir() / "corpora" / "the-verdict.txt").read_text("utf-8"))
    stride = max(1, (len(ids) - args.prompt_len) // n_prompts)
    rows = [ids[i * stride : i * stride + args.prompt_len] for i in range(n_prompts)]
    want = greedy_tokens(Engine(ref.model.eval(), tok, max_batch=n_prompts), rows, args.new_tokens)
    out: dict = {"checkpoint": str(checkpoint), "prompts": n_prompts, "text": "the-verdict.txt"}
    for fmt in ("fp16", "int8", "int8_weight_only"):
        if fmt == "int8_weight_only":  # the int8 format before W8A8, for comparison
            model = load_checkpoint(checkpoint, "cpu", torch.float32).model.eval()
            quantize_int8(model, activations="weight")
        else:
            model = load_checkpoint(checkpoint, "cpu", torch.float32, quantize=fmt).model.eval()
        got = greedy_tokens(Engine(model, tok, max_batch=n_prompts), rows, args.new_tokens)
        forced = teacher_forced_agreement(model, rows, want)
        out[fmt] = {**agreement(want, got), "teacher_forced_top1": forced}
        print(f"trained {fmt} vs fp32: {out[fmt]}", flush=True)
    return out


def interleaved_ratios(
    checkpoint: Path, tokenizer, rows: list[list[int]], batches: list[int], args
) -> list[dict]:
    """scratchllm/llama.cpp ratios at each weight precision, the two timed in alternation
    (`llama_cpp_bench.interleaved`), with the engines loaded as `serve` loads them."""
    from llama_cpp_bench import interleaved

    from scratchllm.checkpoint import load_checkpoint
    from scratchllm.inference.engine import Engine, SamplingParams

    formats = ("fp32",) if args.no_quantized else ("fp32", "fp16", "int8")
    decoders = {}
    for fmt in formats:
        quantize = None if fmt == "fp32" else fmt
        model = load_checkpoint(checkpoint, "cpu", torch.float32, pack=True, quantize=quantize)
        engine = Engine(model.model.eval(), tokenizer, max_batch=max(batches))
        decoders[fmt] = lambda r, n, e=engine: e.generate(
            r, SamplingParams(max_tokens=n, stop_ids=())
        )
    return interleaved(
        decoders, checkpoint, checkpoint.parent, rows, batches, args, rate_from_times
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-small", help="model shape (gpt-nano: smoke test)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per cell (ratios use the median)"
    )
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--no-quantized", action="store_true", help="skip the fp16- and int8-weight rows"
    )
    parser.add_argument(
        "--no-llama-cpp", action="store_true", help="skip the llama.cpp (GGUF) rows"
    )
    parser.add_argument(
        "--agreement-checkpoint",
        default=None,
        help="a trained checkpoint: also measure fp16/int8 greedy agreement with fp32 on it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: gpt-nano shape, 8 new tokens, 2 repeats, fp32 only (not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.preset, args.new_tokens, args.repeats, args.dtypes = "gpt-nano", 8, 2, "float32"
        # A smoke test's numbers must not replace the measured results/inference.json.
        args.out = args.out or str(Path(tempfile.gettempdir()) / "scratchllm-inference-quick.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2LMHeadModel

    from scratchllm import GPTModel, ModelConfig
    from scratchllm.checkpoint import load_checkpoint, save_checkpoint
    from scratchllm.hub import export_hf
    from scratchllm.inference.engine import Engine
    from scratchllm.inference.weights import can_pack
    from scratchllm.tokenizers import load_tokenizer

    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset, drop_rate=0.0, vocab_size=50257)
    tmp = Path(tempfile.mkdtemp(prefix="scratchllm-bench-"))
    tokenizer = load_tokenizer(f"gpt2:{data_dir() / 'gpt2'}")
    save_checkpoint(tmp / "ours", GPTModel(config), tokenizer)
    export_hf(tmp / "ours", tmp / "hf")

    gen = torch.Generator().manual_seed(1)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = torch.randint(0, 50000, (max(batches), args.prompt_len), generator=gen)
    prompts = prompts.to(args.device)
    bandwidth = copy_bandwidth(args.device)
    read_before = read_bandwidth(args.device)
    results: list[dict] = []
    parity: dict[str, float] = {}
    greedy: dict[str, list[list[int]]] = {}  # each dtype's engine tokens on the prompts
    forced: dict[str, float] = {}  # teacher-forced top-1 agreement with the fp32 engine
    packed_agreement: dict[str, dict] = {}  # packed vs plain linears, greedy tokens
    rows_all = prompts[: max(batches)].tolist()

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        # As `serve` loads it: fp32 CPU linears packed in both layouts (one row: the split GEMV
        # that `chat` and `generate` use alone; several rows: oneDNN).
        ours = load_checkpoint(tmp / "ours", args.device, dtype, pack=True).model.eval()
        theirs = GPT2LMHeadModel.from_pretrained(tmp / "hf", dtype=dtype).to(args.device).eval()
        with torch.inference_mode():
            a = ours(prompts[:1]).float()
            b = theirs(prompts[:1]).logits.float()
        parity[dtype_name] = float((a - b).abs().max())
        engine = Engine(ours, tokenizer, max_batch=max(batches))
        greedy[dtype_name] = greedy_tokens(engine, rows_all, args.new_tokens)
        variants = {}  # packing applies to fp32 on the CPU only
        plain = load_checkpoint(tmp / "ours", args.device, dtype).model
        if can_pack(plain):
            variants["unpacked_linears"] = Engine(plain, tokenizer, max_batch=max(batches))
            onednn = load_checkpoint(tmp / "ours", args.device, dtype, pack="onednn").model
            variants["onednn_layout_only"] = Engine(onednn, tokenizer, max_batch=max(batches))
            variants["model_forward"] = Engine(  # without DecodeStep: GPTModel.forward per step
                ours, tokenizer, max_batch=max(batches), decode_step=False
            )
            # Same fp32 products in another order: same greedy tokens?
            plain_tokens = greedy_tokens(variants["unpacked_linears"], rows_all, args.new_tokens)
            packed_agreement[dtype_name] = agreement(plain_tokens, greedy[dtype_name])
        del plain
        if "float32" in greedy and dtype_name != "float32":
            forced[dtype_name] = teacher_forced_agreement(ours, rows_all, greedy["float32"])
        for batch in batches:
            row = {
                "dtype": dtype_name,
                **measure(ours, theirs, engine, prompts[:batch], args, bandwidth, variants),
            }
            results.append(row)
            ours_rate = row["scratchllm_engine"]["tokens_per_s"]
            others = ", ".join(
                f"{name} {row[f'scratchllm_engine_{name}']['tokens_per_s']}" for name in variants
            )
            print(
                f"{dtype_name:9s} batch {batch}: scratchllm {ours_rate:8.1f} tok/s "
                f"({others or 'no variants'}) | "
                f"transformers {row['transformers_generate']['tokens_per_s']:8.1f} | "
                f"no cache {row['scratchllm_no_kv_cache']['tokens_per_s']:7.1f} | "
                f"floor {row['bandwidth_floor']['max_tokens_per_s']:8.1f} "
                f"({row['fraction_of_bandwidth_floor']:.0%})",
                flush=True,
            )
        del variants, engine, ours, theirs

    quantized_results: list[dict] = []
    agree_ref = greedy.get("float32")
    formats = [("fp16", "float32")] + [("int8", d) for d in args.dtypes.split(",")]
    for fmt, dtype_name in [] if args.no_quantized or args.device != "cpu" else formats:
        dtype = getattr(torch, dtype_name)
        ours = load_checkpoint(tmp / "ours", "cpu", dtype, quantize=fmt).model.eval()
        engine = Engine(ours, tokenizer, max_batch=max(batches))
        tokens = greedy_tokens(engine, rows_all, args.new_tokens)
        greedy[f"{fmt}/{dtype_name}"] = tokens
        if agree_ref is not None:
            forced[f"{fmt}/{dtype_name}"] = teacher_forced_agreement(ours, rows_all, agree_ref)
        for batch in batches:
            row = {
                "weights": fmt,
                "activations": dtype_name,
                **measure_quantized(ours, engine, prompts[:batch], args, bandwidth),
            }
            rate = row["scratchllm_engine"]["tokens_per_s"]
            for r in results:  # the fp32 rows at this batch, measured above
                if r["dtype"] == "float32" and r["batch"] == batch:
                    hf = r["transformers_generate"]["tokens_per_s"]
                    row["transformers_fp32_tokens_per_s"] = hf
                    row["speedup_vs_transformers_fp32"] = round(rate / hf, 3)
                    row["speedup_vs_scratchllm_fp32"] = round(
                        rate / r["scratchllm_engine"]["tokens_per_s"], 3
                    )
            if agree_ref is not None:
                row["greedy_agreement_vs_fp32_engine"] = agreement(
                    agree_ref[:batch], tokens[:batch]
                )
            quantized_results.append(row)
            print(
                f"{fmt}/{dtype_name:9s} batch {batch}: scratchllm {rate:8.1f} tok/s | "
                f"vs transformers fp32 {row.get('speedup_vs_transformers_fp32', float('nan')):.2f}x | "
                f"floor {row['bandwidth_floor']['max_tokens_per_s']:8.1f} "
                f"({row['fraction_of_bandwidth_floor']:.0%}) | greedy agreement "
                f"{row.get('greedy_agreement_vs_fp32_engine', {}).get('tokens_identical')}",
                flush=True,
            )
    llama_rows, llama_greedy, llama_note, head_to_head = [], {}, None, []
    if args.no_llama_cpp or args.device != "cpu":
        llama_note = "skipped: --no-llama-cpp" if args.no_llama_cpp else "skipped: CPU only"
    else:
        from llama_cpp_bench import import_llama_cpp, llama_cpp_results

        llama_cpp, why = import_llama_cpp()
        if llama_cpp is None:
            llama_note = f"skipped: {why}"
            print("llama.cpp rows", llama_note, flush=True)
        else:
            llama_rows, llama_greedy = llama_cpp_results(
                tmp / "ours", tmp, rows_all, batches, args, bandwidth, config,
                rate_from_times, bandwidth_floor,
            )  # fmt: skip
            head_to_head = interleaved_ratios(tmp / "ours", tokenizer, rows_all, batches, args)
    # The copy bandwidth varies by ±10% over a run on this shared machine: the floor uses the
    # best of a measurement before and one after the timings (the stricter floor).
    bandwidth_after = copy_bandwidth(args.device)
    bandwidth_before, bandwidth = bandwidth, max(bandwidth, bandwidth_after)
    read_after = read_bandwidth(args.device)
    read = max(read_before, read_after)
    for row in results + quantized_results + llama_rows:
        refloor(row, bandwidth, read)
    reference_agreement = {
        name: {**agreement(agree_ref, tokens), "teacher_forced_top1": forced.get(name)}
        for name, tokens in greedy.items()
        if agree_ref is not None and name != "float32"
    }

    import transformers

    llama_payload: dict = {"note": llama_note}
    if llama_rows:
        import llama_cpp
        from llama_cpp_bench import ratios

        llama_payload = {
            "version": llama_cpp.__version__,
            "method": (
                "GGUF from scratchllm.hub.export_gguf of the same checkpoint; llama-cpp-python's "
                "low-level batch API, one sequence id per prompt, llama.cpp's greedy sampler, "
                "threads = --threads or all cores, default f16 KV cache"
            ),
            "results": llama_rows,
            # Timed in alternation (`interleaved_ratios`): what the README quotes.
            "ratios_scratchllm_over_llama_cpp": head_to_head,
            # From the rows above, llama.cpp's timed after all of ours.
            "ratios_sequential": ratios(results, quantized_results, llama_rows),
            "greedy_agreement_vs_scratchllm_fp32_engine": {
                dtype: agreement(agree_ref, tokens)
                for dtype, tokens in llama_greedy.items()
                if agree_ref is not None
            },
        }

    payload = {
        "model": f"{args.preset} shape, random weights, greedy, no early stop",
        "parameters": config.matmul_parameters(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "transformers": transformers.__version__,
        "device": args.device,
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "copy_bandwidth_before_after_GBps": [
            round(bandwidth_before / 1e9, 2),
            round(bandwidth_after / 1e9, 2),
        ],
        "read_bandwidth_GBps": round(read / 1e9, 2),
        "read_bandwidth_before_after_GBps": [
            round(read_before / 1e9, 2),
            round(read_after / 1e9, 2),
        ],
        "logit_max_abs_diff_vs_transformers": parity,
        # fp16/int8 calls of up to max_rows rows go through our C kernels (where they built)
        "decode_kernels": {
            "ours": decode_kernels.available(),
            "max_rows": {k: decode_kernels.max_rows(k) for k in ("int8", "fp16")},
        },
        "results": results,
        "median_speedup_vs_transformers": statistics.median(
            r["speedup_vs_transformers"] for r in results
        ),
        "packed_vs_unpacked_greedy_agreement": packed_agreement,
        "quantized_results": quantized_results,
        "greedy_agreement_vs_fp32_engine": {
            "prompts": len(rows_all),
            "new_tokens": args.new_tokens,
            "note": "random weights: near-ties make greedy fragile; bf16 gives the scale",
            **reference_agreement,
        },
        "llama_cpp": llama_payload,
        "trained_greedy_agreement_vs_fp32_engine": (
            trained_agreement(args.agreement_checkpoint, args)
            if args.agreement_checkpoint
            else "not measured: pass --agreement-checkpoint DIR (a trained checkpoint)"
        ),
        "note": "the machine is shared; other work may have been running during the timings",
    }
    print("wrote", write_result("inference", payload, args.out))
    shutil.rmtree(tmp, ignore_errors=True)  # the checkpoints and GGUF files: over 1 GB


if __name__ == "__main__":
    main()
