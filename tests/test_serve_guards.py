"""Server hardening: one request never hurts another, and every bound answers in OpenAI's format.

A tiny random byte-level GPT is served on a free 127.0.0.1 port. The property test throws
generated bodies at both generation routes while a stream runs beside them: no body may get a
5xx, and every concurrent stream must end with `data: [DONE]`.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from http_json import post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.inference.engine import Engine
from scratchllm.serve.app import ServerThread
from scratchllm.serve.guards import ServerLimits, host_of, read_api_key

MODEL = "guarded"
LIMITS = ServerLimits(max_body_bytes=4096, max_prompts=4, max_request_tokens=2000)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0
    )
    return Engine(GPTModel(config).eval(), ByteTokenizer(), max_batch=8)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, model_name=MODEL, limits=LIMITS) as srv:
        yield srv


def stream_ends_with_done(server, max_tokens: int = 40) -> bool:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"prompt": "Once", "max_tokens": max_tokens, "stream": True, "temperature": 0.9}
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    lines = [line for line in resp.read().decode().split("\n\n") if line]
    conn.close()
    return resp.status == 200 and lines[-1] == "data: [DONE]"


def assert_openai_error(status: int, reply, expected: int, words: str) -> None:
    assert status == expected, reply
    assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}
    assert words in reply["error"]["message"], reply


@pytest.mark.parametrize(
    "bad, status, words",
    [
        ({"temperature": 1e-40}, 200, ""),
        ({"seed": 2**70, "temperature": 1.0}, 400, "seed"),
        ({"repetition_penalty": 1e-40, "temperature": 1.0}, 400, "repetition_penalty"),
    ],
)
def test_extreme_sampling_values_never_break_other_streams(server, bad, status, words):
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(stream_ends_with_done(server)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    code, reply = post(server, "/v1/completions", {"prompt": "bad", "max_tokens": 20, **bad})
    for t in threads:
        t.join(timeout=60)
    assert results == [True, True, True]
    if status == 200:
        assert code == 200 and reply["choices"][0]["text"] is not None
    else:
        assert_openai_error(code, reply, status, words)


def test_bodies_over_the_limit_get_413(server):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    assert_openai_error(*post(server, "/v1/completions", big), 413, "4,096 bytes")
    # Chunked (no Content-Length): counted as it arrives.
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    chunks = (json.dumps(big)[i : i + 1000].encode() for i in range(0, 6000, 1000))
    conn.request(
        "POST",
        "/v1/completions",
        body=chunks,
        encode_chunked=True,
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    conn.close()
    assert_openai_error(resp.status, reply, 413, "limit")


def test_too_many_prompts_and_too_many_tokens_are_400(server):
    body = {"prompt": ["a"] * 5, "max_tokens": 1}
    assert_openai_error(*post(server, "/v1/completions", body), 400, "5 prompts")
    body = {"prompt": ["a", "b"], "max_tokens": 100, "n": 16}
    assert_openai_error(*post(server, "/v1/completions", body), 400, "allows 2,000")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 16}
    assert_openai_error(*post(server, "/v1/chat/completions", body), 400, "tokens")


def test_lone_surrogates_and_infinity_get_json_400(server):
    raw = '{"prompt": "\\ud800", "max_tokens": 2}'
    assert_openai_error(*post(server, "/v1/completions", raw), 400, "surrogate")
    raw = '{"messages": [{"role": "user", "content": "a\\udfff"}]}'
    assert_openai_error(*post(server, "/v1/chat/completions", raw), 400, "surrogate")
    raw = '{"prompt": "a", "max_tokens": 2, "repetition_penalty": Infinity}'
    assert_openai_error(*post(server, "/v1/completions", raw), 400, "repetition_penalty")
    raw = '{"prompt": "a", "max_tokens": 2, "temperature": NaN}'
    assert_openai_error(*post(server, "/v1/completions", raw), 400, "temperature")


def test_only_loopback_host_names_are_answered(server):
    body = {"prompt": "a", "max_tokens": 1}
    for host in ("evil.example", f"evil.example:{server.port}", "10.0.0.1"):
        code, reply = post(server, "/v1/completions", body, {"Host": host})
        assert_openai_error(code, reply, 400, "Host header")
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]:8000"):
        code, reply = post(server, "/v1/completions", body, {"Host": host})
        assert code == 200, (host, reply)
    assert host_of("[::1]:8000") == "[::1]" and host_of("Example.COM") == "example.com"


def test_disconnected_non_streaming_clients_free_their_slots(engine):
    hook = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    try:
        with ServerThread(engine, model_name=MODEL, limits=LIMITS) as srv:
            before = engine.cancelled
            socks = []
            body = json.dumps({"prompt": "A long story:", "max_tokens": 100, "n": 2}).encode()
            for _ in range(3):
                s = socket.create_connection((srv.host, srv.port))
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                socks.append(s)
            deadline = time.monotonic() + 20
            while engine.load["active"] < 6 and time.monotonic() < deadline:
                time.sleep(0.01)  # all three are generating (3 requests × n=2 rows)
            assert engine.load["active"] == 6
            steps = engine.steps
            for s in socks:
                s.close()
            deadline = time.monotonic() + 20
            while (engine.load["active"] or engine.load["pending"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.load["active"] == 0 and engine.load["pending"] == 0
            assert engine.cancelled - before == 6  # every row was cut short ...
            assert engine.steps - steps < 50  # ... long before its 100 tokens
    finally:
        hook.remove()


def test_openapi_lists_the_error_responses(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("GET", "/openapi.json")
    schema = json.loads(conn.getresponse().read())
    conn.close()
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"400", "401", "404", "413"} <= set(schema["paths"][path]["post"]["responses"])


def test_api_key_from_flag_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SCRATCHLLM_API_KEY", raising=False)
    assert read_api_key(None, None) is None
    monkeypatch.setenv("SCRATCHLLM_API_KEY", "from-env")
    assert read_api_key(None, None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(None, str(key_file)) == "from-file"
    assert read_api_key("from-flag", str(key_file)) == "from-flag"
    key_file.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_api_key(None, str(key_file))


def test_a_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "scratchllm",
                "serve",
                "--checkpoint",
                str(tmp_path),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}" in lines[0] and "in use" in lines[0]


def test_limits_are_validated():
    with pytest.raises(InputError, match="max_prompts must be a positive integer"):
        ServerLimits(max_prompts=0).validate()


# -- property: no generated body gets a 5xx, and a stream beside them always completes ------------
_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xDFFF), max_size=20),
    st.lists(st.text(max_size=5), max_size=3),
)
_fields = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "n",
    "stream",
    "stop",
    "seed",
    "echo",
    "stream_options",
]
_sampling = st.dictionaries(st.sampled_from(_fields), _value, max_size=6)
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "x"]),
        "content": st.one_of(st.text(max_size=30), _value),
    }
)
_completion = st.builds(
    lambda s, p: {**s, "prompt": p},
    _sampling,
    st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=5), _value),
)
_chat = st.builds(
    lambda s, m: {**s, "messages": m}, _sampling, st.one_of(st.lists(_message, max_size=3), _value)
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        st.tuples(st.just("/v1/completions"), _completion),
        st.tuples(st.just("/v1/chat/completions"), _chat),
    )
)
def test_no_generated_body_gets_a_server_error(server, streams, case):
    path, body = case
    if isinstance(body.get("max_tokens"), int):  # keep each example quick
        body["max_tokens"] = body["max_tokens"] % 64
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity tokens too: Python clients send them
    status, reply = post(server, path, raw)
    assert status < 500, (body, reply)
    if status != 200:
        assert isinstance(reply, dict) and "error" in reply, reply


@pytest.fixture(scope="module")
def streams(server):
    """A stream after stream beside the property test; each must end with [DONE]."""
    results: list[bool] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            results.append(stream_ends_with_done(server, max_tokens=30))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield results
    stop.set()
    thread.join(timeout=60)
    assert results and all(results), f"{results.count(False)} of {len(results)} streams cut"
