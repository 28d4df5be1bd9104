"""Exact resume after SIGKILL, crash-safe checkpoint writes, signals, divergence, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import (
    load_checkpoint,
    load_state_dict,
    load_train_state,
    prune_checkpoints,
)
from scratchllm.errors import CheckpointError
from scratchllm.train.settings import TrainConfig
from scratchllm.train.tasks import LMTask
from scratchllm.train.trainer import Trainer, TrainerCallback, TrainingDiverged

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 14


def _cmd(data_dir: Path, tmp: Path, out: str, *extra: str) -> list[str]:
    model = tmp / "tiny.json"
    # Dropout on: the resumed run must also restore the torch RNG stream to match.
    model.write_text(
        json.dumps(dict(context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1))
    )
    return [
        sys.executable,
        "-m",
        "scratchllm",
        "pretrain",
        "--data",
        str(data_dir / "corpora" / "the-verdict.txt"),
        "--model",
        str(model),
        "--tokenizer",
        "bytes",
        "--out",
        str(tmp / out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--grad-accum-steps",
        "2",
        "--eval-every",
        "5",
        "--eval-batches",
        "2",
        "--log-every",
        "1",
        "--save-every",
        "1",
        "--sample-tokens",
        "4",
        "--seed",
        "11",
        "--keep-last",
        "3",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # same thread count in every process: same float sums
    env.update(extra)
    return env


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def _step(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    done = _run(_cmd(data_dir, tmp, "full"))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def _assert_same_run(a: Path, b: Path) -> None:
    # Bit for bit: the very bytes of the weights file, and every logged loss.
    assert (a / "checkpoint" / "model.safetensors").read_bytes() == (
        b / "checkpoint" / "model.safetensors"
    ).read_bytes()
    assert _losses(a) == _losses(b)
    assert [s for s, _ in _losses(a)] == list(range(1, STEPS + 1))


def test_sigkill_mid_training_then_resume_is_bitwise_identical(full_run, data_dir):
    tmp = full_run
    # Saves are slowed down so the kill lands mid-run, not after the end.
    proc = subprocess.Popen(
        _cmd(data_dir, tmp, "killed"),
        env=_env(SCRATCHLLM_TEST_CHECKPOINT_DELAY="0.3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while _step(tmp / "killed") < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = _step(tmp / "killed")
    assert 6 <= killed_at < STEPS
    done = _run(_cmd(data_dir, tmp, "killed", "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(tmp / "full", tmp / "killed")
    # Retention: the latest three snapshots, and best/ holds the lowest val_loss seen.
    snaps = sorted(p.name for p in (tmp / "killed" / "checkpoints").iterdir())
    assert snaps == [f"step-{s:06d}" for s in (STEPS - 2, STEPS - 1, STEPS)]
    evals = [json.loads(line) for line in (tmp / "killed" / "metrics.jsonl").open()]
    vals = {r["step"]: r["val_loss"] for r in evals if r["kind"] == "eval" and r["step"] > 0}
    best = json.loads((tmp / "killed" / "best" / "checkpoint.json").read_text())
    assert best["eval"]["val_loss"] == min(vals.values())
    assert best["step"] == min(vals, key=vals.get)


@pytest.mark.parametrize("stage", ["written", "swapping"])
def test_kill_during_checkpoint_write_leaves_previous_checkpoint(full_run, data_dir, stage):
    """SIGKILL inside the 4th save: after the temporary copy is complete ("written"), or with
    the old checkpoint moved aside and the new one not yet renamed in ("swapping")."""
    tmp = full_run
    out = f"crash-{stage}"
    done = _run(_cmd(data_dir, tmp, out), SCRATCHLLM_TEST_CHECKPOINT_CRASH=f"{stage}:4")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    run = tmp / out
    if stage == "swapping":
        assert not (run / "checkpoint").exists()  # the crash left only the .old copy
    ckpt = load_checkpoint(run)  # whole and loadable: the 3rd save
    assert ckpt.meta["step"] == 3
    assert load_train_state(run)["step"] == 3
    logits = ckpt.model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
    if stage == "written":  # and the run resumes from it to the same end as if never killed
        done = _run(_cmd(data_dir, tmp, out, "--resume"))
        assert done.returncode == 0, done.stderr[-3000:]
        _assert_same_run(tmp / "full", run)


def test_pruning_clears_what_a_killed_snapshot_save_left(tmp_path):
    """A kill mid-save leaves `.step-N.tmp` (never complete: removed) or `.step-N.old` with
    no `step-N` (the swap's only whole copy: restored). Found by CI: a SIGKILL during the
    snapshot write left a `.tmp` that later prunes never removed."""
    snaps = tmp_path / "checkpoints"
    for name in ["step-000004", "step-000005", ".step-000003.tmp", ".step-000002.old"]:
        (snaps / name).mkdir(parents=True)
        (snaps / name / "checkpoint.json").write_text("{}")
    (snaps / "step-000001").mkdir()
    (snaps / ".step-000001.old").mkdir()  # its swap finished: the .old is stale
    removed = prune_checkpoints(snaps, keep=3)
    assert sorted(p.name for p in snaps.iterdir()) == ["step-000002", "step-000004", "step-000005"]
    assert [p.name for p in removed] == ["step-000001"]
    assert (snaps / "step-000002" / "checkpoint.json").exists()


# -- in-process: signals, divergence, accumulation position --------------------------------------
def _trainer(tmp_path, data_dir, max_steps=8, **kw) -> Trainer:
    text = (data_dir / "corpora" / "the-verdict.txt").read_bytes()
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    torch.manual_seed(0)
    model = GPTModel(
        ModelConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
    )
    task = LMTask(tokens[:4000], tokens[4000:], ByteTokenizer(), 4, 16, sample_prompt="a")
    config = TrainConfig(
        max_steps=max_steps,
        lr=1e-3,
        eval_every=100,
        eval_batches=1,
        sample_tokens=0,
        log_every=1,
        **kw,
    )
    return Trainer(model, task, config, tmp_path / "run", ByteTokenizer())


class SignalAt(TrainerCallback):
    def __init__(self, step: int, sig: int) -> None:
        self.step, self.sig = step, sig

    def on_step(self, trainer, record):
        if trainer.step == self.step:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_stops(tmp_path, data_dir, sig):
    trainer = _trainer(tmp_path, data_dir)
    trainer.callback = SignalAt(3, sig)
    before = signal.getsignal(sig)
    result = trainer.fit()
    assert result.interrupted == signal.Signals(sig).name and result.steps == 3
    assert signal.getsignal(sig) == before  # the handler is put back
    assert load_checkpoint(tmp_path / "run").meta["step"] == 3
    state = load_train_state(tmp_path / "run")
    assert state["step"] == 3 and state["accum_position"] == 0


class PoisonAt(TrainerCallback):
    """Turns a weight into NaN after a step, so the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, record):
        if trainer.step == self.step:
            with torch.no_grad():
                trainer.model.final_norm.scale.fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    trainer = _trainer(tmp_path, data_dir, save_every=2)
    trainer.callback = PoisonAt(5)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 6"):
        trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_state_dict(ckpt.path).values())


def test_resume_refuses_a_mid_accumulation_state(tmp_path, data_dir):
    _trainer(tmp_path, data_dir, max_steps=2).fit()
    state = load_train_state(tmp_path / "run")
    state["accum_position"] = 1
    torch.save(state, tmp_path / "run" / "checkpoint" / "train_state.pt")
    again = _trainer(tmp_path, data_dir)
    with pytest.raises(CheckpointError, match="accumulation"):
        again.fit(resume=True)


# -- throughput switches change speed or memory, never results -------------------------------------
def _grads(model: GPTModel, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("switch", ["activation_checkpointing", "vocab_multiple"])
def test_speed_switches_keep_logits_and_gradients(switch, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=301, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1
    )
    model = GPTModel(config).train()
    idx = torch.randint(0, 301, (3, 16))
    torch.manual_seed(1)  # same dropout masks in both passes
    ref_logits, ref_grads = _grads(model, idx)
    from scratchllm.train.parallelize import parallelize

    parallelize(model, torch.device("cpu"), **{switch: 64 if switch == "vocab_multiple" else True})
    torch.manual_seed(1)
    logits, grads = _grads(model, idx)
    assert logits.shape == (3, 16, 301)  # padded rows never reach the caller
    assert len(calls) == (2 if switch == "activation_checkpointing" else 0)  # one per block
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class InterruptMidStep:
    """Wraps a task: a KeyboardInterrupt (a second Ctrl-C) inside micro-batch `micro` of step
    `step`, after the loader has already handed out that step's first micro-batches."""

    def __init__(self, task, step: int, micro: int, accum: int) -> None:
        self.task, self.calls, self.at = task, 0, step * accum + micro

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at + 1:
            raise KeyboardInterrupt
        return self.task.loss(model, batch)


def test_interrupt_mid_step_saves_the_step_boundary_and_resumes_exactly(tmp_path, data_dir):
    straight = _trainer(tmp_path / "a", data_dir, max_steps=6, grad_accum_steps=2)
    straight.fit()
    cut = _trainer(tmp_path / "b", data_dir, max_steps=6, grad_accum_steps=2)
    cut.task = InterruptMidStep(cut.task, step=3, micro=1, accum=2)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    state = load_train_state(tmp_path / "b" / "run")
    assert state["step"] == 3 and state["accum_position"] == 0
    resumed = _trainer(tmp_path / "b", data_dir, max_steps=6, grad_accum_steps=2)
    resumed.fit(resume=True)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert (a / "checkpoint" / "model.safetensors").read_bytes() == (
        b / "checkpoint" / "model.safetensors"
    ).read_bytes()
    assert _losses(a) == _losses(b)


def test_a_second_ctrl_c_during_the_update_waits_for_it_to_end():
    from scratchllm.train.state import _StopRequest

    stop = _StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop at the next boundary
        assert stop.signal == "SIGINT"
        finished = False
        with pytest.raises(KeyboardInterrupt), stop.held():
            os.kill(os.getpid(), signal.SIGINT)  # the second, mid-update: deferred
            finished = True
        assert finished
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # outside the update: at once
    finally:
        stop.restore()
