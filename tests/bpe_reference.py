"""The reference BPE encoder: slow, small and plainly correct, for tests to check the fast path.

It is GPT-2's original algorithm: split the text on the allowed special tokens, cut it into
pre-tokens with the regex, then within each pre-token start from single bytes and repeatedly
merge the adjacent pair with the lowest merge rank (all its occurrences, left to right) until
no adjacent pair is a merge. `BPETokenizer` gets the same ids from tiktoken, which merges by the
rank of the merged token instead; the tests hold the two to agreement.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import regex

from scratchllm.errors import InputError
from scratchllm.tokenizers import EOT, GPT2_PATTERN, BPETokenizer
from scratchllm.tokenizers import files as bpe_files


class ReferenceBPE:
    """Encode with an explicit merge list: `merges[i]` is the pair merged at step i."""

    def __init__(
        self,
        merges: Sequence[tuple[bytes, bytes]],
        token_ids: dict[bytes, int],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.token_ids = dict(token_ids)
        self.special_tokens = dict(special_tokens or {})
        self.decoder = {i: t for t, i in self.token_ids.items()}
        self.decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        self.pattern = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: BPETokenizer) -> ReferenceBPE:
        merges = tokenizer.merges or bpe_files.recover_merges(tokenizer.mergeable_ranks)
        return cls(merges, tokenizer.mergeable_ranks, tokenizer.special_tokens, tokenizer.pattern)

    @classmethod
    def from_gpt2_files(
        cls, directory: str | Path, special_tokens: dict[str, int] | None = None
    ) -> ReferenceBPE:
        directory = Path(directory)
        ranks, specials = bpe_files.read_gpt2_files(directory)
        merges = bpe_files.read_merges(directory / "vocab.bpe")
        return cls(merges, ranks, specials if special_tokens is None else special_tokens)

    def bpe(self, piece: bytes) -> list[bytes]:
        """The BPE tokens of one pre-token."""
        parts = [bytes([b]) for b in piece]
        rank = self.merge_rank
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: rank.get(p, len(rank)))
            if best not in rank:
                break
            merged: list[bytes] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            cached = self._cache.get(piece)
            if cached is None:
                try:
                    data = piece.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates become U+FFFD, as in tiktoken
                    fixed = piece.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                    data = fixed.encode("utf-8")
                cached = [self.token_ids[t] for t in self.bpe(data)]
                self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def encode(self, text: str, allow_special: bool | Iterable[str] = False) -> list[int]:
        allowed = set(self.special_tokens) if allow_special is True else set(allow_special or ())
        for special in self.special_tokens:
            if special not in allowed and special in text:
                raise InputError(f"text contains the special token {special!r}")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = regex.compile(
            "(" + "|".join(regex.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        )
        ids: list[int] = []
        for part in splitter.split(text):
            if part in allowed:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.decoder[int(i)] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def gpt2_reference(directory: str | Path) -> ReferenceBPE:
    """The reference encoder for OpenAI's GPT-2 files in `directory`."""
    return ReferenceBPE.from_gpt2_files(directory, {EOT: 50256})
