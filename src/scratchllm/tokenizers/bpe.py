"""Byte-level BPE run through a tiktoken `Encoding`: GPT-2's files and the vocabularies scratchllm trains."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from scratchllm.errors import InputError
from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, PATTERNS, Tokenizer, write_meta


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

    @property
    def splittable(self) -> bool:
        # GPT-2's and GPT-4's patterns never join a letter/digit and the whitespace after it
        # into one pre-token, and BPE never merges across pre-tokens; a custom pattern may.
        return self.pattern in PATTERNS.values()

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
        from scratchllm.tokenizers import files as bpe_files

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
        from scratchllm.tokenizers import files as bpe_files

        return cls(bpe_files.read_tiktoken_ranks(Path(path)), special_tokens, pattern, name=name)

    def save_tiktoken(self, path: str | Path) -> None:
        """Write the mergeable ranks as a tiktoken rank file (specials are not part of it)."""
        from scratchllm.tokenizers import files as bpe_files

        bpe_files.write_tiktoken_ranks(Path(path), self.mergeable_ranks)

    def write_files(self, directory: Path) -> None:
        from scratchllm.tokenizers import files as bpe_files

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
    from tiktoken_ext import openai_public

    try:  # the public constructor behind tiktoken.get_encoding("gpt2"): ranks and pattern
        enc = openai_public.gpt2()
    except Exception as exc:  # offline: tiktoken cannot fetch its files
        raise InputError(
            f"tokenizer 'gpt2': tiktoken could not load its GPT-2 files ({type(exc).__name__}); "
            "offline, use gpt2:DIR with a folder holding encoder.json and vocab.bpe"
        ) from None
    return BPETokenizer(enc["mergeable_ranks"], {EOT: 50256}, enc["pat_str"], name="gpt2")
