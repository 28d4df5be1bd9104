"""lm-evaluation-harness over a scratchllm checkpoint, in process: the model `scratchllm`.

    pip install 'scratchllm[eval]'
    python -m scratchllm.evaluate.lm_eval_adapter --model scratchllm \\
        --model_args checkpoint=runs/quickstart --tasks lambada_openai [any lm_eval flag]

How lm-eval finds it. lm-eval (0.4.x) knows only the models in its own table
(`lm_eval.models.MODEL_MAPPING`) and those registered with `@register_model` by code imported
before it looks; it reads no entry points and `--include_path` adds tasks, not models. So the
`lm_eval` command cannot see a third-party model by itself. The supported ways are:

- the wrapper above: `python -m scratchllm.evaluate.lm_eval_adapter ARGS` registers `scratchllm`,
  then runs lm-eval's own command line (`lm_eval.__main__.cli_evaluate`) with ARGS, unchanged;
- from Python: `import scratchllm.evaluate.lm_eval_adapter` and then
  `lm_eval.simple_evaluate(model="scratchllm", model_args="checkpoint=DIR", tasks=[...])`, or
  pass `ScratchLLM(checkpoint=DIR)` itself as `model`;
- no adapter at all: `scratchllm serve` and lm-eval's `local-completions` model (docs/serving.md).

`--model_args`: `checkpoint` (required), `dtype` (float32 | bfloat16),
`max_length` (default: the model's context), `max_gen_toks` (256), `batch_size` (rows generated
together); the device is lm-eval's `--device` (cuda:0 falls back to the CPU without CUDA).
Log-likelihoods are sums of log_softmax of the model's logits
(`scratchllm.inference.scoring.prompt_logprobs`, the function `scratchllm serve` scores echoed
prompts with, so both give the same numbers); text is tokenized as the server does (special-token
strings become special tokens); generation is greedy unless a task asks for `do_sample` with a
temperature, through the engine, stopping at the task's `until` strings and the model's stop ids.
Chat templates (`--apply_chat_template`) are not supported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: get_model skips them otherwise)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from scratchllm.checkpoint import load_checkpoint
from scratchllm.errors import InputError
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.scoring import prompt_logprobs
from scratchllm.utils import parse_dtype, pick_device

log = logging.getLogger(__name__)
NAME = "scratchllm"
_SCORE_CHUNK = 64  # requests scored per `prompt_logprobs` call (it batches them itself)


class ScratchLLM(TemplateLM):
    """An `lm_eval.api.model.LM` over a scratchllm checkpoint (see the module docstring)."""

    def __init__(
        self,
        checkpoint: str,
        device: str | None = None,  # lm-eval's --device: cpu, cuda, cuda:N, mps, auto
        dtype: str = "float32",
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        batch_size: int | str | None = 1,
        **kwargs: Any,  # lm-eval's max_batch_size and the like: nothing to do here
    ) -> None:
        super().__init__()
        if not checkpoint:
            raise InputError("--model_args checkpoint=DIR: give the checkpoint directory")
        self._device = _device(device)
        ckpt = load_checkpoint(checkpoint, self._device, parse_dtype(dtype))
        self.model, self.tokenizer_ = ckpt.model.eval(), ckpt.tokenizer
        self.checkpoint = str(checkpoint)
        context = self.model.config.context_length
        self.max_length = min(int(max_length), context) if max_length else context
        self.max_gen_toks = int(max_gen_toks)
        rows = 1 if str(batch_size or "auto").startswith("auto") else int(batch_size or 1)
        self.engine = Engine(self.model, self.tokenizer_, max_batch=max(1, rows))

    # -- tokens --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer_
        eot = tok.special_tokens.get(tok.eot_token)
        if eot is None and not tok.stop_ids:
            raise InputError(f"tokenizer {tok.name!r}: no end-of-text token to condition on")
        return eot if eot is not None else tok.stop_ids[0]

    @property
    def tokenizer_name(self) -> str:
        return f"scratchllm:{self.tokenizer_.fingerprint()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tokenizer_.encode(string, allow_special=True)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer_.decode(ids)

    # -- log-likelihoods -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """(summed log-probability of the continuation, whether every token is the argmax)."""
        windows = [(list(ctx) + list(cont))[-self.max_length :] for _, ctx, cont in requests]
        counts = [min(len(r[2]), len(w) - 1) for r, w in zip(requests, windows, strict=True)]
        scores = []
        for lo in range(0, len(windows), _SCORE_CHUNK):
            scores += prompt_logprobs(self.model, windows[lo : lo + _SCORE_CHUNK], top=1)
        out: list[tuple[float, bool]] = []
        for (key, _, _), entries, n in zip(requests, scores, counts, strict=True):
            scored = entries[len(entries) - n :] if n else []
            total = float(sum(e.logprob for e in scored))
            answer = (total, all(e.logprob >= e.top[0][1] for e in scored))
            if key is not None:  # rolling windows have none
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of the model's length."""
        results = []
        for (text,) in (r.args for r in requests):
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when asked) continuations, cut at the task's `until` strings;
        requests with the same settings are generated together (`batch_size` rows at a time)."""
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted((gen_kwargs or {}).items())), []).append(i)
        results = [""] * len(args)
        for members in groups.values():
            params = self._sampling(args[members[0]][1] or {})
            keep = self.max_length - params.max_tokens
            prompts = [self.tok_encode(args[i][0])[-keep:] for i in members]
            for i, done in zip(members, self.engine.generate(prompts, params), strict=True):
                results[i] = done[0].text
                self.cache_hook.add_partial("generate_until", args[i], results[i])
        return results

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingParams:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        return SamplingParams(
            max_tokens=max(1, min(max_new, self.max_length - 1)),
            temperature=float(kwargs["temperature"]) if sample else 0.0,
            top_p=kwargs.get("top_p") if sample else None,
            top_k=kwargs.get("top_k") if sample else None,
            seed=kwargs.get("seed"),
            stop=tuple(s for s in until if s),
        )


def _device(name: str | None) -> torch.device:
    """lm-eval passes `--device` (its default: cuda:0); without CUDA that means the CPU, as for
    lm-eval's own `hf` model."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("--device %s: CUDA is not available; using the CPU", name)
        name = "cpu"
    return pick_device(name or "cpu")


def register() -> None:
    """Register `ScratchLLM` as lm-eval's model `scratchllm` (once)."""
    if NAME not in model_registry:
        model_registry.register(NAME)(ScratchLLM)


register()


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line, with the `scratchllm` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
