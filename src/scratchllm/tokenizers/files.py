"""GPT-2's BPE file format: `encoder.json` (token → id) and `vocab.bpe` (merges, in order).

Both files spell bytes through GPT-2's bytes-to-unicode table, so every byte is a printable
character. Tokens are held here as `bytes` with their id as tiktoken's rank.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache
from pathlib import Path

from scratchllm.errors import InputError
from scratchllm.fs import atomic_write_text

VERSION_LINE = "#version: 0.2"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes | None:
    """The bytes a GPT-2 file string stands for, or None if it is not in the byte alphabet."""
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


def read_merges(path: Path) -> list[tuple[bytes, bytes]]:
    """Parse `vocab.bpe`; a malformed line is reported with its number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: merges file not found") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte offset {exc.start})") from None
    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(lines, start=1):
        if lineno == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        left = str_to_token(parts[0]) if len(parts) == 2 else None
        right = str_to_token(parts[1]) if len(parts) == 2 else None
        if left is None or right is None or not left or not right:
            raise InputError(
                f"{path}: line {lineno}: expected two byte-level tokens separated by one "
                f"space, got {line!r}"
            )
        merges.append((left, right))
    return merges


def read_gpt2_files(directory: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks (bytes → id) and special tokens (str → id) from a GPT-2 style folder.

    The 256 single bytes and the merge results are mergeable; any other entry of encoder.json
    (such as `<|endoftext|>`) is a special token. Merge results must have increasing ids, since
    tiktoken merges by id.
    """
    enc_path, merges_path = directory / "encoder.json", directory / "vocab.bpe"
    try:
        encoder = json.loads(enc_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{enc_path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{enc_path}: not a valid JSON vocabulary ({exc})") from None
    if not isinstance(encoder, dict):
        raise InputError(f"{enc_path}: expected a JSON object mapping tokens to ids")
    merges = read_merges(merges_path)

    token_ids: dict[bytes, int] = {}
    by_text: dict[str, int] = {}
    for text, idx in encoder.items():
        if not isinstance(idx, int) or idx < 0:
            raise InputError(f"{enc_path}: token {text!r} has id {idx!r}, expected an integer ≥ 0")
        by_text[text] = idx
        token = str_to_token(text)
        if token is not None:
            token_ids[token] = idx

    ranks: dict[bytes, int] = {}
    for b in range(256):
        token = bytes([b])
        if token not in token_ids:
            raise InputError(f"{enc_path}: byte {b} ({token_to_str(token)!r}) has no id")
        ranks[token] = token_ids[token]
    last = -1
    for lineno, (left, right) in enumerate(merges, start=2):
        merged = left + right
        if merged not in token_ids:
            raise InputError(
                f"{merges_path}: line {lineno}: merge result {token_to_str(merged)!r} is not in "
                "encoder.json"
            )
        idx = token_ids[merged]
        if idx <= last or idx < max(ranks[left], ranks.get(right, 0)):
            raise InputError(
                f"{merges_path}: line {lineno}: merge result {token_to_str(merged)!r} has id {idx}, "
                "out of merge order"
            )
        last = idx
        ranks[merged] = idx
    used = set(ranks.values())
    specials = {
        text: idx
        for text, idx in by_text.items()
        if idx not in used and (str_to_token(text) is None or str_to_token(text) not in ranks)
    }
    if len(used) != len(ranks):
        raise InputError(f"{enc_path}: two tokens share one id")
    return ranks, specials


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list behind tiktoken-style ranks: each multi-byte token, in rank order, split
    into the two parts that BPE with all lower-ranked merges produces."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower merges")
        merges.append((parts[0], parts[1]))
    return merges


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file: `base64(token) rank` per line; a bad line is reported."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: tiktoken rank file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise InputError(
                f"{path}: line {lineno}: expected 'base64-token rank', got {line[:60]!r}"
            ) from None
        if token in ranks or rank < 0:
            raise InputError(f"{path}: line {lineno}: duplicate token or negative rank")
        ranks[token] = rank
    if not ranks:
        raise InputError(f"{path}: empty tiktoken rank file")
    return ranks


def write_tiktoken_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """Write ranks in tiktoken's format (what `tiktoken.load.load_tiktoken_bpe` reads)."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_gpt2_files(
    directory: Path,
    ranks: dict[bytes, int],
    special_tokens: dict[str, int],
    merges: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Write `encoder.json` and `vocab.bpe` so that OpenAI-style loaders read them back."""
    directory.mkdir(parents=True, exist_ok=True)
    if merges is None:
        merges = recover_merges(ranks)
    encoder = {token_to_str(t): i for t, i in ranks.items()}
    encoder.update(special_tokens)
    encoder = dict(sorted(encoder.items(), key=lambda kv: kv[1]))
    atomic_write_text(directory / "encoder.json", json.dumps(encoder, ensure_ascii=False) + "\n")
    lines = [VERSION_LINE] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]
    atomic_write_text(directory / "vocab.bpe", "\n".join(lines) + "\n")
