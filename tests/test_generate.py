"""Sampling: reproducibility, greedy equivalences, the nucleus, sliding context, stopping."""

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.inference.generate import generate, generate_text
from scratchllm.inference.sampling import filter_logits, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return GPTModel(config).eval()


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 ≥ 0.7
    assert kept(0.85) == [False, True, True, True]  # 0.95 ≥ 0.85
    assert kept(0.99) == [True, True, True, True]
    assert kept(0.01) == [False, True, False, False]  # the top token always stays


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert kept == [False, True, True, False]


def test_sampled_distribution_respects_nucleus():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] - 0.5 / 0.8) < 0.03  # renormalised over the nucleus


def test_seeded_sampling_is_reproducible(model):
    idx = torch.tensor([[1, 2, 3]])
    runs = [
        generate(
            model, idx, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    other = generate(
        model, idx, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(8)
    )
    assert not torch.equal(runs[0], other)


def test_top_k_one_equals_greedy(model):
    idx = torch.tensor([[5, 6, 7, 8]])
    greedy = generate(model, idx, 12)
    topk1 = generate(
        model, idx, 12, temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(greedy, topk1)


def test_cache_and_sliding_window_match_book_loop(model):
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    out = generate(model, idx, 30)  # runs past the 16-token context: the window slides
    # The book's loop: recompute on the last context_size tokens at every step.
    ref = idx
    for _ in range(30):
        logits = model(ref[:, -16:])[:, -1]
        ref = torch.cat([ref, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    assert torch.equal(generate(model, idx, 30, use_cache=False), ref)


def test_stops_at_eos(model):
    idx = torch.tensor([[1, 2]])
    first = generate(model, idx, 1)[0, -1].item()
    out = generate(model, idx, 10, eos_id=first)
    assert out.shape[1] == 3 and out[0, -1].item() == first


def test_prompt_longer_than_context_is_an_error(model):
    with pytest.raises(
        InputError, match="prompt of 17 tokens exceeds the model's context length of 16"
    ):
        generate(model, torch.zeros(1, 17, dtype=torch.long), 1)


def test_generate_text_returns_only_new_text(model):
    tok = ByteTokenizer()
    a = generate_text(model, tok, "ab", 5, temperature=0.9, seed=3)
    b = generate_text(model, tok, "ab", 5, temperature=0.9, seed=3)
    assert a == b and isinstance(a, str)
