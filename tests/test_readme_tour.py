"""The README's commands, as written: each bash block is read from README.md, its `scratchllm`
lines run with only paths, step counts and model sizes substituted (the table below), and each
must exit 0 with the output it promises. A README change that breaks a command breaks this test.

Not run here: `download` (network), `serve` (tests/test_serve.py, test_webchat.py) and torchrun
(tests/test_distributed.py). `models/gpt2` (what `download gpt2` fetches) is stood in for by a
tiny model with GPT-2's tokenizer exported to a Hugging Face folder."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import main
from scratchllm.train.throughput import cpu_has_native_bf16
from tests.test_newcomer import Terminal, small_model

README = Path(__file__).resolve().parents[1] / "README.md"

# README text -> what the test runs instead ({data}: $SCRATCHLLM_TEST_DATA). Only paths, step
# counts, model sizes and (where bf16 is emulated) the dtype; every
# substitution must be used (a stale row fails the test).
SUBSTITUTIONS = {
    "gpt2:/path/to/gpt2_files": "gpt2:{data}/gpt2",
    "--model gpt-micro": "--model gpt-nano",
    "--model gpt2-small": "--model gpt-nano",
    "--context-length 256": "--context-length 32",
    "--out runs/books": "--out runs/books --max-steps 2",  # no step count in the README
    "--max-steps 2000": "--max-steps 4",
    "--eval-every 200": "--eval-every 2",
    "--max-steps 4000": "--max-steps 6",
    "--time-budget 10m": "--time-budget 2s",
    "--limit 100": "--limit 2",
    "--data sms.tsv": "--data sms.tsv --max-steps 2",
    "--data instruction-data.json": "--data instruction-data.json --max-steps 2 --generate-tokens 4",
}
if not cpu_has_native_bf16():  # emulated bf16 makes two steps of a 50k-vocabulary head a minute
    SUBSTITUTIONS["--dtype bfloat16"] = "--dtype float32"
SKIP = ("scratchllm download", "scratchllm serve", "torchrun ")


def readme_commands() -> list[str]:
    """The `scratchllm` lines of the README's bash blocks from "A short tour" on, joined across
    backslash continuations, comments dropped, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## A short tour")
    end = text.index("\n## ", start + 1)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text[start:end], re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line.startswith(("scratchllm ", "torchrun ")):
                continue
            words = shlex.split(line, comments=True)
            commands.append(shlex.join(words))
    return commands


def substitute(command: str, data: Path, used: set[str]) -> list[str]:
    for old, new in SUBSTITUTIONS.items():
        pattern = rf"{re.escape(old)}(?=\s|$)"
        if re.search(pattern, command):
            used.add(old)
            command = re.sub(pattern, new.replace("{data}", str(data)), command)
    return shlex.split(command)[1:]  # without "scratchllm"


@pytest.fixture
def workspace(tmp_path, monkeypatch, data_dir, gpt2_tokenizer):
    """The files the README's commands name, relative to the current directory."""
    corpora = data_dir / "corpora"
    (tmp_path / "my_notes").mkdir()
    shutil.copy(corpora / "the-verdict.txt", tmp_path / "my_notes")
    (tmp_path / "books").mkdir()
    shutil.copy(corpora / "gutenberg" / "pg11_alice_in_wonderland.txt", tmp_path / "books")
    (tmp_path / "held_out.txt").write_text(
        (corpora / "tinyshakespeare.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8"
    )
    import zstandard

    lines = "".join(
        json.dumps({"text": t}) + "\n"
        for t in (corpora / "the-verdict.txt").read_text(encoding="utf-8").split("\n\n")
    )
    # the README's data files, cut to a few hundred records: the end-of-run losses cover every split
    sms = (data_dir / "sms_spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines()
    (tmp_path / "sms.tsv").write_text("\n".join(sms[:300]) + "\n", encoding="utf-8")
    records = json.loads((data_dir / "instruct" / "instruction-data.json").read_text("utf-8"))
    (tmp_path / "instruction-data.json").write_text(json.dumps(records[:60]), encoding="utf-8")
    (tmp_path / "dump.jsonl.zst").write_bytes(zstandard.compress(lines.encode()))
    # what `scratchllm download gpt2` fetches: a Hugging Face GPT-2 folder (here a tiny one)
    save_checkpoint(tmp_path / "tiny", small_model(gpt2_tokenizer.vocab_size), gpt2_tokenizer)
    argv = ["convert", "--from", str(tmp_path / "tiny"), "--out", str(tmp_path / "models/gpt2")]
    assert main(argv) == 0
    monkeypatch.chdir(tmp_path)
    return tmp_path


def check(argv: list[str], out: str, root: Path) -> None:
    """What each command promises."""
    command = argv[0] if argv[0] not in ("data", "finetune") else " ".join(argv[:2])
    value = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--")}
    if command == "pretrain":
        run = root / value["--out"]
        for name in ("metrics.jsonl", "loss.png"):
            assert (run / name).stat().st_size > 0, name
        for name in ("config.json", "model.safetensors", "tokenizer", "train_state.pt"):
            assert (run / "checkpoint" / name).exists(), name
        steps = [
            json.loads(line).get("step")
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        last = max(s for s in steps if s is not None)
        if "--max-steps" in value:
            assert last == int(value["--max-steps"])
        else:  # a time budget: it trained, and the train lines count its seconds
            assert last > 0
    elif command == "generate":
        assert out.strip(), "generate printed nothing"
    elif command == "evaluate":
        results = json.loads((root / value["--out"] / "results.json").read_text())
        assert results
        assert (root / value["--out"] / "centered.png").exists()
    elif command == "data prepare":
        assert any((root / value["--out"]).iterdir())
    elif command == "data stats":
        assert "tokens" in out
    elif command == "convert":
        out_path = root / value["--out"]
        to = value.get("--to", "hf")
        if to == "gguf":
            assert out_path.read_bytes()[:4] == b"GGUF"
            if "--ollama" in argv:
                assert (out_path.parent / "Modelfile").read_text().startswith("FROM ")
        else:
            name = "adapter_config.json" if to == "peft" else "config.json"
            assert (out_path / name).exists(), name
    elif command.startswith("finetune"):
        run = root / value["--out"]
        for name in ("metrics.jsonl", "loss.png", "results.json"):
            assert (run / name).exists(), name
    elif command == "classify":
        assert out.strip()


def test_every_readme_command_runs_as_written(workspace, data_dir, capsys, one_thread):
    commands = readme_commands()
    assert len(commands) >= 12, commands  # the README still has its tour
    used: set[str] = set()
    ran = []
    chats = []
    for command in commands:
        if command.startswith(SKIP):
            continue
        argv = substitute(command, data_dir, used)
        if argv[0] == "chat":
            chats.append(argv)
            continue
        capsys.readouterr()
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"{command}\n-> {shlex.join(argv)}\n{err[-2000:]}"
        check(argv, out, workspace)
        ran.append(argv[0])
    assert set(SUBSTITUTIONS) == used, f"unused rows: {set(SUBSTITUTIONS) - used}"
    for name in ("pretrain", "generate", "evaluate", "data", "convert", "finetune", "classify"):
        assert name in ran
    assert chats, "the README's chat command is gone"
    for argv in chats:  # over a pseudo-terminal, as a user types
        term = Terminal(*argv)
        try:
            term.expect("\n> ")
            assert term.say("hello") is not None
            assert term.say("/reset") == "[conversation reset]"
            term.type("/exit")
            term.expect("/exit\n")
        finally:
            code = term.close()
        assert code == 0, shlex.join(argv)
