"""lm-evaluation-harness both ways: the real `lm_eval` command line against `scratchllm serve`
(`local-completions`), and against the in-process model `scratchllm`
(`python -m scratchllm.evaluate.lm_eval_adapter`), on local tasks only.

The tasks are YAML files over JSONL built here from the shared data: 16 ARC-Easy items (multiple
choice: loglikelihood), 3 LAMBADA contexts (generate_until) and 3 paragraphs of The Verdict
(loglikelihood_rolling). Nothing is downloaded: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set and
the datasets cache is a temporary directory. Both runs must agree with each other and with a
direct computation from the model's logits: every choice's summed log-probability, the choice
acc and acc_norm pick per item, the generated text and the bits per byte. When
`scratchllm evaluate --task-file` exists, its acc and acc_norm must agree too.
"""

from __future__ import annotations

import glob
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.inference.generate import generate_text

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install '.[eval]'")

pytestmark = pytest.mark.slow
CONTEXT = 512
ARC_ITEMS, GEN_ITEMS, TEXTS = 16, 3, 3
GEN_TOKENS = 6

ARC_YAML = """task: tiny_arc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {tokens}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
"""
PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    model = GPTModel(config).eval()
    ckpt = save_checkpoint(root / "ckpt", model, ByteTokenizer())
    lines = (data_dir / "eval" / "arc_easy.jsonl").read_text(encoding="utf-8").splitlines()
    arc = [json.loads(line) for line in lines[:ARC_ITEMS]]
    lines = (data_dir / "eval" / "lambada_openai.jsonl").read_text(encoding="utf-8").splitlines()
    gen = [r for r in map(json.loads, lines) if len(r["context"]) < 200][:GEN_ITEMS]
    verdict = (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")
    texts = [{"text": p.strip()} for p in verdict.split("\n\n") if 80 < len(p.strip()) < 400]
    texts = texts[:TEXTS]
    tasks = root / "tasks"
    tasks.mkdir()
    for name, template, rows in (
        ("tiny_arc", ARC_YAML, arc),
        ("tiny_gen", GEN_YAML, gen),
        ("tiny_ppl", PPL_YAML, texts),
    ):
        data = write_jsonl(root / f"{name}.jsonl", rows)
        (tasks / f"{name}.yaml").write_text(template.format(data=data, tokens=GEN_TOKENS))
    return {"root": root, "ckpt": ckpt, "model": model, "arc": arc, "gen": gen, "texts": texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(root / "hf"),
        HF_DATASETS_CACHE=str(root / "hf" / "datasets"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"scratchllm serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("scratchllm serve did not answer /health")


def evaluate_command_exists() -> bool:
    try:
        from scratchllm.commands import evaluate
    except ImportError:
        return False
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return "--task-file" in parser._option_string_actions


def finish(proc: subprocess.Popen, what: str, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed:\n{err.decode()[-4000:]}"
    return out.decode()


def lm_eval_output(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    (results,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for task in ("tiny_arc", "tiny_gen", "tiny_ppl"):
        (path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return json.loads(Path(results).read_text())["results"], samples


def sum_logprob(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]
    n = len(context_ids)
    return sum(logprobs[n - 1 + j, t].item() for j, t in enumerate(continuation_ids))


def direct_choices(model, tok, arc: list[dict]):
    """Each item's choice log-likelihoods as lm-eval defines them (the context's trailing space
    moves to the continuation), and the acc / acc_norm picks."""
    lls, acc, norm = [], [], []
    for item in arc:
        context = item["query"] + "\nAnswer:"
        row = []
        for choice in item["choices"]:
            whole = tok.encode(context + " " + choice)
            ctx = tok.encode(context)
            row.append(sum_logprob(model, ctx, whole[len(ctx) :]))
        lls.append(row)
        acc.append(max(range(len(row)), key=lambda i: row[i]))
        lengths = [len(c) for c in item["choices"]]
        norm.append(max(range(len(row)), key=lambda i: row[i] / lengths[i]))
    return lls, acc, norm


def test_lm_eval_cli_against_server_and_adapter(setup):
    root, ckpt, model, tok = setup["root"], setup["ckpt"], setup["model"], ByteTokenizer()
    env = offline_env(root)
    tasks = ["--tasks", "tiny_arc,tiny_gen,tiny_ppl", "--include_path", str(root / "tasks")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "scratchllm", "serve", "--checkpoint", str(ckpt)]
    server = subprocess.Popen(
        [*serve, "--port", str(port), "--no-pack", "--model-name", "tiny"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs: list[subprocess.Popen] = [server]
    try:
        wait_healthy(url, server)
        run = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        remote = f"base_url={url}/v1/completions,tokenizer_backend=remote,max_length={CONTEXT}"
        via_server = subprocess.Popen(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions"]
            + ["--model_args", f"model=tiny,{remote}", *tasks]
            + ["--output_path", str(root / "out_server"), "--log_samples"],
            **run,
        )
        adapter = [sys.executable, "-m", "scratchllm.evaluate.lm_eval_adapter"]
        in_process = subprocess.Popen(
            [*adapter, "--model", "scratchllm", "--model_args", f"checkpoint={ckpt}", *tasks]
            + ["--output_path", str(root / "out_adapter"), "--log_samples", "--device", "cpu"],
            **run,
        )
        procs += [via_server, in_process]
        native = None
        if evaluate_command_exists():
            native = subprocess.Popen(
                [sys.executable, "-m", "scratchllm", "evaluate", "--checkpoint", str(ckpt)]
                + ["--out", str(root / "out_native"), "--task-file", str(root / "tiny_arc.jsonl")]
                + ["--type", "multiple_choice", "--shots", "0", "--delimiter", "\\nAnswer: "]
                + ["--device", "cpu"],
                **run,
            )
            procs.append(native)
        finish(via_server, "lm_eval --model local-completions")
        finish(in_process, "python -m scratchllm.evaluate.lm_eval_adapter")
        if native is not None:
            finish(native, "scratchllm evaluate")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    results = {}
    samples = {}
    for name in ("server", "adapter"):
        results[name], samples[name] = lm_eval_output(root / f"out_{name}")
    lls, acc, norm = direct_choices(model, tok, setup["arc"])
    gold = [item["gold"] for item in setup["arc"]]
    assert acc != norm  # the two rules pick differently on this model: both are checked
    hits = [float(a == g) for a, g in zip(acc, gold, strict=True)]
    norm_hits = [float(a == g) for a, g in zip(norm, gold, strict=True)]
    for name in ("server", "adapter"):
        rows = samples[name]["tiny_arc"]
        got = [[float(r[0]) for r in row["filtered_resps"]] for row in rows]
        for mine, ref in zip(got, lls, strict=True):
            assert mine == pytest.approx(ref, abs=1e-3), name
        assert [row["acc"] for row in rows] == hits, name
        assert [row["acc_norm"] for row in rows] == norm_hits, name
        assert results[name]["tiny_arc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
        assert results[name]["tiny_arc"]["acc_norm,none"] == pytest.approx(
            sum(norm_hits) / len(hits)
        )
    for key in ("acc,none", "acc_norm,none"):
        assert results["server"]["tiny_arc"][key] == results["adapter"]["tiny_arc"][key]

    # generate_until: greedy text, cut at "\n", as the book loop writes it
    for j, item in enumerate(setup["gen"]):
        ref = generate_text(model, tok, item["context"], max_new_tokens=GEN_TOKENS)
        ref = ref.split("\n")[0].split("<|endoftext|>")[0]
        for name in ("server", "adapter"):
            assert samples[name]["tiny_gen"][j]["filtered_resps"] == [ref], name

    # loglikelihood_rolling: each text after the end-of-text token, in one window
    total = sum(sum_logprob(model, [256], tok.encode(t["text"])) for t in setup["texts"])
    n_bytes = sum(len(t["text"].encode()) for t in setup["texts"])
    bpb = -total / n_bytes / math.log(2)
    for name in ("server", "adapter"):
        assert results[name]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-5)

    if native is not None:
        (task,) = json.loads((root / "out_native" / "results.json").read_text())["tasks"]
        assert task["acc"] == pytest.approx(sum(hits) / len(hits))
        assert task["acc_norm"] == pytest.approx(sum(norm_hits) / len(hits))
