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
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from scratchllm.errors import InputError
from scratchllm.fs import atomic_dir, atomic_write_text

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

    def save(self, directory: str | Path) -> None:
        """Write the folder `load_tokenizer(directory)` reads back, atomically: it is built
        aside and swapped in whole (`scratchllm.fs.atomic_dir`), replacing what `directory`
        held, so a crash leaves the previous folder (or none), never a mix of the two."""
        with atomic_dir(directory) as tmp:
            self.write_files(tmp)

    @abstractmethod
    def write_files(self, directory: Path) -> None:
        """Write this tokenizer's files into the (new, empty) folder `directory`; `save` and
        the checkpoint writer call it inside their atomic folders."""

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

    # -- what generation, chat and the data pipeline ask of every tokenizer ---------------------
    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation, sorted: the end-of-turn ids of a chat model; here the
        end-of-text id when the vocabulary has it as a special token, else none."""
        eot = self.special_tokens.get(self.eot_token)
        return () if eot is None else (eot,)

    @property
    def chat_template(self) -> str | None:
        """The model's chat template (Jinja source), or None: prompts use the Alpaca format."""
        return None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any
    ) -> list[int]:
        """Token ids of `messages` rendered with the chat template; InputError without one."""
        raise InputError(
            f"tokenizer {self.name!r} has no chat template; expected one to encode a chat "
            "(without it, chats use the Alpaca instruction format)"
        )

    @property
    def splittable(self) -> bool:
        """Whether encoding a text equals concatenating the encodings of its pieces when it is
        cut only between a letter/digit and whitespace (`scratchllm.data.text.split_chunks`).

        Token files and BPE training encode long documents in such pieces, on all cores, when
        this holds; otherwise whole documents. False unless a tokenizer knows better (a
        SentencePiece model, for one, marks the start of its input, so pieces differ).
        """
        return False

    def fingerprint(self) -> str:
        """A short hash of the vocabulary; token files and checkpoints record it to catch a
        tokenizer that is not the one they were made with."""
        h = hashlib.sha256(self._fingerprint_payload())
        h.update(json.dumps(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
