"""Score model responses with a judge model behind any OpenAI-compatible chat endpoint (ch. 7).

The book asks a local Ollama (Llama 3 8B) for a 0–100 score of each response given the prompt and
the reference output; this client sends the same question to `{base_url}/v1/chat/completions`
(Ollama, vLLM, llama.cpp's server, OpenAI ...) using only the standard library.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchllm.data.instruction import format_prompt
from scratchllm.errors import InputError

log = logging.getLogger(__name__)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def load_responses(path: str | Path, flag: str = "--responses") -> list[dict[str, Any]]:
    """The JSON list of response records to score; a missing, binary or malformed file is an
    InputError naming `flag` and the file."""
    from scratchllm.data.text import decode_text, read_error

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise read_error(path, exc, flag) from None
    try:
        entries = json.loads(decode_text(data, f"{flag} {path}"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{flag} {path}: expected a JSON list of objects")
    return entries


def judge_prompt(entry: dict[str, str], response: str, template: str = "alpaca") -> str:
    return (
        f"Given the input `{format_prompt(entry, template).rstrip()}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{response}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def parse_score(text: str) -> float | None:
    """The first number in the judge's reply, clamped to 0..100; None when there is none."""
    match = _NUMBER.search(text or "")
    if match is None:
        return None
    return min(100.0, max(0.0, float(match.group())))


@dataclass
class JudgeClient:
    base_url: str = "http://127.0.0.1:11434"  # Ollama's default
    model: str = "llama3"
    api_key: str | None = None
    timeout: float = 120.0
    seed: int = 123

    def chat(self, prompt: str) -> str:
        url = self.base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        url += "/chat/completions"
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "seed": self.seed,
            "stream": False,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                payload = json.loads(reply.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise InputError(f"judge {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(
                f"judge {url}: cannot connect ({reason}); is the server running?"
            ) from None
        except json.JSONDecodeError:
            raise InputError(f"judge {url}: the reply is not JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise InputError(
                f"judge {url}: reply has no choices[0].message.content (is it OpenAI-compatible?)"
            ) from None

    def score(self, entry: dict[str, str], response: str, template: str = "alpaca") -> float | None:
        return parse_score(self.chat(judge_prompt(entry, response, template)))


def score_responses(
    client: JudgeClient,
    entries: list[dict[str, Any]],
    response_key: str = "model_response",
    template: str = "alpaca",
    progress=None,
) -> dict[str, Any]:
    """Scores of every entry's `response_key`; replies without a number are counted, not fatal."""
    scores: list[float | None] = []
    for i, entry in enumerate(entries, start=1):
        for key in ("instruction", "output", response_key):
            if key not in entry:
                raise InputError(f"responses: record {i}: field {key!r} is missing")
        scores.append(client.score(entry, str(entry[response_key]), template))
        if progress is not None:
            progress(1)
    valid = [s for s in scores if s is not None]
    if len(valid) < len(scores):
        # Returned as "unparsed": the caller reports it once (the CLI prints a warning).
        log.info("%d of %d judge replies held no score", len(scores) - len(valid), len(scores))
    return {
        "scores": scores,
        "scored": len(valid),
        "unparsed": len(scores) - len(valid),
        "mean_score": sum(valid) / len(valid) if valid else None,
    }
