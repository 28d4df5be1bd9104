"""llama.cpp's side of `benchmarks/inference.py`: the same weights as GGUF, decoded by llama.cpp.

The scratchllm checkpoint the inference benchmark times is exported with `scratchllm.hub.
export_gguf` as f32, f16 and q8_0, and each file is decoded greedily by llama.cpp through
llama-cpp-python's low-level C API — the loop of llama.cpp's own `batched` example: one
`llama_batch` holding every sequence's prompt (sequence ids 0..B-1, logits only at each
prompt's last token), then one batch of B tokens per step, each drawn by llama.cpp's greedy
sampler (`llama_sampler_sample`) from its row of logits. So batch 8 is llama.cpp serving 8
sequences in one decode call per step, as its server does, and batch 1 is the same loop with
one sequence. The high-level `Llama` class is not used: it holds one sequence and copies the
logits into numpy every step.

llama.cpp keeps its defaults otherwise — f16 KV cache, flash attention as its `auto` decides —
and runs `threads` threads (default: all cores) for decode and prefill alike, in a process of
its own (`run_worker`). Where llama.cpp's extra CPU buffer types (its AMX/repacked weight
layouts) crash the process — seen with q8_0 at batch 8 on an AMX Xeon with llama-cpp-python
0.3.36 — that file is measured again without them (`use_extra_bufts = False`, llama.cpp's own
`--no-extra-bufts`), and its rows say so. Timing follows the inference benchmark's
`decode_rate` (time for 1 + N tokens minus time for 1; median and best of the repeats).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LLAMA_CPP_DTYPES = ("f32", "f16", "q8_0")


def import_llama_cpp() -> tuple[Any | None, str | None]:
    """(the llama_cpp module, None), or (None, why it is missing)."""
    try:
        import llama_cpp
    except ImportError as exc:
        return None, f"llama-cpp-python not importable ({exc}); `make interop` builds it"
    # Its log callback prints every loader line unless the logger's level says otherwise.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp, None


def matmul_weight_bytes(path: Path) -> int:
    """Bytes of the weights a decode step reads in full: every 2-D tensor but the embedding
    tables (a step reads one row of those), at the GGUF file's own storage types."""
    import gguf

    reader = gguf.GGUFReader(path)
    lookups = {"token_embd.weight", "position_embd.weight"}
    return sum(
        int(t.n_bytes) for t in reader.tensors if len(t.shape) >= 2 and t.name not in lookups
    )


class LlamaCppDecoder:
    """One GGUF model and one llama.cpp context that decodes up to `max_batch` sequences."""

    def __init__(
        self,
        path: Path,
        max_batch: int,
        seq_len: int,
        threads: int | None = None,
        extra_bufts: bool = True,
    ):
        llama_cpp, why = import_llama_cpp()
        if llama_cpp is None:
            raise RuntimeError(why)
        self.lib = lib = llama_cpp
        lib.llama_backend_init()
        self.threads = threads or os.cpu_count() or 1
        mparams = lib.llama_model_default_params()
        mparams.use_extra_bufts = extra_bufts
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = lib.llama_context_default_params()
        # Per-sequence KV cells (the cache is split evenly over n_seq_max sequences).
        cparams.n_ctx = max_batch * seq_len
        cparams.n_batch = cparams.n_ubatch = max_batch * seq_len
        cparams.n_seq_max = max_batch
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.batch = lib.llama_batch_init(max_batch * seq_len, 0, 1)
        self.sampler = lib.llama_sampler_init_greedy()
        self.max_batch, self.seq_len = max_batch, seq_len

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """Put (token, position, sequence id, wants logits) entries into the batch."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)

    def _decode(self) -> None:
        rc = self.lib.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """`n` greedy tokens for each prompt (the first from the prompt's own logits)."""
        lib = self.lib
        if len(prompts) > self.max_batch or any(len(p) + n > self.seq_len for p in prompts):
            raise ValueError("more sequences or tokens than the context was made for")
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        entries, rows = [], []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                entries.append((token, pos, seq, pos == len(prompt) - 1))
            rows.append(len(entries) - 1)  # the batch index of this prompt's logits
        self._fill(entries)
        self._decode()
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n):
            for seq, row in enumerate(rows):
                out[seq].append(int(lib.llama_sampler_sample(self.sampler, self.ctx, row)))
            if step == n - 1:
                break
            pairs = enumerate(zip(prompts, out, strict=True))
            self._fill([(o[-1], len(p) + step, seq, True) for seq, (p, o) in pairs])
            rows = list(range(len(prompts)))
            self._decode()
        return out

    def close(self) -> None:
        lib = self.lib
        lib.llama_sampler_free(self.sampler)
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


def _times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of `repeats` calls after one warm-up: the inference benchmark's `timed`,
    restated so that this worker process never imports torch."""
    fn()
    return [_seconds(fn) for _ in range(repeats)]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(spec: dict) -> dict:
    """Run in its own process: greedy tokens and decode timings of one GGUF file."""
    prompts, batches, n = spec["prompts"], spec["batches"], spec["new_tokens"]
    decoder = LlamaCppDecoder(
        Path(spec["path"]),
        max(batches),
        spec["seq_len"],
        spec["threads"],
        spec.get("extra_bufts", True),
    )
    try:
        out: dict = {"threads": decoder.threads, "greedy": decoder.generate(prompts, n)}
        for batch in batches:
            rows = prompts[:batch]
            out[f"batch {batch}"] = [
                _times(lambda k=k, rows=rows: decoder.generate(rows, k), spec["repeats"])
                for k in (1, 1 + n)
            ]
        return out
    finally:
        decoder.close()


def run_worker(spec: dict) -> dict:
    """`worker(spec)` in a fresh Python process. In the benchmark's own process llama.cpp ran
    3–5x slower: its OpenMP threads and torch's (another OpenMP runtime, whose idle threads
    still wake and spin) fight over the cores. A process of its own is llama.cpp as people run
    it."""
    proc = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode < 0 and spec.get("extra_bufts", True):  # killed by a signal: a crash
        print(
            f"llama.cpp crashed on {spec['path']} (signal {-proc.returncode}); "
            "again without its extra buffer types",
            flush=True,
        )
        return {**run_worker({**spec, "extra_bufts": False}), "extra_bufts_crashed": True}
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spec(
    checkpoint: Path,
    workdir: Path,
    dtype: str,
    prompts: list[list[int]],
    batches: list[int],
    args: Any,
    repeats: int,
) -> tuple[Path, dict]:
    """The checkpoint's GGUF file in `dtype` (exported once) and a worker spec that times it."""
    from scratchllm.hub.gguf import export_gguf

    path = workdir / f"model-{dtype}.gguf"
    if not path.exists():
        export_gguf(checkpoint, path, dtype=dtype)
    spec = {
        "path": str(path),
        "prompts": prompts,
        "batches": batches,
        "new_tokens": args.new_tokens,
        "repeats": repeats,
        "threads": args.threads,
        "seq_len": args.prompt_len + args.new_tokens + 8,
    }
    return path, spec


def llama_cpp_results(
    checkpoint: Path,
    workdir: Path,
    prompts: list[list[int]],
    batches: list[int],
    args: Any,
    bandwidth: float,
    config: Any,
    rate_from_times: Callable[..., dict[str, float]],
    bandwidth_floor: Callable[..., dict[str, float]],
    dtypes: tuple[str, ...] = LLAMA_CPP_DTYPES,
) -> tuple[list[dict], dict[str, list[list[int]]]]:
    """llama.cpp rows (one per GGUF dtype and batch) and each dtype's greedy tokens: timings
    turned into rates by the inference benchmark's own `rate_from_times`, floored by its
    `bandwidth_floor`."""
    rows: list[dict] = []
    greedy: dict[str, list[list[int]]] = {}
    for dtype in dtypes:
        path, spec = _spec(checkpoint, workdir, dtype, prompts, batches, args, args.repeats)
        measured = run_worker(spec)
        greedy[dtype] = measured["greedy"]
        weight_bytes = matmul_weight_bytes(path)
        for batch in batches:
            t1, tn = measured[f"batch {batch}"]
            rate = rate_from_times(t1, tn, batch, args.new_tokens)
            # The KV cache is llama.cpp's default f16: 2 bytes a value.
            floor = bandwidth_floor(config, args, batch, weight_bytes, 2, bandwidth)
            rows.append(
                {
                    "gguf_dtype": dtype,
                    "batch": batch,
                    "threads": measured["threads"],
                    "extra_buffer_types": not measured.get("extra_bufts_crashed", False),
                    "bandwidth_floor": floor,
                    "llama_cpp": rate,
                    "fraction_of_bandwidth_floor": round(
                        rate["tokens_per_s"] / floor["max_tokens_per_s"], 3
                    ),
                }
            )
            print(
                f"llama.cpp {dtype:5s} batch {batch}: {rate['median_tokens_per_s']:8.1f} "
                f"tok/s median ({rate['tokens_per_s']:.1f} best) | floor "
                f"{floor['max_tokens_per_s']:8.1f} "
                f"({rows[-1]['fraction_of_bandwidth_floor']:.0%})",
                flush=True,
            )
    return rows, greedy


# Which scratchllm weight format each GGUF dtype is measured against.
PAIRS = {"f32": ("fp32", "float32"), "f16": ("fp16", "float32"), "q8_0": ("int8", None)}


def ratios(results: list[dict], quantized: list[dict], llama_rows: list[dict]) -> list[dict]:
    """scratchllm tokens/s over llama.cpp's at the same weight precision and batch (medians)."""
    out = []
    for row in llama_rows:
        fmt, activations = PAIRS[row["gguf_dtype"]]
        theirs = row["llama_cpp"]["median_tokens_per_s"]
        if fmt == "fp32":
            ours = [(r["dtype"], r) for r in results if r["dtype"] == "float32"]
        else:
            ours = [
                (f"{r['weights']}/{r['activations']}", r)
                for r in quantized
                if r["weights"] == fmt and activations in (None, r["activations"])
            ]
        for name, r in ours:
            if r["batch"] != row["batch"]:
                continue
            mine = r["scratchllm_engine"]["median_tokens_per_s"]
            out.append(
                {
                    "batch": row["batch"],
                    "scratchllm": name,
                    "llama_cpp": row["gguf_dtype"],
                    "scratchllm_tokens_per_s": mine,
                    "llama_cpp_tokens_per_s": theirs,
                    "ratio": round(mine / theirs, 3),
                }
            )
    return out


def interleaved(
    ours: dict[str, Callable[[list[list[int]], int], object]],
    checkpoint: Path,
    workdir: Path,
    prompts: list[list[int]],
    batches: list[int],
    args: Any,
    rate_from_times: Callable[..., dict[str, float]],
) -> list[dict]:
    """scratchllm/llama.cpp ratios timed in alternation: `args.repeats` rounds, each timing
    every pair once on both sides (ours, then a llama.cpp worker run with one repeat).

    Timing one decoder's repeats after the other's lets the machine's drift (seen here: 10% in
    an hour) fall on one side only; alternating puts it on both. `ours` maps a scratchllm
    weight format ("fp32", "fp16", "int8") to a function that decodes `n` greedy tokens for the
    given prompts. Each pair's ratio is the median over the rounds of that round's two rates.
    """
    n = args.new_tokens
    pairs = [(d, fmt) for d, (fmt, _) in PAIRS.items() if fmt in ours]
    rounds: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.repeats):
        for dtype, fmt in pairs:
            _, spec = _spec(checkpoint, workdir, dtype, prompts, batches, args, 1)
            for batch in batches:
                rows = prompts[:batch]
                decode = ours[fmt]
                if r == 0:
                    decode(rows, 1 + n)  # warm up (the worker warms up llama.cpp itself)
                t1, tn = [_seconds(lambda k=k, d=decode, p=rows: d(p, k)) for k in (1, 1 + n)]
                mine = rate_from_times([t1], [tn], batch, n)["tokens_per_s"]
                rounds.setdefault((dtype, batch), []).append((mine, 0.0))
            measured = run_worker(spec)
            for batch in batches:
                t1, tn = measured[f"batch {batch}"]
                theirs = rate_from_times(t1, tn, batch, n)["tokens_per_s"]
                mine, _ = rounds[(dtype, batch)][-1]
                rounds[(dtype, batch)][-1] = (mine, theirs)
    out = []
    for (dtype, batch), rates in rounds.items():
        mine, theirs = (statistics.median(side) for side in zip(*rates, strict=True))
        ratio = statistics.median(m / t for m, t in rates)
        out.append(
            {
                "batch": batch,
                "scratchllm": PAIRS[dtype][0],
                "llama_cpp": dtype,
                "scratchllm_tokens_per_s": round(mine, 2),
                "llama_cpp_tokens_per_s": round(theirs, 2),
                "ratio": round(ratio, 3),
                "rounds": [[round(m, 2), round(t, 2)] for m, t in rates],
            }
        )
        print(
            f"interleaved {PAIRS[dtype][0]}/{dtype} batch {batch}: {mine:7.1f} / {theirs:7.1f} "
            f"tok/s, ratio {ratio:.2f}x (median of {len(rates)} rounds)",
            flush=True,
        )
    return out


if __name__ == "__main__":  # the worker: a JSON spec on stdin, a JSON line on stdout
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
