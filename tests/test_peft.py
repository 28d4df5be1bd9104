"""PEFT adapters (issue 17): a LoRA fine-tune exported as a PEFT adapter folder computes, in
`peft.PeftModel` on the transformers model of the exported base, what scratchllm's LoRA model
computes; importing it back (or an adapter PEFT itself made) gives the same logits again; a
fine-tune started from an adapter starts where the adapter ended; bad input is one line, exit 2.

Every model is built here from a config with random weights (nothing is downloaded); norms,
biases and LoRA B factors are perturbed away from their 1/0 starts so that a mapping mistake shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from scratchllm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from scratchllm.cli import main  # noqa: E402
from scratchllm.config import ModelConfig  # noqa: E402
from scratchllm.finetune import load_with_adapters  # noqa: E402
from scratchllm.finetune.checkpoints import (  # noqa: E402
    lora_checkpoint_files,
    weights_fingerprint,
)
from scratchllm.model import GPTModel  # noqa: E402
from scratchllm.model.lora import LoRALinear, apply_lora  # noqa: E402
from scratchllm.tokenizers import ByteTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 257
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
SHAPES = {
    "gpt2": dict(qkv_bias=True, tie_embeddings=True),
    "llama": dict(  # grouped-query attention, Llama 3 RoPE scaling
        n_kv_heads=2, hidden_dim=96, norm="rmsnorm", pos_embedding="rope", ffn="swiglu",
        bias=False, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING), tie_embeddings=True,
    ),
    "qwen3": dict(  # QK-norm, head_dim != emb_dim / n_heads, untied head
        n_kv_heads=2, head_dim=32, hidden_dim=96, norm="rmsnorm", norm_eps=1e-6,
        pos_embedding="rope", ffn="swiglu", bias=False, qk_norm=True, tie_embeddings=False,
    ),
}  # fmt: skip


def base_model(family: str, emb: int = 64) -> GPTModel:
    torch.manual_seed(0)
    dims = dict(vocab_size=VOCAB, context_length=128, emb_dim=emb, n_heads=4, n_layers=2)
    model = GPTModel(ModelConfig(**dims, drop_rate=0.0, **SHAPES[family])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "shift")):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def lora_run(tmp: Path, family: str, targets: str = "attn,ff", rank: int = 4, alpha=8.0):
    """A base checkpoint and a LoRA run's checkpoint of it, written as a fine-tune writes them
    (`lora_checkpoint_files`, the trainer's own), with random B factors; returns the LoRA model."""
    base = tmp / "base"
    save_checkpoint(base, base_model(family), ByteTokenizer(), {})
    model = load_checkpoint(base).model
    torch.manual_seed(1)
    apply_lora(model, rank, alpha, targets)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.05)
    lora = {"rank": rank, "alpha": alpha, "targets": targets}
    meta = {"task": "instruct", "base_checkpoint": str(base), "lora": lora,
            "base_fingerprint": weights_fingerprint(base)}  # fmt: skip
    weights, files = lora_checkpoint_files(model, meta)
    save_checkpoint(tmp / "run" / "checkpoint", model, ByteTokenizer(), meta, {}, files, weights)
    return model.eval()


def cli_ok(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def expect_error(capsys, argv, *fragments) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def ids() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(0, VOCAB, (2, 60))  # past original_max_position_embeddings (32)


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", list(SHAPES))
def test_exported_adapter_in_peft_gives_our_logits_and_imports_back(tmp_path, family):
    ours = lora_run(tmp_path, family)
    cli_ok("convert", "--from", tmp_path / "base", "--to", "hf", "--out", tmp_path / "base-hf")
    cli_ok("convert", "--from", tmp_path / "run", "--to", "peft", "--out", tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    x = ids()
    base_logits = logits(hf, x)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    config = model.peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 8
    want = logits(ours, x)
    assert (want - base_logits).abs().max() > 1e-2  # the adapter changes the function
    assert (logits(model, x) - want).abs().max() <= 1e-4
    # PEFT wrapped exactly the modules our adapters cover: 2 layers × (attention + FF) linears.
    per_layer = 4 if family == "gpt2" else 7
    wrapped = [n for n, m in model.named_modules() if n.endswith(".lora_A")]
    assert len(wrapped) == 2 * per_layer

    # ... and back onto the base: a LoRA checkpoint (merged + factors) and merged weights only.
    cli_ok("convert", "--from", tmp_path / "base", "--adapter", tmp_path / "adapter",
           "--out", tmp_path / "back")  # fmt: skip
    merged = load_checkpoint(tmp_path / "back").model
    assert (logits(merged, x) - want).abs().max() <= 1e-4
    unmerged, _, _ = load_with_adapters(tmp_path / "back")
    assert (logits(unmerged, x) - want).abs().max() <= 1e-4
    # Our own export fuses back to the rank it had, factor for factor.
    ours_state = load_file(tmp_path / "run" / "checkpoint" / "adapters.safetensors")
    back_state = load_file(tmp_path / "back" / "adapters.safetensors")
    assert ours_state.keys() == back_state.keys()
    for key, tensor in ours_state.items():
        assert torch.equal(back_state[key], tensor), key
    cli_ok("convert", "--from", tmp_path / "base", "--adapter", tmp_path / "adapter",
           "--out", tmp_path / "merged", "--merge")  # fmt: skip
    assert not (tmp_path / "merged" / "lora.json").exists()
    assert (logits(load_checkpoint(tmp_path / "merged").model, x) - want).abs().max() <= 1e-4
    # The round trip exports the same adapter again.
    cli_ok("convert", "--from", tmp_path / "back", "--to", "peft", "--out", tmp_path / "again")
    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_attention_only_adapter_names_c_proj_of_attention_alone(tmp_path):
    """GPT-2 has a c_proj in attention and in the MLP: an attn-only adapter names attn.c_proj."""
    ours = lora_run(tmp_path, "gpt2", targets="attn")
    cli_ok("convert", "--from", tmp_path / "base", "--out", tmp_path / "base-hf")
    cli_ok("convert", "--from", tmp_path / "run", "--to", "peft", "--out", tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["attn.c_proj", "c_attn"]
    assert cfg["fan_in_fan_out"] is True  # Conv1D
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert not any(".mlp.c_proj.lora_A" in n for n, _ in model.named_modules())
    x = ids()
    assert (logits(model, x) - logits(ours, x)).abs().max() <= 1e-4


def peft_made_adapter(tmp_path: Path, family: str, targets: list[str], **lora) -> Path:
    """An adapter PEFT itself trains the shape of: q/k/v each with its own A (and rsLoRA)."""
    save_checkpoint(tmp_path / "base", base_model(family), ByteTokenizer(), {})
    cli_ok("convert", "--from", tmp_path / "base", "--out", tmp_path / "base-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    torch.manual_seed(3)
    config = peft.LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **lora)
    model = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", model.eval()


@pytest.mark.parametrize(
    "family, targets, lora",
    [
        ("llama", ["q_proj", "v_proj", "o_proj", "down_proj"], dict(r=4, lora_alpha=8)),
        ("qwen3", ["q_proj", "k_proj", "v_proj", "up_proj"], dict(r=2, lora_alpha=3, use_rslora=True)),
        ("gpt2", ["c_attn", "c_fc"], dict(r=3, lora_alpha=6, fan_in_fan_out=True)),
    ],
)  # fmt: skip
def test_an_adapter_peft_made_imports_with_its_logits(tmp_path, family, targets, lora):
    adapter, model = peft_made_adapter(tmp_path, family, targets, **lora)
    x = ids()
    want = logits(model, x)
    cli_ok("convert", "--from", tmp_path / "base", "--adapter", adapter, "--out", tmp_path / "ck")
    assert (logits(load_checkpoint(tmp_path / "ck").model, x) - want).abs().max() <= 1e-4
    unmerged, _, _ = load_with_adapters(tmp_path / "ck")
    assert (logits(unmerged, x) - want).abs().max() <= 1e-4
    spec = json.loads((tmp_path / "ck" / "lora.json").read_text())
    # Separate q and v factors stack in our fused qkv: twice (three times) the rank.
    qkv_parts = sum(t in targets for t in ("q_proj", "k_proj", "v_proj")) or 1
    assert spec["rank"] == lora["r"] * qkv_parts


def test_lora_checkpoint_keeps_its_factors_and_the_base_it_applies_to(tmp_path):
    lora_run(tmp_path, "gpt2")
    spec = json.loads((tmp_path / "run" / "checkpoint" / "lora.json").read_text())
    assert spec["base_fingerprint"] == weights_fingerprint(tmp_path / "base")
    assert Path(spec["base_checkpoint"]) == (tmp_path / "base").resolve()


# -- fine-tuning from an adapter ----------------------------------------------------------------
@pytest.fixture
def instruct_inputs(tmp_path, data_dir):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0
    )
    save_checkpoint(tmp_path / "base", GPTModel(config), ByteTokenizer(), {})
    records = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())[:30]
    (tmp_path / "inst.json").write_text(json.dumps(records))
    return tmp_path


def finetune_args(tmp: Path, out: str, *extra) -> list[str]:
    return [
        "finetune", "instruct", "--checkpoint", str(tmp / "base"), "--data",
        str(tmp / "inst.json"), "--out", str(tmp / out), "--eval-every", "1",
        "--eval-batches", "2", "--batch-size", "4", "--lr", "2e-2", "--generate-tokens", "0",
        "--seed", "5", *map(str, extra),
    ]  # fmt: skip


def eval_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["val_loss"] for r in map(json.loads, lines) if r.get("kind") == "eval"]


def test_finetune_from_an_adapter_starts_where_it_ended(instruct_inputs, capsys):
    tmp = instruct_inputs
    cli_ok(*finetune_args(tmp, "a", "--lora-rank", 4, "--lora-alpha", 8, "--max-steps", 3))
    first, *_, last = eval_losses(tmp / "a")
    assert abs(first - last) > 1e-3  # the adapter learned something
    cli_ok("convert", "--from", tmp / "a", "--to", "peft", "--out", tmp / "adapter")
    # Another rank and alpha: the adapter fills the first 4 ranks, B rescales to alpha/rank.
    cli_ok(*finetune_args(tmp, "b", "--lora-rank", 6, "--lora-alpha", 3, "--max-steps", 1,
                          "--adapter", tmp / "adapter"))  # fmt: skip
    results = json.loads((tmp / "b" / "results.json").read_text())
    assert results["first_eval"]["val_loss"] == pytest.approx(last, abs=1e-5)
    assert results["lora"]["adapter"] == str((tmp / "adapter").resolve())
    # The adapter's model in PEFT (on the base's transformers export) computes that loss too.
    cli_ok("convert", "--from", tmp / "base", "--out", tmp / "base-hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "base-hf").eval()
    tuned = peft.PeftModel.from_pretrained(hf, tmp / "adapter").eval()
    ours, _, _ = load_with_adapters(tmp / "a")
    x = ids()[:, :40]
    assert (logits(tuned, x) - logits(ours, x)).abs().max() <= 1e-4

    # Bad combinations name the flag, exit 2, one line.
    expect_error(capsys, finetune_args(tmp, "c", "--adapter", tmp / "adapter"),
                 "--adapter needs --lora-rank")  # fmt: skip
    expect_error(capsys, finetune_args(tmp, "d", "--lora-rank", 4, "--lora-targets", "attn",
                                       "--adapter", tmp / "adapter"),
                 "--lora-targets leaves out", "ff")  # fmt: skip
    expect_error(capsys, finetune_args(tmp, "e", "--lora-rank", 2, "--adapter", tmp / "adapter"),
                 "--lora-rank 2 is below the rank 4")  # fmt: skip
    # A resume reads the trained factors from the run, not the adapter (which may be gone).
    (tmp / "adapter").rename(tmp / "adapter-moved")
    cli_ok("finetune", "instruct", "--out", tmp / "b", "--resume", "--max-steps", 2)
    assert len(eval_losses(tmp / "b")) == 3
    # A resume on a base whose weights changed since is refused (the factors belong to it).
    torch.manual_seed(9)
    save_checkpoint(tmp / "base", GPTModel(load_checkpoint(tmp / "base").config), ByteTokenizer())
    expect_error(capsys, finetune_args(tmp, "a", "--lora-rank", 4, "--lora-alpha", 8,
                                       "--max-steps", 4, "--resume"),
                 "lora.json: base_fingerprint")  # fmt: skip


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path):
    lora_run(tmp_path, "gpt2")
    cli_ok("convert", "--from", tmp_path / "run", "--to", "peft", "--out", tmp_path / "adapter")
    return tmp_path


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_run_without_lora_is_refused(tmp_path, capsys):
    save_checkpoint(tmp_path / "plain", base_model("gpt2"), ByteTokenizer())
    expect_error(capsys, ["convert", "--from", tmp_path / "plain", "--to", "peft",
                          "--out", tmp_path / "out"], "lora.json is missing", "--lora-rank")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_classification_head_has_no_place_in_a_peft_adapter(exported, capsys):
    file = exported / "run" / "checkpoint" / "adapters.safetensors"
    save_file({**load_file(file), "out_head.weight": torch.zeros(2, 64)}, file)
    expect_error(capsys, ["convert", "--from", exported / "run", "--to", "peft", "--out",
                          exported / "out"], "adapters.safetensors", "'out_head.weight'")  # fmt: skip


@pytest.mark.parametrize(
    "change, fragments",
    [
        (dict(peft_type="IA3"), ("adapter_config.json: peft_type is 'IA3', expected 'LORA'",)),
        (dict(use_dora=True), ("adapter_config.json: use_dora is True",)),
        (dict(lora_alpha="big"), ("adapter_config.json: lora_alpha is 'big'",)),
    ],
)
def test_an_adapter_config_of_another_kind_is_refused(exported, capsys, change, fragments):
    _edit_config(exported / "adapter", **change)
    argv = ["convert", "--from", exported / "base", "--adapter", exported / "adapter",
            "--out", exported / "out"]  # fmt: skip
    expect_error(capsys, argv, *fragments)
    assert not (exported / "out").exists()


def test_an_adapter_for_another_base_is_refused_and_out_is_left_as_it_was(exported, capsys):
    out = exported / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # Narrower (emb 32): the shapes do not fit.
    save_checkpoint(exported / "narrow", base_model("gpt2", emb=32), ByteTokenizer())
    expect_error(capsys, ["convert", "--from", exported / "narrow", "--adapter",
                          exported / "adapter", "--out", out, "--force"],
                 "adapter_model.safetensors: tensor", "has shape", "expected")  # fmt: skip
    # A Llama base: GPT-2's module names are not there.
    save_checkpoint(exported / "llama", base_model("llama"), ByteTokenizer())
    expect_error(capsys, ["convert", "--from", exported / "llama", "--adapter",
                          exported / "adapter", "--out", out, "--force"],
                 "adapts module 'transformer.h.0.attn.c_attn'", "LlamaForCausalLM")  # fmt: skip
    assert [p.name for p in exported.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_convert_flags_that_do_not_go_together(exported, capsys):
    base, adapter = exported / "base", exported / "adapter"
    expect_error(capsys, ["convert", "--from", base, "--to", "peft", "--adapter", adapter,
                          "--out", exported / "o"], "--adapter")  # fmt: skip
    expect_error(capsys, ["convert", "--from", base, "--merge", "--out", exported / "o"],
                 "--merge: only with --adapter")  # fmt: skip
    expect_error(capsys, ["convert", "--from", base, "--adapter", adapter, "--dtype", "float16",
                          "--out", exported / "o"], "--dtype")  # fmt: skip
    expect_error(capsys, ["convert", "--from", base, "--adapter", exported / "nothing",
                          "--out", exported / "o"], "no such directory")  # fmt: skip
