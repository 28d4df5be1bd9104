"""`load_tokenizer(spec)`: the one place that knows every tokenizer implementation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scratchllm.errors import InputError
from scratchllm.fs import recover_dir
from scratchllm.tokenizers.base import GPT2_PATTERN, META_FILE, TIKTOKEN_FILE, Tokenizer
from scratchllm.tokenizers.bpe import BPETokenizer, gpt2_tokenizer
from scratchllm.tokenizers.bytes import ByteTokenizer


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`bytes`, `gpt2`, `gpt2:DIR`, a directory saved by scratchllm (or a checkpoint directory),
    or a directory holding `encoder.json` + `vocab.bpe`."""
    spec = str(spec)
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec.startswith("gpt2:"):
        directory = Path(spec[5:])
        _require_gpt2_files(directory, spec)
        return gpt2_tokenizer(directory)
    directory = Path(spec)
    recover_dir(directory)  # a save a crash cut short between its two renames: the old copy
    if not directory.exists():
        raise InputError(
            f"tokenizer {spec!r}: no such directory; expected bytes, gpt2, gpt2:DIR or a "
            "tokenizer directory"
        )
    if (directory / "tokenizer" / META_FILE).exists() or (directory / "tokenizer").is_dir():
        directory = directory / "tokenizer"  # a checkpoint directory
    meta_path = directory / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{meta_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return _from_meta(directory, meta, meta_path)
    if (directory / "encoder.json").exists() or (directory / "vocab.bpe").exists():
        _require_gpt2_files(directory, spec)
        return BPETokenizer.from_gpt2_files(directory, name=directory.name or "bpe")
    if (directory / "tokenizer.json").exists():
        return _load_hf(directory)
    raise InputError(
        f"tokenizer {spec!r}: found neither {META_FILE}, encoder.json + vocab.bpe, "
        "nor tokenizer.json in it"
    )


def _from_meta(directory: Path, meta: dict[str, Any], source: Path) -> Tokenizer:
    kind = meta.get("type")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        specials = {str(k): int(v) for k, v in meta.get("special_tokens", {}).items()}
        from scratchllm.tokenizers import files as bpe_files

        pattern, name = meta.get("pattern", GPT2_PATTERN), meta.get("name", "bpe")
        if not (directory / "encoder.json").exists() and (directory / TIKTOKEN_FILE).is_file():
            return BPETokenizer.from_tiktoken_file(
                directory / TIKTOKEN_FILE, specials, pattern, name
            )
        _require_gpt2_files(directory, str(directory))
        ranks, _ = bpe_files.read_gpt2_files(directory)
        return BPETokenizer(ranks, specials, pattern, name)
    if kind == "hf":
        return _load_hf(directory)
    raise InputError(f"{source}: unknown tokenizer type {kind!r}; expected bytes, bpe or hf")


def _load_hf(directory: Path) -> Tokenizer:
    try:
        from scratchllm.tokenizers.hf import HFTokenizer
    except ImportError:
        raise InputError(
            f"{directory}: Hugging Face tokenizer.json is not supported by this build"
        ) from None
    return HFTokenizer.from_directory(directory)


def _require_gpt2_files(directory: Path, spec: str) -> None:
    missing = [n for n in ("encoder.json", "vocab.bpe") if not (directory / n).is_file()]
    if missing:
        raise InputError(
            f"tokenizer {spec!r}: {directory} lacks {' and '.join(missing)} (GPT-2 BPE files)"
        )
