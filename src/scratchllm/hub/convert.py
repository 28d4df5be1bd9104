"""Open weights: Hugging Face (and OpenAI TensorFlow) checkpoints ⇄ scratchllm checkpoints.

Import reads GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM and Qwen2ForCausalLM folders
(config.json + model.safetensors, sharded safetensors with an index, or pytorch_model.bin) and
OpenAI's original GPT-2 TensorFlow release (hparams.json + model.ckpt.*, read without TensorFlow).
Export writes the folder `transformers.AutoModelForCausalLM.from_pretrained` loads.

Conversion streams: the expected names and shapes come from a `GPTModel` built on the meta
device, every source tensor is checked before anything is written, and then one tensor at a time
is read from disk (plain reads, no memory map), renamed, transposed or fused as the family's name
map says, and appended to the output safetensors file. Peak memory is about one tensor, not the
model. Output is built in a temporary sibling directory that is renamed into place
(`scratchllm.fs.atomic_dir`), so a failed conversion leaves `--out` as it was.

The parts: `hub.tensors` (reading and writing tensor files), `hub.tf` (the TensorFlow reader),
`hub.families` (config.json ⇄ `ModelConfig`), `hub.names` (the name maps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import InputError
from scratchllm.fs import atomic_dir, kill_hook, recover_dir
from scratchllm.hub.families import export_spec, hf_config_dict, hf_spec
from scratchllm.hub.names import (
    check_source,
    expected_shapes,
    export_plan,
    import_plan,
    name_map,
    producers,
)
from scratchllm.hub.tensors import SafetensorsFile, TensorSource, open_hf_weights, write_safetensors
from scratchllm.hub.tf import (
    TFCheckpoint,
    TFGPT2Source,
    find_tf_checkpoint,
    gpt2_config_from_hparams,
)


@dataclass
class ConvertResult:
    direction: str  # import | export
    source: Path
    out: Path
    architecture: str
    config: ModelConfig
    dtype: torch.dtype
    parameters: int
    tokenizer: str | None
    notes: list[str] = field(default_factory=list)


def detect_format(path: str | Path) -> str:
    """'scratchllm' (a checkpoint or run directory), 'hf' (a Hugging Face folder) or 'tf'."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--from {path}: no such directory")
    if not path.is_dir():
        raise InputError(f"--from {path}: expected a directory, found a file")
    if (path / "checkpoint" / "config.json").exists() and not (path / "config.json").exists():
        return "scratchllm"
    config = path / "config.json"
    if config.exists():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{config}: invalid JSON ({exc})") from None
        if isinstance(data, dict) and "emb_dim" in data:
            return "scratchllm"
        if isinstance(data, dict) and ("architectures" in data or "model_type" in data):
            return "hf"
        raise InputError(
            f"{config}: neither a scratchllm config (emb_dim) nor a Hugging Face one "
            "(architectures / model_type)"
        )
    if (path / "hparams.json").exists() and find_tf_checkpoint(path) is not None:
        return "tf"
    raise InputError(
        f"--from {path}: no config.json (Hugging Face or scratchllm) and no TensorFlow GPT-2 "
        "checkpoint (hparams.json + model.ckpt.index)"
    )


def _check_paths(source: Path, out: Path) -> None:
    """Refuse an --out that is, holds or lies inside --from (symlinks resolved): replacing it
    would delete the source (`--from run/checkpoint --out run --force`) or write into it."""
    src, dst = source.resolve(), out.resolve()
    if dst == src:
        raise InputError(f"--out {out}: is --from {source}; expected a folder outside it")
    if src.is_relative_to(dst):
        raise InputError(
            f"--out {out}: holds --from {source}, which writing it would replace; "
            "expected a folder outside it"
        )
    if dst.is_relative_to(src):
        raise InputError(f"--out {out}: lies inside --from {source}; expected a folder outside it")


def _check_out(out: Path, force: bool) -> None:
    """Refuse to replace what the user did not ask to replace (the write itself is atomic).
    A write a crash cut short between its two renames is finished first (the old copy back)."""
    recover_dir(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out}: already exists and is not empty; pass --force to replace")


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    from scratchllm.utils import parse_dtype

    return parse_dtype(dtype)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def import_hf(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
    force: bool = False,
    fmt: str = "auto",
) -> ConvertResult:
    """Convert a Hugging Face (or OpenAI TensorFlow GPT-2) folder into a scratchllm checkpoint."""
    from scratchllm.checkpoint import check_tokenizer_fits, write_checkpoint
    from scratchllm.tokenizers import load_tokenizer
    from scratchllm.tokenizers.hf import keep_merges, merges_file_of, tokenizer_from_model_dir

    source, out = Path(source), Path(out)
    _check_paths(source, out)
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "tf":
        config_source = str(source / "hparams.json")
        hf = gpt2_config_from_hparams(_read_json(source / "hparams.json"), config_source)
    else:
        config_source = str(source / "config.json")
        hf = _read_json(source / "config.json")
    name = str(hf.get("_name_or_path") or source.resolve().name)
    spec = hf_spec(hf, config_source, name=name)
    shapes = expected_shapes(spec.config)
    if fmt == "tf":
        prefix = find_tf_checkpoint(source)
        if prefix is None:
            raise InputError(f"{source}: no TensorFlow checkpoint (model.ckpt.index)")
        src: TensorSource = TFGPT2Source(TFCheckpoint(prefix))
    else:
        src = open_hf_weights(source)
    with src:
        steps = import_plan(spec, shapes, set(src.info()))
        ignored = name_map(spec).ignored

        def ignore(k: str) -> bool:
            return bool(ignored.search(k)) or (spec.tied and k == "lm_head.weight")

        check_source(steps, src, ignore, spec.architecture)
        emb_source = next(s for s in steps if s.target == "tok_emb.weight").sources[0]
        out_dtype = _parse_dtype(dtype) or src.info()[emb_source].dtype
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            tok = tokenizer_from_model_dir(source, hf, spec.family)
            if tok is None:
                raise InputError(
                    f"{source}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt, "
                    "or encoder.json + vocab.bpe); pass --tokenizer SPEC"
                )
            keep_merges(tok, merges_file_of(source))
        check_tokenizer_fits(tok, spec.config, str(source))
        _check_out(out, force)
        meta = {
            "source": {
                "format": fmt,
                "architecture": spec.architecture,
                "path": str(source.resolve()),
            },
            "dtype": str(out_dtype).removeprefix("torch."),
        }
        items = producers(steps, src, out_dtype)
        write_checkpoint(out, spec.config, tok, lambda f: write_safetensors(f, items), meta)
    params = sum(math.prod(s) for s in shapes.values())
    return ConvertResult(
        "import", source, out, spec.architecture, spec.config, out_dtype, params, tok.name
    )


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> ConvertResult:
    """Write a scratchllm checkpoint as a Hugging Face folder (config, safetensors, tokenizer)."""
    from scratchllm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir
    from scratchllm.tokenizers.hf import export_tokenizer

    out = Path(out)
    _check_paths(Path(checkpoint), out)
    ckpt = resolve_checkpoint_dir(checkpoint)
    config, tok, _ = read_checkpoint_config(ckpt)  # its tokenizer/ checked against its record
    spec = export_spec(config, str(ckpt / "config.json"))
    shapes = expected_shapes(config)
    steps = export_plan(spec, shapes)
    with SafetensorsFile(ckpt / "model.safetensors") as src:
        what = f"a scratchllm {spec.architecture}-shaped model"
        check_source(steps, src, lambda k: spec.tied and k == "out_head.weight", what)
        out_dtype = _parse_dtype(dtype) or src.info()["tok_emb.weight"].dtype
        _check_out(out, force)
        with atomic_dir(out, hook=kill_hook("convert")) as tmp:
            eos_id, bos_id = export_tokenizer(tok, ckpt / "tokenizer", tmp, config.context_length)
            hf = hf_config_dict(spec, out_dtype, eos_id, bos_id)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            gen = {"bos_token_id": bos_id, "eos_token_id": eos_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            write_safetensors(tmp / "model.safetensors", producers(steps, src, out_dtype))
    params = sum(math.prod(s) for s in shapes.values())
    return ConvertResult(
        "export", ckpt, out, spec.architecture, config, out_dtype, params, tok.name
    )


def convert(
    source: str | Path,
    out: str | Path,
    *,
    fmt: str = "auto",
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    tokenizer: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """`scratchllm convert`: import a Hugging Face/TensorFlow folder or export a checkpoint."""
    if fmt not in ("auto", "hf", "scratchllm", "tf"):
        raise InputError(f"--format {fmt!r}: expected auto, hf, scratchllm or tf")
    detected = detect_format(source) if fmt == "auto" else fmt
    to = to or ("hf" if detected == "scratchllm" else "scratchllm")
    if to not in ("hf", "scratchllm"):
        raise InputError(f"--to {to!r}: expected hf or scratchllm")
    if detected == "scratchllm" and to == "scratchllm":
        raise InputError(f"--from {source}: is already a scratchllm checkpoint (use --to hf)")
    if detected in ("hf", "tf") and to == "hf":
        raise InputError(f"--from {source}: is already a Hugging Face folder (use --to scratchllm)")
    _check_paths(Path(source), Path(out))  # before reading anything
    if detected == "scratchllm":
        return export_hf(source, out, dtype=dtype, force=force)
    return import_hf(source, out, dtype=dtype, tokenizer=tokenizer, force=force, fmt=detected)
