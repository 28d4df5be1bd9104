"""One tokenizer interface and its implementations.

- `ByteTokenizer`: the 256 byte values plus `<|endoftext|>`; needs no files, works everywhere.
- `BPETokenizer`: byte-level BPE run through a tiktoken `Encoding` (the fast path). It loads
  OpenAI's GPT-2 files (`encoder.json` + `vocab.bpe`) and the vocabularies scratchllm trains.

`load_tokenizer(spec)` turns a command-line spec into a tokenizer; `Tokenizer.save(dir)` writes
what `load_tokenizer(dir)` reads back, so a checkpoint carries its tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scratchllm.errors import InputError
from scratchllm.utils import atomic_write_text

EOT = "<|endoftext|>"
META_FILE = "scratchllm_tokenizer.json"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k/gpt2 `pat_str`).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (tiktoken cl100k_base) pattern: case-insensitive contractions, digits in groups of at
# most three, punctuation keeps its trailing newlines.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
TIKTOKEN_FILE = "tokenizer.tiktoken"


class Tokenizer(ABC):
    """Text ↔ token ids. Every tokenizer in scratchllm implements this."""

    name: str = "tokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the model's embedding must hold (max id + 1)."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token strings and their ids."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text; special-token strings in it are treated as plain text."""

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (may end inside a multi-byte character)."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the files `load_tokenizer(directory)` reads back."""

    @abstractmethod
    def _fingerprint_payload(self) -> bytes:
        """Bytes that identify the vocabulary (hashed by `fingerprint`)."""

    # -- shared behaviour ----------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool | Iterable[str] = False) -> list[int]:
        """Encode text. Special tokens in `text` are an error unless allowed (as in tiktoken)."""
        specials = self.special_tokens
        allowed = set(specials) if allow_special is True else set(allow_special or ())
        present = [s for s in specials if s in text]
        forbidden = [s for s in present if s not in allowed]
        if forbidden:
            raise InputError(
                f"text contains the special token {forbidden[0]!r}; pass allow_special=True "
                "(CLI: --allow-special) to encode it as a special token"
            )
        if not present:
            return self.encode_ordinary(text)
        return self._encode_with_specials(text, [s for s in present if s in allowed])

    def _encode_with_specials(self, text: str, specials: Sequence[str]) -> list[int]:
        # Split on the allowed special strings (longest first) and encode the pieces between.
        ids: list[int] = []
        pieces = [text]
        for special in sorted(specials, key=len, reverse=True):
            split: list[str] = []
            for piece in pieces:
                if piece in self.special_tokens:
                    split.append(piece)
                    continue
                parts = piece.split(special)
                for i, part in enumerate(parts):
                    if i:
                        split.append(special)
                    if part:
                        split.append(part)
            pieces = split
        for piece in pieces:
            if piece in specials:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; a byte sequence cut inside a character decodes with U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def eot_token(self) -> str:
        return EOT

    @property
    def eot_id(self) -> int:
        if EOT not in self.special_tokens:
            raise InputError(f"tokenizer {self.name!r} has no {EOT} token")
        return self.special_tokens[EOT]

    def fingerprint(self) -> str:
        """A short hash of the vocabulary; token files record it to catch mismatches."""
        h = hashlib.sha256(self._fingerprint_payload())
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")


class ByteTokenizer(Tokenizer):
    """Each UTF-8 byte is a token (ids 0–255); `<|endoftext|>` is id 256."""

    name = "bytes"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def special_tokens(self) -> dict[str, int]:
        return {EOT: 256}

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i == 256:
                out.extend(EOT.encode())
            else:
                raise InputError(f"token id {i} is outside the byte tokenizer's 0..256")
        return bytes(out)

    def save(self, directory: str | Path) -> None:
        write_meta(Path(directory), {"type": "bytes"})

    def _fingerprint_payload(self) -> bytes:
        return b"bytes-v1"


class BPETokenizer(Tokenizer):
    """Byte-level BPE encoded by tiktoken from `mergeable_ranks` (token bytes → rank = id).

    Ids need not follow merge order for single bytes or special tokens (a vocabulary may put
    `<|endoftext|>` at 0 and the bytes at 1..256); merged tokens must have increasing ids in
    merge order, since tiktoken merges by id. `merges`, when known (a trained tokenizer), is
    written as is by `save`; otherwise `save` recovers it from the ranks.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "bpe",
        merges: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        import tiktoken

        self.name = name
        self.mergeable_ranks = mergeable_ranks
        self.merges = merges
        self.pattern = pattern
        self._special = dict(special_tokens or {})
        n_vocab = max([*mergeable_ranks.values(), *self._special.values()]) + 1
        self._n_vocab = n_vocab
        self._decoder = {rank: token for token, rank in mergeable_ranks.items()}
        for text, i in self._special.items():
            self._decoder[i] = text.encode("utf-8")
        explicit = n_vocab if len(mergeable_ranks) + len(self._special) == n_vocab else None
        self.encoding = tiktoken.Encoding(
            name=name,
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special,
            explicit_n_vocab=explicit,
        )

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return self._special

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts))

    def encode(self, text: str, allow_special: bool | Iterable[str] = False) -> list[int]:
        allowed = set(self._special) if allow_special is True else set(allow_special or ())
        try:
            return self.encoding.encode(text, allowed_special=allowed, disallowed_special="all")
        except ValueError:
            return super().encode(text, allow_special)  # raises our one-line InputError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self._decoder[int(i)] for i in ids)
        except KeyError as exc:
            raise InputError(
                f"token id {exc.args[0]} is not in the {self.name} vocabulary of {self.vocab_size}"
            ) from None

    @classmethod
    def from_gpt2_files(
        cls,
        directory: str | Path,
        special_tokens: dict[str, int] | None = None,
        name: str = "gpt2",
    ) -> BPETokenizer:
        """Load `encoder.json` + `vocab.bpe` (OpenAI's GPT-2 format) from `directory`."""
        from scratchllm import bpe_files

        ranks, specials = bpe_files.read_gpt2_files(Path(directory))
        if special_tokens is not None:
            specials = special_tokens
        return cls(ranks, specials, GPT2_PATTERN, name=name)

    @classmethod
    def from_tiktoken_file(
        cls,
        path: str | Path,
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
        name: str = "bpe",
    ) -> BPETokenizer:
        """Load a tiktoken rank file (`base64(token) rank` per line)."""
        from scratchllm import bpe_files

        return cls(bpe_files.read_tiktoken_ranks(Path(path)), special_tokens, pattern, name=name)

    @classmethod
    def from_training(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (EOT,),
        pattern: str = GPT2_PATTERN,
        **kwargs: Any,
    ) -> BPETokenizer:
        """Train byte-level BPE on `texts`; see `scratchllm.bpe_train.train_bpe` for options."""
        from scratchllm.bpe_train import train_bpe

        return train_bpe(texts, vocab_size, special_tokens, pattern, **kwargs)

    def save_tiktoken(self, path: str | Path) -> None:
        """Write the mergeable ranks as a tiktoken rank file (specials are not part of it)."""
        from scratchllm import bpe_files

        bpe_files.write_tiktoken_ranks(Path(path), self.mergeable_ranks)

    def save(self, directory: str | Path) -> None:
        from scratchllm import bpe_files

        directory = Path(directory)
        bpe_files.write_gpt2_files(directory, self.mergeable_ranks, self._special, self.merges)
        write_meta(
            directory,
            {
                "type": "bpe",
                "name": self.name,
                "pattern": self.pattern,
                "special_tokens": self._special,
            },
        )

    def _fingerprint_payload(self) -> bytes:
        h = hashlib.sha256(self.pattern.encode())
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little"))
            h.update(token)
        return h.digest()


def gpt2_tokenizer(directory: str | Path | None = None) -> BPETokenizer:
    """OpenAI's GPT-2 tokenizer: from `directory` if given, else tiktoken's (downloads once)."""
    if directory is not None:
        return BPETokenizer.from_gpt2_files(directory, {EOT: 50256}, name="gpt2")
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline: tiktoken cannot fetch its files
        raise InputError(
            f"tokenizer 'gpt2': tiktoken could not load its GPT-2 files ({type(exc).__name__}); "
            "offline, use gpt2:DIR with a folder holding encoder.json and vocab.bpe"
        ) from None
    return BPETokenizer(enc._mergeable_ranks, {EOT: 50256}, enc._pat_str, name="gpt2")


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
        from scratchllm import bpe_files

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
        from scratchllm.hub.hf_tokenizer import HFTokenizer
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


def tiktoken_cache_off() -> None:
    """Keep tiktoken from copying local files into its cache directory."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
