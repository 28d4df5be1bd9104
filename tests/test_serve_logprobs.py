"""Log-probabilities from the server, checked against the model's own logits.

A tiny random byte-level GPT is served on a free 127.0.0.1 port. Every number the server returns
is compared with log_softmax of logits from an independent forward pass in the test; echo text,
token names and text offsets are checked for consistency, token-id prompts against text prompts,
and the request bounds for token-id prompts.
"""

from __future__ import annotations

import http.client
import json
import threading

import pytest
import torch
from http_json import post

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.inference.chat import chat_prompt
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.scoring import prompt_logprobs, score
from scratchllm.serve.app import ServerThread
from scratchllm.serve.guards import ServerLimits
from scratchllm.serve.logprobs import token_text

MODEL = "lp-test"
CONTEXT = 192
LIMITS = ServerLimits(max_prompts=3, max_request_tokens=400)
TEXT = "Hello, café ☕ world"  # ASCII, a 2-byte and a 3-byte character


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return GPTModel(config).eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok, max_batch=8)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, model_name=MODEL, limits=LIMITS) as srv:
        yield srv


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of the next token, from a plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def char_offsets(ids: list[int]) -> list[int]:
    """Where each byte token of valid UTF-8 starts in its text: characters completed before it."""
    return [len(bytes(ids[:i]).decode("utf-8", errors="ignore")) for i in range(len(ids))]


def byte_id(name: str) -> int:
    """The byte token a name stands for: its one character, or "bytes:\\xNN"."""
    return int(name[8:10], 16) if name.startswith("bytes:") else ord(name)


def test_echo_scores_the_prompt_with_the_models_logprobs(server, model, tok):
    ids = tok.encode(TEXT)
    status, out = post(
        server, "/v1/completions", {"prompt": TEXT, "echo": True, "logprobs": 3, "max_tokens": 0}
    )
    assert status == 200, out
    (choice,) = out["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert out["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "total_tokens": len(ids),
    }
    assert lp["tokens"] == [token_text(tok, t) for t in ids]
    assert "bytes:\\xe2" in lp["tokens"] and "H" in lp["tokens"]  # partial UTF-8 named by bytes
    assert lp["text_offset"] == char_offsets(ids)
    for name, start in zip(lp["tokens"], lp["text_offset"], strict=True):
        if not name.startswith("bytes:"):
            assert TEXT[start : start + len(name)] == name
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = log_softmax(model, ids)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for i in range(1, len(ids)):
        values, top_ids = ref[i - 1].topk(3)
        top = lp["top_logprobs"][i]
        assert list(top) == [token_text(tok, t) for t in top_ids.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
        assert lp["token_logprobs"][i] <= max(top.values()) + 1e-6


def test_token_id_prompts_answer_as_the_text_prompt(server, tok):
    a, b = "Once upon a time", "Every effort moves"
    body = {"echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}
    _, by_text = post(server, "/v1/completions", {**body, "prompt": [a, b]})
    _, by_ids = post(server, "/v1/completions", {**body, "prompt": [tok.encode(a), tok.encode(b)]})
    _, one = post(server, "/v1/completions", {**body, "prompt": tok.encode(b)})
    assert [c["index"] for c in by_ids["choices"]] == [0, 1]
    for x, y in zip(by_text["choices"], by_ids["choices"], strict=True):
        assert x["text"] == y["text"] and x["logprobs"] == y["logprobs"]
    assert one["choices"][0]["text"] == by_text["choices"][1]["text"]
    assert one["choices"][0]["logprobs"]["tokens"] == by_text["choices"][1]["logprobs"]["tokens"]
    assert by_ids["usage"] == by_text["usage"]


def test_generated_logprobs_are_the_models_own(server, model, tok):
    prompt = "The object of"
    ids = tok.encode(prompt)
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    _, plain = post(server, "/v1/completions", body)
    _, echoed = post(server, "/v1/completions", {**body, "echo": True})
    gen = plain["choices"][0]["logprobs"]
    text = plain["choices"][0]["text"]
    assert echoed["choices"][0]["text"] == prompt + text
    assert (
        echoed["choices"][0]["logprobs"]["tokens"]
        == [token_text(tok, t) for t in ids] + gen["tokens"]
    )
    n = plain["usage"]["completion_tokens"]
    assert len(gen["tokens"]) == n == 6  # no stop id in this model's greedy 6 tokens
    out_ids = [byte_id(t) for t in gen["tokens"]]
    ref = log_softmax(model, ids + out_ids)
    expected = [ref[len(ids) - 1 + j, t].item() for j, t in enumerate(out_ids)]
    assert gen["token_logprobs"] == pytest.approx(expected, abs=1e-5)
    assert gen["text_offset"] == [
        o - len(prompt) for o in echoed["choices"][0]["logprobs"]["text_offset"][len(ids) :]
    ]
    offsets = gen["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] <= len(text)
    for name, start in zip(gen["tokens"], offsets, strict=True):
        if not name.startswith("bytes:"):
            assert text[start : start + len(name)] == name
    for j, top in enumerate(gen["top_logprobs"]):  # greedy: each token is its position's argmax
        assert list(top)[0] == gen["tokens"][j]
        assert top[gen["tokens"][j]] == pytest.approx(gen["token_logprobs"][j])
    # lm-eval's request: one generated token after the echoed prompt, the prompt scored.
    _, lm = post(
        server,
        "/v1/completions",
        {"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
    )
    lm_lp = lm["choices"][0]["logprobs"]
    assert len(lm_lp["token_logprobs"]) == len(ids) + 1
    assert lm_lp["token_logprobs"][-1] == pytest.approx(expected[0], abs=1e-5)
    assert lm_lp["token_logprobs"][1:-1] == pytest.approx(
        [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-5
    )


def test_a_stop_string_cuts_the_logprobs_with_the_text(server, tok):
    body = {"prompt": "A", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    _, full = post(server, "/v1/completions", body)
    text = full["choices"][0]["text"]
    cut = next(i for i in range(2, len(text)) if text[i].isascii() and text[i] not in text[:i])
    _, out = post(server, "/v1/completions", {**body, "stop": text[cut]})
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == text[:cut]
    before = full["choices"][0]["logprobs"]
    kept = sum(1 for o in before["text_offset"] if o < cut)  # the tokens whose text is kept
    assert 0 < kept < len(before["tokens"]) and lp["tokens"] == before["tokens"][:kept]
    assert lp["token_logprobs"] == before["token_logprobs"][:kept]
    assert all(top == {} for top in lp["top_logprobs"])


def test_chat_logprobs(server, model, tok):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {
        "messages": messages,
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    status, out = post(server, "/v1/chat/completions", body)
    assert status == 200, out
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    reply_bytes = [b for entry in content for b in entry["bytes"]]
    assert bytes(reply_bytes).decode("utf-8", errors="replace") == choice["message"]["content"]
    ids, _ = chat_prompt(tok, messages)
    ref = log_softmax(model, ids + reply_bytes)
    expected = [ref[len(ids) - 1 + j, t].item() for j, t in enumerate(reply_bytes)]
    assert [e["logprob"] for e in content] == pytest.approx(expected, abs=1e-5)
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    _, plain = post(
        server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None}
    )
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/completions", {"prompt": [1, 257]}, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"prompt": [[1, 2], [-1]]}, "prompt", "prompt[1][0]"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt", "prompt"),
        ("/v1/completions", {"prompt": [True, 2]}, "prompt", "prompt"),
        ("/v1/completions", {"prompt": [1.5]}, "prompt", "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt", "empty"),
        (
            "/v1/completions",
            {"prompt": [1] * (CONTEXT + 1), "max_tokens": 0, "echo": True},
            "prompt",
            "context",
        ),
        (
            "/v1/completions",
            {"prompt": [1] * CONTEXT, "max_tokens": 1},
            "max_tokens",
            "context length",
        ),
        ("/v1/completions", {"prompt": [[1]] * 4}, "prompt", "3"),
        (
            "/v1/completions",
            {"prompt": [[1] * 90] * 3, "n": 2, "max_tokens": 6},
            "max_tokens",
            "allows 400",
        ),
        (
            "/v1/completions",
            {"prompt": [[1] * 90] * 3, "n": 2, "max_tokens": 0, "echo": True},
            "max_tokens",
            "allows 400",
        ),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "20"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 1, "stream": True}, "logprobs", "stream"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "20",
        ),
        ("/detokenize", {"tokens": [5, 300]}, "tokens", "outside the vocabulary"),
    ],
)
def test_bad_requests_get_400(server, path, body, param, words):
    status, out = post(server, path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and words in out["error"]["message"], out


def test_tokenizer_routes_for_lm_eval(server, engine, tok):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("GET", "/tokenizer_info")
    info = json.loads(conn.getresponse().read())
    conn.close()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CONTEXT
    status, out = post(server, "/tokenize", {"prompt": TEXT + "<|endoftext|>"})
    assert (
        status == 200
        and out["tokens"] == tok.encode(TEXT) + [256]
        and out["count"] == len(out["tokens"])
    )
    status, out = post(server, "/detokenize", {"tokens": tok.encode(TEXT)})
    assert status == 200 and out["prompt"] == TEXT
    with ServerThread(engine, model_name=MODEL, api_key="sekret") as guarded:
        assert post(guarded, "/tokenize", {"prompt": "a"})[0] == 401
        auth = {"Authorization": "Bearer sekret"}
        assert post(guarded, "/tokenize", {"prompt": "a"}, auth) == (
            200,
            {"count": 1, "max_model_len": CONTEXT, "tokens": [97]},
        )


def test_scoring_runs_on_the_engine_thread_beside_decoding(server, engine, model, tok):
    assert engine.running
    assert (
        engine.result(engine.call(lambda: threading.current_thread().name)) == "scratchllm-engine"
    )
    params = SamplingParams(max_tokens=40)
    expected = Engine(model, tok).generate(["Once"], params)[0][0].token_ids  # idle engine
    request = engine.submit(tok.encode("Once"), params)
    prompts = [tok.encode(TEXT), tok.encode("Every effort moves you")]
    scores = [score(engine, prompts, top=2) for _ in range(5)]  # while the request decodes
    request.done.wait(60)
    assert request.completions[0].token_ids == expected
    direct = prompt_logprobs(model, prompts, top=2)
    for s in scores:
        assert [[e.token for e in row] for row in s] == [[e.token for e in row] for row in direct]
        for row, ref in zip(s, direct, strict=True):
            assert [e.logprob for e in row] == pytest.approx([e.logprob for e in ref], abs=1e-6)
    failed = engine.call(lambda: 1 / 0)  # a failing call fails alone
    with pytest.raises(ZeroDivisionError):
        engine.result(failed)
    assert engine.result(engine.call(lambda: 2)) == 2


def test_offline_engine_scores_without_a_thread(model, tok):
    offline = Engine(model, tok)
    ids = tok.encode(TEXT)
    (row,) = score(offline, [ids])
    ref = log_softmax(model, ids)
    assert [e.logprob for e in row] == pytest.approx(
        [ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-5
    )
    assert all(e.top == [] for e in row)
