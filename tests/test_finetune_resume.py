"""Interrupted fine-tuning keeps the run: SIGKILL and SIGTERM leave checkpoints that load (with
LoRA too) and `finetune TASK --out RUN --resume` ends bit for bit where an uninterrupted run
ends. Also: `--max-steps`, the evaluation sample (the run's template, cut to a short context)
and an evaluation that comes out NaN."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from scratchllm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # the subprocesses run one thread too

SRC = Path(__file__).resolve().parents[1] / "src"
TIMING = {"elapsed_s", "train_s", "tokens_per_s", "mfu", "peak_mem_gib"}  # differ between runs


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory):
    """A tiny base checkpoint (context 64: every Alpaca prompt is longer) and small data."""
    tmp = tmp_path_factory.mktemp("finetune-resume")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0
    )
    save_checkpoint(tmp / "base", GPTModel(config), ByteTokenizer(), {})
    sms = (data_dir / "sms_spam" / "SMSSpamCollection").read_text().splitlines()
    (tmp / "sms.tsv").write_text("\n".join(sms[:40]) + "\n")
    instruct = data_dir / "instruct"
    records = json.loads((instruct / "instruction-data.json").read_text())[:30]
    (tmp / "inst.json").write_text(json.dumps(records))
    pref = json.loads((instruct / "instruction-data-with-preference.json").read_text())[:20]
    (tmp / "pref.json").write_text(json.dumps(pref))
    return tmp


DATA = {"classify": "sms.tsv", "instruct": "inst.json", "dpo": "pref.json"}


def _args(inputs: Path, task: str, out: Path, lora: bool, steps: int = 2) -> list[str]:
    # Every step evaluates and saves (--eval-every 1): two steps make two saves.
    args = [
        "finetune", task, "--checkpoint", str(inputs / "base"), "--data", str(inputs / DATA[task]),
        "--out", str(out), "--max-steps", str(steps), "--eval-every", "1", "--eval-batches", "1",
        "--batch-size", "4", "--lr", "3e-3", "--dropout", "0.1", "--seed", "5",
    ]  # fmt: skip
    if task == "instruct":
        args += ["--generate-tokens", "2"]  # evaluation samples of 2 tokens
    if lora:
        args += ["--lora-rank", "2", "--lora-alpha", "4"]
    return args


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the thread count of this process (the one_thread fixture)
    env.update(extra)
    return env


def _cli(argv: list[str], **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scratchllm", *argv]
    return subprocess.Popen(
        cmd, env=_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in TIMING} for r in lines]


def _assert_same_run(a: Path, b: Path, lora: bool, steps: int = 2) -> None:
    files = ["model.safetensors", *(["adapters.safetensors"] if lora else [])]
    for name in files:  # bit for bit
        assert (a / "checkpoint" / name).read_bytes() == (b / "checkpoint" / name).read_bytes()
    assert _records(a) == _records(b)  # every logged loss, evaluation and sample
    assert [r["step"] for r in _records(a) if r["kind"] == "train"][-1] == steps
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert ra["steps"] == rb["steps"] == steps
    paths = {"train_seconds", "checkpoint", "responses"}  # a time, and paths into each run
    assert {k: v for k, v in ra.items() if k not in paths} == {
        k: v for k, v in rb.items() if k not in paths
    }


def _logits(model: torch.nn.Module, task: str) -> torch.Tensor:
    x = torch.tensor([[72, 105, 32, 116, 104, 101, 114, 101]])
    with torch.no_grad():
        if task == "classify":
            from scratchllm.finetune.classify import classify_logits

            return classify_logits(model, x, torch.tensor([x.shape[1]]))
        return model(x)


def _check_loadable(run: Path, task: str, lora: bool) -> int:
    """The latest checkpoint loads as a standard one and runs; a LoRA one also rebuilds from
    its base and adapters with the same logits. Returns its step."""
    ckpt = load_checkpoint(run)
    merged = _logits(ckpt.model, task)
    assert torch.isfinite(merged).all()
    if lora:
        from scratchllm.finetune import load_with_adapters

        unmerged, _, meta = load_with_adapters(run / "checkpoint")
        assert meta["task"] == task
        torch.testing.assert_close(_logits(unmerged, task), merged, rtol=1e-5, atol=1e-5)
    return ckpt.meta["step"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("task", ["classify", "instruct", "dpo"])
def test_sigkill_then_resume_ends_bit_for_bit_as_an_uninterrupted_run(inputs, tmp_path, task, lora):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(_args(inputs, task, full, lora)) == 0
    # SIGKILL inside the second save (its copy complete, not yet renamed in): the first stays.
    proc = _cli(_args(inputs, task, killed, lora), SCRATCHLLM_TEST_CHECKPOINT_CRASH="written:2")
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert _check_loadable(killed, task, lora) == 1
    assert load_train_state(killed)["step"] == 1
    # The options come back from run.json; the run continues with step 2.
    assert main(["finetune", task, "--out", str(killed), "--resume"]) == 0
    _assert_same_run(full, killed, lora)


def test_sigterm_of_a_lora_run_leaves_a_checkpoint_that_loads_and_resumes(inputs, tmp_path, capsys):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    args = _args(inputs, "classify", stopped, lora=True, steps=3)
    proc = _cli(args, SCRATCHLLM_TEST_CHECKPOINT_DELAY="1.0")  # saves slowed: stop mid-run
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads((stopped / "checkpoint" / "checkpoint.json").read_text())["step"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-2000:]
    assert "continue with --resume" in proc.stderr.read()
    step = _check_loadable(stopped, "classify", lora=True)
    assert 1 <= step < 3
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(stopped), "WINNER!! claim your prize"]) == 0
    assert capsys.readouterr().out.strip() in {"ham", "spam"}
    assert main(["finetune", "classify", "--out", str(stopped), "--resume"]) == 0
    assert main(_args(inputs, "classify", full, lora=True, steps=3)) == 0
    _assert_same_run(full, stopped, lora=True, steps=3)


def test_max_steps_stops_there_and_the_eval_sample_answers_an_instruction(inputs, tmp_path):
    from scratchllm.data.instruction import format_prompt, load_records, split_records
    from scratchllm.finetune.instruct import InstructOptions, generate_responses

    out = tmp_path / "run"
    argv = ["finetune", "instruct", "--checkpoint", str(inputs / "base"), "--out", str(out)]
    argv += ["--data", str(inputs / "inst.json"), "--max-steps", "3", "--generate-tokens", "3"]
    assert main([*argv, "--batch-size", "2", "--eval-batches", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and load_checkpoint(out).meta["step"] == 3  # not 2 epochs
    evals = [r for r in _records(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3]
    # The sample is the model's answer to the first validation instruction in the template
    # (its Alpaca prompt, 200+ bytes, cut from the left to fit the 64-token context).
    records = load_records(inputs / "inst.json")
    _, val, _ = split_records(records, InstructOptions.split, 123)
    assert len(format_prompt(val[0], "alpaca")) > 64
    (want,) = generate_responses(load_checkpoint(out).model, ByteTokenizer(), val[:1], "alpaca", 3)
    assert evals[-1]["sample"] == want["model_response"]


def test_a_short_context_cuts_the_sample_prompt_from_the_left(tmp_path, inputs):
    from scratchllm.finetune.instruct import fit_prompt

    assert fit_prompt(list(range(100)), 32, 40) == (list(range(84, 100)), 16)  # half the context
    assert fit_prompt(list(range(10)), 32, 4) == (list(range(10)), 4)  # fits: untouched
    assert fit_prompt(list(range(40)), 32, 4) == (list(range(12, 40)), 4)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, context_length=24, emb_dim=16, n_heads=2, n_layers=1)
    save_checkpoint(tmp_path / "base", GPTModel(config), ByteTokenizer(), {})
    out = tmp_path / "run"
    argv = ["finetune", "instruct", "--checkpoint", str(tmp_path / "base"), "--out", str(out)]
    argv += ["--data", str(inputs / "inst.json"), "--max-steps", "1", "--generate-tokens", "4"]
    assert main(argv) == 0  # it used to abort at the first evaluation sample
    samples = [r["sample"] for r in _records(out) if r["kind"] == "eval"]
    assert len(samples) == 2 and all(isinstance(s, str) for s in samples)


def test_a_nan_evaluation_stops_and_keeps_the_last_good_checkpoint(
    inputs, tmp_path, monkeypatch, capsys
):
    from scratchllm.finetune.classify import ClassificationTask

    real = ClassificationTask.evaluate
    calls = []

    def nan_at_the_third(self, model, max_batches):
        calls.append(1)
        out = real(self, model, max_batches)
        return {**out, "val_loss": math.nan} if len(calls) == 3 else out

    monkeypatch.setattr(ClassificationTask, "evaluate", nan_at_the_third)
    out = tmp_path / "run"
    assert main(_args(inputs, "classify", out, lora=False, steps=3)) == 1  # evals: 0, 1, 2
    assert "evaluation val_loss nan at step 2" in capsys.readouterr().err
    ckpt = load_checkpoint(out)
    assert ckpt.meta["step"] == 1 and math.isfinite(ckpt.meta["eval"]["val_loss"])
    assert load_train_state(out)["step"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert json.loads((out / "best" / "checkpoint.json").read_text())["step"] == 1
    assert not (out / ".checkpoint.good").exists()


def test_a_nan_first_save_leaves_no_latest_checkpoint(tmp_path, data_dir):
    import numpy as np

    from scratchllm.train.settings import TrainConfig
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import Trainer, TrainingDiverged

    class NaNLater(LMTask):
        calls = 0

        def evaluate(self, model, max_batches):  # the one at step 0 is finite, then inf
            out, self.calls = super().evaluate(model, max_batches), self.calls + 1
            return out if self.calls == 1 else {**out, "val_loss": math.inf}

    text = (data_dir / "corpora" / "the-verdict.txt").read_bytes()
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    config = ModelConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)
    model = GPTModel(config)
    task = NaNLater(tokens[:4000], tokens[4000:], ByteTokenizer(), 4, 16)
    train = TrainConfig(max_steps=4, eval_every=2, eval_batches=1, sample_tokens=0)
    trainer = Trainer(model, task, train, tmp_path / "run", ByteTokenizer())
    with pytest.raises(TrainingDiverged, match="evaluation val_loss inf at step 2"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoint").exists()  # no good one to keep
