"""Tensor names: one table per architecture family, read in both directions.

Each row pairs one of our tensors with the Hugging Face tensor(s) it is made of and the
transform between them; the transform knows its inverse, so import ("ours ← theirs") and export
("theirs ← ours") are both derived from the one table:

    Row("trf_blocks.{i}.att.qkv.weight", "{p}h.{i}.attn.c_attn.weight", TRANSPOSE)   # GPT-2
    Row("trf_blocks.{i}.att.qkv.weight", ("{p}...q_proj.weight", "...k_proj...", ...), QKV)

`{p}` is the family's prefix ("transformer.", "model."; a file saved from a bare `GPT2Model`
has none), `{i}` a layer index: consecutive rows with `{i}` repeat once per layer, in order.
Optional tensors: ours exist when our model has them (its meta-device state dict says so); a
row's `when` names the `HFSpec` feature that says whether the Hugging Face side has them. When
only the target side has a tensor, it is written as zeros, which leaves the function unchanged
(a bias of zero, for instance). When only the source side has one, it is reported as
unexpected: nothing is dropped silently.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError
from scratchllm.hub.families import HFSpec
from scratchllm.hub.tensors import TensorInfo, TensorSource

Shape = tuple[int, ...]


# -- transforms: ours ⇄ theirs ------------------------------------------------------------------
class Transform(Protocol):
    """How our tensor is made from a row's Hugging Face tensors, and back."""

    def theirs_shapes(self, ours: Shape, config: ModelConfig) -> tuple[Shape, ...]: ...

    def to_ours(self, theirs: list[torch.Tensor], config: ModelConfig) -> torch.Tensor: ...

    def to_theirs(self, ours: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class Copy:
    """The same tensor under another name."""

    def theirs_shapes(self, ours: Shape, config: ModelConfig) -> tuple[Shape, ...]:
        return (ours,)

    def to_ours(self, theirs: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
        return theirs[0]

    def to_theirs(self, ours: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
        return [ours]


@dataclass(frozen=True)
class Transpose:
    """GPT-2's Conv1D stores its kernel as [in, out]; `nn.Linear` holds [out, in]."""

    def theirs_shapes(self, ours: Shape, config: ModelConfig) -> tuple[Shape, ...]:
        return (ours[::-1],)

    def to_ours(self, theirs: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
        return theirs[0].t()

    def to_theirs(self, ours: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
        return [ours.t()]


@dataclass(frozen=True)
class FuseRows:
    """Ours stacks the parts' rows ([q; k; v] in one `qkv` linear); the inverse splits them."""

    sizes: Callable[[ModelConfig], tuple[int, ...]]

    def theirs_shapes(self, ours: Shape, config: ModelConfig) -> tuple[Shape, ...]:
        return tuple((n, *ours[1:]) for n in self.sizes(config))

    def to_ours(self, theirs: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
        return torch.cat(theirs, dim=0)

    def to_theirs(self, ours: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
        return list(torch.split(ours, list(self.sizes(config)), dim=0))


COPY, TRANSPOSE = Copy(), Transpose()
QKV = FuseRows(
    lambda c: (c.n_heads * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size)
)


# -- the tables ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """Our tensor `ours` is `transform` of the Hugging Face tensor(s) `theirs`."""

    ours: str
    theirs: str | tuple[str, ...]
    transform: Transform = COPY
    when: str | None = None  # the HFSpec feature without which the Hugging Face side lacks it

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.theirs,) if isinstance(self.theirs, str) else self.theirs

    def named(self, prefix: str, layer: int | None) -> Row:
        def fill(template: str) -> str:
            return template.replace("{p}", prefix).replace("{i}", str(layer))

        theirs = tuple(fill(t) for t in self.sources)
        return Row(fill(self.ours), theirs, self.transform, self.when)


@dataclass(frozen=True)
class NameMap:
    """A family's rows, its Hugging Face prefix, and the tensors its files carry that are no
    weights (buffers), which import skips."""

    prefix: str
    probe: str  # a tensor every file of the family has: tells whether the prefix is used
    ignored: re.Pattern[str]
    rows: tuple[Row, ...] = field(repr=False)

    def expand(self, n_layers: int, prefix: str) -> Iterator[Row]:
        """The rows with concrete names, the per-layer runs repeated for each layer."""
        for per_layer, run in itertools.groupby(self.rows, key=lambda r: "{i}" in r.ours):
            group = list(run)
            for layer in range(n_layers) if per_layer else [None]:
                for row in group:
                    yield row.named(prefix, layer)


GPT2_NAMES = NameMap(
    prefix="transformer.",
    probe="wte.weight",
    ignored=re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),  # causal-mask buffers
    rows=(
        Row("tok_emb.weight", "{p}wte.weight"),
        Row("pos_emb.weight", "{p}wpe.weight"),
        Row("trf_blocks.{i}.norm1.scale", "{p}h.{i}.ln_1.weight"),
        Row("trf_blocks.{i}.norm1.shift", "{p}h.{i}.ln_1.bias"),
        Row("trf_blocks.{i}.att.qkv.weight", "{p}h.{i}.attn.c_attn.weight", TRANSPOSE),
        Row("trf_blocks.{i}.att.qkv.bias", "{p}h.{i}.attn.c_attn.bias", when="qkv_bias"),
        Row("trf_blocks.{i}.att.out_proj.weight", "{p}h.{i}.attn.c_proj.weight", TRANSPOSE),
        Row("trf_blocks.{i}.att.out_proj.bias", "{p}h.{i}.attn.c_proj.bias", when="o_bias"),
        Row("trf_blocks.{i}.norm2.scale", "{p}h.{i}.ln_2.weight"),
        Row("trf_blocks.{i}.norm2.shift", "{p}h.{i}.ln_2.bias"),
        Row("trf_blocks.{i}.ff.fc1.weight", "{p}h.{i}.mlp.c_fc.weight", TRANSPOSE),
        Row("trf_blocks.{i}.ff.fc1.bias", "{p}h.{i}.mlp.c_fc.bias", when="mlp_bias"),
        Row("trf_blocks.{i}.ff.fc2.weight", "{p}h.{i}.mlp.c_proj.weight", TRANSPOSE),
        Row("trf_blocks.{i}.ff.fc2.bias", "{p}h.{i}.mlp.c_proj.bias", when="mlp_bias"),
        Row("final_norm.scale", "{p}ln_f.weight"),
        Row("final_norm.shift", "{p}ln_f.bias"),
        Row("out_head.weight", "lm_head.weight", when="untied"),
    ),
)

_ATT = "{p}layers.{i}.self_attn."
_MLP = "{p}layers.{i}.mlp."
_Q_K_V = tuple(f"{_ATT}{x}_proj." for x in "qkv")

# Llama 3, Qwen3 (adds q_norm/k_norm) and Qwen2 (adds q/k/v biases).
LLAMA_NAMES = NameMap(
    prefix="model.",
    probe="embed_tokens.weight",
    ignored=re.compile(r"rotary_emb\.inv_freq$"),
    rows=(
        Row("tok_emb.weight", "{p}embed_tokens.weight"),
        Row("trf_blocks.{i}.norm1.weight", "{p}layers.{i}.input_layernorm.weight"),
        Row("trf_blocks.{i}.att.qkv.weight", tuple(x + "weight" for x in _Q_K_V), QKV),
        Row("trf_blocks.{i}.att.qkv.bias", tuple(x + "bias" for x in _Q_K_V), QKV, "qkv_bias"),
        Row("trf_blocks.{i}.att.out_proj.weight", _ATT + "o_proj.weight"),
        Row("trf_blocks.{i}.att.out_proj.bias", _ATT + "o_proj.bias", when="o_bias"),
        Row("trf_blocks.{i}.att.q_norm.weight", _ATT + "q_norm.weight", when="qk_norm"),
        Row("trf_blocks.{i}.att.k_norm.weight", _ATT + "k_norm.weight", when="qk_norm"),
        Row("trf_blocks.{i}.norm2.weight", "{p}layers.{i}.post_attention_layernorm.weight"),
        Row("trf_blocks.{i}.ff.fc1.weight", _MLP + "gate_proj.weight"),
        Row("trf_blocks.{i}.ff.fc1.bias", _MLP + "gate_proj.bias", when="mlp_bias"),
        Row("trf_blocks.{i}.ff.fc2.weight", _MLP + "up_proj.weight"),
        Row("trf_blocks.{i}.ff.fc2.bias", _MLP + "up_proj.bias", when="mlp_bias"),
        Row("trf_blocks.{i}.ff.fc3.weight", _MLP + "down_proj.weight"),
        Row("trf_blocks.{i}.ff.fc3.bias", _MLP + "down_proj.bias", when="mlp_bias"),
        Row("final_norm.weight", "{p}norm.weight"),
        Row("out_head.weight", "lm_head.weight", when="untied"),
    ),
)


def name_map(spec: HFSpec) -> NameMap:
    return GPT2_NAMES if spec.family == "gpt2" else LLAMA_NAMES


# -- plans derived from a table -----------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One output tensor: `combine` of `sources` (whose shapes must be `expect`), or zeros."""

    target: str
    shape: Shape
    sources: tuple[str, ...] = ()
    expect: tuple[Shape, ...] = ()
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # None: zeros


def expected_shapes(config: ModelConfig) -> dict[str, Shape]:
    """Our state-dict names and shapes (a tied head is stored once), from a meta-device model."""
    from scratchllm.model.gpt import GPTModel

    class ShapesOnly(GPTModel):
        def reset_parameters(self) -> None:  # nothing to initialise on the meta device
            pass

    with torch.device("meta"):
        model = ShapesOnly(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("out_head.weight", None)
    return shapes


def import_plan(spec: HFSpec, shapes: dict[str, Shape], keys: set[str]) -> list[Step]:
    """Ours ← theirs, for every tensor of our model (`shapes`); `keys` are the source's names."""
    names, c = name_map(spec), spec.config
    used = names.prefix + names.probe in keys or names.probe not in keys
    steps = []
    for row in names.expand(c.n_layers, names.prefix if used else ""):
        if row.ours not in shapes:
            continue  # a source tensor left unused is reported as unexpected by check_source
        shape = shapes[row.ours]
        if not spec.has(row.when):
            steps.append(Step(row.ours, shape))
            continue
        expect = row.transform.theirs_shapes(shape, c)
        combine = partial(row.transform.to_ours, config=c)
        steps.append(Step(row.ours, shape, row.sources, expect, combine))
    if {s.target for s in steps} != set(shapes):
        left = sorted(set(shapes) - {s.target for s in steps})
        raise RuntimeError(f"internal error: the name map does not cover {left[:3]}")
    return steps


def export_plan(spec: HFSpec, shapes: dict[str, Shape]) -> list[Step]:
    """Theirs ← ours, for every tensor of the Hugging Face model."""
    names, c = name_map(spec), spec.config
    # The shapes our optional tensors would have: the sizes of zeros the other side needs.
    full = expected_shapes(c.replace(qkv_bias=True, bias=True))
    steps = []
    for row in names.expand(c.n_layers, names.prefix):
        if not spec.has(row.when):
            continue  # an ours-only tensor is reported as unexpected by check_source
        for k, (name, shape) in enumerate(
            zip(row.sources, row.transform.theirs_shapes(full[row.ours], c), strict=True)
        ):
            if row.ours not in shapes:
                steps.append(Step(name, shape))
                continue
            combine = partial(_part, row.transform, k, c)
            steps.append(Step(name, shape, (row.ours,), (shapes[row.ours],), combine))
    return steps


def _part(
    transform: Transform, k: int, config: ModelConfig, ours: list[torch.Tensor]
) -> torch.Tensor:
    return transform.to_theirs(ours[0], config)[k]


def check_source(
    steps: list[Step], src: TensorSource, ignore: Callable[[str], bool], what: str
) -> None:
    """Every needed tensor present with its shape and a float dtype, nothing unexpected."""
    info = src.info()
    needed: dict[str, Shape] = {}
    for step in steps:
        needed.update(zip(step.sources, step.expect, strict=True))
    missing = [name for name in needed if name not in info]
    if missing:
        raise CheckpointError(
            f"{src.where()}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
        )
    for name, shape in needed.items():
        if info[name].shape != shape:
            raise CheckpointError(
                f"{src.where(name)}: tensor {name!r} has shape {info[name].shape}, expected {shape}"
            )
        if not info[name].dtype.is_floating_point:
            raise CheckpointError(
                f"{src.where(name)}: tensor {name!r} has dtype {info[name].dtype}, expected floats"
            )
    unexpected = [k for k in info if k not in needed and not ignore(k)]
    if unexpected:
        raise CheckpointError(
            f"{src.where(unexpected[0])}: unexpected tensor {unexpected[0]!r} for {what} "
            f"({len(unexpected)} unexpected in all)"
        )


def producers(
    steps: list[Step], src: TensorSource, dtype: torch.dtype
) -> list[tuple[str, TensorInfo, Callable[[], torch.Tensor]]]:
    """`write_safetensors` items: each step's tensor, read and converted only when written."""

    def producer(step: Step) -> Callable[[], torch.Tensor]:
        def produce() -> torch.Tensor:
            if step.combine is None:
                return torch.zeros(step.shape, dtype=dtype)
            out = step.combine([src.read(name) for name in step.sources])
            return out.to(dtype).contiguous()

        return produce

    return [(s.target, TensorInfo(s.shape, dtype), producer(s)) for s in steps]
