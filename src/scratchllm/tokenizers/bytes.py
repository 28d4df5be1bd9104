"""The byte tokenizer: the 256 byte values plus `<|endoftext|>`; needs no files."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from scratchllm.errors import InputError
from scratchllm.tokenizers.base import EOT, Tokenizer, write_meta

if TYPE_CHECKING:
    from pathlib import Path


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

    @property
    def splittable(self) -> bool:
        return True  # a byte's id never depends on its neighbours

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

    def write_files(self, directory: Path) -> None:
        write_meta(directory, {"type": "bytes"})

    def _fingerprint_payload(self) -> bytes:
        return b"bytes-v1"
