"""`--time-budget`: durations, the budget-driven schedule, the stop, evaluation not counted, resume.

The trainer's clock is injected: a fake one that the task moves forward by one "second" per
training batch (and by a large amount inside each evaluation), so the assertions are exact and
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchllm.cli import main
from scratchllm.config import ModelConfig
from scratchllm.model.gpt import GPTModel
from scratchllm.settings import build
from scratchllm.tokenizers.bytes import ByteTokenizer
from scratchllm.train.budget import LRPlan
from scratchllm.train.pretrain import PretrainOptions, pretrain
from scratchllm.train.schedule import lr_at_fraction
from scratchllm.train.settings import TrainConfig, parse_duration
from scratchllm.train.tasks import LMTask
from scratchllm.train.trainer import Trainer, TrainerCallback

STEP_S = 1.0  # fake seconds per training batch
EVAL_S = 100.0  # fake seconds per evaluation: far more than the budget, yet not counted


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ClockedTask(LMTask):
    """An LM task whose batches and evaluations move the fake clock."""

    def __init__(self, clock: FakeClock, **kw) -> None:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 64, 4000).astype(np.uint16)
        super().__init__(tokens[:3500], tokens[3500:], ByteTokenizer(), 4, 16, seed=1, **kw)
        self.clock = clock

    def next_batch(self):
        self.clock.now += STEP_S
        return super().next_batch()

    def evaluate(self, model, max_batches):
        self.clock.now += EVAL_S
        return super().evaluate(model, max_batches)


def _model() -> GPTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=ByteTokenizer().vocab_size,
        context_length=16,
        emb_dim=16,
        n_heads=2,
        n_layers=1,
        drop_rate=0.0,
    )
    return GPTModel(config)


def _config(**kw) -> TrainConfig:
    base = dict(
        time_budget=10.5,
        lr=1e-3,
        schedule="wsd",
        decay_fraction=0.4,
        min_lr=0.0,
        warmup_steps=0,
        eval_every=3,
        eval_batches=2,
        log_every=1,
        sample_tokens=0,
        measure_mfu=False,
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


def _trainer(out, callback=None, **kw) -> tuple[Trainer, FakeClock]:
    clock = FakeClock()
    task = ClockedTask(clock)
    return Trainer(
        _model(), task, _config(**kw), out, ByteTokenizer(), callback=callback, clock=clock
    ), clock


def _records(out, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize(
    "text, seconds",
    [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), (" 2 min ", 120.0), (45, 45.0)],
)
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds
    assert build(PretrainOptions, {"time_budget": text}).time_budget == seconds


def test_the_budget_fraction_drives_the_learning_rate():
    plan = LRPlan.for_config(_config(time_budget=100.0, warmup_steps=None), 2**62)
    assert plan.warmup_fraction == pytest.approx(0.05)
    assert plan.lr(3, 2.5) == pytest.approx(1e-3 * 0.5)  # half-way through the 5 s warmup
    assert plan.lr(50, 50.0) == pytest.approx(1e-3)  # stable
    assert plan.lr(80, 80.0) == pytest.approx(1e-3 * 0.5)  # half-way down the last 40%
    assert plan.lr(99, 100.0) == pytest.approx(0.0)
    assert plan.lr(0, 0.0) > 0  # the first step is not wasted at a zero rate
    # With max_steps too, whichever is further along sets the fraction.
    both = LRPlan.for_config(_config(time_budget=100.0, max_steps=10), 10)
    assert both.fraction(8, 10.0) == pytest.approx(0.8)
    assert both.done(10, 1.0) and both.done(3, 100.0) and not both.done(3, 99.0)


def test_a_budgeted_run_follows_the_clock_and_stops_within_one_step(tmp_path):
    trainer, clock = _trainer(tmp_path / "run")
    result = trainer.fit()
    # 1 s per step against 10.5 s: step 11 crosses the budget, and is the last.
    assert result.steps == 11
    assert 10.5 <= trainer.train_seconds < 10.5 + STEP_S
    train = _records(tmp_path / "run", "train")
    for r in train:  # the rate of each step is the schedule's at the seconds used before it
        used = r["train_s"] - STEP_S
        expected = lr_at_fraction(used / 10.5, 1e-3, 0.0, 0.0, "wsd", 0.4)
        assert r["lr"] == pytest.approx(expected)
    evals = _records(tmp_path / "run", "eval")
    assert evals[-1]["step"] == 11 and "val_bpb" in evals[-1]  # it ends with an evaluation
    assert all("val_bpb" in r for r in evals)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 11  # ... and a checkpoint
    state = torch.load(tmp_path / "run" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["train_seconds"] == pytest.approx(trainer.train_seconds)


def test_evaluation_time_is_not_counted(tmp_path):
    trainer, clock = _trainer(tmp_path / "run", eval_every=1)
    result = trainer.fit()
    evals = len(_records(tmp_path / "run", "eval"))
    assert evals == 12  # one before training, one after each step
    assert clock.now >= evals * EVAL_S  # the clock ran far past the budget ...
    assert result.steps == 11  # ... and training still had all of its 10.5 s


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.stop_step = step

    def on_step(self, trainer, record):
        if trainer.step == self.stop_step:
            raise KeyboardInterrupt


def test_resume_keeps_the_remaining_budget(tmp_path):
    full, _ = _trainer(tmp_path / "full")
    full.fit()
    cut, _ = _trainer(tmp_path / "cut", callback=StopAt(4))
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    state = torch.load(tmp_path / "cut" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["train_seconds"] == pytest.approx(4 * STEP_S)
    resumed, clock = _trainer(tmp_path / "cut")
    result = resumed.fit(resume=True)
    assert result.steps == 11  # 4 before the kill, 7 after: the 6.5 s left and one step over
    assert resumed.train_seconds == pytest.approx(full.train_seconds)
    lrs = lambda run: [r["lr"] for r in _records(tmp_path / run, "train")]  # noqa: E731
    assert lrs("cut") == pytest.approx(lrs("full"))  # the schedule carried on where it was


def test_a_real_budgeted_pretrain_ends_with_an_evaluation(tmp_path, data_dir):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(context_length=16, emb_dim=16, n_heads=2, n_layers=1)))
    opts = PretrainOptions(
        data=[str(data_dir / "corpora" / "the-verdict.txt")],
        model=str(config),
        out=str(tmp_path / "run"),
        time_budget=1.0,
        batch_size=2,
        eval_every=10**6,
        eval_batches=2,
        sample_tokens=0,
    )
    result = pretrain(opts, TrainerCallback())
    assert result["steps"] >= 1 and "val_bpb" in result["last_eval"]
    evals = _records(tmp_path / "run", "eval")
    assert evals[-1]["step"] == result["steps"]
    assert _records(tmp_path / "run", "train")[-1]["train_s"] >= 1.0


@pytest.mark.parametrize(
    "value, message",
    [
        ("10x", "--time-budget must be a duration such as 90, 90s, 10m or 1.5h, got '10x'"),
        ("-5", "--time-budget must be > 0, got -5.0"),
        ("0", "--time-budget must be > 0, got 0.0"),
    ],
)
def test_a_bad_budget_is_one_line_and_exit_2(value, message, tmp_path, capsys):
    argv = ["pretrain", "--time-budget", value, "--out", str(tmp_path / "run"), "--data", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(message), err
    assert not (tmp_path / "run").exists()


def test_a_budget_in_a_yaml_config(tmp_path):
    from scratchllm.settings import load_yaml, parse_values

    config = tmp_path / "run.yaml"
    config.write_text("time_budget: 1.5h\n")
    assert parse_values(PretrainOptions, load_yaml(PretrainOptions, config)) == {
        "time_budget": 5400.0
    }
