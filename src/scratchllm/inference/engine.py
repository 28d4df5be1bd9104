"""The inference engine: batched decoding over a per-row KV cache, streaming, stop conditions.

One `Engine` serves many requests at once (continuous batching): every `step()` runs one decode
step over all active sequences (`scratchllm.inference.decode.DecodeStep`: the model's arithmetic for
one token, without its module-call overhead), then prefills newly arrived prompts together
(right-padded, one forward pass) and merges them into the running batch; finished or cancelled
rows leave it. The same step drives offline batched generation (`generate`), single-prompt
streaming (`stream`) and the HTTP server (a background thread started with `start()`).

Per sequence: its own stop ids, stop strings (cut exactly, never streamed in part), token limit,
sampling settings and seeded `torch.Generator`; `n` samples of one prompt share one prefill. Text
is decoded incrementally as UTF-8, so a stream never splits a multi-byte character. Tokens are
drawn by the one sampler in `scratchllm.inference.sampling`; with `SamplingParams.logprobs` each
one's log-probability is taken from the same logits (`scratchllm.inference.scoring`). Other work on
the model, such as scoring whole prompts, runs on the stepping thread between steps (`call`).
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from scratchllm.errors import InputError
from scratchllm.inference.decode import DecodeStep
from scratchllm.inference.requests import (  # noqa: F401  (re-exported: the engine's API)
    Completion,
    Event,
    Request,
    SamplingParams,
    TokenLogprob,
)
from scratchllm.inference.sampling import apply_repetition_penalty, sample_next
from scratchllm.inference.scoring import record_logprobs
from scratchllm.inference.weights import Fp16Linear, Int8Linear
from scratchllm.model.attention import BatchKVCache
from scratchllm.model.gpt import GPTModel
from scratchllm.tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Room reserved beyond the prompt when a batch's cache is first allocated; it doubles as needed.
_CACHE_HEADROOM = 128


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class _Sequence:
    """One sample being generated: its tokens, text, and what has been streamed of it."""

    def __init__(
        self,
        request: Request,
        index: int,
        tokenizer: Tokenizer,
        stop_ids: frozenset[int],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.request, self.index, self.tokenizer = request, index, tokenizer
        self.params = request.params
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already streamed
        self.unsent_ids: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        self.logprobs: list[TokenLogprob] | None = None if self.params.logprobs is None else []
        if self.params.seed is not None and self.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            # n samples get seeds seed, seed+1, ...: wrapped into the 64 bits a generator takes.
            self.generator.manual_seed((self.params.seed + index) % 2**64)
        self.seen: torch.Tensor | None = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(request.prompt_ids, device=device)] = True

    @property
    def greedy_plain(self) -> bool:
        return self.params.temperature == 0 and self.seen is None

    def push(self, token: int) -> None:
        """Take the next token: stop on a stop id, a stop string or the token limit."""
        if token in self.stop_ids:
            self._end("stop", self.decoder.decode(b"", final=True))
            return
        self.tokens.append(token)
        self.unsent_ids.append(token)
        if self.seen is not None:
            self.seen[token] = True
        piece = self.decoder.decode(self.tokenizer.decode_bytes([token]))
        if len(self.tokens) >= self.params.max_tokens:
            self._add(piece + self.decoder.decode(b"", final=True))
            if self.finish_reason is None:
                self._end("length", "")
            return
        self._add(piece)
        if self.finish_reason is None:
            self._flush()

    def cancel(self) -> None:
        self.finish_reason = "cancelled"
        self._complete()

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = len(self.text)
        self.text += piece
        cut = None
        for stop in self.params.stop:
            pos = self.text.find(stop, max(0, start - len(stop) + 1))
            if pos != -1 and (cut is None or pos < cut):
                cut = pos
        if cut is not None:
            self.text = self.text[:cut]
            self._end("stop", "")

    def _end(self, reason: str, tail: str) -> None:
        if tail:
            self._add(tail)
            if self.finish_reason is not None:  # the tail completed a stop string
                return
        self.finish_reason = reason
        self._flush()
        self._complete()

    def _flush(self) -> None:
        end = len(self.text)
        if self.finish_reason is None:
            end -= _holdback(self.text, self.params.stop)
        delta = self.text[self.sent : end]
        if delta or self.finish_reason is not None:
            self.request._send(Event(self.index, delta, self.unsent_ids, self.finish_reason))
            self.sent, self.unsent_ids = end, []

    def _complete(self) -> None:
        self.request._complete(
            Completion(
                self.index,
                self.text,
                list(self.tokens),
                self.finish_reason or "stop",
                self.logprobs,
            )
        )


def default_kv_dtype(model: GPTModel) -> torch.dtype:
    """The engine's KV cache dtype: the model's activation dtype, except fp16 for a CPU model
    with fp16 or int8 weights, as llama.cpp keeps its cache by default. A decode step reads the
    whole cache once per layer (at batch 8 and 64 positions, 38 MB a step in fp32 for
    gpt2-small, beside 124 MB of int8 weights); fp16 halves that, at about 3 decimal digits
    for keys and values, which reduced-precision weights already give up."""
    p = next(model.parameters())
    quantized = any(isinstance(m, (Fp16Linear, Int8Linear)) for m in model.modules())
    if quantized and p.device.type == "cpu" and p.dtype == torch.float32:
        return torch.float16
    return p.dtype


class Engine:
    """Batched generation over one model; see the module docstring. `kv_dtype`: the KV cache's
    dtype (default: `default_kv_dtype`)."""

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        max_tokens: int = 4096,
        decode_step: bool = True,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch < 1:
            raise InputError(f"max_batch must be ≥ 1, got {max_batch}")
        self.model = model.eval()
        # The one-token step without module-call overhead (`decode_step=False`: the model's own
        # forward), bound to the model as it is now.
        fast = decode_step and DecodeStep.supports(model)
        self._decode_step = DecodeStep(model) if fast else None
        self.tokenizer = tokenizer
        self.config = model.config
        self.context_length = model.config.context_length
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.kv_dtype = kv_dtype or default_kv_dtype(model)
        self.max_batch = max_batch
        self.max_tokens = max_tokens  # the most tokens one request may ask for
        self.stop_ids = frozenset(tokenizer.stop_ids)  # the same ids `generate_text` stops at
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._step_lock = threading.Lock()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._active: list[_Sequence] = []
        self._cache: BatchKVCache | None = None
        self._last: torch.Tensor | None = None  # (B,) the token each active row feeds next
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.peak_batch = 0  # most rows decoded together so far (a batching witness)
        self.cancelled = 0  # rows dropped because their request was cancelled

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, allow_special=True)

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InputError` if the prompt and its settings cannot run on this model."""
        params.validate()
        if not prompt_ids:
            raise InputError("prompt is empty: give at least one token")
        total = len(prompt_ids) + params.max_tokens
        if total > self.context_length:
            raise InputError(
                f"this model's context length is {self.context_length} tokens, but "
                f"{total} were requested ({len(prompt_ids)} in the prompt, {params.max_tokens} "
                "for the completion); shorten the prompt or lower max_tokens"
            )
        if params.max_tokens > self.max_tokens:
            raise InputError(f"max_tokens {params.max_tokens} exceeds the limit {self.max_tokens}")
        bad = [i for i in prompt_ids if not 0 <= int(i) < self.config.vocab_size]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary")

    # -- submitting and running ----------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Event | None], Any] | None = None,
    ) -> Request:
        """Queue a prompt; it joins the running batch at the next step."""
        self.check(prompt_ids, params)
        request = Request(prompt_ids, params, on_event)
        with self._cond:
            self._pending.append(request)
            self._cond.notify()
        return request

    def generate(
        self, prompts: Sequence[Sequence[int] | str], params: SamplingParams
    ) -> list[list[Completion]]:
        """Complete every prompt (batched); returns each prompt's `n` completions."""
        ids = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for p in ids:
            self.check(p, params)
        requests = [self.submit(p, params) for p in ids]
        self._wait(requests)
        return [[c for c in r.completions if c is not None] for r in requests]

    def stream(self, prompt: Sequence[int] | str, params: SamplingParams) -> Iterator[Event]:
        """Yield the pieces of a prompt's completion(s) as they are generated."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        request = self.submit(ids, params, events.put)
        try:
            while True:
                if not self.running:
                    while events.empty():
                        self.step()
                event = events.get()
                if event is None:
                    break
                yield event
            if request.error is not None:
                raise request.error
        finally:
            request.cancel()

    def _wait(self, requests: Sequence[Request]) -> None:
        for request in requests:
            while not request.done.is_set():
                if self.running:
                    request.done.wait()
                else:
                    self.step()
            if request.error is not None:
                raise request.error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run steps in a background thread whenever there is work (for the server)."""
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scratchllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._active or self._calls):
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:
                # A failure no single request caused (the batched forward itself): the rows in
                # flight are lost, waiting requests are not. Per-request failures never get here.
                log.exception("engine step failed")
                self._fail_all(exc, pending=False)
        self._fail_all(RuntimeError("the engine stopped"))

    def _fail_all(self, exc: BaseException, pending: bool = True) -> None:
        with self._step_lock:
            requests = {s.request.id: s.request for s in self._active}
            calls: list[Future] = []
            if pending:
                with self._cond:
                    requests.update({r.id: r for r in self._pending})
                    self._pending.clear()
                    calls = [future for _, future in self._calls]
                    self._calls.clear()
            self._active, self._cache, self._last = [], None, None
        for request in requests.values():
            request._fail(exc)
        for future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    # -- other work on the model, between steps ------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the stepping thread between two steps (under inference mode), so that
        it never races the decode loop: scoring prompts, say. Its result or exception lands in
        the future; `result(future)` waits for it, stepping when no background thread runs."""
        future: Future = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def result(self, future: Future) -> Any:
        """The result of a `call`, once it has run."""
        while not future.done() and not self.running:
            self.step()
        return future.result()

    def _run_calls(self) -> None:
        if self._calls:  # one per step: the rows being decoded advance between calls
            fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller's failure, not the engine's
                    future.set_exception(exc)

    @property
    def load(self) -> dict[str, int]:
        return {
            "active": len(self._active),
            "pending": len(self._pending),
            "steps": self.steps,
            "cancelled": self.cancelled,
        }

    # -- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Decode one token for every active row, then admit waiting prompts. True if work is left."""
        with self._step_lock:
            self._drop_cancelled()
            if self._active:
                self._decode()
            self._admit()
            self._run_calls()
            self.steps += 1
            return bool(self._active or self._pending or self._calls)

    def _drop_cancelled(self) -> None:
        keep = []
        for i, seq in enumerate(self._active):
            if seq.request.cancelled:
                seq.cancel()
                self.cancelled += 1
            else:
                keep.append(i)
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._active):
            return
        self._active = [self._active[i] for i in rows]
        if not rows:
            self._cache, self._last = None, None
            return
        assert self._cache is not None and self._last is not None
        self._cache.select(rows)
        self._last = self._last[torch.tensor(rows, device=self.device)]

    def _decode(self) -> None:
        cache, last = self._cache, self._last
        assert cache is not None and last is not None
        cache.reserve(cache.length + 1)
        self.peak_batch = max(self.peak_batch, len(self._active))
        if self._decode_step is not None:
            logits = self._decode_step(last, cache, cache.lengths, cache.decode_mask())
        else:
            logits = self.model(
                last[:, None],
                cache=cache,
                positions=cache.positions(),
                attn_mask=cache.decode_mask(),
            )[:, -1]
        tokens = self._sample(logits, self._active)
        record_logprobs(logits, self._active, tokens)
        # A failed row's placeholder: the row leaves the batch just below.
        self._last = torch.tensor([0 if t is None else t for t in tokens], device=self.device)
        keep = [
            i
            for i, (seq, t) in enumerate(zip(self._active, tokens, strict=True))
            if self._accept(seq, t)
        ]
        self._keep(keep)

    def _admit(self) -> None:
        new: list[Request] = []
        with self._cond:
            free = self.max_batch - len(self._active)
            while self._pending:
                request = self._pending[0]
                if request.cancelled:
                    self._pending.popleft()
                    request._finish()
                    continue
                fits = request.params.n <= free or (not self._active and not new)
                if not fits:
                    break
                new.append(self._pending.popleft())
                free -= request.params.n
        if not new:
            return
        try:
            self._prefill(new)
        except Exception:
            if len(new) == 1:
                raise
            # Which prompt broke the batch? Each alone: only the one that fails again fails.
            log.warning("prefill of %d prompts failed; retrying them one at a time", len(new))
            for request in new:
                try:
                    self._prefill([request])
                except Exception as exc:
                    log.exception("request %d: prefill failed", request.id)
                    request._fail(exc)

    def _prefill(self, requests: list[Request]) -> None:
        # Right-padded: every row starts at position 0, so causal attention is all it needs.
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        idx = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            idx[row, : lengths[row]] = torch.tensor(request.prompt_ids)
        need = max(n + r.params.max_tokens for n, r in zip(lengths, requests, strict=True))
        capacity = min(need, width + _CACHE_HEADROOM)
        cache = BatchKVCache(self.config, len(requests), capacity, self.device, self.kv_dtype)
        hidden = self.model(idx.to(self.device), cache=cache, return_hidden=True)
        last = hidden[torch.arange(len(requests)), torch.tensor(lengths) - 1]
        logits = self.model.head_logits(last)
        cache.set_lengths(lengths)
        # n samples of one prompt: fork its cache row n times instead of prefilling it n times.
        rows = [row for row, r in enumerate(requests) for _ in range(r.params.n)]
        if len(rows) != len(requests):
            cache.select(rows)
            logits = logits[torch.tensor(rows, device=self.device)]
        seqs = [
            _Sequence(
                r,
                j,
                self.tokenizer,
                frozenset(r.params.stop_ids) if r.params.stop_ids is not None else self.stop_ids,
                self.config.vocab_size,
                self.device,
            )
            for r in requests
            for j in range(r.params.n)
        ]
        tokens = self._sample(logits, seqs)
        record_logprobs(logits, seqs, tokens)
        keep = [
            i for i, (seq, t) in enumerate(zip(seqs, tokens, strict=True)) if self._accept(seq, t)
        ]
        if not keep:
            return
        if len(keep) != len(seqs):
            cache.select(keep)
        last_tokens = torch.tensor([tokens[i] for i in keep], device=self.device)
        if self._cache is None:
            self._cache, self._last = cache, last_tokens
        else:
            assert self._last is not None
            self._cache.merge(cache)
            self._last = torch.cat([self._last, last_tokens])
        self._active.extend(seqs[i] for i in keep)

    def _sample(self, logits: torch.Tensor, seqs: Sequence[_Sequence]) -> list[int | None]:
        """One token per row; a row whose sampling raises fails its own request (None)."""
        if all(s.greedy_plain for s in seqs):
            return torch.argmax(logits, dim=-1).tolist()
        out: list[int | None] = []
        for row, seq in enumerate(seqs):
            p = seq.params
            try:
                scores = logits[row : row + 1]
                if seq.seen is not None:
                    scores = apply_repetition_penalty(scores, seq.seen[None], p.repetition_penalty)
                out.append(int(sample_next(scores, p.temperature, p.top_k, p.top_p, seq.generator)))
            except Exception as exc:
                log.exception("request %d: sampling failed", seq.request.id)
                seq.request._fail(exc)
                out.append(None)
        return out

    def _accept(self, seq: _Sequence, token: int | None) -> bool:
        """Give `token` to its sequence; False when the sequence is done."""
        if token is None or seq.request.error is not None:
            return False  # its request failed (this row or a sibling sample)
        if seq.request.cancelled:
            seq.cancel()
            self.cancelled += 1
            return False
        seq.push(token)
        return seq.finish_reason is None
