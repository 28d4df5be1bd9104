"""`scratchllm serve`: an OpenAI-compatible HTTP server (and a web chat page) for a checkpoint."""

from __future__ import annotations

import argparse
import sys

from scratchllm.commands._inference import add_model_arguments, load_model
from scratchllm.serve.guards import API_KEY_ENV, ServerLimits

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API"
DESCRIPTION = """Serve a checkpoint: /v1/models, /v1/completions, /v1/chat/completions (with
stream: true), /health, and a chat page at /. Concurrent requests are batched.

examples:
  scratchllm serve --checkpoint runs/quickstart
  scratchllm serve --checkpoint models/qwen3 --port 8080 --api-key sekret --max-batch 16
  then: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
          -d '{"prompt": "Once upon a time", "max_tokens": 20}'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (a reverse proxy's name); by "
        "default only loopback names and --host are answered (DNS-rebinding guard)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (or --api-key-file, or ${API_KEY_ENV})",
    )
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key here")
    p.add_argument("--model-name", default=None, help="model id in the API (default: dir name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens allowed")
    limits = ServerLimits()
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=limits.max_body_bytes,
        help=f"largest request body, else 413 (default {limits.max_body_bytes:,})",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        default=limits.max_prompts,
        help=f"prompts in one completions request (default {limits.max_prompts})",
    )
    p.add_argument(
        "--max-request-tokens",
        type=int,
        default=limits.max_request_tokens,
        help="n × (prompt + max_tokens) summed over one request's prompts "
        f"(default {limits.max_request_tokens:,})",
    )
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.inference.engine import Engine
    from scratchllm.serve.app import bind, serve
    from scratchllm.serve.guards import read_api_key

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise InputError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    if args.max_tokens < 1:
        raise InputError(f"--max-tokens must be ≥ 1, got {args.max_tokens}")
    limits = ServerLimits(args.max_body_bytes, args.max_prompts, args.max_request_tokens)
    try:
        limits.validate()
    except InputError as exc:  # name the flag, not the field
        field = str(exc).split()[0]
        raise InputError(f"--{field.replace('_', '-')}{str(exc)[len(field) :]}") from None
    api_key = read_api_key(args.api_key, args.api_key_file)
    bind(args.host, args.port).close()  # a port in use: say so before loading the model
    ckpt = load_model(args, rows=args.max_batch)
    name = args.model_name or ckpt.path.resolve().name
    if name == "checkpoint":  # a run directory: name the model after the run
        name = ckpt.path.resolve().parent.name
    engine = Engine(ckpt.model, ckpt.tokenizer, args.max_batch, args.max_tokens)
    print(f"serving {name!r} on http://{args.host}:{args.port} (chat page at /)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr)
    serve(engine, args.host, args.port, name, api_key, limits=limits, extra_hosts=args.allow_host)
    return 0
