"""One request must never hurt another: a request whose own step raises fails alone, and the
sampling settings that used to raise (extreme temperature, penalty, seed) now compute."""

from __future__ import annotations

import math

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.inference import engine as engine_module
from scratchllm.inference.engine import Engine, SamplingParams


def make_engine(max_batch: int = 8) -> Engine:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return Engine(GPTModel(config).eval(), ByteTokenizer(), max_batch=max_batch)


GOOD = [SamplingParams(max_tokens=12, temperature=0.8, seed=i, stop_ids=()) for i in range(3)]


def _run_together(engine: Engine, bad: SamplingParams, *, bad_first: bool = False):
    """Three good sampled requests and one bad one, stepped in one batch."""
    requests = [engine.submit([1, 2, 3], p) for p in GOOD]
    engine.step()  # the good ones are decoding when the bad one arrives
    bad_request = engine.submit([4, 5], bad)
    while any(not r.done.is_set() for r in [*requests, bad_request]):
        engine.step()
    return requests, bad_request


def _alone(engine: Engine, params: SamplingParams) -> list[int]:
    return engine.generate([[1, 2, 3]], params)[0][0].token_ids


def test_a_request_whose_sampling_raises_fails_alone(monkeypatch):
    engine = make_engine()
    expected = [_alone(engine, p) for p in GOOD]
    real = engine_module.sample_next

    def flaky(scores, temperature, *args):
        if temperature == 0.123:  # the poisoned request
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(scores, temperature, *args)

    monkeypatch.setattr(engine_module, "sample_next", flaky)
    good, bad = _run_together(engine, SamplingParams(max_tokens=12, temperature=0.123, n=2))
    assert isinstance(bad.error, RuntimeError)
    assert [r.error for r in good] == [None, None, None]
    assert [r.completions[0].token_ids for r in good] == expected


def test_a_prefill_that_breaks_the_batch_fails_only_its_own_request(monkeypatch):
    engine = make_engine()
    real = engine_module._Sequence.__init__

    def init(self, request, *args):
        if request.prompt_ids == [9, 9]:
            raise ValueError("cannot prepare this request")
        real(self, request, *args)

    monkeypatch.setattr(engine_module._Sequence, "__init__", init)
    ok = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, stop_ids=()))
    broken = engine.submit([9, 9], SamplingParams(max_tokens=4))
    while not (ok.done.is_set() and broken.done.is_set()):
        engine.step()
    assert ok.error is None and len(ok.completions[0].token_ids) == 4
    assert isinstance(broken.error, ValueError)


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=1e-40),
        dict(temperature=1.0, repetition_penalty=1e-40),
        dict(temperature=1.0, seed=2**70),
    ],
)
def test_extreme_settings_compute_and_leave_others_alone(bad):
    engine = make_engine()
    expected = [_alone(engine, p) for p in GOOD]
    good, request = _run_together(engine, SamplingParams(max_tokens=12, stop_ids=(), **bad))
    assert request.error is None and len(request.completions[0].token_ids) == 12
    assert [r.completions[0].token_ids for r in good] == expected


def test_a_vanishing_temperature_is_greedy():
    engine = make_engine()
    greedy = _alone(engine, SamplingParams(max_tokens=12, stop_ids=()))
    assert _alone(engine, SamplingParams(max_tokens=12, temperature=1e-40, stop_ids=())) == greedy


@pytest.mark.parametrize(
    "field, value",
    [("temperature", math.nan), ("top_p", math.inf), ("repetition_penalty", math.nan)],
)
def test_non_finite_settings_are_input_errors(field, value):
    with pytest.raises(InputError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value}).validate()
