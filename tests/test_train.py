"""The training loop: it learns, it resumes exactly, it writes what it promises."""

import json
import math

import numpy as np
import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import load_checkpoint, load_state_dict
from scratchllm.train.pretrain import PretrainOptions, pretrain
from scratchllm.train.schedule import lr_at
from scratchllm.train.settings import TrainConfig
from scratchllm.train.tasks import FusedCrossEntropy, LMTask, lm_loss
from scratchllm.train.trainer import Trainer, TrainerCallback


def tiny_config(tmp_path, **kw):
    path = tmp_path / "tiny.json"
    config = dict(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    config.update(kw)
    path.write_text(json.dumps(config))
    return str(path)


def test_schedule_warmup_then_cosine_to_floor():
    lrs = [lr_at(s, 1e-3, 100, warmup_steps=10, min_lr=1e-4) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # monotone decay
    assert lr_at(100, 1e-3, 100, 10, 1e-4) == pytest.approx(1e-4)
    assert lr_at(55, 1e-3, 100, 10, 1e-4) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way
    assert lr_at(50, 1e-3, 100, 0, 0, schedule="constant") == 1e-3


def test_tiny_model_overfits_the_verdict(tmp_path, data_dir, gpt2_tokenizer):
    """A small GPT memorises the book's chapter 5 text through the real trainer.

    The text is tokenized with GPT-2's BPE; its ~1,400 distinct ids are renumbered densely so the
    output layer is small enough for a 2-core CPU (the full 50,257-way head costs 40x more).
    """
    text = (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")
    ids = np.array(gpt2_tokenizer.encode_ordinary(text))
    used, dense = np.unique(ids, return_inverse=True)
    assert len(ids) == 5145 and len(used) < 1500
    torch.manual_seed(1)
    config = ModelConfig(
        vocab_size=len(used), context_length=64, emb_dim=128, n_heads=4, n_layers=2, drop_rate=0.0
    )
    model = GPTModel(config)
    tokens = dense.astype(np.uint16)
    task = LMTask(
        tokens, None, ByteTokenizer(), batch_size=8, context_length=64, seed=1, sample_prompt="-"
    )
    train = TrainConfig(
        max_steps=250,
        lr=3e-3,
        warmup_steps=10,
        eval_every=250,
        eval_batches=100,
        sample_tokens=0,
        log_every=25,
        seed=1,
    )
    result = Trainer(model, task, train, tmp_path / "run", ByteTokenizer()).fit()
    assert result.first_eval["train_loss"] > 6.5  # about ln(1,400) = 7.2 before training
    assert result.last_eval["train_loss"] < 1.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert all(r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.stop_step = step

    def on_step(self, trainer, record):
        if trainer.step == self.stop_step:
            raise KeyboardInterrupt


def _opts(tmp_path, data_dir, out, **kw):
    base = dict(
        data=[str(data_dir / "corpora" / "the-verdict.txt")],
        model=tiny_config(tmp_path, context_length=32, emb_dim=32, n_layers=1),
        tokenizer="bytes",
        out=str(tmp_path / out),
        max_steps=12,
        batch_size=4,
        lr=1e-3,
        eval_every=100,
        eval_batches=2,
        log_every=1,
        sample_tokens=0,
        seed=5,
    )
    base.update(kw)
    return PretrainOptions(**base)


def test_resume_after_a_stop_continues_from_the_saved_step(tmp_path, data_dir):
    full = pretrain(_opts(tmp_path, data_dir, "full"), callback=TrainerCallback())
    with pytest.raises(KeyboardInterrupt):
        pretrain(_opts(tmp_path, data_dir, "cut"), callback=StopAt(5))
    meta = json.loads((tmp_path / "cut" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 5
    resumed = pretrain(_opts(tmp_path, data_dir, "cut", resume=True), callback=TrainerCallback())
    assert resumed["steps"] == full["steps"] == 12
    a = load_state_dict(tmp_path / "full" / "checkpoint")
    b = load_state_dict(tmp_path / "cut" / "checkpoint")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda run: [  # noqa: E731
        r["loss"]
        for r in map(json.loads, (tmp_path / run / "metrics.jsonl").open())
        if r["kind"] == "train"
    ]
    assert losses("full") == losses("cut")


def test_checkpoint_round_trip_generates_the_same(tmp_path, data_dir):
    pretrain(_opts(tmp_path, data_dir, "run", max_steps=3), callback=TrainerCallback())
    ckpt = load_checkpoint(tmp_path / "run")
    again = load_checkpoint(tmp_path / "run" / "checkpoint")
    idx = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(ckpt.model(idx), again.model(idx), rtol=0, atol=0)
    assert ckpt.tokenizer.fingerprint() == again.tokenizer.fingerprint()
    assert math.isfinite(ckpt.meta["eval"]["val_loss"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_cross_entropy_matches_fp32_reference(dtype):
    """Training's fused cross-entropy on bf16/fp16 logits: the loss of F.cross_entropy on the
    same logits widened to fp32, and its gradient cast back to the logits' dtype."""
    torch.manual_seed(0)
    logits = (torch.randn(300, 512) * 4).to(dtype)
    target = torch.randint(0, 512, (300,))
    low = logits.clone().requires_grad_()
    loss = FusedCrossEntropy.apply(low, target)
    (loss * 3).backward()  # a scale on the way back reaches the gradient
    ref = logits.float().requires_grad_()
    ref_loss = torch.nn.functional.cross_entropy(ref, target)
    (ref_loss * 3).backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == dtype
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    # The same fp32 numbers rounded once to the dtype: at most one step of it apart.
    want = ref.grad.to(dtype).float()
    step = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((low.grad.float() - want).abs() <= step).all()


def test_lm_loss_takes_the_fused_path_only_when_training():
    """bf16 logits with gradients go through FusedCrossEntropy, to the loss evaluation (no
    grad) computes with F.cross_entropy in fp32; fp32 logits keep F.cross_entropy."""
    torch.manual_seed(0)
    model = GPTModel(
        ModelConfig(
            vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0
        )
    )
    x = torch.randint(0, 64, (2, 8))
    y = torch.randint(0, 64, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train = lm_loss(model, x, y)
        with torch.no_grad():
            evaluated = lm_loss(model, x, y)
    assert train.grad_fn is not None and "FusedCrossEntropy" in type(train.grad_fn).__name__
    assert evaluated.dtype == torch.float32
    assert train.item() == pytest.approx(evaluated.item(), rel=1e-6)  # the same fp32 numbers
    fp32 = lm_loss(model, x, y)
    assert "FusedCrossEntropy" not in type(fp32.grad_fn).__name__
    train.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
