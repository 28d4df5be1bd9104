"""Muon: the Newton–Schulz orthogonalisation, a hand-computed reference step, training, resume."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.train.muon import (
    MuonAdamW,
    muon_update,
    newton_schulz,
    qkv_row_blocks,
    split_for_muon,
)
from scratchllm.train.optim import build_optimizer
from scratchllm.train.settings import TrainConfig
from scratchllm.train.tasks import LMTask
from scratchllm.train.trainer import Trainer, TrainerCallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_newton_schulz_makes_singular_values_near_one(shape, dtype):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(*shape, generator=g)
    x = newton_schulz(m, steps=5, dtype=dtype)
    assert x.shape == m.shape and x.dtype == m.dtype
    s = torch.linalg.svdvals(x.float())
    # The published quintic trades exact convergence for speed: every σ lands in about [0.7, 1.2].
    assert s.min() > 0.6 and s.max() < 1.2, s
    # Same singular vectors as the exact orthogonalisation U·Vᵀ: close to it in direction.
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    cos = (x.float() * (u @ vh)).sum() / (x.float().norm() * (u @ vh).norm())
    assert cos > 0.97


def _ns_reference(m: np.ndarray, steps: int = 5) -> np.ndarray:
    """Newton–Schulz, written again from the published description, in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.T if m.shape[0] > m.shape[1] else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if m.shape[0] > m.shape[1] else x


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_two_reference_steps_match_a_hand_computation(wd):
    w0 = np.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.7]])  # 3×2: tall, scale √(3/2)
    g1 = np.array([[0.3, -0.1], [0.2, 0.4], [-0.5, 0.1]])
    g2 = np.array([[-0.2, 0.6], [0.1, -0.3], [0.4, 0.2]])
    lr, beta = 0.1, 0.95
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    group = dict(params=[p], use_muon=True, lr=lr, momentum=beta, weight_decay=wd)
    opt = MuonAdamW([group], torch.float64)
    w, m = w0.copy(), np.zeros_like(w0)
    for g in (g1, g2):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        m = beta * m + (1 - beta) * g  # momentum
        u = (1 - beta) * g + beta * m  # Nesterov look-ahead
        w = w * (1 - lr * wd)  # decoupled weight decay, before the step
        w = w - lr * np.sqrt(3 / 2) * _ns_reference(u)  # orthogonalise, scale by shape
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), m, atol=1e-12)


def test_the_batched_step_equals_one_matrix_at_a_time():
    """Matrices of one (wide) shape share one Newton–Schulz: tall ones are transposed into the
    batch and back, and each still gets its own norm, momentum and shape scale."""
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 8), (16, 8), (8, 16), (8, 8), (16, 8), (4, 12)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]
    start = [p.detach().clone() for p in params]
    opt = MuonAdamW([dict(params=params, use_muon=True, lr=0.05)], torch.float64)
    moms = [torch.zeros_like(p) for p in params]
    want = [p.clone() for p in start]
    for _ in range(3):
        grads = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        opt.step()
        for i, grad in enumerate(grads):
            want[i] -= 0.05 * muon_update(grad, moms[i], ns_dtype=torch.float64)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-12)


def test_row_blocks_orthogonalise_each_part_apart():
    """A fused q/k/v weight with row blocks steps as its three matrices would on their own
    (each its own norm and shape scale), batched with plain matrices of the same shape; the
    sharded path's `muon_update(row_blocks=...)` gives the same step."""
    g = torch.Generator().manual_seed(2)
    fused = torch.nn.Parameter(torch.randn(24, 8, generator=g, dtype=torch.float64))
    plain = torch.nn.Parameter(torch.randn(8, 8, generator=g, dtype=torch.float64))
    blocks = (8, 8, 8)
    opt = MuonAdamW(
        [dict(params=[fused, plain], use_muon=True, lr=0.05)],
        torch.float64,
        row_blocks={id(fused): blocks},
    )
    parts = [fused.detach()[i * 8 : (i + 1) * 8].clone() for i in range(3)]
    part_moms = [torch.zeros(8, 8, dtype=torch.float64) for _ in range(3)]
    fused_mom = torch.zeros(24, 8, dtype=torch.float64)
    want_plain, plain_mom = plain.detach().clone(), torch.zeros(8, 8, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(24, 8, generator=g, dtype=torch.float64)
        fused.grad, plain.grad = grad, torch.randn(8, 8, generator=g, dtype=torch.float64)
        opt.step()
        steps = [
            muon_update(grad[i * 8 : (i + 1) * 8], part_moms[i], ns_dtype=torch.float64)
            for i in range(3)
        ]
        for i in range(3):
            parts[i] -= 0.05 * steps[i]
        # Each block scaled as a square matrix (1), not as one tall 24×8 one (√3).
        whole = muon_update(grad, fused_mom, ns_dtype=torch.float64, row_blocks=blocks)
        torch.testing.assert_close(whole, torch.cat(steps), rtol=0, atol=1e-12)
        want_plain -= 0.05 * muon_update(plain.grad, plain_mom, ns_dtype=torch.float64)
    torch.testing.assert_close(fused.detach(), torch.cat(parts), rtol=0, atol=1e-12)
    torch.testing.assert_close(plain.detach(), want_plain, rtol=0, atol=1e-12)
    model = GPTModel(
        ModelConfig(
            vocab_size=32, context_length=8, emb_dim=16, n_heads=4, n_kv_heads=2, n_layers=2
        )
    )
    found = qkv_row_blocks(model)
    assert found == {id(b.att.qkv.weight): (16, 8, 8) for b in model.trf_blocks}
    for split in (False, True):
        config = TrainConfig(optimizer="muon", muon_split_qkv=split)
        opt = build_optimizer(model, config, torch.device("cpu"))
        assert opt.row_blocks == (found if split else {})


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([dict(params=[a], **kw)])
    ref = torch.optim.AdamW([b], **kw)
    for _ in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(
        ModelConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
    )


def test_muon_takes_hidden_matrices_only_and_scales_its_lr():
    model = _model()
    hidden, matrices, vectors = split_for_muon(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == [
        "trf_blocks.0.att.out_proj.weight",
        "trf_blocks.0.att.qkv.weight",
        "trf_blocks.0.ff.fc1.weight",
        "trf_blocks.0.ff.fc2.weight",
    ]
    assert sorted(names[id(p)] for p in matrices) == [
        "out_head.weight",
        "pos_emb.weight",
        "tok_emb.weight",
    ]
    assert all(p.dim() == 1 for p in vectors)
    config = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = build_optimizer(model, config, torch.device("cpu"))
    muon = [g for g in opt.param_groups if g["use_muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.02 and muon[0]["lr_scale"] == pytest.approx(20)
    assert muon[0]["weight_decay"] == 0.0  # as published, unless asked for
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in opt.param_groups if not g["use_muon"])
    config = TrainConfig(optimizer="muon", muon_weight_decay=0.1, weight_decay=0.0)
    opt = build_optimizer(model, config, torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups if g["use_muon"]] == [0.1]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if not g["use_muon"])
    # and it decays: a step with a zero gradient shrinks each Muon matrix by (1 - lr·wd)
    hidden = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    before = [p.detach().clone() for p in hidden]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(hidden, before, strict=True):
        torch.testing.assert_close(p.detach(), b * (1 - config.muon_lr * 0.1))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_lr_gives_untied_tables_their_own_group(optimizer, tied):
    torch.manual_seed(0)
    model = GPTModel(
        ModelConfig(
            vocab_size=257,
            context_length=16,
            emb_dim=32,
            n_heads=2,
            n_layers=1,
            tie_embeddings=tied,
        )
    )
    names = {id(p): n for n, p in model.named_parameters()}
    config = TrainConfig(optimizer=optimizer, lr=1e-3, embedding_lr=0.05, weight_decay=0.1)
    opt = build_optimizer(model, config, torch.device("cpu"))
    own = [g for g in opt.param_groups if g.get("lr_scale", 1.0) == pytest.approx(50)]
    want = ["pos_emb.weight"] if tied else ["pos_emb.weight", "tok_emb.weight"]
    assert len(own) == 1 and sorted(names[id(p)] for p in own[0]["params"]) == want
    assert own[0]["lr"] == 0.05 and own[0]["weight_decay"] == 0.0
    # Every parameter in exactly one group; a tied table stays with the head's rate.
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    head = next(g for g in opt.param_groups if any(p is model.out_head.weight for p in g["params"]))
    assert head.get("lr_scale", 1.0) == 1.0 and head["lr"] == 1e-3
    # Unset: the groups are what they were (a resumed optimizer state still fits).
    before = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3), torch.device("cpu"))
    assert all(g.get("lr_scale", 1.0) != pytest.approx(50) for g in before.param_groups)


def _trainer(tmp_path, data_dir, max_steps=8, lr=1e-3, **kw) -> Trainer:
    text = (data_dir / "corpora" / "the-verdict.txt").read_bytes()
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    task = LMTask(tokens[:4000], tokens[4000:], ByteTokenizer(), 4, 16, sample_prompt="a")
    config = TrainConfig(
        max_steps=max_steps,
        lr=lr,
        optimizer="muon",
        eval_every=100,
        eval_batches=1,
        sample_tokens=0,
        log_every=1,
        seed=5,
        **kw,
    )
    return Trainer(_model(), task, config, tmp_path / "run", ByteTokenizer())


def test_a_tiny_muon_run_reduces_the_loss(tmp_path, data_dir):
    trainer = _trainer(tmp_path, data_dir, max_steps=30, lr=3e-3, warmup_steps=2)
    result = trainer.fit()
    assert result.last_eval["val_loss"] < result.first_eval["val_loss"] - 0.5
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]  # the schedule scaled every group
    assert lrs[0] == pytest.approx(0.02 / 3e-3 * lrs[1])


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer, record):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves and stops at the boundary


def test_muon_resume_is_exact(tmp_path, data_dir):
    _trainer(tmp_path / "a", data_dir, max_steps=6).fit()
    cut = _trainer(tmp_path / "b", data_dir, max_steps=6)
    cut.callback = StopAt(3)
    assert cut.fit().steps == 3
    _trainer(tmp_path / "b", data_dir, max_steps=6).fit(resume=True)
    a = (tmp_path / "a" / "run" / "checkpoint" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "run" / "checkpoint" / "model.safetensors").read_bytes()
    assert a == b
