"""Classification fine-tuning (ch. 6): data, last-real-token pooling, the CLI end to end."""

import json
import random

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.cli import main
from scratchllm.data.classification import (
    balance,
    encode_texts,
    label_names,
    load_labeled,
    pad_right,
    split_indices,
)
from scratchllm.finetune import select_trainable
from scratchllm.finetune.classify import (
    ClassificationTask,
    Classifier,
    Split,
    classify_logits,
    confusion_matrix,
    pool_last,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(context=128, layers=1, emb=32):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257,
        context_length=context,
        emb_dim=emb,
        n_heads=2,
        n_layers=layers,
        drop_rate=0.0,
    )
    return GPTModel(config)


@pytest.fixture
def base_ckpt(tmp_path):
    path = tmp_path / "base"
    save_checkpoint(path, tiny_model(layers=2), ByteTokenizer(), {})
    return path


def keyword_data(path, n=160, seed=0):
    """Separable toy data: 'pos' texts say 'good', 'neg' texts say 'bad'."""
    rng = random.Random(seed)
    filler = ["the", "a", "movie", "was", "really", "quite", "plot", "and", "so"]
    lines = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(filler) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        lines.append(f"{label}\t{' '.join(words)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sms_spam_loads_balances_and_splits_reproducibly(data_dir):
    data = load_labeled(data_dir / "sms_spam" / "SMSSpamCollection")
    assert len(data) == 5574
    assert data.labels.count("ham") == 4827 and data.labels.count("spam") == 747
    assert label_names(data) == ["ham", "spam"]
    balanced = balance(data, seed=123)
    assert balanced.labels.count("ham") == balanced.labels.count("spam") == 747
    parts = split_indices(len(balanced), (0.7, 0.1, 0.2), seed=123)
    assert [len(p) for p in parts] == [1045, 149, 300]
    assert sorted(sum(parts, [])) == list(range(1494))
    assert parts == split_indices(len(balanced), (0.7, 0.1, 0.2), seed=123)
    assert parts != split_indices(len(balanced), (0.7, 0.1, 0.2), seed=124)
    assert balance(data, seed=123).texts == balanced.texts


def test_pooling_reads_the_last_real_token_under_right_padding():
    model = tiny_model()
    model.set_classification_head(3)
    model.eval()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    x, lengths = pad_right(seqs, pad_id=256)
    assert x.tolist()[1] == [11, 12, 256, 256, 256, 256] and lengths.tolist() == [6, 2, 4]
    batched = classify_logits(model, x, lengths)
    for i, s in enumerate(seqs):  # each sequence alone, no padding at all
        alone = model(torch.tensor([s]))[0, -1]
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
    # The book's read-out at position -1 sees padding for the shorter rows: a different answer.
    naive = model(x)[:, -1]
    assert not torch.allclose(naive[1], batched[1], atol=1e-4)
    hidden = torch.arange(24.0).view(2, 3, 4)
    assert pool_last(hidden, torch.tensor([1, 3])).tolist() == [
        hidden[0, 0].tolist(),
        hidden[1, 2].tolist(),
    ]


def test_train_selection_freezes_the_rest():
    model = tiny_model(layers=3)
    model.set_classification_head(2)
    select_trainable(model, "last-2")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("trf_blocks.1.") for n in names)
    assert any(n.startswith("trf_blocks.2.") for n in names)
    assert not any(n.startswith("trf_blocks.0.") for n in names)
    assert {"final_norm.scale", "out_head.weight"} <= names and "tok_emb.weight" not in names
    select_trainable(model, "head")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "out_head.weight",
        "out_head.bias",
    }
    with pytest.raises(InputError, match="last-N"):
        select_trainable(model, "middle")
    with pytest.raises(InputError, match="1..3"):
        select_trainable(model, "last-7")


def test_classification_tokens_in_counts_the_non_padding_inputs():
    split = Split([[1, 2, 3], [4], [5, 6]], [0, 1, 0])
    task = ClassificationTask({"train": split}, pad_id=256, batch_size=3)
    batch = task.next_batch()
    assert batch[0].shape == (3, 3) and task.tokens_in(batch) == 3 + 1 + 2  # not the 9 padded


def test_confusion_matrix_rows_are_true_classes():
    assert confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 2) == [[1, 1], [1, 2]]


def test_cli_trains_a_classifier_and_classify_uses_it(tmp_path, base_ckpt, capsys):
    data = keyword_data(tmp_path / "reviews.tsv")
    out = tmp_path / "run"
    code = main(
        [
            "finetune", "classify", "--checkpoint", str(base_ckpt), "--data", str(data),
            "--out", str(out), "--epochs", "6", "--batch-size", "8", "--lr", "3e-3",
            "--train", "all", "--seed", "1",
        ]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert results["train_accuracy"] >= 0.9 and results["test_accuracy"] >= 0.8
    assert results["sizes"] == {"train": 112, "val": 16, "test": 32}
    assert len(results["epochs"]) == 7  # before training + once per epoch
    assert all("val_accuracy" in e and "test_loss" in e for e in results["epochs"])
    assert sum(map(sum, results["confusion_matrix"])) == 32
    assert (out / "confusion_matrix.png").stat().st_size > 0 and (out / "accuracy.png").exists()
    ckpt = load_checkpoint(out)
    assert ckpt.meta["task"] == "classify" and ckpt.meta["labels"] == ["neg", "pos"]
    capsys.readouterr()
    assert (
        main(["classify", "--checkpoint", str(out), "so good and really good", "bad bad plot"]) == 0
    )
    assert capsys.readouterr().out.split() == ["pos", "neg"]
    texts = tmp_path / "texts.txt"
    texts.write_text("a good movie\n\nthe bad plot\n")
    assert main(["classify", "--checkpoint", str(out), "--file", str(texts)]) == 0
    assert capsys.readouterr().out.split() == ["pos", "neg"]


def test_append_eot_ends_every_text_with_the_eot_token_and_classify_uses_it(tmp_path, base_ckpt):
    tok = ByteTokenizer()
    ids, cut = encode_texts(["ab", "abcdef"], tok, 4, append_eot=True)
    assert ids == [[97, 98, tok.eot_id], [97, 98, 99, tok.eot_id]] and cut == 1
    data = keyword_data(tmp_path / "reviews.tsv", n=40)
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--epochs", "1", "--append-eot"]
    assert main(["finetune", "classify", "--checkpoint", str(base_ckpt), *args]) == 0
    clf = Classifier(out)
    assert clf.append_eot and load_checkpoint(out).meta["append_eot"] is True
    # The saved classifier reads the state at the appended token, as training did.
    x = torch.tensor([[*tok.encode_ordinary("a good movie"), tok.eot_id]])
    with torch.no_grad():
        want = classify_logits(clf.model, x, torch.tensor([x.shape[1]])).softmax(-1)
    torch.testing.assert_close(clf.probabilities(["a good movie"]), want)


def test_lora_classifier_saves_adapters_and_a_standard_merged_checkpoint(tmp_path, base_ckpt):
    from scratchllm.finetune import load_with_adapters
    from scratchllm.finetune.classify import ClassifyOptions, finetune_classify

    data = keyword_data(tmp_path / "reviews.tsv", n=80)
    out = tmp_path / "lora"
    opts = ClassifyOptions(
        checkpoint=str(base_ckpt), data=str(data), out=str(out), epochs=1, lr=1e-2,
        lora_rank=4, lora_alpha=8, batch_size=8,
    )  # fmt: skip
    r = finetune_classify(opts)
    assert r["train"] == "lora+head" and r["trainable_parameters"] < r["total_parameters"] / 5
    assert (out / "adapters" / "adapters.safetensors").exists()
    assert (out / "checkpoint" / "adapters.safetensors").exists()
    merged = load_checkpoint(out)  # a standard checkpoint: plain Linear layers
    unmerged, _, meta = load_with_adapters(out / "adapters")
    assert meta["labels"] == ["neg", "pos"]
    x, lengths = pad_right([[1, 2, 3, 4], [5, 6]], 256)
    torch.testing.assert_close(
        classify_logits(merged.model, x, lengths),
        classify_logits(unmerged, x, lengths),
        rtol=1e-5,
        atol=1e-5,
    )
    base = load_checkpoint(base_ckpt).model  # the base stays untouched
    assert not torch.equal(
        base.trf_blocks[0].att.qkv.weight, merged.model.trf_blocks[0].att.qkv.weight
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "bad.jsonl",
            '{"text": "hi", "label": "a"}\n{"text": "x", "label"\n',
            "line 2: invalid JSON",
        ),
        ("miss.jsonl", '{"text": "hi", "label": "a"}\n{"text": "yo"}\n', "line 2: field 'label'"),
        ("empty.tsv", "a\thello\nb\t   \n", "line 2: the text is empty"),
        ("notab.tsv", "a\thello\nb hello\n", "line 2: expected 'label<TAB>text'"),
        ("nocol.csv", "label,body\na,hi\n", "no 'text' column"),
        ("one.tsv", "a\thello\na\tworld\n", "only one class"),
    ],
)
def test_bad_data_is_an_input_error_naming_the_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        label_names(load_labeled(path))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, base_ckpt, capsys):
    one = tmp_path / "one.tsv"
    one.write_text("a\thello\na\tworld\n")
    args = ["finetune", "classify", "--checkpoint", str(base_ckpt), "--out", str(tmp_path / "o")]
    assert main([*args, "--data", str(one)]) == 2
    err = capsys.readouterr().err
    assert "only one class" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["classify", "--checkpoint", str(base_ckpt), "hello"]) == 2  # not a classifier
    assert "not a classifier" in capsys.readouterr().err


def test_classify_rejects_unseen_labels_and_empty_texts(tmp_path, base_ckpt, capsys):
    from scratchllm.finetune.classify import ClassifyOptions, finetune_classify

    data = keyword_data(tmp_path / "reviews.tsv", n=40)
    out = tmp_path / "run"
    finetune_classify(
        ClassifyOptions(checkpoint=str(base_ckpt), data=str(data), out=str(out), epochs=0.2)
    )
    gold = tmp_path / "gold.tsv"
    gold.write_text("pos\tgood\nneutral\tso so\n")
    assert main(["classify", "--checkpoint", str(out), "--eval", str(gold)]) == 2
    assert "record 2: label 'neutral'" in capsys.readouterr().err
    assert main(["classify", "--checkpoint", str(out), "fine", "  "]) == 2
    assert "text 2 is empty" in capsys.readouterr().err
    long = "good " * 100  # 500 bytes > the 128-token context: cut with a warning, not a crash
    assert main(["classify", "--checkpoint", str(out), long]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 text longer than" in err and "was cut" in err  # "1 text", not "1 texts"


def test_csv_and_jsonl_load_with_quotes_and_extra_fields(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('id,text,label\n1,"hello, world",pos\n2,"say ""hi""",neg\n')
    data = load_labeled(csv_file)
    assert data.texts == ["hello, world", 'say "hi"'] and data.labels == ["pos", "neg"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": 1, "x": 0}\n\n{"text": "b", "label": 0}\n')
    data = load_labeled(jsonl)
    assert data.texts == ["a", "b"] and data.labels == ["1", "0"]
