"""Open weights (issue 4): import GPT-2 / Llama 3 / Qwen3 with transformers' logits, export back.

Every model here is built from a config with random weights (nothing is downloaded). Norms and
biases are perturbed away from their 1/0 initialisation so that a mapping mistake shows.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from scratchllm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scratchllm.cli import main  # noqa: E402
from scratchllm.config import ModelConfig  # noqa: E402
from scratchllm.hub.convert import detect_format, export_hf, import_hf  # noqa: E402
from scratchllm.model import GPTModel  # noqa: E402
from scratchllm.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer  # noqa: E402
from scratchllm.tokenizers.hf import HFTokenizer  # noqa: E402

VOCAB = 300
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)


def hf_model(family: str):
    """A small random transformers model of `family`, float32, eval mode."""
    t = transformers
    torch.manual_seed(0)
    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family in ("gpt2", "gpt2-untied"):
        cfg = t.GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=128,
            tie_word_embeddings=family == "gpt2",
            **no_ids,
        )
        cls = t.GPT2LMHeadModel
    elif family == "llama":  # grouped-query attention and Llama 3 RoPE scaling
        cfg = t.LlamaConfig(
            **TINY,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            rope_theta=500000.0,
            rope_scaling=dict(LLAMA3_SCALING),
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            **no_ids,
        )
        cls = t.LlamaForCausalLM
    elif family == "qwen3":  # QK-norm, head_dim != hidden/heads, untied head
        cfg = t.Qwen3Config(
            **TINY,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **no_ids,
        )
        cls = t.Qwen3ForCausalLM
    elif family == "qwen2":  # q/k/v biases only
        cfg = t.Qwen2Config(
            **TINY,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **no_ids,
        )
        cls = t.Qwen2ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(
        ids,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    return out


def our_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    from scratchllm.inference.generate import generate

    return generate(model, ids, n, temperature=0.0)


def expect_error(capsys, argv, *fragments) -> str:
    capsys.readouterr()  # drop what earlier steps printed (progress bars)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


FAMILIES = ["gpt2", "gpt2-untied", "llama", "qwen3", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_and_exports_back(tmp_path, family):
    model = hf_model(family)
    src = save_hf(model, tmp_path / "hf")
    result = import_hf(src, tmp_path / "ckpt", tokenizer="bytes")
    assert result.architecture == model.config.architectures[0]
    ckpt = load_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 100))  # past original_max_position_embeddings (64)
    with torch.no_grad():
        expected = model(ids).logits
        got = ckpt.model(ids)
    assert (got - expected).abs().max().item() <= 1e-4
    prompt = ids[:1, :12]
    with torch.no_grad():
        assert torch.equal(our_greedy(ckpt.model, prompt, 20), hf_greedy(model, prompt, 20))

    # ... and back: our export loads in transformers with the same logits.
    export_hf(tmp_path / "ckpt", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (again(ids).logits - expected).abs().max().item() <= 1e-4


EXPORT_SHAPES = {
    "gpt2-no-biases": dict(qkv_bias=False, bias=False, tie_embeddings=True),
    "gpt2-untied": dict(qkv_bias=True, tie_embeddings=False, hidden_dim=96),
    "llama": dict(
        n_kv_heads=2,
        hidden_dim=96,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        rope_theta=500000.0,
        rope_scaling=dict(LLAMA3_SCALING),
        context_length=256,
        tie_embeddings=True,
    ),
    "llama-qkv-bias": dict(
        n_kv_heads=2,
        hidden_dim=96,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        qkv_bias=True,
        tie_embeddings=False,
    ),
    "llama-all-biases": dict(
        hidden_dim=96,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        bias=True,
        qkv_bias=False,
    ),
    "qwen3": dict(
        n_kv_heads=2,
        head_dim=32,
        hidden_dim=96,
        norm="rmsnorm",
        norm_eps=1e-6,
        pos_embedding="rope",
        ffn="swiglu",
        bias=False,
        qk_norm=True,
        rope_theta=1e6,
    ),
}


@pytest.mark.parametrize("shape", list(EXPORT_SHAPES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, shape):
    torch.manual_seed(0)
    base = dict(vocab_size=VOCAB, context_length=128, emb_dim=64, n_heads=4, n_layers=2)
    config = ModelConfig(**{**base, "drop_rate": 0.0, **EXPORT_SHAPES[shape]})
    model = GPTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "shift")):
                p.add_(torch.randn_like(p) * 0.2)
    save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())
    assert detect_format(tmp_path / "ckpt") == "scratchllm"
    assert main(["convert", "--from", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 257, (2, 50))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4
    if shape == "gpt2-untied":  # transformers did not tie what we left untied
        assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Bytes: héllo 😀"
    assert tok(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text)


NAME_MAP_CONFIGS = {
    "gpt2": dict(qkv_bias=True, bias=True),
    "llama": dict(
        n_kv_heads=2,
        head_dim=32,
        norm="rmsnorm",
        pos_embedding="rope",
        ffn="swiglu",
        qkv_bias=True,
        bias=True,
        qk_norm=True,
    ),
}


@pytest.mark.parametrize("family", list(NAME_MAP_CONFIGS))
def test_name_map_covers_every_tensor_and_each_transform_inverts(family):
    """Export is derived from the import table: every row's transform must undo itself."""
    from scratchllm.hub.names import GPT2_NAMES, LLAMA_NAMES, expected_shapes

    names = GPT2_NAMES if family == "gpt2" else LLAMA_NAMES
    base = dict(vocab_size=VOCAB, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    config = ModelConfig(**base, tie_embeddings=False, **NAME_MAP_CONFIGS[family])
    shapes = expected_shapes(config)
    rows = list(names.expand(config.n_layers, names.prefix))
    assert sorted(r.ours for r in rows) == sorted(shapes)  # every tensor, each exactly once
    theirs_names = [name for r in rows for name in r.sources]
    assert len(theirs_names) == len(set(theirs_names))
    torch.manual_seed(0)
    for row in rows:
        ours = torch.randn(shapes[row.ours])
        theirs = row.transform.to_theirs(ours, config)
        expected = row.transform.theirs_shapes(shapes[row.ours], config)
        assert tuple(tuple(t.shape) for t in theirs) == expected, row.ours
        assert torch.equal(row.transform.to_ours(theirs, config), ours), row.ours


def test_export_refuses_shapes_no_architecture_holds(tmp_path, capsys):
    config = ModelConfig(
        vocab_size=VOCAB, context_length=32, emb_dim=32, n_heads=2, n_layers=1, norm="rmsnorm"
    )
    save_checkpoint(tmp_path / "ckpt", GPTModel(config), ByteTokenizer())
    expect_error(
        capsys,
        ["convert", "--from", tmp_path / "ckpt", "--out", tmp_path / "hf"],
        "no Hugging Face architecture",
        "norm=rmsnorm",
    )
    assert not (tmp_path / "hf").exists()


def test_gpt2_small_imports_and_generates_through_the_cli(tmp_path, data_dir):
    """A gpt2-small-shaped checkpoint (124M, 500 MB) with GPT-2's real tokenizer files."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    src = save_hf(model, tmp_path / "gpt2")
    shutil.copy(data_dir / "gpt2" / "encoder.json", src / "vocab.json")
    shutil.copy(data_dir / "gpt2" / "vocab.bpe", src / "merges.txt")
    out = tmp_path / "ckpt"
    assert main(["convert", "--from", str(src), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layers"], config["emb_dim"], config["vocab_size"]) == (12, 768, 50257)
    assert config["qkv_bias"] and config["tie_embeddings"] and config["drop_rate"] == 0.1
    tok = load_tokenizer(out)
    assert isinstance(tok, BPETokenizer)
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0] and tok.eot_id == 50256

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scratchllm",
            "generate",
            "--checkpoint",
            str(out),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    prompt = torch.tensor([tok.encode("Hello")])
    with torch.no_grad():
        expected = hf_greedy(model, prompt, 5)[0, prompt.shape[1] :].tolist()
    assert proc.stdout == tok.decode(expected) + "\n"


# -- other sources: TensorFlow, pytorch_model.bin, shards ------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(entries: list[tuple[bytes, bytes]], restart_every: int = 4) -> bytes:
    """A LevelDB table block with prefix-compressed keys and restart points."""
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_every == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        last = key
    for r in restarts:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts)))


def write_tf_checkpoint(prefix: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The tensor-bundle layout TensorFlow's Saver writes (index table + one data shard)."""
    data, entries = bytearray(), []
    for name in sorted(tensors):
        raw = tensors[name].contiguous().numpy().tobytes()
        shape = b"".join(_field(2, _field(1, d)) for d in tensors[name].shape)
        proto = _field(1, 1) + _field(2, shape) + _field(4, len(data)) + _field(5, len(raw))
        entries.append((name.encode(), proto + b"\x35" + b"\0\0\0\0"))  # crc32c (unchecked)
        data += raw
    header = _field(1, 1) + _field(3, _field(1, 1))
    entries = [(b"", header), *entries]
    table = bytearray()
    data_block = _block(entries)
    table += data_block + b"\0\0\0\0\0"
    meta_offset = len(table)
    meta_block = _block([])
    table += meta_block + b"\0\0\0\0\0"
    index_offset = len(table)
    index_block = _block([(entries[-1][0], _varint(0) + _varint(len(data_block)))])
    table += index_block + b"\0\0\0\0\0"
    handles = _varint(meta_offset) + _varint(len(meta_block))
    handles += _varint(index_offset) + _varint(len(index_block))
    table += handles + b"\0" * (40 - len(handles)) + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(table))
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(bytes(data))


def test_openai_tensorflow_checkpoint_imports(tmp_path):
    model = hf_model("gpt2")
    src = tmp_path / "124M"
    src.mkdir()
    tf = {}
    for name, t in model.transformer.state_dict().items():
        if name.endswith((".attn.bias", "masked_bias")):  # causal-mask buffers
            continue
        tf_name = "model/" + name.replace("h.", "h", 1).replace(".weight", "/w").replace(
            ".bias", "/b"
        ).replace(".", "/")
        if "ln_" in name:
            tf_name = tf_name.replace("/w", "/g")
        if name in ("wte.weight", "wpe.weight"):
            tf_name = "model/" + name.split(".")[0]
        if t.dim() == 2 and name not in ("wte.weight", "wpe.weight"):
            t = t[None]  # OpenAI's conv1d kernels are [1, in, out]
        tf[tf_name] = t
    assert "model/h0/attn/c_attn/w" in tf and "model/ln_f/g" in tf
    write_tf_checkpoint(src / "model.ckpt", tf)
    (src / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    hparams = dict(n_vocab=VOCAB, n_ctx=128, n_embd=64, n_head=4, n_layer=2)
    (src / "hparams.json").write_text(json.dumps(hparams))
    assert detect_format(src) == "tf"
    import_hf(src, tmp_path / "ckpt", tokenizer="bytes")
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        diff = (load_checkpoint(tmp_path / "ckpt").model(ids) - model(ids).logits).abs().max()
    assert diff.item() <= 1e-4


def test_pytorch_bin_and_sharded_safetensors_import(tmp_path):
    model = hf_model("llama")
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        expected = model(ids).logits
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(sharded / "config.json", binary / "config.json")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    for src in (sharded, binary):
        import_hf(src, tmp_path / f"{src.name}-ckpt", tokenizer="bytes")
        with torch.no_grad():
            got = load_checkpoint(tmp_path / f"{src.name}-ckpt").model(ids)
        assert (got - expected).abs().max().item() <= 1e-4


def test_dtype_option_writes_bfloat16(tmp_path):
    model = hf_model("llama")
    src = save_hf(model, tmp_path / "hf")
    argv = ["convert", "--from", src, "--out", tmp_path / "ckpt", "--tokenizer", "bytes"]
    assert main([str(a) for a in [*argv, "--dtype", "bfloat16"]]) == 0
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    meta = json.loads((tmp_path / "ckpt" / "checkpoint.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["source"]["architecture"] == "LlamaForCausalLM"
    emb = model.model.embed_tokens.weight.detach().to(torch.bfloat16)
    assert torch.equal(state["tok_emb.weight"], emb)
    export_hf(tmp_path / "ckpt", tmp_path / "back", dtype="float32")
    hf_config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert hf_config["torch_dtype"] == "float32"


# -- tokenizers ------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, data_dir):
    """A byte-level BPE tokenizer.json trained on The Verdict, with specials and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = tmp_path_factory.mktemp("hftok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 4,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([(data_dir / "corpora" / "the-verdict.txt").read_text()], trainer)
    tok.add_tokens(["<think>"])  # an added token that is not special
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


TEXTS = [
    "Hello, world! It's a test.",
    "Unicode: héllo wörld — ünïcödé 😀 中文字符",
    "  spaces\tand\nnewlines   ",
    "<think>special <|endoftext|> strings<|im_end|>",
]


def test_hf_tokenizer_matches_transformers(hf_tokenizer_dir):
    ours = HFTokenizer.from_directory(hf_tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert ours.vocab_size == len(theirs)
    assert ours.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert ours.eos_token == "<|im_end|>" and ours.eot_id == 2 and ours.eos_id == 2
    assert ours.bos_id == 0
    for text in TEXTS:
        ids = ours.encode(text, allow_special=True)
        assert ids == theirs(text, add_special_tokens=False).input_ids
        assert ours.decode(ids) == text
        assert ours.decode_bytes(ids) == text.encode("utf-8")
    # encode_ordinary spells special strings as text; encode refuses them unless allowed
    assert 2 not in ours.encode_ordinary("a<|im_end|>b")
    with pytest.raises(Exception, match="special token"):
        ours.encode("a<|im_end|>b")
    # decode_bytes returns real bytes, also for a token sequence cut inside a character
    emoji = ours.encode_ordinary("😀")
    assert b"".join(ours.decode_bytes([i]) for i in emoji) == "😀".encode()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there "},
    ]
    for gen in (True, False):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    chat_ids = ours.encode_chat(messages)
    assert chat_ids[:2] == [0, 1] and chat_ids.count(2) == 2


def test_hf_tokenizer_saves_and_loads_through_load_tokenizer(hf_tokenizer_dir, tmp_path):
    ours = HFTokenizer.from_directory(hf_tokenizer_dir)
    ours.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / "scratchllm_tokenizer.json").read_text())
    assert meta["type"] == "hf" and meta["eos_token"] == "<|im_end|>"
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        hf_tokenizer_dir / "tokenizer.json"
    ).read_bytes()
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, HFTokenizer)
    assert again.fingerprint() == ours.fingerprint() and again.eot_id == 2
    assert again.has_chat_template


def test_import_carries_tokenizer_json_and_chat_template(tmp_path, hf_tokenizer_dir):
    src = save_hf(hf_model("qwen3"), tmp_path / "qwen3")
    for file in hf_tokenizer_dir.iterdir():
        shutil.copy(file, src / file.name)
    assert main(["convert", "--from", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(ckpt.tokenizer, HFTokenizer)
    assert ckpt.tokenizer.eot_id == 2
    text = ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    assert main(["convert", "--from", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
        == text
    )


def test_gpt2_tokenizer_exports_for_transformers(tmp_path, gpt2_tokenizer):
    config = ModelConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1)
    save_checkpoint(tmp_path / "ckpt", GPTModel(config), gpt2_tokenizer)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert (tmp_path / "hf" / "vocab.json").exists() and (tmp_path / "hf" / "merges.txt").exists()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS[:3]:
        assert theirs(text).input_ids == gpt2_tokenizer.encode(text)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == 50256
    # ... and the exported folder imports back with GPT-2's BPE tokenizer
    import_hf(tmp_path / "hf", tmp_path / "again")
    again = load_tokenizer(tmp_path / "again")
    assert isinstance(again, BPETokenizer) and again.encode("Hello, world!") == [15496, 11, 995, 0]


# -- bad input: one line, exit 2, nothing left behind ----------------------------------------


@pytest.fixture()
def gpt2_dir(tmp_path):
    return save_hf(hf_model("gpt2"), tmp_path / "src")


def _rewrite(path: Path, change) -> None:
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _convert_fails(capsys, src: Path, out: Path, *fragments: str) -> str:
    err = expect_error(
        capsys, ["convert", "--from", src, "--out", out, "--tokenizer", "bytes"], *fragments
    )
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())
    return err


def test_missing_tensor(capsys, gpt2_dir, tmp_path):
    _rewrite(gpt2_dir / "model.safetensors", lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    _convert_fails(
        capsys, gpt2_dir, tmp_path / "out", "'transformer.h.1.mlp.c_fc.weight'", "missing"
    )


def test_unexpected_tensor(capsys, gpt2_dir, tmp_path):
    _rewrite(
        gpt2_dir / "model.safetensors",
        lambda s: s.__setitem__("transformer.h.0.extra.weight", torch.zeros(3)),
    )
    _convert_fails(
        capsys, gpt2_dir, tmp_path / "out", "unexpected tensor", "'transformer.h.0.extra.weight'"
    )


def test_wrong_shape(capsys, gpt2_dir, tmp_path):
    _rewrite(
        gpt2_dir / "model.safetensors",
        lambda s: s.__setitem__("transformer.h.0.attn.c_attn.weight", torch.zeros(64, 100)),
    )
    _convert_fails(
        capsys,
        gpt2_dir,
        tmp_path / "out",
        "'transformer.h.0.attn.c_attn.weight'",
        "(64, 100)",
        "expected (64, 192)",
    )


def test_unknown_architecture(capsys, gpt2_dir, tmp_path):
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["architectures"], config["model_type"] = ["BertForMaskedLM"], "bert"
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    _convert_fails(
        capsys,
        gpt2_dir,
        tmp_path / "out",
        "unsupported architecture",
        "BertForMaskedLM",
        "config.json",
    )


@pytest.mark.parametrize("damage", ["truncated", "corrupt-header", "tiny"])
def test_truncated_or_corrupt_safetensors(capsys, gpt2_dir, tmp_path, damage):
    file = gpt2_dir / "model.safetensors"
    raw = file.read_bytes()
    if damage == "truncated":
        file.write_bytes(raw[: len(raw) // 2])
    elif damage == "corrupt-header":
        file.write_bytes(raw[:8] + b"#" * 20 + raw[28:])
    else:
        file.write_bytes(raw[:5])
    _convert_fails(
        capsys,
        gpt2_dir,
        tmp_path / "out",
        "model.safetensors",
        "truncated" if damage != "corrupt-header" else "corrupt",
    )


def test_failed_convert_leaves_existing_out_unchanged(capsys, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(
        capsys,
        ["convert", "--from", gpt2_dir, "--out", out, "--tokenizer", "bytes"],
        "already exists",
        "--force",
    )
    raw = (gpt2_dir / "model.safetensors").read_bytes()
    (gpt2_dir / "model.safetensors").write_bytes(raw[:-100])
    expect_error(
        capsys,
        ["convert", "--from", gpt2_dir, "--out", out, "--tokenizer", "bytes", "--force"],
        "truncated",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_convert_direction_and_missing_input_errors(capsys, gpt2_dir, tmp_path):
    expect_error(
        capsys,
        ["convert", "--from", tmp_path / "nope", "--out", tmp_path / "o"],
        "no such directory",
    )
    expect_error(
        capsys,
        ["convert", "--from", gpt2_dir, "--out", tmp_path / "o", "--to", "hf"],
        "already a Hugging Face folder",
    )
    (gpt2_dir / "model.safetensors").unlink()
    expect_error(
        capsys, ["convert", "--from", gpt2_dir, "--out", tmp_path / "o"], "no weights found"
    )
    (tmp_path / "empty").mkdir()
    expect_error(
        capsys, ["convert", "--from", tmp_path / "empty", "--out", tmp_path / "o"], "no config.json"
    )
    assert not (tmp_path / "o").exists()


def test_import_without_tokenizer_asks_for_one(capsys, gpt2_dir, tmp_path):
    expect_error(
        capsys,
        ["convert", "--from", gpt2_dir, "--out", tmp_path / "o"],
        "no tokenizer files",
        "--tokenizer",
    )


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def test_convert_refuses_an_out_that_is_holds_or_lies_in_the_source(capsys, gpt2_dir, tmp_path):
    """Item 5: `--from run/checkpoint --out run --force` deleted its own source. An --out that
    is, holds or lies inside --from (symlinks resolved) is refused, import and export alike."""
    run = tmp_path / "run"
    cfg = ModelConfig(vocab_size=257, context_length=8, emb_dim=16, n_heads=2, n_layers=1)
    save_checkpoint(run / "checkpoint", GPTModel(cfg), ByteTokenizer())
    (tmp_path / "link").symlink_to(run)
    before, hf_before = _tree_bytes(run), _tree_bytes(gpt2_dir)
    for src, out, what in [
        (run / "checkpoint", run, "holds --from"),  # export: out holds the source
        (tmp_path / "link" / "checkpoint", run, "holds --from"),  # ... through a symlink
        (run, run / "checkpoint" / "hf", "lies inside --from"),  # export: out inside it
        (run / "checkpoint", tmp_path / "link" / "checkpoint", "is --from"),
        (gpt2_dir, tmp_path, "holds --from"),  # import: out holds the source
        (gpt2_dir, gpt2_dir / "ckpt", "lies inside --from"),  # import: out inside it
    ]:
        argv = ["convert", "--from", src, "--out", out, "--tokenizer", "bytes", "--force"]
        if src.name != "src":
            argv = argv[:5] + ["--force"]  # export takes no --tokenizer
        expect_error(capsys, argv, f"--out {out}", what)
    assert _tree_bytes(run) == before and _tree_bytes(gpt2_dir) == hf_before
    # A sibling folder is fine.
    assert main(["convert", "--from", str(run), "--out", str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_path_that_leaves_the_model_folder_is_refused(capsys, tmp_path, entry):
    """Item 9: a weight_map entry may only name a file in the model folder."""
    sharded = tmp_path / "models" / "m"
    hf_model("llama").save_pretrained(sharded, max_shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = entry
    index.write_text(json.dumps(data))
    expect_error(
        capsys,
        ["convert", "--from", sharded, "--out", tmp_path / "out", "--tokenizer", "bytes"],
        str(index),
        repr(name),
        "outside the model folder",
    )
    assert not (tmp_path / "out").exists()


# -- download ---------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_offline_says_how_to_convert_instead(tmp_path):
    env = dict(
        os.environ,
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "gpt2"
    proc = subprocess.run(
        [sys.executable, "-m", "scratchllm", "download", "gpt2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "openai-community/gpt2" in err and "cannot reach" in err
    assert "scratchllm convert --from DIR" in err
    assert not out.exists()


def test_download_without_huggingface_hub_or_with_a_bad_name(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    expect_error(
        capsys,
        ["download", "qwen3-0.6b", "--out", tmp_path / "q"],
        "huggingface_hub is not installed",
        "Qwen/Qwen3-0.6B",
        "scratchllm convert",
    )
    expect_error(capsys, ["download", "not-a-model"], "not a known short name")
    assert not (tmp_path / "q").exists()
