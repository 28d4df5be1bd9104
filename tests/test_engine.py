"""The batched engine against references that do not share its code paths.

References: the model run on the whole sequence at every step without any cache (the book's
loop), one-by-one generation, `Tokenizer.decode` of the final ids, and `str.find` for stops.
"""

from __future__ import annotations

import os

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.inference.chat import ALPACA_STOPS, ChatSession, alpaca_prompt, chat_prompt
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.sampling import apply_repetition_penalty
from scratchllm.model.attention import BatchKVCache

NO_STOP = ()  # no stop ids: every sample runs to max_tokens


def make_model(**kw) -> GPTModel:
    torch.manual_seed(0)
    config = dict(
        vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    config.update(kw)
    return GPTModel(ModelConfig(**config)).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "gates"])
def model(request):
    if request.param == "gpt2":
        return make_model()
    if request.param == "gates":  # the smear reads each row's previous token id from the cache
        model = make_model(pos_embedding="rope", smear=True, attn_gate=True, bias=False)
        with torch.no_grad():  # gates that act (both start neutral)
            model.smear.scale.fill_(2.0)
            model.smear.weight.normal_()
            for block in model.trf_blocks:
                block.att.gate.weight.normal_()
        return model
    # RoPE, RMSNorm, SwiGLU and grouped-query heads: positions reach the model differently.
    return make_model(
        pos_embedding="rope",
        norm="rmsnorm",
        ffn="swiglu",
        n_kv_heads=2,
        bias=False,
        hidden_dim=64,
    )


def uncached_greedy(model: GPTModel, prompt: list[int], n: int) -> list[int]:
    """The book's loop: run the whole sequence through the model for every new token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt) :].tolist()


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13], [42], [7, 7, 7, 7], [200, 100]]


def test_cached_greedy_equals_uncached(model):
    engine = Engine(model, ByteTokenizer())
    for prompt in PROMPTS[:3]:
        out = engine.generate([prompt], SamplingParams(max_tokens=20, stop_ids=NO_STOP))
        assert out[0][0].token_ids == uncached_greedy(model, prompt, 20)


def test_batched_equals_one_by_one_for_different_lengths(model):
    params = SamplingParams(max_tokens=20, stop_ids=NO_STOP)
    alone = [Engine(model, ByteTokenizer()).generate([p], params)[0][0] for p in PROMPTS]
    engine = Engine(model, ByteTokenizer(), max_batch=8)
    together = engine.generate(PROMPTS, params)
    assert [c[0].token_ids for c in together] == [c.token_ids for c in alone]
    assert engine.peak_batch == len(PROMPTS)


def test_requests_joining_a_running_batch_match_one_by_one(model):
    # Continuous batching: prompts arrive while others are mid-decode, with different limits.
    params = [SamplingParams(max_tokens=m, stop_ids=NO_STOP) for m in (30, 7, 15, 22, 3)]
    engine = Engine(model, ByteTokenizer(), max_batch=3)
    requests = []
    for prompt, p in zip(PROMPTS, params, strict=True):
        requests.append(engine.submit(prompt, p))
        engine.step()
        engine.step()
    while engine.step():
        pass
    for prompt, p, r in zip(PROMPTS, params, requests, strict=True):
        assert r.completions[0].token_ids == uncached_greedy(model, prompt, p.max_tokens)
    assert engine.peak_batch == 3  # never more than max_batch rows at once


def test_stop_id_ends_only_its_own_sequence(model):
    engine = Engine(model, ByteTokenizer())
    free = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, stop_ids=NO_STOP))
    stop = free[0][0].token_ids[4]  # the 5th token of the first prompt becomes a stop id
    out = engine.generate(PROMPTS[:2], SamplingParams(max_tokens=12, stop_ids=(stop,)))
    first = free[0][0].token_ids
    assert out[0][0].token_ids == first[: first.index(stop)]
    assert out[0][0].finish_reason == "stop"
    second = free[1][0].token_ids
    expect = second[: second.index(stop)] if stop in second else second
    assert out[1][0].token_ids == expect


def test_stop_strings_cut_exactly():
    tok = ByteTokenizer()
    engine = Engine(make_model(), tok)
    full = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=30, stop_ids=NO_STOP))[0][0]
    text = full.text
    # A stop string spanning several tokens in the middle of the text, and one never produced.
    stop = text[9:12]
    params = SamplingParams(max_tokens=30, stop_ids=NO_STOP, stop=("\x00never", stop))
    cut = engine.generate([[1, 2, 3]], params)[0][0]
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(e.text for e in engine.stream([1, 2, 3], params))
    assert streamed == cut.text  # no part of the stop string ever went out


def test_streaming_joins_to_the_full_text_with_multibyte_characters():
    engine = Engine(make_model(), ByteTokenizer())
    # "é" is 2 bytes and "€" 3: each arrives one byte-token at a time.
    forced = list("aé€b".encode()) * 4
    events = list(_stream_forced(engine, forced))
    pieces = [e.text for e in events]
    assert "".join(pieces) == "aé€b" * 4
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert events[-1].finish_reason == "length"


def _stream_forced(engine: Engine, forced: list[int]):
    """Stream while the model is forced (through its head bias) to emit `forced` in order."""
    model = engine.model
    step = {"i": 0}

    def force(module, args, output):
        out = torch.full_like(output, -1e4)
        out[..., forced[min(step["i"], len(forced) - 1)]] = 0.0
        step["i"] += 1
        return out

    hook = model.out_head.register_forward_hook(force)
    try:
        yield from engine.stream([1, 2], SamplingParams(max_tokens=len(forced), stop_ids=NO_STOP))
    finally:
        hook.remove()


def test_stream_of_random_bytes_equals_decode(model):
    tok = ByteTokenizer()
    engine = Engine(model, tok)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop_ids=NO_STOP)
    events = list(engine.stream([1, 2, 3], params))
    ids = [i for e in events for i in e.token_ids]
    assert "".join(e.text for e in events) == tok.decode(ids)
    assert len(ids) == 40


def test_seeded_sampling_is_reproducible_and_n_samples_share_a_prefill(model):
    engine = Engine(model, ByteTokenizer())
    params = SamplingParams(
        max_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=11, n=3, stop_ids=NO_STOP
    )
    a = [c.token_ids for c in engine.generate([[4, 5, 6]], params)[0]]
    b = [c.token_ids for c in engine.generate([[4, 5, 6]], params)[0]]
    assert a == b and len(a) == 3
    assert len({tuple(x) for x in a}) > 1  # the samples differ from each other
    other = SamplingParams(**{**params.__dict__, "seed": 12})
    assert [c.token_ids for c in engine.generate([[4, 5, 6]], other)[0]] != a
    # Sample i of n equals a single sample drawn with seed + i: forked rows are independent.
    single = SamplingParams(**{**params.__dict__, "n": 1, "seed": 12})
    assert engine.generate([[4, 5, 6]], single)[0][0].token_ids == a[1]


def test_repetition_penalty_matches_its_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    engine = Engine(make_model(), ByteTokenizer())
    plain = engine.generate([[9, 9]], SamplingParams(max_tokens=30, stop_ids=NO_STOP))[0][0]
    strict = SamplingParams(max_tokens=30, stop_ids=NO_STOP, repetition_penalty=1e6)
    penalised = engine.generate([[9, 9]], strict)[0][0]
    assert len(set(plain.token_ids)) < 30  # a random model repeats itself greedily
    ids = penalised.token_ids
    assert len(set(ids)) == len(ids) and 9 not in ids  # a huge penalty forbids every repeat


def test_bfloat16_engine_runs_and_mostly_agrees():
    model = make_model()
    ref = Engine(model, ByteTokenizer()).generate(PROMPTS, SamplingParams(max_tokens=10))
    half = Engine(make_model().to(torch.bfloat16), ByteTokenizer())
    out = half.generate(PROMPTS, SamplingParams(max_tokens=10))
    assert all(len(c[0].token_ids) <= 10 for c in out)
    agree = sum(a[0].token_ids[:1] == b[0].token_ids[:1] for a, b in zip(ref, out, strict=True))
    assert agree >= 3  # bf16 rounding may flip a near tie, not most first tokens


def test_limits_and_bad_settings_are_input_errors():
    engine = Engine(make_model(), ByteTokenizer())
    with pytest.raises(InputError, match="context length is 64 tokens, but 70 were requested"):
        engine.generate([[1] * 10], SamplingParams(max_tokens=60))
    with pytest.raises(InputError, match="prompt is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(InputError, match="top_p"):
        engine.generate([[1]], SamplingParams(top_p=1.5))
    with pytest.raises(InputError, match="max_tokens"):
        engine.generate([[1]], SamplingParams(max_tokens=0))
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.generate([[300]], SamplingParams(max_tokens=1))


def test_cache_rows_select_and_merge_keep_their_contents():
    config = ModelConfig(vocab_size=10, context_length=32, emb_dim=8, n_heads=2, n_layers=1)
    a = BatchKVCache(config, 2, 4)
    b = BatchKVCache(config, 1, 8)
    for cache, value in ((a, 1.0), (b, 5.0)):
        k = torch.arange(cache.batch_size, dtype=torch.float32)[:, None, None, None] + value
        cache.update(0, k.expand(-1, 2, 3, 4), k.expand(-1, 2, 3, 4))
        cache.set_lengths([3] * cache.batch_size)
    a.set_lengths([3, 2])
    a.merge(b)
    assert a.lengths_list == [3, 2, 3] and a.capacity == 8
    assert a.keys[0][:, 0, 0, 0].tolist() == [1.0, 2.0, 5.0]
    a.select([2, 0, 0])
    assert a.lengths_list == [3, 3, 3] and a.keys[0][:, 0, 0, 0].tolist() == [5.0, 1.0, 1.0]
    a.reserve(20)
    assert a.capacity == 20 and a.keys[0][0, 0, 2, 0].item() == 5.0


def test_chat_prompt_default_template_and_session_history():
    tok = ByteTokenizer()
    messages = [{"role": "user", "content": "Hi"}]
    ids, stops = chat_prompt(tok, messages)
    assert tok.decode(ids) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nHi\n\n### Response:\n"
    )
    assert stops == ALPACA_STOPS
    assert alpaca_prompt(messages + [{"role": "assistant", "content": "Yo"}]).endswith(
        "### Response:\nYo\n\n### Response:\n"
    )
    with pytest.raises(InputError, match="role"):
        chat_prompt(tok, [{"role": "robot", "content": "x"}])
    model = make_model(context_length=256)
    session = ChatSession(Engine(model, tok), SamplingParams(max_tokens=40, stop_ids=NO_STOP))
    for turn in range(4):
        reply = "".join(session.send(f"message number {turn}"))
        assert session.history[-1] == {"role": "assistant", "content": reply}
    # 4 turns of ~150 tokens cannot all fit in 256: the oldest were dropped, the last kept.
    assert session.history[-2]["content"] == "message number 3"
    assert len(session.history) < 8
    ids, _, _ = session.prompt("next")
    assert len(ids) + 40 <= 256
    session.reset()
    assert session.history == []


def test_chat_command_streams_keeps_history_and_resets(tmp_path):
    import subprocess
    import sys

    from scratchllm.checkpoint import save_checkpoint
    from scratchllm.inference.generate import generate_text

    tok = ByteTokenizer()
    model = make_model(context_length=256)
    save_checkpoint(tmp_path / "ckpt", model, tok)

    def reply(messages: list[dict[str, str]]) -> str:  # the book's loop on the Alpaca prompt
        text = generate_text(model, tok, alpaca_prompt(messages), max_new_tokens=20)
        for stop in ALPACA_STOPS:
            text = text.split(stop)[0]
        return text

    stdin = "hello\nagain\n/reset\nagain\n/exit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "scratchllm", "chat", "--checkpoint", str(tmp_path / "ckpt")]
        + ["--max-new-tokens", "20"],
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode("utf-8", errors="surrogateescape").split("\n")
    assert lines[0].startswith("chatting with")
    first = reply([{"role": "user", "content": "hello"}])
    second = reply(
        [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "again"},
        ]
    )
    fresh = reply([{"role": "user", "content": "again"}])
    assert second != fresh  # the history changes the answer, so the check below means something
    out = "\n".join(lines[1:])
    assert out == f"{first}\n{second}\n[conversation reset]\n{fresh}\n"


def test_chat_command_bad_input_exits_2(tmp_path):
    import subprocess
    import sys

    from scratchllm.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", make_model(), ByteTokenizer())
    proc = subprocess.run(
        [sys.executable, "-m", "scratchllm", "chat", "--checkpoint", str(tmp_path / "ckpt")]
        + ["--top-p", "3"],
        input=b"",
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "top-p" in err[0] and "Traceback" not in err[0]


def test_chat_template_of_an_imported_tokenizer_is_used(tmp_path, data_dir):
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from scratchllm.tokenizers.hf import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([(data_dir / "corpora" / "the-verdict.txt").read_text()], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = {"eos_token": "<|im_end|>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = HFTokenizer.from_directory(tmp_path)
    ids, stops = chat_prompt(hf, [{"role": "user", "content": "Hi"}])
    assert stops == ()
    assert hf.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_end = hf.token_to_id("<|im_end|>")
    model = make_model(vocab_size=hf.vocab_size)
    engine = Engine(model, hf)
    assert im_end in engine.stop_ids
    # Force "<|im_end|>" as the 4th token: the reply ends there, without it.
    forced = [ids[1], ids[2], ids[3], im_end, ids[1]]
    step = {"i": 0}

    def force(module, args, output):
        out = torch.full_like(output, -1e4)
        out[..., forced[step["i"]]] = 0.0
        step["i"] += 1
        return out

    hook = model.out_head.register_forward_hook(force)
    try:
        done = engine.generate([ids], SamplingParams(max_tokens=5))[0][0]
    finally:
        hook.remove()
    assert done.token_ids == forced[:3] and done.finish_reason == "stop"
    assert done.text == hf.decode(forced[:3])
