"""PEFT LoRA adapters ⇄ scratchllm LoRA factors, on the Hugging Face export of the base.

A PEFT adapter folder holds adapter_config.json (peft_type "LORA", r, lora_alpha,
target_modules, ...) and adapter_model.safetensors with, for every adapted module of the
Hugging Face model, `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]; the module computes W x + scale · B A x with scale = lora_alpha / r (/ sqrt(r) with
rsLoRA). The modules are those `scratchllm convert --to hf` writes for the base, read from the
family's one name map (`hub.names`): where our row is one Hugging Face tensor (GPT-2's c_attn,
c_proj, c_fc, Llama's o_proj, gate/up/down_proj) the factors copy over; where our fused `qkv` is
three (Llama/Qwen's q/k/v_proj) B splits by rows and each part keeps the same A. GPT-2's Conv1D
stores its weight transposed, but PEFT's factors are `nn.Linear`s in either case: only
`fan_in_fan_out` says so, the factors are not transposed.

Back: q/k/v parts that share one A (as ours export) fuse to that rank; parts with their own A
(an adapter trained by PEFT) fuse exactly as the stacked A and a block-diagonal B, whose rank is
the sum. Scales are folded into B where they differ from ours, so the model computes the same.

  export_peft     a LoRA fine-tune's checkpoint → a PEFT adapter folder (`convert --to peft`)
  import_peft     a PEFT adapter onto a checkpoint → a LoRA checkpoint, or merged weights only
  load_peft_into  a PEFT adapter into a model `apply_lora` wrapped (`finetune --adapter`)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import InputError
from scratchllm.hub.convert import _read_json
from scratchllm.hub.families import HFSpec, export_spec
from scratchllm.hub.names import FuseRows, Transpose, expected_shapes, name_map
from scratchllm.model.lora import TARGETS, LoRALinear
from scratchllm.settings import SettingError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the base model's module names
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Settings of adapter_config.json that change what the adapter computes beyond W + scale·B A.
_UNSUPPORTED = (
    "use_dora",
    "use_qalora",
    "alora_invocation_tokens",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "modules_to_save",
    "alpha_pattern",
    "lora_bias",
)


@dataclass(frozen=True)
class LayerMap:
    """One of our LoRA-able linears and the Hugging Face module(s) computing its output rows."""

    layer: str  # "trf_blocks.0.att.qkv"
    in_features: int
    out_features: int
    modules: tuple[str, ...]  # "model.layers.0.self_attn.q_proj", ...
    rows: tuple[tuple[int, int], ...]  # [start, stop) of our output, per module


@dataclass
class PeftResult:
    direction: str  # export | import
    source: Path
    out: Path
    architecture: str
    rank: int
    alpha: float
    layers: int  # our LoRA layers
    target_modules: list[str]
    merged: bool = False
    notes: list[str] = field(default_factory=list)


def lora_layers(config: ModelConfig, source: str) -> tuple[HFSpec, dict[str, LayerMap]]:
    """Our LoRA-able linears of a model of `config` (which must export to Hugging Face) and the
    modules of its Hugging Face export, from the family's name map."""
    spec = export_spec(config, source)
    names = name_map(spec)
    shapes = expected_shapes(config)
    suffixes = tuple(name for group in TARGETS.values() for name in group)
    layers: dict[str, LayerMap] = {}
    for row in names.expand(config.n_layers, names.prefix):
        layer = row.ours.removesuffix(".weight")
        if layer == row.ours or not layer.endswith(suffixes) or row.ours not in shapes:
            continue
        out, inn = shapes[row.ours]
        sizes = row.transform.sizes(config) if isinstance(row.transform, FuseRows) else (out,)
        bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        modules = tuple(s.removesuffix(".weight") for s in row.sources)
        rows = tuple(zip(bounds[:-1], bounds[1:], strict=True))
        layers[layer] = LayerMap(layer, inn, out, modules, rows)
    return spec, layers


def _fan_in_fan_out(spec: HFSpec) -> bool:
    """Whether the family's linears are Conv1D ([in, out] weights): PEFT wants to be told."""
    return any(isinstance(r.transform, Transpose) for r in name_map(spec).rows)


def target_names(modules: list[str], all_modules: list[str]) -> list[str]:
    """PEFT `target_modules` naming exactly `modules`: each one's last name, or its last two
    where the last alone also names a module left out (GPT-2's attn.c_proj vs mlp.c_proj)."""
    chosen = set(modules)
    out = set()
    for module in modules:
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if not any(_matches(m, name) for m in all_modules if m not in chosen):
                out.add(name)
                break
    return sorted(out)


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


# -- reading an adapter ---------------------------------------------------------------------------
@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter: per Hugging Face module its A [r, in], B [out, r] and scale."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    keys: dict[str, str]  # module → its lora_B key (for messages)
    metadata: dict[str, str]


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = fh.keys()  # safe_open is no mapping: `in fh` does not iterate
            return {k: fh.get_tensor(k) for k in keys}, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def read_peft_adapter(path: str | Path) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter folder (config and tensors, not yet against a base)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"adapter {path}: no such directory (expected {ADAPTER_CONFIG} + "
                         f"{ADAPTER_WEIGHTS})")  # fmt: skip
    cfg_path = path / ADAPTER_CONFIG
    cfg = _read_json(cfg_path)
    if cfg.get("peft_type") != "LORA":
        raise InputError(
            f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA' "
            "(scratchllm reads LoRA adapters)"
        )
    for name in _UNSUPPORTED:
        if cfg.get(name):
            raise InputError(
                f"{cfg_path}: {name} is {cfg[name]!r}; scratchllm reads plain LoRA "
                f"(W + scale·B A), expected {name} unset"
            )
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{cfg_path}: bias is {cfg['bias']!r}, expected 'none'")
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise InputError(f"{cfg_path}: lora_alpha is {alpha!r}, expected a number > 0")
    rslora = bool(cfg.get("use_rslora"))
    file = path / ADAPTER_WEIGHTS
    tensors, metadata = _load_tensors(file)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, str] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise InputError(
                f"{file}: tensor {key!r} is not a LoRA factor (base_model.model.<module>."
                "lora_A.weight / lora_B.weight); DoRA, biases and modules_to_save are not read"
            )
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise InputError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} and dtype "
                             f"{tensor.dtype}, expected a 2-d float matrix")  # fmt: skip
        parts.setdefault(m["module"], {})[m["ab"]] = tensor
        if m["ab"] == "B":
            keys[m["module"]] = key
    if not parts:
        raise InputError(f"{file}: holds no LoRA factors")
    factors = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise InputError(f"{file}: {module!r} has no {missing}.weight")
        a, b = ab["A"], ab["B"]
        if b.shape[1] != a.shape[0]:
            raise InputError(f"{file}: {keys[module]!r} has shape {tuple(b.shape)}, expected "
                             f"({b.shape[0]}, {a.shape[0]}) to match its lora_A")  # fmt: skip
        r = a.shape[0]
        scale = float(alpha) / (math.sqrt(r) if rslora else r)
        factors[module] = (a, b, scale)
    return PeftAdapter(path, cfg, factors, keys, metadata)


def fuse(
    adapter: PeftAdapter, config: ModelConfig, source: str
) -> tuple[HFSpec, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """The adapter as updates of our layers: per layer (A, B, scale) with W + scale · B A the
    same function as the adapter's modules. Refuses modules or shapes the base does not have."""
    spec, layers = lora_layers(config, source)
    where = {m: (lay, k) for lay in layers.values() for k, m in enumerate(lay.modules)}
    file = adapter.path / ADAPTER_WEIGHTS
    grouped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for module, (a, b, scale) in adapter.factors.items():
        if module not in where:
            known = target_names(sorted(where), sorted(where))
            raise InputError(
                f"{file}: {adapter.keys[module]!r} adapts module {module!r}, which the "
                f"{spec.architecture} export of {source} does not have (its LoRA-able modules: "
                f"{', '.join(_short(known))}, {config.n_layers} layers); the adapter was made "
                "for another base"
            )
        lay, k = where[module]
        start, stop = lay.rows[k]
        for name, got, want in (
            ("lora_A", tuple(a.shape), (a.shape[0], lay.in_features)),
            ("lora_B", tuple(b.shape), (stop - start, b.shape[1])),
        ):
            if got != want:
                key = f"{PREFIX}{module}.{name}.weight"
                raise InputError(f"{file}: tensor {key!r} has shape {got}, expected {want} for "
                                 f"the base {source}")  # fmt: skip
        grouped.setdefault(lay.layer, {})[k] = (a, b, scale)
    fused = {}
    for name, parts in grouped.items():
        lay = layers[name]
        items = sorted(parts.items())
        a0, _, s0 = items[0][1]
        shared = all(torch.equal(a, a0) and s == s0 for _, (a, _, s) in items)
        rank = a0.shape[0] if shared else sum(a.shape[0] for _, (a, _, _) in items)
        big_a = a0 if shared else torch.cat([a for _, (a, _, _) in items])
        big_b = torch.zeros(lay.out_features, rank, dtype=a0.dtype)
        col = 0
        for k, (_a, b, s) in items:
            start, stop = lay.rows[k]
            width = b.shape[1]
            part = b if s == s0 else b * (s / s0)  # one scale for the layer: fold the ratio in
            big_b[start:stop, col : col + width] = part.to(big_b.dtype)
            col = col if shared else col + width
        fused[name] = (big_a.clone(), big_b, s0)
    return spec, fused


def _short(names: list[str]) -> list[str]:
    """q_proj, k_proj, ... for the message: the names without their layer path."""
    return sorted({re.sub(r"^.*?\d+\.", "", n) for n in names})


def _fingerprint_note(adapter: PeftAdapter, fingerprint: str | None, base: str) -> list[str]:
    recorded = adapter.metadata.get("scratchllm_base_fingerprint")
    if recorded and fingerprint and recorded != fingerprint:
        return [
            f"adapter {adapter.path} was trained on base weights {recorded} "
            f"({adapter.metadata.get('scratchllm_base', '?')}); {base} holds {fingerprint}"
        ]
    return []


# -- into a wrapped model (finetune --adapter) ------------------------------------------------------
def load_peft_into(
    model: torch.nn.Module,
    adapter_dir: str | Path,
    base: str = "the base checkpoint",
    base_fingerprint: str | None = None,
) -> list[str]:
    """Set the LoRA factors of a model `apply_lora` wrapped so that it computes what the
    adapter computes on its base: the adapter's factors fill the first ranks, the rest of A
    keeps its initialisation and the rest of B is zero (no change), and B is rescaled where
    the model's alpha/rank differs. Layers the adapter leaves alone stay fresh (B = 0).
    Returns warnings (a base other than the one the adapter was trained on)."""
    adapter = read_peft_adapter(adapter_dir)
    _, fused = fuse(adapter, model.config, base)
    modules = dict(model.named_modules())
    for name, (a, b, scale) in fused.items():
        layer = modules.get(name)
        if not isinstance(layer, LoRALinear):
            group = next(g for g, suffixes in TARGETS.items() if name.endswith(suffixes))
            raise SettingError(
                "lora_targets",
                f"leaves out {name}, which the adapter {adapter.path} adapts; name {group} "
                "in `lora_targets` (e.g. attn,ff)",
            )
        if a.shape[0] > layer.rank:
            raise SettingError(
                "lora_rank",
                f"{layer.rank} is below the rank {a.shape[0]} that {name} needs to hold the "
                f"adapter {adapter.path} (its r, or the sum of its q/k/v parts' r where each "
                f"has its own lora_A); pass at least {a.shape[0]}",
            )
        _set_factors(layer, a, b, scale)
    return _fingerprint_note(adapter, base_fingerprint, base)


def _set_factors(layer: LoRALinear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """The first ranks of `layer` from (A, B, scale); its other ranks change nothing (B = 0)."""
    k = a.shape[0]
    with torch.no_grad():
        layer.lora_A[:k] = a.to(layer.lora_A.dtype)
        layer.lora_B.zero_()
        ratio = scale / layer.scale  # exactly 1.0 when the alphas and ranks agree: B copies
        layer.lora_B[:, :k] = (b if ratio == 1.0 else b * ratio).to(layer.lora_B.dtype)


# -- the conversions (`scratchllm convert`) -----------------------------------------------------
# checkpoint.json fields of a base that describe its own training, not the imported model.
_BOOKKEEPING = {
    "format_version", "tokenizer_fingerprint", "step", "tokens", "eval", "lora",
    "base_checkpoint", "base_fingerprint", "source", "title",
}  # fmt: skip


def _integral(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(run: str | Path, out: str | Path, *, force: bool = False) -> PeftResult:
    """A LoRA fine-tune's checkpoint (its adapters.safetensors + lora.json) as a PEFT adapter
    folder for the Hugging Face export of its base (`scratchllm convert --from BASE --to hf`)."""
    from safetensors.torch import save_file

    from scratchllm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir
    from scratchllm.finetune.checkpoints import ADAPTER_FILES
    from scratchllm.fs import atomic_dir, kill_hook
    from scratchllm.hub.convert import _check_out, _check_paths

    out = Path(out)
    _check_paths(Path(run), out)
    ckpt = resolve_checkpoint_dir(run)
    config, _, _ = read_checkpoint_config(ckpt)
    weights_file, spec_file = (ckpt / name for name in ADAPTER_FILES)
    if not spec_file.exists():
        raise InputError(
            f"--from {run}: {spec_file} is missing: not a LoRA fine-tune; --to peft exports "
            "the LoRA factors of `scratchllm finetune TASK ... --lora-rank R`"
        )
    lora = _read_json(spec_file)
    try:
        rank, alpha = int(lora["rank"]), float(lora["alpha"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{spec_file}: expected the fields rank and alpha as numbers") from None
    tensors, _ = _load_tensors(weights_file)
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            raise InputError(
                f"{weights_file}: holds {key!r} besides the LoRA factors (a classification head "
                "trained in full); a PEFT adapter of the causal LM carries LoRA factors only"
            )
        by_layer.setdefault(layer, {})[leaf] = tensor
    spec, layers = lora_layers(config, str(ckpt / "config.json"))
    peft_tensors: dict[str, torch.Tensor] = {}
    for name, ab in sorted(by_layer.items()):
        lay = layers.get(name)
        if lay is None or set(ab) != {"lora_A", "lora_B"}:
            raise InputError(f"{weights_file}: {name!r} is not a whole LoRA layer (lora_A and "
                             f"lora_B) of a {spec.architecture}-shaped model")  # fmt: skip
        for leaf, want in (
            ("lora_A", (rank, lay.in_features)),
            ("lora_B", (lay.out_features, rank)),
        ):
            if tuple(ab[leaf].shape) != want:
                raise InputError(f"{weights_file}: tensor '{name}.{leaf}' has shape "
                                 f"{tuple(ab[leaf].shape)}, expected {want}")  # fmt: skip
        for module, (start, stop) in zip(lay.modules, lay.rows, strict=True):
            # One A for each part of a fused layer: B's rows alone tell q, k and v apart.
            peft_tensors[f"{PREFIX}{module}.lora_A.weight"] = ab["lora_A"].clone()
            peft_tensors[f"{PREFIX}{module}.lora_B.weight"] = ab["lora_B"][start:stop].clone()
    modules = sorted({k.removeprefix(PREFIX).rsplit(".", 2)[0] for k in peft_tensors})
    targets = target_names(modules, sorted(m for lay in layers.values() for m in lay.modules))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": lora.get("base_checkpoint"),
        "r": rank,
        "lora_alpha": _integral(alpha),
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": _fan_in_fan_out(spec),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    metadata = {"format": "pt"}
    for key, value in (("scratchllm_base", lora.get("base_checkpoint")),
                       ("scratchllm_base_fingerprint", lora.get("base_fingerprint"))):  # fmt: skip
        if value:
            metadata[key] = str(value)
    _check_out(out, force)
    with atomic_dir(out, hook=kill_hook("convert")) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_file(peft_tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
    return PeftResult("export", ckpt, out, spec.architecture, rank, alpha, len(by_layer), targets)


def import_peft(
    checkpoint: str | Path,
    adapter: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    force: bool = False,
) -> PeftResult:
    """A PEFT adapter onto a scratchllm checkpoint (the base it was made for, by shapes and
    module names). `out` is a LoRA checkpoint: merged weights plus the unmerged factors and
    lora.json naming `checkpoint` as the base, as a LoRA fine-tune saves; with `merge`, a
    plain checkpoint of the merged weights."""
    from scratchllm.checkpoint import load_checkpoint, save_checkpoint
    from scratchllm.finetune.checkpoints import lora_checkpoint_files, weights_fingerprint
    from scratchllm.hub.convert import _check_out, _check_paths
    from scratchllm.model.lora import apply_lora

    out = Path(out)
    _check_paths(Path(checkpoint), out)
    src, dst = Path(adapter).resolve(), out.resolve()
    if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise InputError(f"--out {out}: is, holds or lies in --adapter {adapter}")
    ckpt = load_checkpoint(checkpoint)
    peft = read_peft_adapter(adapter)
    spec, fused = fuse(peft, ckpt.config, str(ckpt.path))
    fingerprint = weights_fingerprint(ckpt.path)
    notes = _fingerprint_note(peft, fingerprint, str(ckpt.path))
    _check_out(out, force)
    model = ckpt.model
    meta: dict[str, Any] = {k: v for k, v in ckpt.meta.items() if k not in _BOOKKEEPING}
    meta["source"] = {"format": "peft", "path": str(peft.path.resolve())}
    rank = max(a.shape[0] for a, _, _ in fused.values())
    groups = [g for g, sfx in TARGETS.items() if any(name.endswith(sfx) for name in fused)]
    targets = ",".join(groups)
    r = peft.config.get("r")
    if r == rank and not peft.config.get("use_rslora"):
        alpha = float(peft.config["lora_alpha"])  # the same alpha/r: the factors copy exactly
    else:
        alpha = next(iter(fused.values()))[2] * rank
    if merge:
        with torch.no_grad():
            for name, (a, b, scale) in fused.items():
                linear = model.get_submodule(name)
                delta = (b.double() @ a.double()) * scale
                linear.weight += delta.to(linear.weight.dtype)
        save_checkpoint(out, model, ckpt.tokenizer, meta)
    else:
        with torch.random.fork_rng():  # the spare ranks' A: reproducible, the caller's RNG kept
            torch.manual_seed(0)
            wrapped = apply_lora(model, rank, alpha, targets)
        modules = dict(model.named_modules())
        for name, (a, b, scale) in fused.items():
            _set_factors(modules[name], a, b, scale)
        meta["base_checkpoint"] = str(ckpt.path)
        meta["base_fingerprint"] = fingerprint
        meta["lora"] = {"rank": rank, "alpha": alpha, "targets": targets, "layers": len(wrapped)}
        weights, files = lora_checkpoint_files(model, meta)
        save_checkpoint(out, model, ckpt.tokenizer, meta, extra_files=files, weights=weights)
    all_modules = sorted(m for lay in lora_layers(ckpt.config, "")[1].values() for m in lay.modules)
    result = PeftResult(
        "import", peft.path, out, spec.architecture, rank, alpha, len(fused),
        target_names(sorted(peft.factors), all_modules), merge, notes,
    )  # fmt: skip
    return result
