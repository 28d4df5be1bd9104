"""Hugging Face tokenizers behind scratchllm's `Tokenizer` interface, and tokenizer export.

`HFTokenizer` wraps a `tokenizer.json` (Llama 3, Qwen3, GPT-2, ...) through the `tokenizers`
library. It keeps the files it was loaded from, so a checkpoint's `tokenizer/` folder holds the
original `tokenizer.json` / `tokenizer_config.json` / `chat_template.jinja` plus scratchllm's
`scratchllm_tokenizer.json` ({"type": "hf", ...}). The chat template, when the model carries one,
is rendered with jinja2 the way transformers renders it.

GPT-2 folders that carry `vocab.json` + `merges.txt` (the same content as OpenAI's `encoder.json`
+ `vocab.bpe`) load as scratchllm's own `BPETokenizer` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from scratchllm.errors import InputError
from scratchllm.fs import atomic_write_bytes, atomic_write_text
from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, META_FILE, Tokenizer, write_meta
from scratchllm.tokenizers.bpe import BPETokenizer
from scratchllm.tokenizers.bytes import ByteTokenizer

HF_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_text(value: Any) -> str | None:
    """A token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _decoder_types(node: Any) -> set[str]:
    """Every decoder type named in tokenizer.json's (possibly nested) `decoder`."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
            if node["type"] == "Replace" and "▁" in json.dumps(node.get("pattern", "")):
                found.add("Metaspace")
        for value in node.values():
            found |= _decoder_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _decoder_types(value)
    return found


def _load_json_bytes(data: bytes, source: Path) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{source}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InputError(f"{source}: expected a JSON object")
    return value


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json) as a scratchllm tokenizer."""

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        name: str = "hf",
        eos_token: str | None = None,
        bos_token: str | None = None,
        stop_tokens: Sequence[str] = (),
        chat_template: str | None = None,
        source: str = "tokenizer.json",
    ) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if "tokenizer.json" not in files:
            raise InputError(f"{source}: tokenizer.json is missing")
        self.files = dict(files)
        self.name = name
        raw = self.files["tokenizer.json"]
        try:
            self._tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise InputError(
                f"{source}: not a valid tokenizer.json ({text[0] if text else type(exc).__name__})"
            ) from None
        self._tok.encode_special_tokens = True  # encode_ordinary: special strings are plain text
        spec = json.loads(raw.decode("utf-8"))
        types = _decoder_types(spec.get("decoder"))
        self._mode = "generic"
        if "ByteLevel" in types:
            self._mode = "bytelevel"
        elif types & {"Metaspace", "ByteFallback"}:
            self._mode = "spm"
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise InputError(f"{source}: the tokenizer has an empty vocabulary")
        self._n_vocab = max(vocab.values()) + 1
        added = self._tok.get_added_tokens_decoder()
        self._added = {int(i): t.content for i, t in added.items()}
        self._special = {t.content: int(i) for i, t in added.items() if t.special}
        for label, token in (("eos_token", eos_token), ("bos_token", bos_token)):
            if token is not None and self._tok.token_to_id(token) is None:
                raise InputError(f"{source}: {label} {token!r} is not in the vocabulary")
        self._eos, self._bos = eos_token, bos_token
        self._stop = [t for t in stop_tokens if self._tok.token_to_id(t) is not None]
        self._chat_template = chat_template
        self._compiled: Any = None
        self._table: list[bytes | None] | None = None

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        *,
        default_eos_id: int | None = None,
        default_bos_id: int | None = None,
        stop_ids: Iterable[int] = (),
    ) -> HFTokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from `directory`.

        eos/bos come from scratchllm's meta file, else tokenizer_config.json, else the given
        default ids (a model's config.json / generation_config.json).
        """
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise InputError(f"{directory}: tokenizer.json is missing")
        files = {n: (directory / n).read_bytes() for n in HF_FILES if (directory / n).is_file()}
        meta: dict[str, Any] = {}
        if (directory / META_FILE).is_file():
            meta = _load_json_bytes((directory / META_FILE).read_bytes(), directory / META_FILE)
        config: dict[str, Any] = {}
        if "tokenizer_config.json" in files:
            config = _load_json_bytes(
                files["tokenizer_config.json"], directory / "tokenizer_config.json"
            )
        template: str | None = None
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].decode("utf-8", errors="replace")
        else:
            template = _pick_template(config.get("chat_template"))
        tok = cls(
            files,
            name=str(meta.get("name") or directory.resolve().name or "hf"),
            chat_template=template,
            source=str(directory / "tokenizer.json"),
        )
        eos = meta.get("eos_token") or _token_text(config.get("eos_token"))
        bos = meta.get("bos_token") or _token_text(config.get("bos_token"))
        if eos is None and default_eos_id is not None:
            eos = tok._tok.id_to_token(default_eos_id)
        if bos is None and default_bos_id is not None:
            bos = tok._tok.id_to_token(default_bos_id)
        stops = list(meta.get("stop_tokens") or [])
        stops += [t for t in (tok._tok.id_to_token(i) for i in stop_ids) if t and t not in stops]
        for label, token in (("eos_token", eos), ("bos_token", bos)):
            if token is not None and tok._tok.token_to_id(token) is None:
                raise InputError(f"{directory}: {label} {token!r} is not in the vocabulary")
        tok._eos, tok._bos = eos, bos
        tok._stop = [t for t in stops if tok._tok.token_to_id(t) is not None]
        return tok

    # -- the Tokenizer interface ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return self._special

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._byte_table()
        out = bytearray()
        for i in ids:
            i = int(i)
            piece = table[i] if 0 <= i < len(table) else None
            if piece is None:
                raise InputError(
                    f"token id {i} is not in the {self.name} vocabulary of {self.vocab_size}"
                )
            out += piece
        return bytes(out)

    def _byte_table(self) -> list[bytes | None]:
        """The bytes every id stands for (byte-level pieces mapped back through GPT-2's table)."""
        if self._table is not None:
            return self._table
        from scratchllm.tokenizers.files import str_to_token

        table: list[bytes | None] = [None] * self._n_vocab
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            if i in self._added:
                table[i] = self._added[i].encode("utf-8")
            elif self._mode == "bytelevel":
                raw = str_to_token(piece)
                table[i] = raw if raw is not None else piece.encode("utf-8")
            elif self._mode == "spm":
                m = _BYTE_PIECE.fullmatch(piece)
                table[i] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
            else:
                table[i] = self._tok.decode([i], skip_special_tokens=False).encode("utf-8")
        self._table = table
        return table

    def write_files(self, directory: Path) -> None:
        for name, data in self.files.items():
            atomic_write_bytes(directory / name, data)
        write_meta(
            directory,
            {
                "type": "hf",
                "name": self.name,
                "eos_token": self._eos,
                "bos_token": self._bos,
                "stop_tokens": self._stop,
            },
        )

    def _fingerprint_payload(self) -> bytes:
        return hashlib.sha256(self.files["tokenizer.json"]).digest()

    # -- end of text, begin of text ------------------------------------------------------------
    @property
    def eos_token(self) -> str | None:
        return self._eos

    @property
    def eos_id(self) -> int | None:
        return None if self._eos is None else self._tok.token_to_id(self._eos)

    @property
    def bos_token(self) -> str | None:
        return self._bos

    @property
    def bos_id(self) -> int | None:
        return None if self._bos is None else self._tok.token_to_id(self._bos)

    @property
    def eot_token(self) -> str:
        return self._eos or EOT

    @property
    def eot_id(self) -> int:
        i = self._tok.token_to_id(self.eot_token)
        if i is None:
            raise InputError(f"tokenizer {self.name!r} has no eos_token and no {EOT} token")
        return i

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the eos token, any other end tokens the model names and
        the end-of-text special token if there is one."""
        ids = {self._tok.token_to_id(t) for t in [self._eos, *self._stop] if t is not None}
        return tuple(sorted({*(i for i in ids if i is not None), *super().stop_ids}))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # -- chat ----------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's template.

        The text holds special tokens: encode it with `encode(text, allow_special=True)`.
        Extra keyword arguments (tools, enable_thinking, ...) reach the template as variables.
        """
        if not self._chat_template:
            raise InputError(f"tokenizer {self.name!r} has no chat template")
        if not isinstance(messages, Sequence) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise InputError("chat messages: expected a list of {'role': ..., 'content': ...}")
        from jinja2.exceptions import TemplateError

        try:
            if self._compiled is None:
                self._compiled = _compile_template(self._chat_template)
            return self._compiled.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos or "",
                eos_token=self._eos or "",
                **kwargs,
            )
        except TemplateError as exc:
            raise InputError(f"chat template of {self.name!r}: {exc}") from None

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any
    ) -> list[int]:
        """Token ids of the rendered chat (special tokens in the template encoded as such)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kw)
        return self.encode(text, allow_special=True)


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        pick = named.get("default") or next(iter(named.values()), None)
        return pick if isinstance(pick, str) else None
    return None


def _compile_template(source: str):
    """A jinja2 template set up as transformers sets up chat templates."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render", [])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ----------------------------------------------------------------------------------------------
# Tokenizers of a model folder
# ----------------------------------------------------------------------------------------------


def gpt2_bpe_from_files(vocab: Path, merges: Path, name: str = "gpt2") -> BPETokenizer:
    """A `BPETokenizer` from Hugging Face's vocab.json + merges.txt (= encoder.json + vocab.bpe)."""
    from scratchllm.tokenizers import files as bpe_files

    with tempfile.TemporaryDirectory(prefix="scratchllm-bpe-") as tmp:
        links = {Path(tmp) / "encoder.json": vocab, Path(tmp) / "vocab.bpe": merges}
        for link, target in links.items():
            os.symlink(target.resolve(), link)
        try:
            ranks, specials = bpe_files.read_gpt2_files(Path(tmp))
        except InputError as exc:
            message = str(exc)
            for link, target in links.items():
                message = message.replace(str(link), str(target))
            raise InputError(message) from None
    return BPETokenizer(ranks, specials, GPT2_PATTERN, name=name)


def keep_merges(tokenizer: Tokenizer, merges_file: Path | None) -> None:
    """A BPE tokenizer read from files keeps their merge list, so that saving it need not
    recover the list from the ranks (a second saved on GPT-2's 50k merges)."""
    from scratchllm.tokenizers import files as bpe_files

    if isinstance(tokenizer, BPETokenizer) and merges_file is not None and tokenizer.merges is None:
        tokenizer.merges = bpe_files.read_merges(merges_file)


def merges_file_of(directory: Path) -> Path | None:
    """The merge list a GPT-2 style folder carries (merges.txt or vocab.bpe), if any."""
    for name in ("merges.txt", "vocab.bpe"):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def tokenizer_from_model_dir(
    directory: Path, hf_config: dict[str, Any], family: str
) -> Tokenizer | None:
    """The tokenizer a Hugging Face (or OpenAI GPT-2) folder carries, or None."""
    directory = Path(directory)
    gen: dict[str, Any] = {}
    if (directory / "generation_config.json").is_file():
        gen = _load_json_bytes(
            (directory / "generation_config.json").read_bytes(),
            directory / "generation_config.json",
        )
    has_hf_bpe = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    has_openai = (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file()
    name = "gpt2" if int(hf_config.get("vocab_size", 0)) == 50257 else directory.resolve().name
    if family == "gpt2" and has_hf_bpe:
        return gpt2_bpe_from_files(directory / "vocab.json", directory / "merges.txt", name)
    if family == "gpt2" and has_openai:
        return BPETokenizer.from_gpt2_files(directory, name=name)
    if (directory / "tokenizer.json").is_file():
        eos_ids = _ids(gen.get("eos_token_id")) or _ids(hf_config.get("eos_token_id"))
        bos_ids = _ids(gen.get("bos_token_id")) or _ids(hf_config.get("bos_token_id"))
        return HFTokenizer.from_directory(
            directory,
            default_eos_id=eos_ids[0] if eos_ids else None,
            default_bos_id=bos_ids[0] if bos_ids else None,
            stop_ids=eos_ids,
        )
    if has_hf_bpe:
        return gpt2_bpe_from_files(directory / "vocab.json", directory / "merges.txt", name)
    if has_openai:
        return BPETokenizer.from_gpt2_files(directory, name=name)
    return None


# ----------------------------------------------------------------------------------------------
# Export: the tokenizer files transformers loads
# ----------------------------------------------------------------------------------------------


def bpe_tokenizer_json(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    specials: dict[str, int],
    pattern: str = GPT2_PATTERN,
) -> str:
    """A byte-level BPE tokenizer.json equivalent to tiktoken over the same vocabulary.

    `vocab` and `merges` are spelled in GPT-2's bytes-to-unicode alphabet (as in encoder.json).
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    model = models.BPE(
        vocab={**vocab, **specials},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=True,  # a piece found whole in the vocabulary is one token, as in tiktoken
    )
    tok = RustTokenizer(model)
    if pattern == GPT2_PATTERN:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in sorted(specials, key=specials.get)]
    )
    return tok.to_str(pretty=False)


def _gpt2_file_strings(directory: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """encoder.json and vocab.bpe as their strings (no byte decoding: they are already valid)."""
    vocab = json.loads((directory / "encoder.json").read_text(encoding="utf-8"))
    merges = []
    for line in (directory / "vocab.bpe").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return vocab, merges


def export_tokenizer(
    tokenizer: Tokenizer, saved_dir: Path, out: Path, context_length: int
) -> tuple[int | None, int | None]:
    """Write the tokenizer files of a Hugging Face folder into `out`; return (eos_id, bos_id).

    `saved_dir` is the checkpoint's tokenizer/ folder: a BPE tokenizer's encoder.json and
    vocab.bpe there become vocab.json and merges.txt, and tokenizer.json is built from them.
    """
    from scratchllm.tokenizers import files as bpe_files

    out = Path(out)
    if isinstance(tokenizer, HFTokenizer):
        for name, data in tokenizer.files.items():
            atomic_write_bytes(out / name, data)
        if "tokenizer_config.json" not in tokenizer.files:
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": context_length,
                "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token,
                "clean_up_tokenization_spaces": False,
            }
            atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return tokenizer.eos_id, tokenizer.bos_id
    saved_dir = Path(saved_dir)
    if isinstance(tokenizer, BPETokenizer):
        specials, pattern = tokenizer.special_tokens, tokenizer.pattern
        if not ((saved_dir / "encoder.json").is_file() and (saved_dir / "vocab.bpe").is_file()):
            bpe_files.write_gpt2_files(out, tokenizer.mergeable_ranks, specials)
            saved_dir = out
    elif isinstance(tokenizer, ByteTokenizer):
        specials, pattern = {EOT: 256}, GPT2_PATTERN
        bpe_files.write_gpt2_files(out, {bytes([b]): b for b in range(256)}, specials, [])
        saved_dir = out
    else:
        raise InputError(
            f"tokenizer {tokenizer.name!r} ({type(tokenizer).__name__}) has no Hugging Face form"
        )
    vocab, merges = _gpt2_file_strings(saved_dir)
    vocab = {k: v for k, v in vocab.items() if k not in specials}
    atomic_write_text(out / "tokenizer.json", bpe_tokenizer_json(vocab, merges, specials, pattern))
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        if saved_dir == out:
            os.replace(out / src, out / dst)
        else:
            atomic_write_bytes(out / dst, (saved_dir / src).read_bytes())
    eot = EOT if EOT in specials else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "eos_token": eot,
        "bos_token": eot,
        "unk_token": eot,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    eot_id = specials.get(EOT)
    return eot_id, eot_id
