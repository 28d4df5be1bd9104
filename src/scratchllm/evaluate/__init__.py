"""Evaluation: held-out text (loss, perplexity, bits per byte) and in-context tasks (CORE).

  text.py      held-out text in sliding windows: nats per token, perplexity, bits per byte
  tasks.py     task files in the three CORE shapes, checked line by line; few-shot prompts
  logprobs.py  the engine: log-probabilities of chosen tokens, prefixes shared, batched
  scoring.py   which tokens are an answer's, CORE's rules, lm-eval's acc / acc_norm
  core.py      the CORE suite table (18 DCLM tasks), centred scores and CORE
  report.py    results.json, the terminal table and the bar chart

Typical use, as `scratchllm evaluate` does:

    from scratchllm.evaluate import core_suite, evaluate_tasks, load_items
    specs = core_suite(["copa", "arc_easy"])
    results = evaluate_tasks(model, tokenizer, [(s, load_items(s)) for s in specs], limit=100)
"""

from scratchllm.evaluate.core import CORE_TASKS, centered, core_score, core_suite, default_eval_dir
from scratchllm.evaluate.logprobs import Span, SpanScore, resolve_autocast, score_spans
from scratchllm.evaluate.report import build_results, format_table, plot_centered, write_results
from scratchllm.evaluate.scoring import ItemResult, TaskResult, evaluate_task, evaluate_tasks
from scratchllm.evaluate.tasks import TASK_TYPES, TaskSpec, fewshot_indices, load_items, render
from scratchllm.evaluate.text import TextResult, combine, evaluate_text, read_text

__all__ = [
    "CORE_TASKS",
    "TASK_TYPES",
    "ItemResult",
    "Span",
    "SpanScore",
    "TaskResult",
    "TaskSpec",
    "TextResult",
    "build_results",
    "centered",
    "combine",
    "core_score",
    "core_suite",
    "default_eval_dir",
    "evaluate_task",
    "evaluate_tasks",
    "evaluate_text",
    "fewshot_indices",
    "format_table",
    "load_items",
    "plot_centered",
    "read_text",
    "render",
    "resolve_autocast",
    "score_spans",
    "write_results",
]
