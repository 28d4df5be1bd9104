"""`--recipe speedrun`: the size follows the budget and the measured speed, explicit settings win,
bf16 only where the CPU has it natively. Speeds are given, not measured: no timing here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchllm.cli import main
from scratchllm.train import recipe
from scratchllm.train.pretrain import PretrainOptions
from scratchllm.train.recipe import SHAPES, TOKENS_PER_PARAM, apply_recipe, choose_shape

CPU = torch.device("cpu")


def _speeds(rate: float) -> dict[str, float]:
    """Every shape at `rate` tokens/s (the choice then turns on the budget alone)."""
    return {s.label: rate for s in SHAPES}


def _fixed(rate: float):
    def measure(vocab_size, context, batch, device, dtype, budget, shapes=SHAPES):
        return _speeds(rate)

    return measure


def test_the_size_grows_with_the_budget():
    rate = 20_000.0
    picks = [choose_shape(budget, _speeds(rate))[0] for budget in (10, 3600, 36_000, 360_000)]
    assert picks[0] == SHAPES[0]  # nothing sees enough tokens: the smallest
    sizes = [s.non_embedding_params() for s in picks]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    for budget, shape in zip((3600, 36_000, 360_000), picks[1:], strict=True):
        # The pick sees enough tokens and the next size up would not.
        assert rate * budget >= TOKENS_PER_PARAM * shape.non_embedding_params()
        bigger = SHAPES.index(shape) + 1
        if bigger < len(SHAPES):
            assert rate * budget < TOKENS_PER_PARAM * SHAPES[bigger].non_embedding_params()


def test_a_faster_machine_gets_a_bigger_model():
    slow, _ = choose_shape(600, _speeds(5_000))
    fast, why = choose_shape(600, _speeds(500_000))
    assert fast.non_embedding_params() > slow.non_embedding_params()
    assert "tokens/s" in why


def test_the_recipe_sets_muon_wsd_and_writes_its_model(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: False)
    opts = PretrainOptions(out=str(tmp_path / "run"), time_budget=600.0, recipe="speedrun")
    new, choice = apply_recipe(
        opts, 257, CPU, explicit={"time_budget", "recipe", "out"}, measure=_fixed(20_000)
    )
    assert (new.optimizer, new.schedule, new.min_lr) == ("muon", "wsd", 0.0)
    assert new.muon_weight_decay == recipe.MUON_WEIGHT_DECAY > 0
    assert new.dtype == "float32"
    assert new.embedding_lr is None  # bytes (257 ids): the table stays at the AdamW rate
    subword, _ = apply_recipe(
        opts, 4096, CPU, explicit={"time_budget", "recipe", "out"}, measure=_fixed(20_000)
    )
    assert subword.embedding_lr == recipe.EMBEDDING_LR > 10 * subword.lr  # its own rate
    model = json.loads((tmp_path / "run" / "recipe-model.json").read_text())
    assert new.model == str(tmp_path / "run" / "recipe-model.json")
    assert model["pos_embedding"] == "rope" and model["qk_norm"]  # config.GPT_MODERN's
    assert any("model" in line and "tokens/s" in line for line in choice.reasons)
    new.validate()


def test_explicit_settings_win(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: False)
    opts = PretrainOptions(
        out=str(tmp_path / "run"),
        time_budget=600.0,
        recipe="speedrun",
        optimizer="adamw",
        batch_size=4,
        model="gpt-micro",  # the default, yet given: it stays
    )
    given = {"time_budget", "recipe", "out", "optimizer", "batch_size", "model"}
    measured = []
    new, choice = apply_recipe(
        opts, 257, CPU, explicit=given, measure=lambda *a: measured.append(a) or {}
    )
    assert (new.optimizer, new.batch_size, new.model) == ("adamw", 4, "gpt-micro")
    assert new.lr == recipe.ADAMW_ONLY_LR  # an AdamW-only run gets AdamW's rate
    assert new.schedule == "wsd"  # what was not given still comes from the recipe
    assert not measured  # the user's model: no size calibration
    assert any("yours" in line for line in choice.reasons)
    # In the library, settings that differ from their defaults count as given.
    lib, _ = apply_recipe(
        PretrainOptions(out=str(tmp_path / "lib"), time_budget=60.0, lr=1e-4),
        257,
        CPU,
        measure=_fixed(20_000),
    )
    assert lib.lr == 1e-4 and lib.optimizer == "muon"


@pytest.mark.parametrize("rate", [1_000.0, 30_000.0, 300_000.0])
def test_the_batch_is_the_largest_that_keeps_enough_steps(rate, tmp_path):
    opts = PretrainOptions(out=str(tmp_path / "run"), time_budget=60.0, recipe="speedrun")
    new, choice = apply_recipe(opts, 257, CPU, explicit=set(), measure=_fixed(rate))
    context = json.loads(Path(new.model).read_text())["context_length"]
    assert context == SHAPES[0].context  # the smallest shape at these speeds, with its context
    tokens = rate * 60.0
    step = new.batch_size * context
    cap = recipe.CPU_MAX_BATCH_TOKENS  # on a CPU a larger step only costs steps
    assert step in recipe.BATCH_TOKENS and step <= cap
    if tokens / step < recipe.TARGET_STEPS:  # too short a budget for any: the smallest step
        assert step == min(recipe.BATCH_TOKENS)
    bigger = [b for b in recipe.BATCH_TOKENS if step < b <= cap]
    assert not bigger or tokens / bigger[0] < recipe.TARGET_STEPS


def test_the_cpu_cap_bounds_the_step_and_nothing_else():
    many = 1e9  # tokens: every step size keeps TARGET_STEPS
    assert recipe.pick_batch(many, 64)[0] * 64 == max(recipe.BATCH_TOKENS)  # no cap (a GPU)
    assert recipe.pick_batch(many, 64, recipe.CPU_MAX_BATCH_TOKENS)[0] * 64 == 3072
    assert recipe.pick_batch(many, 256, 3072)[0] == 12
    few = 200 * 1536.0  # exactly TARGET_STEPS steps of 1,536: the cap changes nothing
    assert recipe.pick_batch(few, 64, 3072) == recipe.pick_batch(few, 64)
    batch, _ = recipe.fit_batch(1e9 / 60, 60.0, 64, lambda step: 1e9 / 60, max_tokens=3072)
    assert batch * 64 == 3072


def test_each_size_has_its_context_and_a_given_context_wins(tmp_path):
    assert [s.context for s in SHAPES] == sorted(s.context for s in SHAPES)
    model = recipe.speedrun_model(SHAPES[2])
    assert model["context_length"] == SHAPES[2].context
    assert recipe.speedrun_model(SHAPES[2], 96)["context_length"] == 96
    # A subword token is ~4 bytes: the same span of text is four times fewer tokens.
    assert [SHAPES[0].context_for(v) for v in (257, 4096)] == [64, 256]
    assert SHAPES[-1].context_for(50257) == recipe.MAX_SUBWORD_CONTEXT
    bpe, _ = apply_recipe(
        PretrainOptions(out=str(tmp_path / "bpe"), time_budget=60.0, recipe="speedrun"),
        4096,
        CPU,
        explicit=set(),
        measure=_fixed(20_000),
    )
    assert json.loads(Path(bpe.model).read_text())["context_length"] == 256
    opts = PretrainOptions(
        out=str(tmp_path / "run"), time_budget=60.0, recipe="speedrun", context_length=48
    )
    seen = []

    def measure(vocab_size, context, batch_tokens, device, dtype, budget, shapes=SHAPES):
        seen.append((context, batch_tokens))
        return _speeds(20_000.0)

    new, _ = apply_recipe(opts, 257, CPU, explicit={"context_length"}, measure=measure)
    assert seen[0] == (48, recipe.CALIBRATION_TOKENS)  # then the batch picked is timed
    assert all(context == 48 for context, _ in seen)
    assert json.loads(Path(new.model).read_text())["context_length"] == 48


def test_a_step_that_is_slower_per_token_is_stepped_down():
    # 60 s at 100k tokens/s calibrated: 6M tokens, so 24,576 a step (244 steps) is picked first;
    # timed (a made-up machine), the larger steps run at a third of the speed, 3,072 and below
    # at the full speed.
    def rate_at(step_tokens):
        return 100_000.0 if step_tokens <= 3072 else 33_000.0

    batch, rate = recipe.fit_batch(100_000.0, 60.0, 64, rate_at)
    assert (batch * 64, rate) == (3072, 100_000.0)
    # Without the slowdown the largest step that keeps TARGET_STEPS stands.
    batch, rate = recipe.fit_batch(100_000.0, 60.0, 64, lambda step: 100_000.0)
    assert batch * 64 == 24576 and 100_000.0 * 60 / (batch * 64) >= recipe.TARGET_STEPS
    # A step that keeps its speed but is timed too slow for TARGET_STEPS steps down too.
    batch, _ = recipe.fit_batch(100_000.0, 60.0, 64, lambda step: 81_000.0)
    steps_at_largest = 81_000.0 * 60 / 24576
    assert steps_at_largest < recipe.TARGET_STEPS and batch * 64 == 24576 // 2


@pytest.mark.parametrize("native, dtype", [(True, "bfloat16"), (False, "float32")])
def test_the_dtype_follows_the_cpu(native, dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "cpu_has_native_bf16", lambda: native)
    opts = PretrainOptions(out=str(tmp_path / "run"), time_budget=60.0, recipe="speedrun")
    new, choice = apply_recipe(opts, 257, CPU, explicit=set(), measure=_fixed(20_000))
    assert new.dtype == dtype
    assert any(line.startswith(f"dtype {dtype}") for line in choice.reasons)


def test_the_calibration_measures_a_real_step():
    speeds = recipe.measure_speeds(257, 16, 2, CPU, "float32", 1.0, SHAPES[:2], seconds=0.0)
    # A 1-second budget feeds no candidate: the walk stops after the first.
    assert list(speeds) == [SHAPES[0].label] and speeds[SHAPES[0].label] > 0


def test_the_recipe_needs_a_budget(tmp_path, capsys):
    argv = ["pretrain", "--recipe", "speedrun", "--out", str(tmp_path / "run"), "--data", "x"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--recipe speedrun needs --time-budget (e.g. 10m)"), err


def test_a_recipe_run_through_the_cli(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "measure_speeds", lambda *a, **k: {SHAPES[0].label: 1.0})
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--data",
        str(data_dir / "corpora" / "the-verdict.txt"),
        "--recipe",
        "speedrun",
        "--time-budget",
        "1s",
        "--eval-batches",
        "2",
        "--context-length",
        "32",
        "--sample-tokens",
        "0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recipe speedrun picked:" in printed and "optimizer muon" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["recipe"] == "speedrun" and run["optimizer"] == "muon"
    assert run["eval_batches"] == 2  # given on the command line
