"""Issue 13 items no other test pinned: the serve flags that bound the engine and the requests are
range-checked (one line, exit 2, before the model loads), and prompts are tokenized off the event
loop, so one slow request does not stall `/health` for everyone else."""

from __future__ import annotations

import http.client
import threading
import time

import pytest
import torch
from http_json import post

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.cli import main
from scratchllm.inference.engine import Engine
from scratchllm.serve.app import ServerThread


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-tokens", "-5", "--max-tokens must be ≥ 1, got -5"),
        ("--max-batch", "0", "--max-batch must be ≥ 1, got 0"),
        ("--port", "70000", "--port must be in 0..65535, got 70000"),
        ("--max-body-bytes", "0", "--max-body-bytes must be a positive integer, got 0"),
        ("--max-prompts", "-1", "--max-prompts must be a positive integer, got -1"),
        ("--max-request-tokens", "0", "--max-request-tokens must be a positive integer, got 0"),
    ],
)
def test_serve_flags_out_of_range_are_one_line_before_the_model_loads(
    flag, value, message, tmp_path, capsys
):
    # The checkpoint does not exist: were the value let through, loading it would fail instead.
    argv = ["serve", "--checkpoint", str(tmp_path / "no-such-checkpoint"), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_slow_tokenization_does_not_stall_the_event_loop(monkeypatch):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0
    )
    engine = Engine(GPTModel(config).eval(), ByteTokenizer(), max_batch=2)
    real_encode = engine.encode
    started = threading.Event()

    def slow_encode(text: str) -> list[int]:
        started.set()
        time.sleep(2.0)  # a huge prompt's tokenization
        return real_encode(text)

    monkeypatch.setattr(engine, "encode", slow_encode)
    with ServerThread(engine, model_name="slow") as srv:
        replies: list = []
        slow = threading.Thread(
            target=lambda: replies.append(
                post(srv, "/v1/completions", {"prompt": "hello", "max_tokens": 1})
            )
        )
        slow.start()
        assert started.wait(timeout=30)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        waited = time.monotonic() - t0
        slow.join(timeout=60)
    assert waited < 1.0, f"/health waited {waited:.2f} s behind a tokenization"
    assert replies and replies[0][0] == 200, replies


def test_the_serve_max_tokens_cap_is_a_400_naming_max_tokens():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=64, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0
    )
    engine = Engine(GPTModel(config).eval(), ByteTokenizer(), max_batch=2, max_tokens=8)
    with ServerThread(engine, model_name="capped") as srv:
        ok = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 8, "temperature": 0})
        over = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 9})
    assert ok[0] == 200, ok
    status, reply = over
    assert status == 400 and reply["error"]["param"] == "max_tokens", reply
    assert "exceeds the limit 8" in reply["error"]["message"], reply
