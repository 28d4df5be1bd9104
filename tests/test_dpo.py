"""DPO (the book's preference-tuning bonus): the loss by hand, masks, and a tiny run."""

import json
import math

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.data.instruction import format_prompt, load_records
from scratchllm.finetune.preference import (
    DPOTask,
    Pair,
    collate_pairs,
    dpo_loss,
    encode_pairs,
    sequence_logprobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_equals_hand_computed_value():
    pc = torch.tensor([-1.0, -2.0])  # policy log p(chosen), per pair
    pr = torch.tensor([-2.0, -1.0])  # policy log p(rejected)
    rc = torch.tensor([-1.5, -2.0])  # reference
    rr = torch.tensor([-1.5, -1.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 1: β·((-1 + 1.5) - (-2 + 1.5)) = 0.1 · 1.0 → -log σ(0.1) = log(1 + e^-0.1) = 0.644397
    # pair 2: β·((-2 + 2) - (-1 + 1.5)) = 0.1 · -0.5 → log(1 + e^0.05) = 0.718460
    assert float(loss) == pytest.approx((0.6443967 + 0.7184596) / 2, abs=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.05, 0.05]))


def test_sequence_logprobs_average_only_masked_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    got = sequence_logprobs(logits, ids, mask)
    for b in range(2):  # by hand: token t is predicted by logits at t - 1
        vals = [
            torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for t in range(1, 5) if mask[b, t]
        ]
        assert float(got[b]) == pytest.approx(float(sum(vals) / len(vals)), abs=1e-6)


def test_collate_pairs_masks_prompt_and_padding():
    pairs = [Pair([1, 2], [3, 4, 9], [5, 9]), Pair([1], [6, 9], [7, 8, 8, 9])]
    b = collate_pairs(pairs, pad_id=9)
    assert b["chosen"].tolist() == [[1, 2, 3, 4, 9], [1, 6, 9, 9, 9]]
    assert b["chosen_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b["rejected"].tolist() == [[1, 2, 5, 9, 9], [1, 7, 8, 8, 9]]
    assert b["rejected_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]


def test_a_cut_prompt_keeps_its_response_header_next_to_the_responses():
    tok = ByteTokenizer()
    record = {"instruction": "word " * 60, "input": "", "chosen": "Yes.", "rejected": "No."}
    pairs, cut = encode_pairs([record], tok, "alpaca", max_length=64)
    p = pairs[0]
    assert cut == 1 and len(p.prompt) == 32  # the response budget: half the limit, as before
    # The end of the prompt is kept (cut from the left): the header, then the responses.
    assert tok.decode(p.prompt).endswith("word word \n\n### Response:\n")
    assert p.chosen == [*tok.encode_ordinary("Yes."), tok.eot_id]
    assert p.rejected == [*tok.encode_ordinary("No."), tok.eot_id]
    short = {**record, "instruction": "Say yes."}
    [whole], cut = encode_pairs([short], tok, "alpaca", max_length=256)
    assert cut == 0 and tok.decode(whole.prompt) == format_prompt(short, "alpaca")


def test_dpo_tokens_in_counts_the_non_padding_inputs_of_both_responses():
    pairs = [Pair([1, 2], [3, 4, 9], [5, 9]), Pair([1], [6, 9], [7, 8, 8, 9])]
    task = DPOTask({"train": pairs}, torch.nn.Linear(1, 1), pad_id=9, batch_size=2)
    # prompt + chosen: 5 and 3; prompt + rejected: 4 and 5. Padded, the batch holds 2 × 5 + 2 × 5.
    assert task.tokens_in(task.next_batch()) == 5 + 3 + 4 + 5


def test_preference_data_needs_chosen_and_rejected(tmp_path, data_dir):
    records = load_records(
        data_dir / "instruct" / "instruction-data-with-preference.json",
        ("instruction", "chosen", "rejected"),
    )
    assert len(records) == 1100
    bad = tmp_path / "pref.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b", "chosen": "c"}]))
    with pytest.raises(InputError, match="record 1: field 'rejected' is missing"):
        load_records(bad, ("instruction", "chosen", "rejected"))


def test_dpo_run_starts_at_log2_and_learns_the_preference(tmp_path, data_dir):
    records = json.loads(
        (data_dir / "instruct" / "instruction-data-with-preference.json").read_text()
    )[:80]
    data = tmp_path / "pref.json"
    data.write_text(json.dumps(records))
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=128, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0
    )
    save_checkpoint(tmp_path / "base", GPTModel(config), ByteTokenizer(), {})
    out = tmp_path / "dpo"
    code = main(
        [
            "finetune", "dpo", "--checkpoint", str(tmp_path / "base"), "--data", str(data),
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3",
            "--template", "phi3", "--eval-batches", "2",
        ]
    )  # fmt: skip
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    first = r["first_eval"]
    # Policy == reference before training: every margin is 0 and the loss is exactly log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    last = r["epochs"][-1]
    assert last["train_loss"] < math.log(2) and last["train_reward_margin"] > 0
    for key in ("val_loss", "val_reward_margin", "val_accuracy"):
        assert math.isfinite(r[key])
    assert (out / "reward_margin.png").exists()
