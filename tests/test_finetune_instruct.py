"""Instruction fine-tuning (ch. 7): templates, the masking collate, the loop, the judge client."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.data.instruction import (
    IGNORE_INDEX,
    Example,
    collate_instructions,
    encode_examples,
    format_prompt,
    load_records,
)
from scratchllm.finetune.instruct import InstructionTask
from scratchllm.finetune.judge import JudgeClient, parse_score, score_responses
from scratchllm.inference.chat import ALPACA_STOPS, chat_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


ENTRY = {"instruction": "Rewrite the sentence.", "input": "It is hot.", "output": "It's warm."}


def test_alpaca_and_phi3_templates_match_the_book():
    assert format_prompt(ENTRY, "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\n"
        "It is hot.\n\n### Response:\n"
    )
    no_input = {**ENTRY, "input": ""}
    assert "### Input" not in format_prompt(no_input, "alpaca")
    assert (
        format_prompt(ENTRY, "phi3")
        == "<|user|>\nRewrite the sentence.\nIt is hot.\n<|assistant|>:\n"
    )
    with pytest.raises(InputError, match="--template"):
        format_prompt(ENTRY, "chatml")


def test_collate_masks_exactly_the_right_positions():
    pad = 50256
    batch = [Example([1, 2, 3, 4, 5], prompt_len=3), Example([6, 7], prompt_len=1)]
    x, y = collate_instructions(batch, pad)
    # Each example gets one end-of-text; the batch pads to the longest (6 - 1 = 5 inputs).
    assert x.tolist() == [[1, 2, 3, 4, 5], [6, 7, pad, pad, pad]]
    assert y.tolist() == [[2, 3, 4, 5, pad], [7, pad, -100, -100, -100]]
    x, y = collate_instructions(batch, pad, mask_prompt=True)
    # Targets at positions 0..prompt_len-2 predict prompt tokens 1..prompt_len-1: masked.
    assert y.tolist() == [[-100, -100, 4, 5, pad], [7, pad, -100, -100, -100]]
    x, y = collate_instructions(batch, pad, allowed_max_length=3)
    assert x.shape == (2, 3) and y.tolist() == [[2, 3, 4], [7, pad, -100]]


def test_encoding_counts_truncation_and_drops_examples_without_response():
    tok = ByteTokenizer()
    long = {"instruction": "x" * 40, "input": "", "output": "y" * 40}
    short = {"instruction": "q", "input": "", "output": "a"}
    examples, counts = encode_examples([long, short], tok, "phi3", max_length=60)
    assert counts == {"truncated": 1, "dropped": 0} and len(examples[0].ids) == 60
    examples, counts = encode_examples([long, short], tok, "phi3", 30, mask_prompt=True)
    assert counts == {"truncated": 1, "dropped": 1} and len(examples) == 1


def test_a_cut_example_ends_on_a_response_token_and_a_whole_one_on_end_of_text():
    tok = ByteTokenizer()
    long = {"instruction": "q", "input": "", "output": "y" * 40 + "z"}
    short = {"instruction": "q", "input": "", "output": "a"}
    full = tok.encode_ordinary(format_prompt(long, "phi3") + long["output"])
    limit = len(full) - 5  # the cut falls inside the response
    examples, counts = encode_examples([long, short], tok, "phi3", limit)
    assert counts == {"truncated": 1, "dropped": 0}
    x, y = collate_instructions(examples, tok.eot_id)
    # As the book's collate: append end-of-text, then cut. Inputs are the first `limit` tokens,
    # targets the next `limit`, so the last target is a response token, not an end-of-text.
    assert x[0].tolist() == full[:limit]
    assert y[0].tolist() == full[1 : limit + 1]
    assert tok.eot_id not in y[0].tolist()
    real = [t for t in y[1].tolist() if t != IGNORE_INDEX]
    assert real[-1] == tok.eot_id and real.count(tok.eot_id) == 1  # whole: learns to stop
    # --mask-prompt: a prompt of exactly `limit` tokens still predicts its first response token.
    prompt_len = len(tok.encode_ordinary(format_prompt(long, "phi3")))
    examples, counts = encode_examples([long], tok, "phi3", prompt_len, mask_prompt=True)
    _, y = collate_instructions(examples, tok.eot_id, mask_prompt=True)
    assert counts["dropped"] == 0 and [t for t in y[0].tolist() if t != IGNORE_INDEX] == [ord("y")]


def test_instruction_tokens_in_counts_the_non_padding_inputs():
    batch = [Example([1, 2, 3, 4, 5], prompt_len=3), Example([6, 7], prompt_len=1)]
    task = InstructionTask({"train": batch}, pad_id=50256, batch_size=2, mask_prompt=True)
    # 5 + 2 real inputs; the 3 padding inputs of row 2 are not counted, nor is the prompt
    # masking (it changes the targets, not what the model reads).
    assert task.tokens_in(task.next_batch()) == 7


def test_the_shuffled_task_reshuffles_each_epoch_and_resumes_exactly():
    examples = [Example([i + 1, i + 2], prompt_len=1) for i in range(10)]

    def make():
        return InstructionTask({"train": examples}, pad_id=0, batch_size=4, seed=3)

    def firsts(batch):
        return batch[0][:, 0].tolist()  # example i starts with token i + 1

    task = make()
    assert task.steps_per_epoch() == 3
    epoch0 = [firsts(task.next_batch()) for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(sum(epoch0, [])) == list(range(1, 11))  # every example once
    state = task.state_dict()
    rest = [firsts(task.next_batch()) for _ in range(4)]
    assert sorted(sum(rest[:3], [])) == list(range(1, 11)) and rest[:3] != epoch0
    resumed = make()
    resumed.load_state_dict(state)
    assert [firsts(resumed.next_batch()) for _ in range(4)] == rest
    with pytest.raises(InputError, match="instruction data: the training split is empty"):
        InstructionTask({"train": []}, pad_id=0, batch_size=4)


def test_chat_prompt_for_one_user_message_is_the_training_prompt():
    # A chat user message is an instruction with no input: its prompt must be exactly the
    # prompt part of a training example, or the tuned model is served a format it never saw.
    tok = ByteTokenizer()
    record = {"instruction": ENTRY["instruction"], "input": "", "output": ENTRY["output"]}
    [example], _ = encode_examples([record], tok, "alpaca", max_length=512)
    ids, stops = chat_prompt(tok, [{"role": "user", "content": record["instruction"]}])
    assert ids == example.ids[: example.prompt_len]
    assert stops == ALPACA_STOPS and "\n\n### Input:" in stops
    # A system message replaces the preamble and nothing else.
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.decode(chat_prompt(tok, system)[0])
    assert text == "Be brief." + format_prompt({"instruction": "Hi"}).split("request.", 1)[1]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n', "line 2"),
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', "record 2: field 'output'"),
        ('[{"instruction": "a", "output": 3}]', "record 1: field 'output' must be a string"),
        ('[{"instruction": " ", "output": "b"}]', "record 1: field 'instruction' is empty"),
        ("[]", "no records"),
    ],
)
def test_malformed_instruction_data_names_the_record(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_records(path)


def test_book_data_loads(data_dir):
    records = load_records(data_dir / "instruct" / "instruction-data.json")
    assert len(records) == 1100 and all(
        set(r) >= {"instruction", "input", "output"} for r in records
    )


def test_instruction_finetuning_lowers_held_out_loss(tmp_path, data_dir):
    records = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())[:240]
    data = tmp_path / "subset.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=192, emb_dim=48, n_heads=2, n_layers=2, drop_rate=0.0
    )
    save_checkpoint(tmp_path / "base", GPTModel(config), ByteTokenizer(), {})
    out = tmp_path / "run"
    code = main(
        [
            "finetune", "instruct", "--checkpoint", str(tmp_path / "base"), "--data", str(data),
            "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "3e-3",
            "--generate-tokens", "4", "--eval-batches", "3",
        ]
    )  # fmt: skip
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    assert r["sizes"] == {"train": 204, "val": 12, "test": 24}
    assert r["truncated"] > 0  # the Alpaca preamble alone is ~130 bytes
    assert r["first_eval"]["val_loss"] == pytest.approx(math.log(257), abs=0.3)  # untrained
    assert r["val_loss"] < r["first_eval"]["val_loss"] - 1.0
    assert math.isfinite(r["test_loss"])
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 24 and all("model_response" in e for e in responses)
    assert (out / "loss.png").exists() and (out / "metrics.jsonl").exists()


class FakeJudge(BaseHTTPRequestHandler):
    replies: list[str] = []
    requests: list[tuple[str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append((self.path, body))
        content = FakeJudge.replies[(len(FakeJudge.requests) - 1) % len(FakeJudge.replies)]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge():
    FakeJudge.requests = []
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_parse_score():
    assert parse_score("85") == 85.0
    assert parse_score("Score: 72.5 out of 100") == 72.5
    assert parse_score("120") == 100.0
    assert parse_score("no idea") is None


def test_judge_client_scores_through_a_local_endpoint(fake_judge):
    FakeJudge.replies = ["85", "Score: 40.", "I cannot rate this."]
    client = JudgeClient(fake_judge, model="judge-model")
    entries = [{**ENTRY, "model_response": f"answer {i}"} for i in range(3)]
    result = score_responses(client, entries)
    assert result["scores"] == [85.0, 40.0, None]
    assert result["mean_score"] == 62.5 and result["unparsed"] == 1
    path, body = FakeJudge.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model"
    prompt = body["messages"][0]["content"]
    assert "answer 0" in prompt and "It's warm." in prompt and "0 to 100" in prompt


def test_judge_cli_and_unreachable_server(tmp_path, fake_judge, capsys):
    FakeJudge.replies = ["90"]
    responses = tmp_path / "test_responses.json"
    responses.write_text(json.dumps([{**ENTRY, "model_response": "It's warm."}]))
    assert main(["finetune", "judge", "--responses", str(responses), "--url", fake_judge]) == 0
    assert "mean score: 90.00" in capsys.readouterr().out
    saved = json.loads((tmp_path / "test_responses.scores.json").read_text())
    assert saved["scores"] == [90.0]
    with pytest.raises(InputError, match="cannot connect"):
        JudgeClient("http://127.0.0.1:9", timeout=5).chat("hi")
