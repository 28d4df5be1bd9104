"""GGUF export: a scratchllm checkpoint as one file llama.cpp, Ollama and LM Studio load.

Written with the `gguf` package (the format's own writer). The architecture follows the model's
shape as `hub.families.export_spec` picks it: GPT-2 (learned positions, LayerNorm, GELU) becomes
llama.cpp's `gpt2`, Llama 3 (RoPE, RMSNorm, SwiGLU) its `llama`, Qwen3 (the same with QK-norm)
its `qwen3`.

Tensor layouts. llama.cpp reads a weight of torch shape [out, in] (ggml lists the dimensions in
reverse), which is how our `nn.Linear` holds it, so GPT-2's Conv1D transposition that the Hugging
Face export needs does not arise here; our fused `qkv` is llama.cpp's GPT-2 `attn_qkv` as it is,
and is split into `attn_q/k/v` for Llama and Qwen3. Our rotary embedding rotates halves
(`rotate_half`, as Hugging Face does); llama.cpp's `llama` rotates interleaved pairs, so q and k
rows are permuted per head the way llama.cpp's convert_hf_to_gguf.py does, while its `qwen3`
uses the half layout (NEOX) and takes them as they are. Llama 3 frequency scaling is carried as
the `rope_freqs` tensor (the factor each frequency is divided by), as llama.cpp expects.

Precision: f32 writes every tensor as float32; f16 and q8_0 write the 2-D weights as float16 or
Q8_0 (blocks of 32 int8 with one f16 scale; a row whose length is not a multiple of 32 falls back
to f16) and keep 1-D tensors (norms, biases, rope factors) in float32.

The tokenizer goes in as llama.cpp's "gpt2" (byte-level BPE) model: tokens in GPT-2's
bytes-to-unicode spelling, merges, token types (special tokens CONTROL, padding rows UNUSED),
bos/eos ids and the pre-tokenizer name llama.cpp recognises ("gpt-2", "llama-bpe", "qwen2") for
the split pattern. A pattern llama.cpp has no name for, a non-BPE tokenizer, and the byte
tokenizer (no merges, which a GGUF array cannot hold empty) are refused.

The file is written under a temporary name and renamed into place: a failure leaves no file.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchllm.config import ModelConfig
from scratchllm.errors import InputError

GGUF_DTYPES = ("f32", "f16", "q8_0")
_DTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16"}
ARCH = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3"}


@dataclass
class GGUFResult:
    source: Path
    out: Path
    architecture: str
    config: ModelConfig
    dtype: str
    parameters: int
    tokenizer: str
    tensors: int
    modelfile: Path | None = None


@dataclass
class Item:
    """One GGUF tensor: its name, torch-layout shape and how to make it (float32 numpy)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def parse_gguf_dtype(dtype: str | None) -> str | None:
    """f32 | f16 | q8_0, or None for auto; anything else is an InputError."""
    if dtype is None or dtype == "auto":
        return None
    key = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if key not in GGUF_DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)} for gguf")
    return key


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise InputError(
            "--to gguf needs the gguf package: pip install 'scratchllm[gguf]'"
        ) from None
    return gguf


# -- tensors ------------------------------------------------------------------------------------
def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-rotation (Hugging Face) rows of q or k → llama.cpp's interleaved pairs, per head."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_factors(config: ModelConfig) -> np.ndarray:
    """llama3 scaling as llama.cpp's `rope_freqs`: plain inverse frequency / scaled one."""
    from scratchllm.model.layers import rope_inverse_frequencies

    scaled = rope_inverse_frequencies(config).double()
    plain = rope_inverse_frequencies(config.replace(rope_scaling=None)).double()
    return (plain / scaled).float().numpy()


def tensor_plan(
    family: str, config: ModelConfig, read: Callable[[str], torch.Tensor], has: set[str]
):
    """The GGUF tensors of `family` in llama.cpp's names, made from our state dict by `read`."""
    c = config
    items: list[Item] = []

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).contiguous().numpy()

    def add(name: str, shape: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> None:
        items.append(Item(name, tuple(shape), lambda: f32(fn())))

    def take(ours: str, shape: tuple[int, ...], zeros_ok: bool = False):
        if ours in has:
            return lambda: read(ours)
        if zeros_ok:
            return lambda: torch.zeros(shape)
        raise RuntimeError(f"internal error: tensor {ours!r} missing")

    E, V = c.emb_dim, c.vocab_size
    hidden = c.hidden_dim or 4 * E
    tied = "out_head.weight" not in has
    if family == "gpt2":
        add("token_embd.weight", (V, E), take("tok_emb.weight", (V, E)))
        add("position_embd.weight", (c.context_length, E), take("pos_emb.weight", ()))
        for i in range(c.n_layers):
            p, b = f"trf_blocks.{i}.", f"blk.{i}."
            rows = (
                ("attn_norm", "norm1.scale", "norm1.shift", (E,), (E,)),
                ("attn_qkv", "att.qkv.weight", "att.qkv.bias", (3 * E, E), (3 * E,)),
                ("attn_output", "att.out_proj.weight", "att.out_proj.bias", (E, E), (E,)),
                ("ffn_norm", "norm2.scale", "norm2.shift", (E,), (E,)),
                ("ffn_up", "ff.fc1.weight", "ff.fc1.bias", (hidden, E), (hidden,)),
                ("ffn_down", "ff.fc2.weight", "ff.fc2.bias", (E, hidden), (E,)),
            )
            for gname, w, bias, wshape, bshape in rows:
                add(f"{b}{gname}.weight", wshape, take(p + w, wshape))
                add(f"{b}{gname}.bias", bshape, take(p + bias, bshape, zeros_ok=True))
        add("output_norm.weight", (E,), take("final_norm.scale", (E,)))
        add("output_norm.bias", (E,), take("final_norm.shift", (E,), zeros_ok=True))
        # llama.cpp's converter writes GPT-2's tied head out as its own tensor; so do we.
        add("output.weight", (V, E), take("tok_emb.weight" if tied else "out_head.weight", ()))
        return items

    hd, nh, nkv = c.head_size, c.n_heads, c.kv_heads
    sizes = (nh * hd, nkv * hd, nkv * hd)
    add("token_embd.weight", (V, E), take("tok_emb.weight", ()))
    if c.rope_scaling:
        items.append(Item("rope_freqs.weight", (hd // 2,), lambda: rope_factors(c)))
    for i in range(c.n_layers):
        p, b = f"trf_blocks.{i}.", f"blk.{i}."
        add(f"{b}attn_norm.weight", (E,), take(p + "norm1.weight", ()))
        for suffix in ("weight", "bias"):
            name = f"{p}att.qkv.{suffix}"
            if name not in has:
                continue
            for k, part in enumerate("qkv"):

                def piece(name: str = name, k: int = k) -> torch.Tensor:
                    t = torch.split(read(name), list(sizes), dim=0)[k]
                    if family == "llama" and k < 2:
                        t = permute_rotary(t, nh if k == 0 else nkv)
                    return t

                shape = (sizes[k], E) if suffix == "weight" else (sizes[k],)
                add(f"{b}attn_{part}.{suffix}", shape, piece)
        add(f"{b}attn_output.weight", (E, nh * hd), take(p + "att.out_proj.weight", ()))
        if p + "att.out_proj.bias" in has:
            add(f"{b}attn_output.bias", (E,), take(p + "att.out_proj.bias", ()))
        if c.qk_norm:
            add(f"{b}attn_q_norm.weight", (hd,), take(p + "att.q_norm.weight", ()))
            add(f"{b}attn_k_norm.weight", (hd,), take(p + "att.k_norm.weight", ()))
        add(f"{b}ffn_norm.weight", (E,), take(p + "norm2.weight", ()))
        for gname, ours, shape in (
            ("ffn_gate", "fc1", (hidden, E)),
            ("ffn_up", "fc2", (hidden, E)),
            ("ffn_down", "fc3", (E, hidden)),
        ):
            add(f"{b}{gname}.weight", shape, take(f"{p}ff.{ours}.weight", ()))
            if f"{p}ff.{ours}.bias" in has:
                add(f"{b}{gname}.bias", (shape[0],), take(f"{p}ff.{ours}.bias", ()))
    add("output_norm.weight", (E,), take("final_norm.weight", ()))
    if not tied:
        add("output.weight", (V, E), take("out_head.weight", ()))
    return items


def stored_type(gguf: Any, item: Item, dtype: str) -> Any:
    """The GGML type a tensor is written in: 1-D tensors stay f32."""
    T = gguf.GGMLQuantizationType
    if dtype == "f32" or len(item.shape) < 2:
        return T.F32
    if dtype == "q8_0" and item.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def encode(gguf: Any, array: np.ndarray, qtype: Any) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(array.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


# -- tokenizer ----------------------------------------------------------------------------------
_PRE_PATTERNS = {
    "gpt-2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt-2 (hf)": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def pre_tokenizer_name(pattern: str | None) -> str | None:
    """llama.cpp's name for a split pattern (GPT-4's cl100k pattern is Llama 3's)."""
    from scratchllm.tokenizers.base import GPT4_PATTERN

    if pattern is None:
        return None
    if pattern == GPT4_PATTERN:
        return "llama-bpe"
    for name, known in _PRE_PATTERNS.items():
        if pattern == known:
            return name.split(" ")[0]
    return None


def _hf_pattern(spec: dict[str, Any]) -> str | None:
    """The split regex of a tokenizer.json pre-tokenizer (ByteLevel's own is GPT-2's)."""
    node = spec.get("pre_tokenizer") or {}
    nodes = node.get("pretokenizers", [node]) if node.get("type") == "Sequence" else [node]
    for n in nodes:
        if n.get("type") == "Split":
            pat = n.get("pattern") or {}
            return pat.get("Regex") or (re.escape(pat["String"]) if "String" in pat else None)
        if n.get("type") == "ByteLevel" and n.get("use_regex", True):
            return _PRE_PATTERNS["gpt-2"]
    return None


@dataclass
class GGUFVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None
    stop_tokens: list[str]


def gguf_vocab(tok: Any, saved_dir: Path, context_length: int, n_vocab: int) -> GGUFVocab:
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary, or an InputError."""
    from scratchllm.tokenizers.bpe import BPETokenizer
    from scratchllm.tokenizers.bytes import ByteTokenizer
    from scratchllm.tokenizers.hf import HFTokenizer, export_tokenizer

    what = f"tokenizer {tok.name!r}"
    if isinstance(tok, ByteTokenizer):
        raise InputError(
            f"{what} is the byte tokenizer, which GGUF cannot carry (llama.cpp's BPE needs "
            "merges); train or use a BPE tokenizer for GGUF export"
        )
    if not isinstance(tok, BPETokenizer | HFTokenizer):
        raise InputError(f"{what} ({type(tok).__name__}) has no GGUF form")
    with tempfile.TemporaryDirectory(prefix="scratchllm-gguf-") as tmp:
        eos_id, bos_id = export_tokenizer(tok, saved_dir, Path(tmp), context_length)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        config: dict[str, Any] = {}
        if (Path(tmp) / "tokenizer_config.json").is_file():
            config = json.loads((Path(tmp) / "tokenizer_config.json").read_text("utf-8"))
    model = spec.get("model") or {}
    if model.get("type") not in (None, "BPE") or not model.get("merges"):
        raise InputError(f"{what}: a {model.get('type')} model without merges has no GGUF form")
    decoders = json.dumps(spec.get("decoder") or {})
    if "ByteLevel" not in decoders:
        raise InputError(f"{what}: not a byte-level BPE (SentencePiece-style) tokenizer")
    pattern = tok.pattern if isinstance(tok, BPETokenizer) else _hf_pattern(spec)
    pre = pre_tokenizer_name(pattern)
    if pre is None:
        raise InputError(
            f"{what}: its pre-tokenizer pattern {pattern!r} has no llama.cpp name "
            "(known: GPT-2's, Llama 3's, Qwen2's)"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special: set[int] = set()
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = int(added["id"])
        if added.get("special", True):
            special.add(int(added["id"]))
    size = max(n_vocab, max(vocab.values()) + 1)
    if size > n_vocab:
        raise InputError(f"{what}: {size} tokens do not fit the model's vocab_size {n_vocab}")
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types.append(5)  # UNUSED
        else:
            types.append(3 if i in special else 1)  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    stops = [t for t in (tokens[i] for i in tok.stop_ids if i < size) if t]
    return GGUFVocab(
        tokens=[t for t in tokens if t is not None],
        types=types,
        merges=merges,
        pre=pre,
        bos_id=bos_id,
        eos_id=eos_id,
        add_bos=bool(config.get("add_bos_token", False)),
        chat_template=tok.chat_template,
        stop_tokens=stops,
    )


# -- metadata -----------------------------------------------------------------------------------
def check_expressible(family: str, config: ModelConfig, has: set[str], source: str) -> None:
    """Refuse what llama.cpp's architecture cannot compute."""
    c = config
    if c.num_classes is not None:
        raise InputError(f"{source}: a classifier (num_classes) has no GGUF form")
    if family == "qwen3":
        extra = [k for k in has if k.endswith(("qkv.bias", "out_proj.bias"))]
        if extra:
            raise InputError(f"{source}: llama.cpp's qwen3 has no attention biases ({extra[0]})")
    if c.pos_embedding == "rope" and c.head_size % 2:
        raise InputError(f"{source}: rotary head size {c.head_size} is odd")


def write_metadata(w: Any, gguf: Any, family: str, c: ModelConfig, dtype: str, name: str) -> None:
    ftype = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    w.add_name(name)
    w.add_file_type(ftype)
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.context_length)
    w.add_embedding_length(c.emb_dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim or 4 * c.emb_dim)
    w.add_head_count(c.n_heads)
    if family == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
        return
    w.add_head_count_kv(c.kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_size)
    w.add_vocab_size(c.vocab_size)
    if c.head_size * c.n_heads != c.emb_dim or family == "qwen3":
        w.add_key_length(c.head_size)
        w.add_value_length(c.head_size)


def write_vocab(w: Any, v: GGUFVocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    if v.bos_id is not None:
        w.add_bos_token_id(v.bos_id)
    if v.eos_id is not None:
        w.add_eos_token_id(v.eos_id)
    w.add_add_bos_token(v.add_bos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def modelfile_text(gguf_name: str, v: GGUFVocab) -> str:
    """An Ollama Modelfile: the GGUF's own chat template when it has one (Ollama reads it from
    the file), else the Alpaca format the model was tuned with."""
    from scratchllm.data.instruction import ALPACA_HEADERS, ALPACA_PREAMBLE, ALPACA_STOPS

    lines = [f"FROM ./{gguf_name}", ""]
    stops = list(v.stop_tokens)
    if not v.chat_template:
        ins, resp = ALPACA_HEADERS["instruction"], ALPACA_HEADERS["response"]
        lines += [
            f'TEMPLATE """{ALPACA_PREAMBLE}\n\n{ins}\n{{{{ .Prompt }}}}\n\n{resp}\n"""',
            "",
        ]
        stops += [s.strip() for s in ALPACA_STOPS]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


# -- the export ---------------------------------------------------------------------------------
def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    ollama: bool = False,
) -> GGUFResult:
    """Write a scratchllm checkpoint as one GGUF file (and an Ollama Modelfile beside it)."""
    from scratchllm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir
    from scratchllm.fs import atomic_file, atomic_write_text
    from scratchllm.hub.families import export_spec
    from scratchllm.hub.tensors import SafetensorsFile

    gguf_dtype = parse_gguf_dtype(dtype)  # before anything is read
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; expected a .gguf file name")
    if out.exists() and not force:
        raise InputError(f"--out {out}: already exists; pass --force to replace")
    modelfile = out.parent / "Modelfile" if ollama else None
    if modelfile is not None and modelfile.exists() and not force:
        raise InputError(f"{modelfile}: already exists; pass --force to replace")
    gguf = _gguf()
    ckpt = resolve_checkpoint_dir(checkpoint)
    config, tok, _ = read_checkpoint_config(ckpt)
    where = str(ckpt / "config.json")
    spec = export_spec(config, where)
    family = spec.family
    if family not in ARCH:
        raise InputError(f"{where}: llama.cpp has no architecture for {spec.architecture}")
    vocab = gguf_vocab(tok, ckpt / "tokenizer", config.context_length, config.vocab_size)
    with SafetensorsFile(ckpt / "model.safetensors") as src:
        info = src.info()
        has = set(info)
        check_expressible(family, config, has, where)
        if gguf_dtype is None:
            gguf_dtype = "f32" if info["tok_emb.weight"].dtype == torch.float32 else "f16"
        items = tensor_plan(family, config, src.read, has)
        with atomic_file(out) as tmp:
            w = gguf.GGUFWriter(tmp, ARCH[family])
            try:
                write_metadata(w, gguf, family, config, gguf_dtype, config.name or ckpt.name)
                write_vocab(w, vocab)
                qtypes = [stored_type(gguf, it, gguf_dtype) for it in items]
                for it, qt in zip(items, qtypes, strict=True):
                    shape, np_dtype = _stored_shape(gguf, it.shape, qt)
                    nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
                    raw = qt if qt == gguf.GGMLQuantizationType.Q8_0 else None
                    w.add_tensor_info(it.name, shape, np.dtype(np_dtype), nbytes, raw_dtype=raw)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_ti_data_to_file()
                for it, qt in zip(items, qtypes, strict=True):
                    array = it.make()
                    if tuple(array.shape) != it.shape:
                        raise InputError(
                            f"{where}: tensor for {it.name} has shape {tuple(array.shape)}, "
                            f"expected {it.shape}"
                        )
                    w.write_tensor_data(encode(gguf, array, qt))
            finally:
                w.close()
        if modelfile is not None:
            atomic_write_text(modelfile, modelfile_text(out.name, vocab))
    params = sum(int(np.prod(s.shape)) for s in info.values())
    return GGUFResult(
        ckpt, out, ARCH[family], config, gguf_dtype, params, tok.name, len(items), modelfile
    )


def _stored_shape(gguf: Any, shape: tuple[int, ...], qtype: Any) -> tuple[tuple[int, ...], Any]:
    """The numpy shape and dtype the writer's tensor info takes for `qtype`."""
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return shape, np.float32
    if qtype == T.F16:
        return shape, np.float16
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size), np.uint8
