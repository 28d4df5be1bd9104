"""Data preparation at scale: scratchllm's sharded tokenization vs nanoGPT's two ways.

    python benchmarks/data_prepare.py [--gb 2] [--small-gb 0.5] [--peer-gb 0.5] [--quick]
                                      [--out benchmarks/results/data_prepare.json]

Builds a JSON lines corpus of at least `--gb` GB of text (10^9 bytes) from the shared texts:
the Gutenberg novels, Tiny Shakespeare, WikiText-2 and the Verdict cut into ~8 kB documents,
repeated with per-copy variation (each copy shuffles the documents, rotates each one's
paragraphs and heads it with its copy and number), in a temporary folder deleted afterwards.
Then, each in its own process, with GPT-2 (tiktoken, from the shared gpt2/ files):

- scratchllm: `prepare_shards` (JSONL stream → 1 or 2 worker processes → 10^8-token shards),
  on `--small-gb` with 1 and 2 workers and on `--gb` with 2 workers (is memory flat?);
- nanoGPT, shakespeare style: every document in a list, tiktoken `encode_ordinary_batch`, then
  one uint16 array written out;
- nanoGPT, openwebtext style: `datasets.load_dataset("json")`, `.map` with tiktoken over 2
  processes, then one uint16 memmap filled shard by shard;

both peers on `--peer-gb` (they hold the corpus, or its ids, in memory). For each run: MB/s of
document text, wall and CPU seconds, and the peak memory of the process tree (sum of RSS, and of
PSS, which counts pages that forked workers share once), sampled every 50 ms. The load average
is recorded, as other work on the machine slows every run alike. Writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, data_dir, write_result  # noqa: E402

DOC_CHARS = 8000
EOT = 50256
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the corpus ------------------------------------------------------------------------------------
def _source_documents() -> list[list[str]]:
    """The shared texts as documents, each a list of paragraphs."""
    from scratchllm.data.corpus import read_text_file

    data = data_dir() / "corpora"
    files = sorted((data / "gutenberg").glob("*.txt"))
    files += [data / "tinyshakespeare.txt", data / "the-verdict.txt"]
    files += [data / "wikitext-2" / "valid.txt", data / "wikitext-2" / "test.txt"]
    docs: list[list[str]] = []
    for path in files:
        paras = [p for p in re.split(r"\n\s*\n", read_text_file(path, True)) if p.strip()]
        current: list[str] = []
        size = 0
        for para in paras:
            current.append(para)
            size += len(para)
            if size >= DOC_CHARS:
                docs.append(current)
                current, size = [], 0
        if current:
            docs.append(current)
    return docs


def build_corpus(folder: Path, sizes: list[int]) -> dict[int, dict[str, Any]]:
    """JSONL files of at least each of `sizes` text bytes (the smaller ones prefixes of the
    largest); for each: path, documents, text bytes."""
    import numpy as np

    docs = _source_documents()
    files = {s: folder / f"corpus-{s}.jsonl" for s in sizes}
    handles = {s: open(f, "w", encoding="utf-8") for s, f in files.items()}  # noqa: SIM115
    info = {
        s: {"path": str(folder / f"corpus-{s}.jsonl"), "documents": 0, "bytes": 0} for s in sizes
    }
    copy = 0
    try:
        while handles:
            rng = np.random.default_rng(copy)
            for j in rng.permutation(len(docs)).tolist():
                paras = docs[j]
                turn = (copy * 7 + j) % len(paras)
                text = f"Copy {copy}, document {j}.\n\n" + "\n\n".join(paras[turn:] + paras[:turn])
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                nbytes = len(text.encode("utf-8"))
                for size in list(handles):
                    handles[size].write(line)
                    info[size]["documents"] += 1
                    info[size]["bytes"] += nbytes
                    if info[size]["bytes"] >= size:
                        handles.pop(size).close()
            copy += 1
    finally:
        for fh in handles.values():
            fh.close()
    for size in sizes:
        info[size]["copies"] = copy
        info[size]["file_bytes"] = Path(info[size]["path"]).stat().st_size
    return info


# -- measuring a process tree ----------------------------------------------------------------------
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                rss += int(fh.read().split()[1]) * PAGE
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return rss, pss


def run_measured(args: list[str], env: dict[str, str], text_bytes: int) -> dict[str, Any]:
    """Run `python this_file --child ...`; its JSON result plus peak tree memory and CPU time."""
    started = time.perf_counter()
    load = os.getloadavg()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, env=env, text=True
    )
    peak = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss = _memory(_tree(proc.pid))
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime  # this child and the children it waited for
    result.update(
        peak_rss_tree_mib=round(peak[0] / 2**20, 1),
        peak_pss_tree_mib=round(peak[1] / 2**20, 1),
        process_wall_s=round(wall, 2),
        cpu_s=round(cpu, 2),
        load_average_before=[round(x, 2) for x in load],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
    )
    result["text_bytes"] = text_bytes
    result["mb_per_s"] = round(text_bytes / 1e6 / result["seconds"], 3)
    # Per CPU second (the whole process, imports included): what a busy machine changes least.
    result["mb_per_cpu_s"] = round(text_bytes / 1e6 / cpu, 3)
    result["cores_used"] = round(cpu / wall, 2)
    return result


# -- the three preparations (run in a child process each) -----------------------------------------
def _tiktoken_gpt2() -> Any:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from scratchllm.tokenizers import GPT2_PATTERN

    gpt2 = data_dir() / "gpt2"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(gpt2 / "vocab.bpe"), encoder_json_file=str(gpt2 / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )


def child_ours(path: str, out: str, workers: int) -> dict[str, Any]:
    from scratchllm.data.prepare import prepare_shards
    from scratchllm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(f"gpt2:{data_dir() / 'gpt2'}")
    started = time.perf_counter()
    shard_set = prepare_shards([path], tokenizer, out, workers=workers)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "text_bytes_counted": shard_set.bytes,
        "tokens": len(shard_set),
        "shards": len(shard_set.files),
    }


def child_nanogpt_batch(path: str, out: str) -> dict[str, Any]:
    import numpy as np

    enc = _tiktoken_gpt2()
    started = time.perf_counter()
    with open(path, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    ids = enc.encode_ordinary_batch(texts)
    arr = np.concatenate([np.array([*doc, EOT], dtype=np.uint16) for doc in ids])
    arr.tofile(Path(out) / "train.bin")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": int(arr.size),
    }


def child_datasets_map(path: str, out: str, workers: int) -> dict[str, Any]:
    import numpy as np
    from datasets import load_dataset

    enc = _tiktoken_gpt2()

    def process(example: dict[str, Any]) -> dict[str, Any]:
        ids = enc.encode_ordinary(example["text"])
        ids.append(EOT)
        return {"ids": ids, "len": len(ids)}

    started = time.perf_counter()
    ds = load_dataset("json", data_files=path, split="train")
    map_started = time.perf_counter()
    tokenized = ds.map(process, remove_columns=["text"], num_proc=workers)
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(Path(out) / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    at, batches = 0, min(1024, len(tokenized))
    for i in range(batches):  # nanoGPT's openwebtext/prepare.py loop
        part = tokenized.shard(num_shards=batches, index=i, contiguous=True).with_format("numpy")
        if len(part) == 0:
            continue
        block = np.concatenate(part["ids"])
        arr[at : at + len(block)] = block
        at += len(block)
    arr.flush()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "seconds_after_load": time.perf_counter() - map_started,
        "tokens": total,
    }


def _child(argv: list[str]) -> None:
    kind, path, out, *rest = argv
    workers = int(rest[0]) if rest else 1
    if kind == "ours":
        result = child_ours(path, out, workers)
    elif kind == "nanogpt_batch":
        result = child_nanogpt_batch(path, out)
    else:
        result = child_datasets_map(path, out, workers)
    print(json.dumps(result))


def token_hash(out: Path) -> str:
    """sha256 of the token ids a run wrote (shard headers skipped), read in blocks by this
    process: hashing a memory map inside the measured one would add its pages to its RSS."""
    from scratchllm.data.shards import HEADER_BYTES

    digest = hashlib.sha256()
    files = sorted(out.glob("shard-*.bin")) or [out / "train.bin"]
    for path in files:
        with open(path, "rb") as fh:
            if path.name.startswith("shard-"):
                fh.seek(HEADER_BYTES)
            while block := fh.read(64 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]


# -- the run ---------------------------------------------------------------------------------------
def _available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def _cpu_ratio(runs: dict[str, Any]) -> float | None:
    ours = [
        v["mb_per_cpu_s"] for k, v in runs.items() if k.startswith("scratchllm") and "cpu_s" in v
    ]
    peers = [
        v["mb_per_cpu_s"]
        for k, v in runs.items()
        if not k.startswith("scratchllm") and "cpu_s" in v
    ]
    return round(max(ours) / max(peers), 2) if ours and peers else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="large corpus, GB of text")
    parser.add_argument("--small-gb", type=float, default=0.5, help="small corpus, GB of text")
    parser.add_argument("--peer-gb", type=float, default=0.5, help="corpus for the peers")
    parser.add_argument("--quick", action="store_true", help="20 MB / 5 MB, to try the script")
    parser.add_argument("--tmp", default=None, help="where the corpus goes (deleted after)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the corpus is deleted
    if args.quick:
        args.gb, args.small_gb, args.peer_gb = 0.02, 0.005, 0.005
    big, small, peer = (int(x * 1e9) for x in (args.gb, args.small_gb, args.peer_gb))
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="scratchllm-data-bench-", dir=args.tmp))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "TIKTOKEN_CACHE_DIR": "",
        "HF_HOME": str(tmp / "hf"),  # the datasets cache goes with the corpus
        "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
    }
    load_start = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        corpus = build_corpus(tmp, sorted({big, small, peer}))
        build_s = time.perf_counter() - t0
        plan: list[tuple[str, str, int, int]] = [
            ("scratchllm_1_worker", "ours", small, 1),
            ("scratchllm_2_workers", "ours", small, 2),
            ("nanogpt_encode_ordinary_batch", "nanogpt_batch", peer, 0),
            ("datasets_map_2_proc", "datasets_map", peer, 2),
            ("scratchllm_2_workers_large", "ours", big, 2),
        ]
        for name, kind, size, workers in plan:
            out = tmp / name
            out.mkdir()
            need_gib = size / 1e9 * (12 if kind == "nanogpt_batch" else 3)
            if kind != "ours" and _available_gib() < need_gib:
                runs[name] = {"skipped": f"needs ~{need_gib:.0f} GiB, {_available_gib():.1f} free"}
                continue
            print(f"{name}: {size / 1e9:g} GB ...", file=sys.stderr, flush=True)
            argv = [kind, corpus[size]["path"], str(out), str(workers)]
            runs[name] = run_measured(argv, env, corpus[size]["bytes"])
            runs[name]["corpus_gb"] = size / 1e9
            runs[name]["sha256"] = token_hash(out)
            print(f"  {json.dumps(runs[name])}", file=sys.stderr, flush=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(tmp / "hf", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours_best = max(runs[k]["mb_per_s"] for k in ("scratchllm_1_worker", "scratchllm_2_workers"))
    peers = [
        runs[k]["mb_per_s"]
        for k in runs
        if not k.startswith("scratchllm") and "mb_per_s" in runs[k]
    ]
    same = {runs[k].get("sha256") for k in runs if runs[k].get("corpus_gb") == args.small_gb}
    payload = {
        "corpus": {str(k): v for k, v in corpus.items()},
        "corpus_build_s": round(build_s, 1),
        "runs": runs,
        "ratio_ours_over_best_peer": round(ours_best / max(peers), 2) if peers else None,
        "ratio_ours_over_best_peer_per_cpu_s": _cpu_ratio(runs),
        "peak_rss_small_vs_large_mib": [
            runs["scratchllm_2_workers"]["peak_rss_tree_mib"],
            runs["scratchllm_2_workers_large"]["peak_rss_tree_mib"],
        ],
        "identical_tokens_on_the_small_corpus": len(same) == 1 if peer == small else None,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "usable_cores": len(os.sched_getaffinity(0)),
        "total_s": round(time.time() - started, 1),
    }
    path = write_result("data_prepare", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
