"""Training wrappers applied from outside the model change speed or memory, never the numbers:
activation checkpointing and the padded output head against the plain model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchllm import GPTModel, InputError, ModelConfig
from scratchllm.model.gpt import TransformerBlock
from scratchllm.train import parallelize as P

CPU = torch.device("cpu")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=301, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    base.update(kw)
    return ModelConfig(**base)


def loss_and_grads(model, idx, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in every pass
    logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def count_block_calls(model, during: list[str], phase: list[str]):
    """Record, for every block forward, the phase ('forward' or 'backward') it ran in."""
    # A pre-hook on the block's first module: the recomputation stops as soon as it has rebuilt
    # the last saved tensor, so hooks that run after a module returns may never fire in it.
    for block in model.trf_blocks:
        block.norm1.register_forward_pre_hook(lambda *_: during.append(phase[0]))


@pytest.mark.parametrize("kw", [dict(drop_rate=0.1), dict(drop_rate=0.0, pos_embedding="rope")])
def test_activation_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(kw):
    torch.manual_seed(0)
    model = GPTModel(tiny(**kw)).train()
    idx = torch.randint(0, 301, (3, 16))
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, idx)
    keys = list(model.state_dict())
    assert P.parallelize(model, CPU, activation_checkpointing=True) is model
    assert list(model.state_dict()) == keys  # checkpoints are unchanged
    assert all(isinstance(b, P.CheckpointedBlock) for b in model.trf_blocks)
    calls: list[str] = []
    phase = ["forward"]
    count_block_calls(model, calls, phase)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    logits = model(idx)
    loss = F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten())
    phase[0] = "backward"
    loss.backward()
    # Each block ran once forward and once more inside backward (the recomputation).
    assert calls == ["forward", "forward", "backward", "backward"]
    torch.testing.assert_close(logits.detach(), ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_is_off_in_eval_without_grad_and_with_a_cache(monkeypatch):
    model = GPTModel(tiny(drop_rate=0.0))
    P.checkpoint_blocks(model)
    used = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: used.append(1) or real(*a, **k)
    )
    idx = torch.randint(0, 301, (1, 8))
    model.eval()(idx).sum().backward()
    with torch.no_grad():
        model.train()(idx)
    model(idx, cache=model.new_cache(1)).sum().backward()
    assert used == []
    model(idx).sum().backward()
    assert used == [1, 1]  # once per block: in training, with grad and without a cache


def test_activation_checkpointing_needs_transformer_blocks():
    with pytest.raises(InputError, match="has no TransformerBlock to checkpoint"):
        P.parallelize(torch.nn.Linear(3, 3), CPU, activation_checkpointing=True)

    class Custom(TransformerBlock):
        def forward(self, x, rope=None, cache=None, attn_mask=None):
            return x

    model = GPTModel(tiny())
    model.trf_blocks[1] = Custom(model.config)
    with pytest.raises(InputError, match="Custom is a TransformerBlock subclass"):
        P.checkpoint_blocks(model)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_head_keeps_logits_gradients_keys_and_tying(tie, monkeypatch):
    torch.manual_seed(0)
    model = GPTModel(tiny(tie_embeddings=tie, drop_rate=0.1)).train()
    idx = torch.randint(0, 301, (3, 16))
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, idx)
    keys = list(model.state_dict())
    weight = model.out_head.weight
    P.parallelize(model, CPU, vocab_multiple=64)
    head = model.out_head
    assert isinstance(head, P.PaddedHead) and head.pad == 320 - 301
    assert head.weight is weight  # the same parameter: nothing copied, nothing to resync
    assert (head.weight is model.tok_emb.weight) == tie
    assert list(model.state_dict()) == keys  # `out_head.weight`, as checkpoints have it
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    shapes = []
    real = F.linear
    monkeypatch.setattr(
        F, "linear", lambda x, w, b=None: shapes.append(w.shape[0]) or real(x, w, b)
    )
    logits, loss, grads = loss_and_grads(model, idx)
    monkeypatch.undo()
    assert 320 in shapes and 301 not in shapes  # the head used the padded weight
    assert logits.shape == (3, 16, 301)  # padded logits never reach the caller
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # The state dict loads back into an unpadded model and gives the same logits.
    plain = GPTModel(tiny(tie_embeddings=tie, drop_rate=0.1)).eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(idx), model.eval()(idx), rtol=1e-6, atol=1e-6)


def test_padded_head_leaves_classifiers_and_round_vocabularies_alone():
    model = GPTModel(tiny(num_classes=3))
    assert not P.pad_output_head(model, 64)
    assert type(model.out_head) is torch.nn.Linear
    model = GPTModel(tiny(vocab_size=320))
    assert not P.pad_output_head(model, 64)
    assert not P.pad_output_head(GPTModel(tiny()), 1)
    P.parallelize(model := GPTModel(tiny()), CPU)  # auto: no padding on a CPU
    assert type(model.out_head) is torch.nn.Linear
    for bad in (0, -64, 2.5, True):
        with pytest.raises(InputError, match="vocab_multiple: expected an integer ≥ 1"):
            P.parallelize(GPTModel(tiny()), CPU, vocab_multiple=bad)


def test_fsdp_on_an_old_torch_is_a_clear_input_error(monkeypatch):
    monkeypatch.setattr(P, "FSDP2_AVAILABLE", False)
    monkeypatch.setattr(P, "_world_size", lambda: 2)
    with pytest.raises(InputError, match=r"--fsdp needs torch >= 2\.6"):
        P.parallelize(GPTModel(tiny()), CPU, fsdp=True)


def test_single_process_returns_the_model_itself():
    model = GPTModel(tiny())
    assert P.parallelize(model, CPU, fsdp=True) is model
