"""Chat data for instruction tuning (issue 16, item 4): OpenAI messages and ShareGPT records, the
assistant-only mask, the template shared with `chat`, and bad input."""

import json
from types import SimpleNamespace

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, InputError, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.data.chat import conversation, encode_conversation, encode_conversations, segments
from scratchllm.data.instruction import IGNORE_INDEX, collate_instructions, format_prompt
from scratchllm.inference.chat import ChatSession, chat_prompt
from scratchllm.inference.engine import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Ok?"},
    {"role": "assistant", "content": "No"},
]


def test_collate_masks_every_non_assistant_token():
    tok = ByteTokenizer()
    first = "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"
    second = "\n\n### Instruction:\nOk?\n\n### Response:\n"
    text = first + "Yo" + second + "No"
    (example,), counts = encode_conversations([{"messages": TALK}], tok, 1000)
    assert counts == {"truncated": 0, "dropped": 0}
    assert example.ids == list(text.encode())
    # By hand: the targets are "Yo", "No" and the end-of-text after the last reply; a target at
    # position j predicts token j + 1.
    yo, no = len(first), len(first) + 2 + len(second)
    trained = {yo, yo + 1, no, no + 1, len(text)}
    eot = tok.eot_id
    expected = [
        (list(text.encode()) + [eot])[j + 1] if j + 1 in trained else IGNORE_INDEX
        for j in range(len(text))
    ]
    for mask_prompt in (False, True):  # conversations mask the same way either way
        x, y = collate_instructions([example], eot, mask_prompt)
        assert x[0].tolist() == list(text.encode())
        assert y[0].tolist() == expected
    assert tok.decode([t for t in expected if t not in (IGNORE_INDEX, eot)]) == "YoNo"
    # Batched with a longer Alpaca example: padding is ignored past the first end-of-text.
    other, _ = encode_conversations(
        [{"messages": TALK + [{"role": "user", "content": "x"}, TALK[2]]}], tok, 1000
    )
    _, y = collate_instructions([example, other[0]], eot)
    assert y[0, : len(text)].tolist() == expected
    assert (y[0, len(text) :] == IGNORE_INDEX).all()


def test_a_cut_conversation_keeps_its_mask_and_one_without_a_reply_left_is_dropped():
    tok = ByteTokenizer()
    prompt = len(chat_prompt(tok, TALK[:2])[0])  # the reply "Yo" starts here
    (example,), counts = encode_conversations([{"messages": TALK[:3]}], tok, prompt)
    # Its inputs are the prompt, its one target the reply's first token (the cut target).
    assert counts == {"truncated": 1, "dropped": 0} and len(example.ids) == prompt
    _, y = collate_instructions([example], tok.eot_id)
    assert y[0].tolist() == [IGNORE_INDEX] * (prompt - 1) + [ord("Y")]
    long = [{"role": "user", "content": "x" * 100}, TALK[2]]  # its reply starts past the cut
    examples, counts = encode_conversations(
        [{"messages": TALK[:3]}, {"messages": long}], tok, prompt
    )
    assert counts == {"truncated": 2, "dropped": 1} and examples == [example]
    with pytest.raises(InputError, match="--max-length"):
        encode_conversations([{"messages": long}], tok, prompt)


def test_the_training_render_is_what_chat_renders_for_the_history():
    tok = ByteTokenizer()
    ids, trained = encode_conversation(tok, TALK)
    starts = [i for i in range(len(ids)) if trained[i] and (i == 0 or not trained[i - 1])]
    assert len(starts) == 2
    for k, start in zip((2, 4), starts, strict=True):
        assert ids[:start] == chat_prompt(tok, TALK[:k])[0]
        reply = tok.encode_ordinary(TALK[k]["content"])
        assert ids[start : start + len(reply)] == reply
    # Through a chat session: the system message, the history, then the new user message.
    engine = SimpleNamespace(context_length=1000, tokenizer=tok)
    session = ChatSession(engine, SamplingParams(max_tokens=10), system="Be brief.")
    session.history = TALK[1:3]
    prompt, _, dropped = session.prompt("Ok?")
    assert dropped == 0 and prompt == ids[: starts[1]]
    # One user turn is exactly the Alpaca record's prompt.
    single = encode_conversation(tok, TALK[1:3])[0]
    alpaca = format_prompt({"instruction": "Hi", "input": ""})
    assert tok.decode(single) == alpaca + "Yo"


def test_a_checkpoint_chat_template_is_used_for_training_and_for_chat(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from scratchllm.tokenizers.hf import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hi there. Be brief. Yo, ok? No. user assistant system"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = {"eos_token": "<|im_end|>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = HFTokenizer.from_directory(tmp_path)
    pieces = segments(hf, TALK)
    assert [text for text, train in pieces if train] == ["Yo<|im_end|>\n", "No<|im_end|>\n"]
    assert "".join(text for text, _ in pieces) == hf.apply_chat_template(TALK, False)
    ids, trained = encode_conversation(hf, TALK)
    starts = [i for i in range(len(ids)) if trained[i] and not trained[i - 1]]
    for k, start in zip((2, 4), starts, strict=True):
        assert ids[:start] == chat_prompt(hf, TALK[:k])[0]
    assert hf.decode([t for t, m in zip(ids, trained, strict=True) if m]) == (
        "Yo<|im_end|>\nNo<|im_end|>\n"
    )


def _sharegpt(turns):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in turns]}


def test_sharegpt_records_read_as_messages():
    assert conversation(_sharegpt(TALK), "f.jsonl", "line 1") == TALK
    trailing = TALK + [{"role": "user", "content": "bye"}]  # nothing to train after the reply
    assert conversation({"messages": trailing}, "f.jsonl", "line 1") == TALK


@pytest.fixture
def base(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=257, context_length=192, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0
    )
    save_checkpoint(tmp_path / "base", GPTModel(config), ByteTokenizer(), {})
    return tmp_path / "base"


def _finetune(base, data, out):
    return main(
        [
            "finetune", "instruct", "--checkpoint", str(base), "--data", str(data),
            "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--generate-tokens", "2", "--eval-batches", "1",
        ]
    )  # fmt: skip


@pytest.mark.parametrize("form", ["openai", "sharegpt"])
def test_finetune_instruct_on_chat_data(tmp_path, base, form):
    records = []
    for i in range(20):
        talk = [
            *([{"role": "system", "content": "Be brief."}] if i % 2 else []),
            {"role": "user", "content": f"Add {i} and 1."},
            {"role": "assistant", "content": str(i + 1)},
            {"role": "user", "content": "Double it."},
            {"role": "assistant", "content": str(2 * (i + 1))},
        ]
        records.append({"messages": talk} if form == "openai" else _sharegpt(talk))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    assert _finetune(base, data, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == "chat" and results["template"] == "alpaca"
    responses = json.loads((out / "test_responses.json").read_text())
    assert responses and all("model_response" in r and "messages" in r for r in responses)
    assert responses[0]["instruction"] == "Double it."


@pytest.mark.parametrize(
    "line, message",
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "'content' must be a string"),
        ({"conversations": [{"from": "bot", "value": "Hi"}]}, "unknown role 'bot'"),
        ({"conversations": [{"from": "human", "value": ["Hi"]}]}, "'value' must be a string"),
        ({"text": "Hi"}, "field 'messages'"),
    ],
)
def test_bad_chat_data_names_file_and_line_and_exits_2(tmp_path, base, capsys, line, message):
    good = {"messages": TALK}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    assert _finetune(base, data, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{data}: line 2" in err and message in err
    with pytest.raises(InputError, match="line 2"):
        conversation(line, data, "line 2")
