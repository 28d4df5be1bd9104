"""The OpenAI-compatible server, driven by the real `openai` client and by raw HTTP.

A tiny random GPT over bytes is saved as a checkpoint and served on a free
127.0.0.1 port. Greedy answers are checked against the book's generation loop
(`scratchllm.inference.generate.generate_text`), which runs without the engine, the batching or the server.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from http_json import post

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.inference.chat import ALPACA_STOPS, alpaca_prompt
from scratchllm.inference.engine import Engine
from scratchllm.inference.generate import generate_text
from scratchllm.serve.app import ServerThread

MODEL = "tiny-test"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=256, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    path = save_checkpoint(
        tmp_path_factory.mktemp("serve") / "ckpt", GPTModel(config), ByteTokenizer()
    )
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine(ckpt.model, ckpt.tokenizer, max_batch=16)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, model_name=MODEL) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(ckpt, prompt: str, n: int, stops=()) -> str:
    text = generate_text(ckpt.model, ckpt.tokenizer, prompt, max_new_tokens=n)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.request("GET", "/")
    resp = conn.getresponse()
    page = resp.read().decode()
    assert resp.status == 200 and "<textarea" in page and "http://" not in page.split("<script")[0]


def test_completion_matches_book_loop(ckpt, client):
    prompt = "Every effort moves you"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == reference(ckpt, prompt, 12)
    assert out.usage.prompt_tokens == len(ckpt.tokenizer.encode(prompt))
    assert out.choices[0].finish_reason in ("length", "stop")


def test_chat_uses_default_template_and_matches_book_loop(ckpt, client):
    messages = [{"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0
    )
    expected = reference(ckpt, alpaca_prompt(messages), 10, ALPACA_STOPS)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected


def test_streaming_joins_to_the_full_text(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    messages = [{"role": "user", "content": "Hello there"}]
    ckw = dict(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    full = client.chat.completions.create(**ckw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **ckw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[0].choices[0].delta.role == "assistant"


def test_sse_wire_format_ends_with_done(server):
    status, text = post(
        server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True}
    )
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_seeded_sampling_reproducible_and_n(client):
    kw = dict(model=MODEL, prompt="The", max_tokens=8, temperature=1.0, seed=5, n=3)
    a = [c.text for c in client.completions.create(**kw).choices]
    b = [c.text for c in client.completions.create(**kw).choices]
    assert a == b and len(a) == 3


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=500)
    assert err.value.status_code == 400
    assert "context length is 256" in err.value.body["message"]
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ("{not json", None, "not valid JSON"),
        ("", None, "body"),
        ({"model": MODEL}, "messages", "messages"),
        ({"messages": "hello"}, "messages", "messages"),
        ({"messages": []}, "messages", "at least one"),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
            "temperature",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": 5},
            "temperature",
            "temperature",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
            "max_tokens",
            "max_tokens",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
            "max_tokens",
            "context",
        ),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "role"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "top_p"),
    ],
)
def test_malformed_chat_bodies_get_openai_errors(server, body, param, words):
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]


def test_empty_prompt_is_rejected(server):
    status, reply = post(server, "/v1/completions", {"prompt": "", "max_tokens": 3})
    assert status == 400 and "empty" in reply["error"]["message"]


def test_api_key_required(engine):
    with ServerThread(engine, model_name=MODEL, api_key="sekret") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        status, reply = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="a", max_tokens=2).choices


def _wait_idle(engine, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if engine.load["active"] == 0 and engine.load["pending"] == 0:
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_the_slot(ckpt):
    # A slow model (20 ms a step) so that the stream is surely still running when we leave.
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch=4)
    hook = ckpt.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    try:
        with ServerThread(engine, model_name=MODEL) as srv:
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
            body = {"prompt": "A long story:", "max_tokens": 80, "stream": True}
            conn.request("POST", "/v1/completions", body=json.dumps(body), headers=JSON)
            resp = conn.getresponse()
            assert resp.status == 200
            resp.fp.readline()  # the first event arrived: the request is generating
            conn.sock.shutdown(2)
            conn.close()
            assert _wait_idle(engine), "the disconnected stream still holds a slot"
            assert engine.cancelled == 1
            assert engine.steps < 70  # it stopped early, not after its 80 tokens
            status, reply = post(srv, "/v1/completions", {"prompt": "still", "max_tokens": 2})
            assert status == 200 and reply["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        hook.remove()


def test_load_32_concurrent_streaming_clients(server, engine):
    errors: list[BaseException] = []
    lock = threading.Lock()
    engine.peak_batch = 0

    def worker(i: int) -> int:
        local = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        done = 0
        for j in range(3):
            try:
                if (i + j) % 2:
                    stream = local.completions.create(
                        model=MODEL,
                        prompt=f"Client {i} request {j}",
                        max_tokens=12,
                        temperature=0.8,
                        seed=i,
                        stream=True,
                    )
                    finish = [c.choices[0].finish_reason for c in stream if c.choices]
                else:
                    stream = local.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"Hi {i}/{j}"}],
                        max_tokens=12,
                        stream=True,
                    )
                    finish = [c.choices[0].finish_reason for c in stream if c.choices]
                assert finish[-1] in ("length", "stop"), finish
                done += 1
            except BaseException as exc:  # noqa: BLE001 - collected and reported below
                with lock:
                    errors.append(exc)
        return done

    with ThreadPoolExecutor(32) as pool:
        completed = sum(pool.map(worker, range(32)))
    assert not errors, errors[:3]
    assert completed == 96
    assert engine.peak_batch > 1  # requests were decoded together
    assert _wait_idle(engine)


def test_serve_command_runs_and_answers(ckpt):
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:  # a free port (released just before the server takes it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "scratchllm", "serve", "--checkpoint", str(ckpt.path)]
    cmd += ["--port", str(port), "--model-name", "cli-model", "--max-batch", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        assert "serving 'cli-model' on http://127.0.0.1:" in proc.stdout.readline().decode()
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "cli-model"
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_command_bad_checkpoint_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "scratchllm", "serve", "--checkpoint", str(tmp_path / "nope")],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
