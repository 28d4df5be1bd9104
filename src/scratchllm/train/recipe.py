"""`pretrain --recipe speedrun --time-budget T`: the best known settings for a budget and a machine.

A new user should not have to tune. The speedrun recipe takes the modern architecture of the
`gpt-modern-*` presets (`config.GPT_MODERN`: RoPE, QK-norm, zero-initialised projections, an
untied head, the smear and attention gates, no logit soft-cap; GELU and LayerNorm, which beat
ReLU² and parameter-free RMSNorm in the benchmark's ablation rows), Muon for the hidden matrices
(query, key and value orthogonalised apart, a little weight decay) with AdamW for the rest (the
token embedding of a subword vocabulary at its own, much higher rate: `EMBEDDING_LR`), and a
warmup–stable–decay schedule that decays to zero over the end of the budget (modded-nanogpt,
nanochat). What it decides per run is the model size: a short calibration
(about a second per candidate) measures this machine's training tokens/s for each candidate
shape, and the largest shape that still sees `TOKENS_PER_PARAM` tokens per non-embedding
parameter within the budget wins — a bigger model that sees too little data loses to a smaller
one that sees enough (the compute-optimal trade of Chinchilla, at CPU scale). Each shape has its
own context length (a small model gains little from a long context and pays for its attention)
and the batch is the largest that still gives `TARGET_STEPS` steps in the budget.

Every setting the user gives explicitly wins over the recipe (`explicit`: the names given; in
the library, the settings that differ from their defaults). bf16 autocast only where the CPU
has native bf16 kernels (AVX512-BF16 / AMX) or on CUDA; emulated bf16 is slower than fp32.
The figures here are measured with benchmarks/speedrun.py (its ablation rows say which tricks
pay on a 2-core CPU); a trick that did not pay is off here and the benchmark table says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from scratchllm.config import GPT_MODERN
from scratchllm.train.throughput import cpu_has_native_bf16

# A `PretrainOptions` (train/pretrain.py imports this module: naming the class would be a circle).
Options = TypeVar("Options")

log = logging.getLogger(__name__)

RECIPES = ("speedrun",)
TOKENS_PER_PARAM = 20.0  # training tokens per non-embedding parameter the chosen size must see
# Tokens per step the recipe picks from: the largest that still gives `TARGET_STEPS` steps.
# Measured on Tiny Shakespeare, 4x128, 2 cores (benchmarks/speedrun.py's budgets): at 22 s, 1,536
# tokens a step (~230 steps) beat 768 (~360 steps) and 3,072 (~130); at 66 s, 3,072 (~420 steps)
# beat 1,536 (~700). Muon's per-step Newton–Schulz cost is what small steps waste.
BATCH_TOKENS = (768, 1536, 3072, 6144, 12288, 24576)
TARGET_STEPS = 200
# On a CPU a larger step is no faster per token (a 2-core step is already one long stream of
# matmuls), so it only costs steps: on the Gutenberg novels (4096-id BPE, 4x128, context 256,
# 180 s), 3,072 tokens a step (568 steps) reached 1.846 bpb where 6,144 (264 steps, context 64)
# reached 1.903 and 3,072 at context 64 1.864; 1,536 (1,197 steps) 1.835, within noise. A GPU
# fills its cores with a larger step, so there the cap does not apply.
CPU_MAX_BATCH_TOKENS = 3072
BYTE_VOCAB_LIMIT = 512  # a vocabulary this small is bytes (256) plus a few special tokens
MAX_SUBWORD_CONTEXT = 1024
CALIBRATION_TOKENS = 1536  # tokens per step of the speed calibration
MAX_SLOWDOWN = 0.2  # a larger step may lose this share of the calibrated tokens/s, no more
# Muon's rate, with Q, K and V orthogonalised apart (`muon_split_qkv`, as modded-nanogpt's separate
# projections). Gutenberg, 4x128, 600 s, Zen 4, single runs with the smear gate: 1.6575 at 0.03
# with the fused step, 1.6488 at 0.05 split, 1.6596 at 0.08 split; Tiny Shakespeare's ablation
# rows: +0.016 bpb at 0.03, +0.018 with the fused step.
MUON_LR = 0.05
# Muon's decoupled weight decay (p <- p·(1 - lr·wd) before the step). Gutenberg, 4x128, 600 s,
# Zen 4: 0.01 ended below the recipe without it in three same-seed pairs (1.6395/1.6427,
# 1.6437/1.6459, 1.6469/1.6494: 0.002-0.003, a quarter of the noise threshold but every time);
# 0.03 ended at 1.6489, 0.1 cost 0.03. On Tiny Shakespeare's 82 s (bytes) the benchmark's
# `no_muon_wd` row ended 0.004 lower, within noise (445 steps; the Gutenberg pairs ran ~2,200).
MUON_WEIGHT_DECAY = 0.01
# The head, norms, gates and a byte vocabulary's embedding, beside Muon. Gutenberg, 4x128, 600 s,
# Zen 4: 0.004 ended at 1.6460, inside the 1.642-1.6494 of four runs of the recipe (two seeds).
ADAMW_LR = 6e-3
# The untied token embedding's own AdamW rate (`embedding_lr`) for a subword vocabulary, as
# modded-nanogpt and nanochat give it tens of times the head's: a row moves only when its
# token occurs (a byte table's 256 rows occur at almost every step: not measured there). On
# the Gutenberg novels (4096-id BPE, 4x128, 180 s, AMD EPYC, fp32) the recipe ended at 1.956
# bpb with the table at ADAMW_LR, 1.912 at 0.1, 1.885 at 0.3 and 1.916 at 0.6 (single runs;
# the last trained 14% fewer tokens). At 600 s with the current recipe (Zen 4, bf16) 0.15 ended
# at 1.6504, four runs at 0.3 at 1.642-1.6494.
EMBEDDING_LR = 0.3
ADAMW_ONLY_LR = 2e-3  # every weight, with --optimizer adamw
DECAY_FRACTION = 0.4
WARMUP_STEPS = 20
EVALS_PER_RUN = 20


@dataclass(frozen=True)
class Shape:
    """One candidate model size."""

    n_layers: int
    emb_dim: int
    n_heads: int
    context: int  # tokens of context the recipe trains this size with, for a byte tokenizer

    def context_for(self, vocab_size: int) -> int:
        """The context for a tokenizer of `vocab_size` ids: `context` for bytes, and for a
        subword vocabulary (whose token is ~4 bytes of English) four times that, so that the
        model sees about the same span of text (at most `MAX_SUBWORD_CONTEXT`)."""
        if vocab_size <= BYTE_VOCAB_LIMIT:
            return self.context
        return max(self.context, min(4 * self.context, MAX_SUBWORD_CONTEXT))

    def non_embedding_params(self) -> int:
        # Attention 4·d², a 4x-wide feed-forward 8·d² per block (no biases; norms are negligible).
        return 12 * self.n_layers * self.emb_dim**2

    @property
    def label(self) -> str:
        return f"{self.n_layers}x{self.emb_dim}"


# Smallest first: the choice walks up while the budget feeds the larger one enough tokens. The
# context grows with the size: at 4x128 on Tiny Shakespeare (bytes), context 64 and 128 both
# ended at 2.37 bpb after 66 s where 256 ended at 2.45, and at 22 s 64 (1,536 tokens a step)
# beat 128 (2,048) by 0.1 bpb. With a subword tokenizer the same size wants the same span of
# text, four times the tokens (`Shape.context_for`): on the Gutenberg novels (4096-id BPE,
# 4x128, 3,072 tokens a step, 180 s) context 256 reached 1.846 bpb, 64 1.864 and 512 1.878.
SHAPES: tuple[Shape, ...] = (
    Shape(4, 128, 4, 64),
    Shape(4, 192, 6, 128),
    Shape(6, 256, 8, 256),
    Shape(6, 384, 6, 256),
    Shape(8, 512, 8, 512),
    Shape(12, 768, 12, 1024),
)


@dataclass
class RecipeChoice:
    """What the recipe set (`settings`, of `PretrainOptions`), the model it picked and why."""

    settings: dict[str, Any]
    model: dict[str, Any] | None  # a ModelConfig dict (None: the user's `model` stands)
    reasons: list[str] = field(default_factory=list)
    speeds: dict[str, float] = field(default_factory=dict)  # shape label → tokens/s measured


def pick_dtype(device: torch.device) -> str:
    """bfloat16 where it is native (CUDA with bf16, a CPU with AVX512-BF16/AMX), else float32."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def speedrun_model(
    shape: Shape, context_length: int | None = None, **changes: Any
) -> dict[str, Any]:
    """The recipe's model config at `shape` (vocab_size follows the tokenizer; context: the
    shape's unless given); `changes` override fields (the benchmark's ablations: `ffn="gelu"`)."""
    return {
        **GPT_MODERN,  # the gpt-modern presets' architecture
        "name": f"speedrun-{shape.label}",
        "n_layers": shape.n_layers,
        "emb_dim": shape.emb_dim,
        "n_heads": shape.n_heads,
        "context_length": context_length or shape.context,
        **changes,
    }


def choose_shape(
    budget_s: float, speeds: dict[str, float], shapes: Sequence[Shape] = SHAPES
) -> tuple[Shape, str]:
    """The largest shape whose tokens in `budget_s` (at its measured tokens/s) reach
    `TOKENS_PER_PARAM` per non-embedding parameter; the smallest when none does."""
    chosen, why = shapes[0], "the smallest candidate (no larger one sees enough tokens)"
    for shape in shapes:
        rate = speeds.get(shape.label)
        if rate is None:
            continue
        tokens = rate * budget_s
        ratio = tokens / shape.non_embedding_params()
        if ratio >= TOKENS_PER_PARAM:
            chosen = shape
            why = (
                f"{shape.label} at {rate:,.0f} tokens/s sees {tokens / 1e6:.1f}M tokens in the "
                f"budget, {ratio:.0f} per non-embedding parameter (≥ {TOKENS_PER_PARAM:.0f})"
            )
    return chosen, why


def measure_speeds(
    vocab_size: int,
    context_length: int | None,
    batch_tokens: int,
    device: torch.device,
    dtype: str,
    budget_s: float,
    shapes: Sequence[Shape] = SHAPES,
    seconds: float = 0.8,
) -> dict[str, float]:
    """Training tokens/s of each shape (forward, backward, Muon step) on this machine, at its
    context (or `context_length`) and about `batch_tokens` tokens a step.

    Walks up from the smallest and stops at the first shape that could no longer see
    `TOKENS_PER_PARAM` tokens per parameter even at its measured speed: larger ones are slower
    still, so measuring them would only cost time."""
    speeds: dict[str, float] = {}
    for shape in shapes:
        context = context_length or shape.context_for(vocab_size)
        batch = max(1, batch_tokens // context)
        rate = _tokens_per_s(shape, vocab_size, context, batch, device, dtype, seconds)
        speeds[shape.label] = rate
        if rate * budget_s / shape.non_embedding_params() < TOKENS_PER_PARAM:
            break
    return speeds


def _tokens_per_s(
    shape: Shape,
    vocab_size: int,
    context_length: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    seconds: float,
) -> float:
    from scratchllm.config import ModelConfig
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train.muon import MuonAdamW, muon_ns_dtype, split_for_muon
    from scratchllm.train.tasks import lm_loss

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    config = ModelConfig.from_dict(
        {**speedrun_model(shape, context_length), "vocab_size": vocab_size}
    )
    model = GPTModel(config).to(device)
    hidden, matrices, vectors = split_for_muon(model)
    groups = [
        dict(params=hidden, use_muon=True, lr=MUON_LR),
        dict(params=matrices + vectors, use_muon=False, lr=ADAMW_LR),
    ]
    opt = MuonAdamW([g for g in groups if g["params"]], ns_dtype=muon_ns_dtype(device))
    x = torch.randint(0, vocab_size, (batch_size, context_length), device=device)

    def step() -> None:
        with autocast:
            loss = lm_loss(model, x, x)  # the training loss, as the trainer computes it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step allocates and warms the kernels up: not timed
    steps, start = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * x.numel() / (time.perf_counter() - start)


def pick_batch(tokens: float, context: int, max_tokens: int | None = None) -> tuple[int, float]:
    """(sequences per step, steps) for a run that sees about `tokens` tokens at `context`: the
    largest of `BATCH_TOKENS` (up to `max_tokens`) that still gives `TARGET_STEPS` steps (the
    smallest when none)."""
    sizes = [b for b in BATCH_TOKENS if max_tokens is None or b <= max_tokens] or BATCH_TOKENS[:1]
    fits = [b for b in sizes if tokens / b >= TARGET_STEPS]
    batch = max(1, (max(fits) if fits else BATCH_TOKENS[0]) // context)
    return batch, tokens / (batch * context)


def fit_batch(
    rate: float,
    budget: float,
    context: int,
    rate_at: Callable[[int], float | None],
    max_tokens: int | None = None,
) -> tuple[int, float]:
    """(sequences per step, tokens/s at that step) for a shape calibrated at `rate` tokens/s.

    `pick_batch` assumes the calibrated speed; a larger step can be slower per token (with a
    4096-id vocabulary, 24,576 tokens a step trained at 8.1k tokens/s against 10.2k calibrated
    on 2 cores: 199 steps where 248 were planned). So the step picked is timed (`rate_at`), and
    the recipe steps down while it loses more than `MAX_SLOWDOWN` of the calibrated speed or no
    longer gives `TARGET_STEPS` steps. `max_tokens`: the largest step allowed."""
    batch, _ = pick_batch(rate * budget, context, max_tokens)
    while batch * context > CALIBRATION_TOKENS:
        measured = rate_at(batch * context)
        fast = measured is not None and measured >= (1 - MAX_SLOWDOWN) * rate
        if fast and measured * budget / (batch * context) >= TARGET_STEPS:
            return batch, measured
        smaller = [b for b in BATCH_TOKENS if b < batch * context]
        if not smaller:
            break
        batch = max(1, max(smaller) // context)
    return batch, rate


def explicit_settings(opts: Any) -> set[str]:
    """The settings of `opts` that differ from their defaults (the library's "given")."""
    default = type(opts)()
    return {
        f.name
        for f in dataclasses.fields(opts)
        if f.init and getattr(opts, f.name) != getattr(default, f.name)
    }


def speedrun(
    opts: Any,
    vocab_size: int,
    device: torch.device,
    explicit: Collection[str],
    measure: Callable[..., dict[str, float]] = measure_speeds,
) -> RecipeChoice:
    """The speedrun settings for `opts.time_budget` on `device`; `measure` gives tokens/s per
    shape (tests pass fixed figures)."""
    budget = opts.time_budget
    if budget is None:
        raise ValueError("the speedrun recipe needs a time budget")
    settings: dict[str, Any] = {}
    reasons: list[str] = []
    given = set(explicit)

    def put(name: str, value: Any, why: str | None = None) -> None:
        if name in given:
            reasons.append(f"{name}: yours ({getattr(opts, name)!r}) over the recipe's {value!r}")
            return
        settings[name] = value
        if why:
            reasons.append(f"{name} {value}: {why}")

    dtype = pick_dtype(device)
    native = "native bf16" if dtype == "bfloat16" else "no native bf16: emulated bf16 is slower"
    put("dtype", dtype, f"{device.type}, {native}")
    put("optimizer", "muon", "Muon on the hidden matrices, AdamW on embeddings, head and norms")
    adamw = settings.get("optimizer", opts.optimizer) == "adamw"
    put("muon_lr", MUON_LR)
    put("muon_split_qkv", True)
    put("muon_weight_decay", MUON_WEIGHT_DECAY)
    put("lr", ADAMW_ONLY_LR if adamw else ADAMW_LR)
    if vocab_size > BYTE_VOCAB_LIMIT:  # bytes: every row is updated at almost every step
        put("embedding_lr", EMBEDDING_LR, "the token embedding's own AdamW rate")
    put("schedule", "wsd", f"warmup, stable, linear decay to 0 over the last {DECAY_FRACTION:.0%}")
    put("decay_fraction", DECAY_FRACTION)
    put("min_lr", 0.0)
    put("warmup_steps", WARMUP_STEPS)
    put("weight_decay", 0.0 if not adamw else 0.1)
    put("grad_clip", 1.0)
    model: dict[str, Any] | None = None
    speeds: dict[str, float] = {}
    if "model" in given:
        reasons.append(f"model: yours ({opts.model}); no size calibration")
        rate, context, shape = None, opts.context_length, None
    else:
        speeds = measure(vocab_size, opts.context_length, CALIBRATION_TOKENS, device, dtype, budget)
        shape, why = choose_shape(budget, speeds)
        rate = speeds.get(shape.label)
        model = speedrun_model(shape, opts.context_length or shape.context_for(vocab_size))
        context = model["context_length"]
        measured = ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items())
        reasons.append(f"model {shape.label} (context {context}): {why}; tokens/s {measured}")
    batch = opts.batch_size
    if "batch_size" not in given and rate and context and shape is not None:

        def rate_at(step_tokens: int) -> float | None:
            sizes = measure(vocab_size, context, step_tokens, device, dtype, budget, (shape,))
            return sizes.get(shape.label)

        cap = CPU_MAX_BATCH_TOKENS if device.type == "cpu" else None
        batch, rate = fit_batch(rate, budget, context, rate_at, cap)
        steps = rate * budget / (batch * context)
        put("batch_size", batch, f"~{steps:,.0f} steps of {batch * context:,} tokens")
    else:
        put("batch_size", batch)
    if rate and context:
        steps = rate * budget / (batch * context)
        put("eval_every", max(10, int(steps / EVALS_PER_RUN)), f"~{EVALS_PER_RUN} evaluations")
    return RecipeChoice(settings, model, reasons, speeds)


def apply_recipe(
    opts: Options,
    vocab_size: int,
    device: torch.device,
    explicit: Collection[str] | None = None,
    measure: Callable[..., dict[str, float]] = measure_speeds,
) -> tuple[Options, RecipeChoice]:
    """`opts` with the recipe's settings where the user set none; the model it picks is written
    to OUT/recipe-model.json and named by `model` (run.json then records it for --resume)."""
    given = explicit_settings(opts) if explicit is None else set(explicit)
    choice = speedrun(opts, vocab_size, device, given, measure)
    changes = dict(choice.settings)
    if choice.model is not None:
        path = Path(opts.out) / "recipe-model.json"  # type: ignore[attr-defined]
        from scratchllm.fs import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(choice.model, indent=2) + "\n")
        changes["model"] = str(path)
    for line in choice.reasons:
        log.info("recipe speedrun: %s", line)
    return dataclasses.replace(opts, **changes), choice  # type: ignore[type-var]
