"""The learning-rate schedules, by step and by fraction of training done, on known values."""

from __future__ import annotations

import math

import pytest

from scratchllm.settings import SettingError
from scratchllm.train.schedule import lr_at, lr_at_fraction
from scratchllm.train.settings import TrainConfig


def test_wsd_by_step_warms_up_holds_the_peak_then_decays_linearly():
    lr = [lr_at(s, 1.0, 100, 10, 0.1, "wsd", 0.2) for s in range(101)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # warmup (step+1)/10
    assert all(v == 1.0 for v in lr[10:81])  # stable until 80% of training
    assert lr[90] == pytest.approx(0.55)  # halfway down from 1.0 to 0.1
    assert lr[99] == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert lr[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[80:], lr[81:], strict=False))


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [
        (0.0, 0.0),
        (0.05, 0.5),
        (0.1, 1.0),
        (0.5, 1.0),
        (0.7, 1.0),
        (0.85, 0.55),
        (1.0, 0.1),
        (3, 0.1),
    ],
)
def test_wsd_by_fraction(fraction, expected):
    assert lr_at_fraction(fraction, 1.0, 0.1, 0.1, "wsd", 0.3) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fraction", "expected"),
    [(0.5, 1.0), (0.7, 1.0), (0.7 + 0.3 / 4, 0.55), (0.7 + 0.3 * 0.81, 0.19), (1.0, 0.1)],
)
def test_wsd_sqrt_decays_by_one_minus_the_square_root(fraction, expected):
    """Peak 1, floor 0.1, decay over the last 30%: a quarter into the decay the rate is halfway
    down (1 − √¼ = ½), at 81% of it 1 − 0.9·0.9 = 0.19 (linear: 0.55 and 0.271)."""
    assert lr_at_fraction(fraction, 1.0, 0.1, 0.1, "wsd-sqrt", 0.3) == pytest.approx(expected)
    assert lr_at(round(fraction * 1000), 1.0, 1000, 10, 0.1, "wsd-sqrt", 0.3) == pytest.approx(
        expected
    )


def test_cosine_and_constant_by_fraction():
    assert lr_at_fraction(0.0, 2.0, 0.0, 0.0, "cosine") == pytest.approx(2.0)
    assert lr_at_fraction(0.5, 2.0, 0.0, 0.0, "cosine") == pytest.approx(1.0)
    assert lr_at_fraction(1.0, 2.0, 0.0, 0.2, "cosine") == pytest.approx(0.2)
    # After a 20% warmup the cosine runs over the remaining 80%.
    assert lr_at_fraction(0.6, 1.0, 0.2, 0.0, "cosine") == pytest.approx(0.5)
    assert lr_at_fraction(0.2 + 0.8 / 3, 1.0, 0.2, 0.0, "cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 3))
    )
    assert lr_at_fraction(0.9, 1.0, 0.2, 0.0, "constant") == 1.0


def test_by_fraction_matches_by_step_after_warmup():
    for s in range(10, 100, 7):
        for schedule in ("cosine", "wsd", "wsd-sqrt"):
            by_step = lr_at(s, 1.0, 100, 10, 0.05, schedule)
            by_fraction = lr_at_fraction(s / 100, 1.0, 0.1, 0.05, schedule)
            assert by_step == pytest.approx(by_fraction), (s, schedule)


def test_unknown_schedule_and_decay_fraction_range():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at_fraction(0.5, 1.0, schedule="linear")
    with pytest.raises(SettingError, match="decay_fraction"):
        TrainConfig(schedule="wsd", decay_fraction=0).validate()
