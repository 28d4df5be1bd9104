"""Evaluation cross-checks: held-out loss against transformers, CORE's choices against a
reference written here from the data README's rules on transformers' logits, and lm-eval's
acc / acc_norm against lm-eval itself (its HF backend on the exported model).

One tiny random GPT with a small trained BPE, exported with `export_hf`, serves every test.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_evaluate import small_bpe, tiny_model, write_jsonl  # noqa: E402

from scratchllm.checkpoint import save_checkpoint  # noqa: E402
from scratchllm.evaluate import TaskSpec, evaluate_task, evaluate_text  # noqa: E402
from scratchllm.hub.convert import export_hf  # noqa: E402

WINDOW = 96


COUNTING = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def train_briefly(model: torch.nn.Module, ids: list[int], steps: int = 150) -> None:
    """A few AdamW steps on `ids`: enough to make greedy decoding continue the counting text."""
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 33, (8,), generator=g).tolist()
        x = torch.stack([data[i : i + 32] for i in ix])
        y = torch.stack([data[i + 1 : i + 33] for i in ix])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_dir):
    """(scratchllm model, tokenizer, transformers model, transformers tokenizer, HF folder):
    a tiny GPT with a small BPE, trained briefly on a counting text, exported with export_hf."""
    tmp = tmp_path_factory.mktemp("parity")
    tokenizer = small_bpe(data_dir)
    model = tiny_model(tokenizer.vocab_size, context_length=WINDOW, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_briefly(model, tokenizer.encode(" ".join(COUNTING * 60)))
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(tmp / "ckpt", model, tokenizer)
    export_hf(tmp / "ckpt", tmp / "hf", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    return model, tokenizer, hf, hf_tok, tmp / "hf"


def hf_encode(hf_tok, text: str) -> list[int]:
    return hf_tok(text, add_special_tokens=False).input_ids


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab) log-probabilities of each next token, from transformers."""
    return hf(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)


def test_held_out_loss_equals_transformers_sliding_window_loss(exported, data_dir, one_thread):
    model, tokenizer, hf, hf_tok, _ = exported
    text = (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")[:3000]
    stride = 40
    ours = evaluate_text(model, tokenizer, text, stride=stride)
    # transformers' perplexity guide, with the end-of-text token in front so that the first
    # token is predicted too: windows of WINDOW inputs `stride` apart, each token scored once.
    ids = [hf_tok.eos_token_id, *hf_encode(hf_tok, text)]
    nats, count, prev_end = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + WINDOW + 1, len(ids))
        logprobs = hf_logprobs(hf, ids[begin:end])
        targets = range(prev_end, end)
        nats -= float(sum(logprobs[t - begin - 1, ids[t]] for t in targets))
        count += len(targets)
        prev_end = end
        if end == len(ids):
            break
    assert ours.tokens == count == len(ids) - 1
    assert ours.loss == pytest.approx(nats / count, abs=1e-4)
    assert ours.bytes == len(text.encode("utf-8"))


# -- CORE's rules, written from the data README, on transformers' logits -------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reference_option(hf, hf_tok, context: str, continuation: str) -> tuple[float, bool]:
    """(mean log-prob of the continuation's tokens, whether each is the argmax), the tokens being
    those of `context + continuation` after what `context` alone encodes to, the prompt cut to
    the last WINDOW + 1 tokens (the window reads WINDOW and predicts the next)."""
    full = hf_encode(hf_tok, context + continuation)
    start = common_prefix(hf_encode(hf_tok, context), full)
    cut = max(0, len(full) - WINDOW - 1)
    full, start = full[cut:], max(1, start - cut)
    logprobs = hf_logprobs(hf, full)
    picked = [float(logprobs[t - 1, full[t]]) for t in range(start, len(full))]
    greedy = all(int(logprobs[t - 1].argmax()) == full[t] for t in range(start, len(full)))
    return sum(picked) / len(picked), greedy


def reference_fewshot(items: list[dict], index: int, shots: int) -> list[dict]:
    """nanochat's draw: `shots` other items, random.Random(1234 + index)."""
    others = [i for i in range(len(items)) if i != index]
    return [items[i] for i in random.Random(1234 + index).sample(others, shots)] if shots else []


def reference_core(hf, hf_tok, items: list[dict], task_type: str, shots: int, delim: str):
    """Per item: (pick, correct) by the README's rule for the shape."""
    out = []
    for index, item in enumerate(items):
        examples = reference_fewshot(items, index, shots)
        if task_type == "multiple_choice":
            prefix = "".join(f"{e['query']}{delim}{e['choices'][e['gold']]}\n\n" for e in examples)
            scores = [
                reference_option(hf, hf_tok, prefix + item["query"] + delim, c)[0]
                for c in item["choices"]
            ]
        elif task_type == "schema":
            prefix = "".join(
                f"{e['context_options'][e['gold']]}{delim}{e['continuation']}\n\n" for e in examples
            )
            scores = [
                reference_option(hf, hf_tok, prefix + option + delim, item["continuation"])[0]
                for option in item["context_options"]
            ]
        else:
            prefix = "".join(
                f"{e['context'].strip()}{delim}{e['continuation']}\n\n" for e in examples
            )
            context = prefix + item["context"].strip() + delim
            out.append((None, reference_option(hf, hf_tok, context, item["continuation"])[1]))
            continue
        pick = max(range(len(scores)), key=lambda k: (scores[k], -k))  # lowest loss, first of ties
        out.append((pick, pick == item["gold"]))
    return out


def lm_items(data_dir) -> list[dict]:
    """Ten LAMBADA items, and ten from the counting text the model was trained on: six that
    continue it right and four that do not, so that some items are right and some wrong."""
    lines = (data_dir / "eval" / "lambada_openai.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines[:10]]
    for k in range(10):
        after = COUNTING[(k + 4) % 10] if k < 6 else COUNTING[(k + 7) % 10]
        items.append({"context": " ".join(COUNTING[k : k + 4]) + " ", "continuation": after})
    return items


@pytest.mark.parametrize(
    "task_type,file,shots,delim",
    [
        ("multiple_choice", "arc_easy.jsonl", 2, "\nAnswer: "),
        ("schema", "winograd_wsc.jsonl", 1, " "),
        ("language_modeling", None, 0, " "),
    ],
)
def test_core_choices_equal_the_readme_rules_on_transformers_logits(
    exported, data_dir, tmp_path, one_thread, task_type, file, shots, delim
):
    model, tokenizer, hf, hf_tok, _ = exported
    if file is None:
        items = lm_items(data_dir)
    else:
        lines = (data_dir / "eval" / file).read_text(encoding="utf-8").splitlines()[:20]
        items = [json.loads(line) for line in lines]
    path = write_jsonl(tmp_path / "task.jsonl", items)
    spec = TaskSpec("t", path, task_type, shots=shots, delimiter=delim)
    ours = evaluate_task(model, tokenizer, spec)
    expected = reference_core(hf, hf_tok, items, task_type, shots, delim)
    assert [i.index for i in ours.items] == list(range(len(items)))
    assert [(i.pred, i.correct) for i in ours.items] == expected
    correct = [c for _, c in expected]
    if task_type == "language_modeling":  # the check can tell right from wrong
        assert any(correct) and not all(correct)
    else:
        assert len({p for p, _ in expected}) > 1  # not one option picked every time


# -- lm-eval itself --------------------------------------------------------------------------------
LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_acc_and_acc_norm_equal_lm_eval_item_for_item(exported, data_dir, tmp_path, one_thread):
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate (lm-eval[hf])")
    from lm_eval.tasks import TaskManager

    model, tokenizer, _, _, hf_dir = exported
    lines = (data_dir / "eval" / "copa.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    items = [json.loads(line) for line in lines]
    data = write_jsonl(tmp_path / "copa16.jsonl", items)
    name = "scratchllm_copa_parity"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, data=data))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
        tasks=[name],
        num_fewshot=0,
        batch_size=4,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    spec = TaskSpec("copa16", data, "multiple_choice", shots=0, delimiter=" ")
    ours = evaluate_task(model, tokenizer, spec)
    assert len(samples) == len(ours.items) == 16
    for sample, item, doc in zip(samples, ours.items, items, strict=True):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert item.loglikelihoods == pytest.approx(lls, abs=1e-4)
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        assert item.acc_pred == lls.index(max(lls)) and item.acc_norm_pred == norm.index(max(norm))
        assert float(sample["acc"]) == float(item.acc_pred == item.gold)
        assert float(sample["acc_norm"]) == float(item.acc_norm_pred == item.gold)
    assert ours.acc == pytest.approx(out["results"][name]["acc,none"])
    assert ours.acc_norm == pytest.approx(out["results"][name]["acc_norm,none"])
    # the picks differ between the two rules somewhere, or the comparison shows nothing
    assert any(i.acc_pred != i.acc_norm_pred for i in ours.items) or ours.acc != ours.acc_norm
