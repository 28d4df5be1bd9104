"""Model configuration: one typed dataclass, JSON round trip, and named presets.

The GPT-2 presets carry the book's numbers (chapter 4). The same dataclass also describes the
Llama/Qwen-style variants (RMSNorm, RoPE, SwiGLU, grouped-query attention, QK-norm), so every
architecture runs through the one `GPTModel`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scratchllm.errors import InputError

# "rmsnorm_noparam": RMSNorm without a learned scale, everywhere (QK-norm included).
Norm = Literal["layernorm", "rmsnorm", "rmsnorm_noparam"]
PosEmbedding = Literal["learned", "rope"]
FFN = Literal["gelu", "swiglu", "relu2"]  # relu2: fc2(relu(fc1(x)) ** 2)


@dataclass
class ModelConfig:
    """Shape and flavour of a GPT-style decoder."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    # Everything below keeps GPT-2 behaviour at its default; the modern architectures change it.
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    head_dim: int | None = None  # defaults to emb_dim // n_heads
    hidden_dim: int | None = None  # feed-forward width; defaults to 4 * emb_dim
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    pos_embedding: PosEmbedding = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # Llama 3 style: factor, low/high_freq_factor, ...
    ffn: FFN = "gelu"
    bias: bool = True  # bias on the output projection and the feed-forward linears
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    # Zero-initialised residual projections (attention out_proj, feed-forward down projection):
    # every block starts as the identity (modded-nanogpt). Only the init; no Hugging Face effect.
    zero_init_proj: bool = False
    # Logit soft-capping at the language-model head: cap · tanh(logits / cap) (Gemma 2).
    logit_softcap: float | None = None
    # Std of the embedding init. None: 1.0 (PyTorch's nn.Embedding default, the book's model)
    # when the head is untied, 0.02 (GPT-2) when it is tied, since the head then shares it.
    emb_init_std: float | None = None
    # Smear (modded-nanogpt): each token's embedding adds a gated share of the previous token's,
    # x_t + λ·σ(w·x_t[:12])·x_{t-1} with λ = 0 at init; a bigram path beside attention.
    smear: bool = False
    # Attention gate (Qiu et al. 2025; modded-nanogpt): each head's output scaled by
    # σ(w_h·x_t[:12]) from the attention's input, w = 0 at init (every gate 0.5).
    attn_gate: bool = False
    # A classifier (ch. 6): the head maps the final states to this many classes, not to the
    # vocabulary, and is never tied. None: the language-model head.
    num_classes: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.emb_dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.hidden_dim or 4 * self.emb_dim

    def validate(self) -> None:
        """Raise `InputError` naming the field when the numbers cannot make a model. Every
        field is first checked against its annotation (`"norm_eps": "abc"` is refused), and
        every integer is a size, so at least 1."""
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _field_types()[f.name]
            problem = _type_problem(value, hint)
            if problem:
                raise InputError(f"model config: '{f.name}' must be {problem}")
            if _scalar(hint) is int and value is not None and value < 1:
                null = " or null" if _scalar(hint) is not hint else ""
                raise InputError(
                    f"model config: '{f.name}' must be a positive integer{null}, got {value!r}"
                )
        if not 0.0 <= self.drop_rate < 1.0:
            raise InputError(f"model config: 'drop_rate' must be in [0, 1), got {self.drop_rate}")
        if self.head_dim is None and self.emb_dim % self.n_heads:
            raise InputError(
                f"model config: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}"
            )
        if self.n_heads % self.kv_heads:
            raise InputError(
                f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}"
            )
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise InputError(
                f"model config: 'logit_softcap' must be positive or null, got {self.logit_softcap}"
            )
        if self.pos_embedding == "rope" and self.head_size % 2:
            raise InputError(f"model config: RoPE needs an even head size, got {self.head_size}")

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a wrong type that the dataclass itself rejects
            raise InputError(f"{source}: {exc}") from None
        except InputError as exc:  # `validate`'s message, with the file (or preset) it is in
            raise InputError(f"{source}: {exc}") from None

    def to_json(self, path: str | Path) -> None:
        from scratchllm.fs import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: model config file not found") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise InputError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        data = dict(PRESETS[name])
        data.update(overrides)
        data["name"] = name
        return cls.from_dict(data, source=f"preset {name}")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def allocation_error(self, exc: BaseException) -> InputError | None:
        """For an allocation that failed while building a model from this config (`exc`), an
        InputError naming the field that asked for it and the size; None for other errors."""
        text = str(exc)
        if not isinstance(exc, MemoryError) and "alloc" not in text and "memory" not in text:
            return None
        learned = self.pos_embedding == "learned"
        tensors = [  # (numel, the field that sizes it, what it is)
            (self.vocab_size * self.emb_dim, "vocab_size", "token embeddings"),
            (
                self.context_length * self.emb_dim if learned else 0,
                "context_length",
                "position embeddings",
            ),
            (
                self.emb_dim * self.ffn_dim,
                "hidden_dim" if self.hidden_dim else "emb_dim",
                "feed-forward weights",
            ),
            (self.emb_dim * self.n_heads * self.head_size, "n_heads", "attention weights"),
        ]
        numel, name, what = max(tensors)
        size = _bytes(numel * 4)
        return InputError(
            f"model config: '{name}' {getattr(self, name)} asks for {size} of {what} "
            f"(emb_dim {self.emb_dim}); cannot allocate it"
        )

    # -- counts --------------------------------------------------------------------------------
    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per token at full context (PaLM appendix B): 6N + 12·L·H·Q·T for training.

        N counts the non-embedding weights plus the output head (the head is a real matmul).
        Inference (forward only) is a third of that.
        """
        n = self.matmul_parameters()
        attn = 12 * self.n_layers * self.n_heads * self.head_size * self.context_length
        total = 6 * n + attn
        return float(total if training else total / 3)

    def matmul_parameters(self) -> int:
        """Weights that take part in a matmul per token: attention, feed-forward, output head."""
        head = self.num_classes or self.vocab_size
        d, hd = self.emb_dim, self.head_size
        q = d * self.n_heads * hd
        kv = 2 * d * self.kv_heads * hd
        out = self.n_heads * hd * d
        ffn = (3 if self.ffn == "swiglu" else 2) * d * self.ffn_dim
        return self.n_layers * (q + kv + out + ffn) + d * head


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


_TYPES: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    """ModelConfig's field annotations, resolved once (`from __future__` makes them text)."""
    if not _TYPES:
        _TYPES.update(typing.get_type_hints(ModelConfig))
    return _TYPES


def _scalar(hint: Any) -> Any:
    """`X` of an annotation `X | None`; any other annotation as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _type_problem(value: Any, hint: Any) -> str | None:
    """What `value` should be ("a number, got 'abc'") when it does not fit `hint`, else None.
    Covers the annotations ModelConfig uses: int, float, bool, str, dict, Literal, X | None."""
    if _scalar(hint) is not hint:  # X | None
        problem = None if value is None else _type_problem(value, _scalar(hint))
        return f"{problem.replace(', got', ' or null, got', 1)}" if problem else None
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return None
        return f"one of {', '.join(map(str, choices))}, got {value!r}"
    base = typing.get_origin(hint) or hint
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"a finite number, got {value!r}"
    else:
        ok = isinstance(value, base)
    if ok:
        return None
    # Every integer of ModelConfig is a size.
    kind = {bool: "true or false", int: "a positive integer", float: "a number", str: "a string"}
    return f"{kind.get(base, 'a JSON object' if base is dict else base.__name__)}, got {value!r}"


# What the modern architectures share: RMSNorm, RoPE, SwiGLU, GQA, no biases, tied head.
_MODERN: dict[str, Any] = dict(
    n_kv_heads=8,
    norm="rmsnorm",
    pos_embedding="rope",
    ffn="swiglu",
    bias=False,
    tie_embeddings=True,
    drop_rate=0.0,
)
_LLAMA32: dict[str, Any] = dict(
    _MODERN,
    vocab_size=128256,
    context_length=131072,
    hidden_dim=8192,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
_QWEN3: dict[str, Any] = dict(
    _MODERN,
    vocab_size=151936,
    context_length=40960,
    n_heads=16,
    head_dim=128,
    norm_eps=1e-6,
    rope_theta=1000000.0,
    qk_norm=True,
)

# scratchllm's modern small-model architecture: the options of modded-nanogpt and nanochat that
# paid in benchmarks/speedrun.py (Tiny Shakespeare, bytes, 4x128, 76 s on 2 cores; each row one
# option changed, single runs, 0.01 bpb counted as noise; docs/training.md has the table). On:
# RoPE (learned positions: +0.09 bpb), QK-norm (without: +0.03) and the untied head (tied:
# +0.01). Off: ReLU² (+0.04 against GELU), parameter-free RMSNorm (+0.02 against LayerNorm) and
# the logit soft-cap (+0.01 with it; with a 4096-id BPE its pass over the batch × vocabulary
# logits cost 17% of the training speed: Gutenberg, 4x128, 180 s, 1.818 bpb without, 1.846
# with). Within noise and kept: zero-initialised output projections (each block starts as the
# identity). On since 2026-12-07: the smear gate (Gutenberg, 4x128, 600 s: 1.6575 against
# 1.6665 without; its ablation row has the bytes figure) and the attention gate (the same runs
# with the recipe's split Muon step at 0.05: 1.6427 and 1.6418 against 1.6488 and 1.6514
# without; within noise in its bytes row). A tied head without a soft-cap is risky:
# gpt-modern-micro diverged in 4 steps at lr 3e-3 in the presets' training check (a tied head's
# logits start at the embedding's scale). No biases, no dropout.
GPT_MODERN: dict[str, Any] = dict(
    pos_embedding="rope",
    norm="layernorm",
    ffn="gelu",
    qk_norm=True,
    zero_init_proj=True,
    tie_embeddings=False,
    logit_softcap=None,
    smear=True,
    attn_gate=True,
    bias=False,
    qkv_bias=False,
    drop_rate=0.0,
)

# The book's GPT-2 sizes (chapter 4, exercise 4.2) and small configs for tests and the quickstart.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(emb_dim=768, n_heads=12, n_layers=12),
    "gpt2-medium": dict(emb_dim=1024, n_heads=16, n_layers=24),
    "gpt2-large": dict(emb_dim=1280, n_heads=20, n_layers=36),
    "gpt2-xl": dict(emb_dim=1600, n_heads=25, n_layers=48),
    # ~1M non-embedding parameters: unit tests and the quickstart on a laptop CPU.
    "gpt-nano": dict(context_length=256, emb_dim=128, n_heads=4, n_layers=5, drop_rate=0.0),
    # ~10M non-embedding parameters (nanoGPT's Shakespeare size).
    "gpt-micro": dict(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.1),
    # The modern recipe at the sizes of gpt-nano, gpt-micro and gpt2-small.
    "gpt-modern-nano": dict(GPT_MODERN, context_length=256, emb_dim=128, n_heads=4, n_layers=5),
    "gpt-modern-micro": dict(GPT_MODERN, context_length=256, emb_dim=384, n_heads=6, n_layers=6),
    "gpt-modern-small": dict(GPT_MODERN, emb_dim=768, n_heads=12, n_layers=12),
    # Llama 3.2 and Qwen3 shapes (weights come from `scratchllm convert`).
    "llama3.2-1b": dict(_LLAMA32, emb_dim=2048, n_heads=32, n_layers=16),
    "llama3.2-3b": dict(_LLAMA32, emb_dim=3072, n_heads=24, n_layers=28),
    "qwen3-0.6b": dict(_QWEN3, emb_dim=1024, n_layers=28, hidden_dim=3072),
    "qwen3-1.7b": dict(_QWEN3, emb_dim=2048, n_layers=28, hidden_dim=6144),
}


def resolve_model_config(spec: str) -> ModelConfig:
    """A preset name or a path to a config JSON file."""
    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return ModelConfig.from_json(path)
    from scratchllm.settings import SettingError  # the `model` setting of the recipes

    raise SettingError(
        "model", f"{spec!r}: not a preset ({', '.join(PRESETS)}) and not a config JSON file"
    )
