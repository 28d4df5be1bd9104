"""Evaluation (issue: evaluation): bits per byte, task files, CORE's arithmetic, the command.

Tiny random models throughout; the cross-checks against transformers and lm-eval are in
test_evaluate_parity.py.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.config import ModelConfig
from scratchllm.evaluate import (
    CORE_TASKS,
    ItemResult,
    Span,
    TaskResult,
    TaskSpec,
    centered,
    core_score,
    core_suite,
    evaluate_task,
    evaluate_tasks,
    evaluate_text,
    fewshot_indices,
    load_items,
    render,
    score_spans,
)
from scratchllm.evaluate.tasks import subset
from scratchllm.evaluate.text import windows
from scratchllm.model import GPTModel
from scratchllm.tokenizers import ByteTokenizer, Tokenizer
from scratchllm.tokenizers.train import train_bpe

TEXT = "Héllo, wörld! The quick brown fox jumps over the lazy dog. 😀 " * 3


def tiny_model(vocab_size: int, context_length: int = 64, seed: int = 0, **kw) -> GPTModel:
    """A random GPT whose norms and biases are moved off 1/0, so that every part matters."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
        tie_embeddings=True,
        **kw,
    )
    model = GPTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def small_bpe(data_dir: Path, vocab_size: int = 400) -> Tokenizer:
    text = (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")
    return train_bpe([text], vocab_size)


def direct_nats(model: GPTModel, ids: list[int]) -> float:
    """Total NLL of ids[1:] given what precedes, in one plain forward pass."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(x)[0]
    return float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


# -- held-out text -------------------------------------------------------------------------------
def test_bpb_of_a_byte_model_is_its_loss_over_ln2(one_thread):
    model = tiny_model(257, context_length=256)
    result = evaluate_text(model, ByteTokenizer(), TEXT)
    n = len(TEXT.encode("utf-8"))
    assert result.tokens == result.bytes == n  # every byte scored, the first one included
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2), rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    expected = direct_nats(model, [256, *TEXT.encode("utf-8")])  # after <|endoftext|>
    assert result.nats == pytest.approx(expected, rel=1e-5)


def test_bpb_counts_the_same_bytes_under_two_tokenizers(data_dir, one_thread):
    bpe = small_bpe(data_dir)
    text = TEXT + "<|endoftext|>" + "A second document. Naïve café."
    byte_result = evaluate_text(tiny_model(257, 128), ByteTokenizer(), text)
    bpe_result = evaluate_text(tiny_model(bpe.vocab_size, 128), bpe, text)
    n = len(text.encode("utf-8")) - len(b"<|endoftext|>")  # a special token is no text
    assert byte_result.bytes == bpe_result.bytes == n
    assert byte_result.tokens == n and bpe_result.tokens < n  # BPE: fewer, longer tokens
    for r in (byte_result, bpe_result):
        assert r.bits_per_byte == pytest.approx(r.nats / (math.log(2) * n))


@pytest.mark.parametrize("n,window,stride", [(2, 8, 4), (9, 8, 8), (50, 8, 3), (50, 8, 1)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window + 1 and begin < first < end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_sliding_window_loss_equals_direct_windows(one_thread):
    model = tiny_model(257, context_length=32)
    text = TEXT * 2
    result = evaluate_text(model, ByteTokenizer(), text, stride=10)
    ids = [256, *text.encode("utf-8")]
    expected = 0.0
    for begin, end, first in windows(len(ids), 32, 10):  # each window by hand
        chunk = ids[begin:end]
        logits = model(torch.tensor([chunk[:-1]]))[0].detach()
        nll = F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="none")
        expected += float(nll[first - begin - 1 :].sum())
    assert result.tokens == len(ids) - 1
    assert result.nats == pytest.approx(expected, rel=1e-5)
    wide = evaluate_text(model, ByteTokenizer(), text, stride=32)  # less context per token
    assert wide.tokens == result.tokens and wide.nats != pytest.approx(result.nats, rel=1e-6)


# -- the engine ----------------------------------------------------------------------------------
ROPE = dict(pos_embedding="rope", norm="rmsnorm", ffn="swiglu", n_kv_heads=2, bias=False)


@pytest.mark.parametrize("window", [48, 300])  # 300: the packed groups share bins too
@pytest.mark.parametrize("shape", [{}, ROPE], ids=["gpt2", "llama"])
def test_shared_prefixes_bins_and_batching_give_the_same_log_probs(one_thread, shape, window):
    model = tiny_model(257, context_length=window, **shape)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (20,), generator=g).tolist()
    groups = []
    for k in range(5):  # options of different lengths after a shared prefix
        opts = [torch.randint(0, 256, (3 + j + k,), generator=g).tolist() for j in range(3)]
        groups.append([Span(prefix + o, len(prefix)) for o in opts])
    groups.append([Span(prefix + [1, 2], 21), Span(prefix + [1], 20)])  # one inside another
    groups += [[Span([5, 6, 7], 1)], [Span([8, 9], 1)]]  # short rows, to join into bins
    plain = score_spans(model, groups, pack=False, batch_tokens=1)
    packed = score_spans(model, groups, pack=True, batch_tokens=window + 1)
    assert plain.rows == sum(len(g) for g in groups)
    assert packed.rows < len(groups) if window == 48 else packed.rows == 1  # 199 tokens in all
    for ga, gb, group in zip(plain.groups, packed.groups, groups, strict=True):
        for a, b, span in zip(ga, gb, group, strict=True):
            direct = model(torch.tensor([list(span.ids[:-1])]))[0].detach().log_softmax(-1)
            want = direct[range(span.first - 1, len(span.ids) - 1), list(span.ids[span.first :])]
            assert torch.allclose(torch.from_numpy(a.logprobs), want.double(), atol=1e-5)
            assert torch.allclose(torch.from_numpy(b.logprobs), want.double(), atol=1e-5)
            assert (a.greedy == b.greedy).all()


def test_a_long_prompt_loses_its_left_end_and_is_warned_about_once(tmp_path, caplog, one_thread):
    model = tiny_model(257, context_length=16)
    ids = list(range(40, 70))
    (score,) = score_spans(model, [[Span(ids, 25)]]).groups[0]
    kept = ids[-17:]  # the window reads 16 tokens and predicts the 17th
    logits = model(torch.tensor([kept[:-1]]))[0].detach().log_softmax(-1)
    want = logits[range(25 - 13 - 1, 16), kept[25 - 13 :]]
    assert torch.allclose(torch.from_numpy(score.logprobs), want.double(), atol=1e-5)
    path = tmp_path / "lm.jsonl"
    path.write_text((json.dumps({"context": "x" * 40, "continuation": "y"}) + "\n") * 3)
    spec = TaskSpec("long", path, "language_modeling")
    with caplog.at_level(logging.WARNING):
        (result,) = evaluate_tasks(model, ByteTokenizer(), [(spec, None)])
    assert result.truncated == 3
    lines = [r for r in caplog.records if "window" in r.getMessage()]
    assert len(lines) == 1 and "3 prompts" in lines[0].getMessage()


# -- task files, prompts, tokenization -----------------------------------------------------------
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MC = [{"query": f"q{i}", "choices": [f"a{i}", f"b{i}", f"c{i}"], "gold": i % 3} for i in range(20)]


def test_fewshot_examples_never_include_the_item_and_are_reproducible():
    for index in range(20):
        shots = fewshot_indices(20, index, 10)
        assert index not in shots and len(set(shots)) == 10
        assert shots == fewshot_indices(20, index, 10)
    assert fewshot_indices(20, 3, 10, seed=1) != fewshot_indices(20, 3, 10, seed=2)
    assert subset(100, 10) == subset(100, 10) and len(set(subset(100, 10))) == 10
    assert subset(100, 10) != list(range(10)) and subset(5, 10) == list(range(5))


def test_prompts_follow_the_three_shapes(tmp_path):
    mc = TaskSpec("mc", tmp_path / "x", "multiple_choice", shots=2, delimiter="\nAnswer: ")
    a, b = fewshot_indices(20, 7, 2)
    choices = render(mc, MC, 7)
    prefix = (
        f"q{a}\nAnswer: {MC[a]['choices'][a % 3]}\n\nq{b}\nAnswer: {MC[b]['choices'][b % 3]}\n\n"
    )
    assert [c.context for c in choices] == [prefix + "q7\nAnswer: "] * 3
    assert [c.continuation for c in choices] == ["a7", "b7", "c7"]
    schema_items = [{"context_options": ["A", "B"], "continuation": "end.", "gold": 1}] * 2
    schema = render(TaskSpec("s", tmp_path / "x", "schema", shots=1), schema_items, 0)
    assert [(c.context, c.continuation) for c in schema] == [
        ("B end.\n\nA ", "end."),
        ("B end.\n\nB ", "end."),
    ]
    lm_items = [{"context": " ctx  ", "continuation": "word"}] * 2
    (lm,) = render(TaskSpec("l", tmp_path / "x", "language_modeling", shots=1), lm_items, 1)
    assert (lm.context, lm.continuation) == ("ctx word\n\nctx ", "word")


def test_continuation_tokens_follow_the_context(gpt2_tokenizer, one_thread):
    from scratchllm.evaluate.scoring import _Encoder
    from scratchllm.evaluate.tasks import Choice

    choice = Choice("Question: capital of France?\nAnswer: ", "Paris", "Paris")
    span, core, lm = _Encoder(gpt2_tokenizer).span(choice)
    assert gpt2_tokenizer.decode(span.ids[-core:]) == " Paris" and core == lm == 1
    span, core, lm = _Encoder(ByteTokenizer()).span(choice)
    assert (core, lm) == (5, 6)  # bytes: CORE scores "Paris", lm-eval " Paris"


def test_a_task_reports_accuracy_centred_score_and_lm_eval_metrics(tmp_path, one_thread):
    path = write_jsonl(tmp_path / "mc.jsonl", MC)
    spec = TaskSpec("mc", path, "multiple_choice", shots=1, baseline=100 / 3)
    model = tiny_model(257)
    result = evaluate_task(model, ByteTokenizer(), spec, limit=12)
    assert len(result.items) == 12 and len({i.index for i in result.items}) == 12
    for item in result.items:
        assert item.pred == max(range(3), key=lambda k: item.mean_logprobs[k])
        assert item.acc_pred == max(range(3), key=lambda k: item.loglikelihoods[k])
        assert item.correct == (item.pred == item.gold)
    assert result.accuracy == sum(i.correct for i in result.items) / 12
    assert result.centered == pytest.approx((result.accuracy - 1 / 3) / (2 / 3))
    again = evaluate_task(model, ByteTokenizer(), spec, limit=12)
    assert [i.to_dict() for i in again.items] == [i.to_dict() for i in result.items]


def test_centred_score_and_core_arithmetic():
    assert centered(0.5, 50) == 0.0 and centered(1.0, 25) == 1.0
    assert centered(0.625, 25) == pytest.approx(0.5) and centered(0.1, 0) == pytest.approx(0.1)
    assert centered(0.25, 50) == pytest.approx(-0.5)  # below chance is negative
    spec = TaskSpec("t", Path("x"), "multiple_choice", baseline=25)
    items = [ItemResult(i, correct=i < 5, pred=0, gold=0 if i < 5 else 1) for i in range(8)]
    result = TaskResult(spec, items)
    assert result.accuracy == 5 / 8 and result.centered == pytest.approx(0.5)
    assert core_score([0.5, 0.0, 0.25]) == pytest.approx(0.25) and math.isnan(core_score([]))


def test_core_suite_has_the_readme_settings_and_every_file_reads(data_dir):
    specs = core_suite(["core"], data_dir / "eval")
    assert len(specs) == len(CORE_TASKS) == 18
    by_name = {s.name: s for s in specs}
    assert by_name["arc_easy"].shots == 10 and by_name["arc_easy"].delimiter == "\nAnswer: "
    assert by_name["bigbench_language_identification"].baseline == 25
    assert by_name["boolq"].baseline == 62 and by_name["copa"].shots == 0
    assert (
        by_name["winogrande"].type == "schema" and by_name["jeopardy"].type == "language_modeling"
    )
    lines = {s.name: len(load_items(s)) for s in specs}  # every line of every file checks out
    assert lines["copa"] == 100 and lines["bigbench_qa_wikidata"] == 20321


# -- the command and its bad inputs --------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(257), ByteTokenizer())
    return tmp_path / "ckpt"


def test_evaluate_command_writes_results_table_and_chart(tmp_path, checkpoint, capsys, one_thread):
    tasks = write_jsonl(tmp_path / "mine.jsonl", MC)
    text = tmp_path / "held.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "eval"
    code = main(
        ["evaluate", "--checkpoint", str(checkpoint), "--out", str(out), "--text", str(text)]
        + ["--task-file", str(tasks), "--type", "multiple_choice", "--shots", "2"]
        + ["--baseline", "33.3", "--limit", "6", "--log-samples"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    (task,) = results["tasks"]
    assert task["name"] == "mine" and task["items"] == 6 and task["shots"] == 2
    assert results["core"] == pytest.approx(task["centered"])
    assert task["centered"] == pytest.approx((task["accuracy"] - 0.333) / (1 - 0.333))
    assert {"acc", "acc_norm", "acc_bytes"} <= set(task)
    assert results["text"][0]["bytes"] == len(TEXT.encode("utf-8"))
    assert (out / "centered.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "samples" / "mine.jsonl").read_text().splitlines()) == 6
    assert "CORE" in printed and "bpb" in printed and "mine" in printed


BAD_LINES = {
    "malformed": (
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": oops}\n',
        ":2: invalid JSON",
    ),
    "shape": (
        '{"context_options": ["a", "b"], "continuation": "c", "gold": 0}\n',
        "field 'query' is missing",
    ),
    "gold": (
        '{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"], "gold": 2}\n',
        ":2: field 'gold' is 2",
    ),
    "type": ('{"query": "q", "choices": "ab", "gold": 0}\n', "field 'choices' must be a list"),
    "empty": ("\n", "no items"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_task_files_exit_2_naming_line_and_field(tmp_path, checkpoint, capsys, case):
    content, expected = BAD_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--task-file",
        str(path),
    ]
    assert main([*args, "--type", "multiple_choice"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and str(path) in err
    assert not out.exists()  # nothing half-written


def test_bad_checkpoint_task_names_and_flags_exit_2(tmp_path, checkpoint, data_dir, capsys):
    import shutil

    out = tmp_path / "eval"
    base = ["evaluate", "--checkpoint", str(checkpoint), "--out", str(out)]
    base += ["--eval-dir", str(data_dir / "eval")]
    shutil.rmtree(checkpoint / "tokenizer")
    assert main([*base, "--tasks", "copa"]) == 2
    assert "tokenizer/ is missing" in capsys.readouterr().err
    save_checkpoint(checkpoint, tiny_model(257), ByteTokenizer())
    for args, expected in [
        (["--tasks", "copa", "nosuchtask"], "'nosuchtask': unknown task"),
        (["--task-file", str(tmp_path / "none.jsonl"), "--type", "schema"], "no such file"),
        (["--task-file", str(tmp_path / "x.jsonl")], "--type is needed"),
        (["--text", str(tmp_path / "none.txt")], "no such file"),
        ([], "nothing to evaluate"),
    ]:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


# -- during pretraining --------------------------------------------------------------------------
def test_pretrain_eval_tasks_put_core_and_bpb_in_the_metrics(tmp_path, data_dir, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(context_length=32, emb_dim=32, n_heads=2, n_layers=1)))
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(data_dir / "corpora" / "the-verdict.txt")]
    args += ["--model", str(config), "--tokenizer", "bytes", "--out", str(out)]
    args += ["--max-steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1"]
    args += ["--sample-tokens", "0", "--eval-tasks", "copa", "winograd", "--eval-limit", "3"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "core" in printed.out + printed.err and "val_bpb" in printed.out + printed.err
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").open()) if r["kind"] == "eval"]
    assert evals and all({"core", "core_copa", "core_winograd", "val_bpb"} <= set(r) for r in evals)
    for r in evals:
        assert r["core"] == pytest.approx((r["core_copa"] + r["core_winograd"]) / 2)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-3)  # bytes
    assert (out / "loss.png").exists()
    bad = [a if a != "winograd" else "nosuch" for a in args]
    bad[bad.index(str(out))] = str(tmp_path / "run2")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "eval-tasks" in err and "'nosuch': unknown task" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run2" / "checkpoint").exists()
