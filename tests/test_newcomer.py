"""A newcomer's path: chat on a small context over a real terminal, honest MFU, guiding messages
and `generate`'s sampling flags."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchllm import ByteTokenizer, GPTModel, ModelConfig
from scratchllm.checkpoint import save_checkpoint
from scratchllm.cli import build_parser, main
from scratchllm.commands._inference import load_model
from scratchllm.inference.chat import ChatSession, default_reply_tokens
from scratchllm.inference.engine import Engine, SamplingParams
from scratchllm.inference.generate import generate_text

CONTEXT = 128


def small_model(vocab_size: int, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size,
        context_length=CONTEXT,
        emb_dim=32,
        n_heads=4,
        n_layers=2,
        drop_rate=0.0,
    )
    return GPTModel(config).eval()


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A model with a 128-token context and GPT-2's tokenizer (the Alpaca template fits)."""
    path = tmp_path_factory.mktemp("newcomer") / "assistant"
    save_checkpoint(path, small_model(gpt2_tokenizer.vocab_size), gpt2_tokenizer)
    return path


def chat_session(path: Path) -> ChatSession:
    """The session `scratchllm chat --checkpoint path` starts, loaded the way it loads."""
    args = build_parser().parse_args(["chat", "--checkpoint", str(path)])
    ckpt = load_model(args)
    params = SamplingParams(max_tokens=default_reply_tokens(ckpt.config.context_length))
    return ChatSession(Engine(ckpt.model, ckpt.tokenizer, max_batch=1), params)


# -- the chat command over a pseudo-terminal ---------------------------------------------------
# A launcher that makes the pty its controlling terminal (so Ctrl-C is a SIGINT from the line
# discipline, as for a user), then runs the CLI. `start_new_session` makes it a session leader.
_LAUNCH = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDWR)\n"
    "for i in range(3): os.dup2(fd, i)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'scratchllm', *sys.argv[2:]])\n"
)
_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")


class Terminal:
    """`scratchllm ARGS` on a pseudo-terminal: type lines, read what the screen shows."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        # One thread, as the tests here run (`one_thread`): tiny models are no faster on two,
        # and two stall on a busy CPU.
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", "TERM": "dumb", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, os.ttyname(slave), *args],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        os.close(slave)
        self.raw = b""
        self.pos = 0  # characters of `screen` already consumed by `expect`

    @property
    def screen(self) -> str:
        text = self.raw.decode("utf-8", errors="replace")
        return _ESCAPE.sub("", text).replace("\r", "")

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` shows after what was read so far; return what came before it."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.screen.find(text, self.pos)
            if at >= 0:
                before, self.pos = self.screen[self.pos : at], at + len(text)
                return before
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not shown; the screen:\n{self.screen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the program ended
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited before {text!r}; the screen:\n{self.screen}")
                self.raw += chunk

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def say(self, line: str, echo: bool = True) -> str:
        """Type `line` and return what is shown after its echo, up to the next prompt (with
        `echo` False: after the typed line, which line editing may show scrolled)."""
        self.type(line)
        if echo:
            self.expect(line + "\n")
        else:
            self.expect("\n")
        return self.expect("\n> ")

    def close(self) -> int:
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            os.close(self.master)
        return code


def test_chat_over_a_terminal_on_a_128_token_context(chat_ckpt, one_thread):
    # The reference: the same session in this process (greedy, the command's default budget).
    ref = chat_session(chat_ckpt)
    first = "".join(ref.send("hello"))
    second = "".join(ref.send("and then?"))
    ref.reset()
    fresh = "".join(ref.send("and then?"))
    assert first and second != fresh  # history matters, so /reset below is seen to work

    term = Terminal("chat", "--checkpoint", str(chat_ckpt))
    try:
        header = term.expect("\n> ")
        assert "context 128 tokens, replies up to 32" in header  # not the 256 that cannot fit
        assert term.say("hello") == first
        assert term.say("and then?") == second
        assert term.say("/foo") == "[unknown command /foo: /help lists the commands]"
        listing = term.say("/help")
        for command in ("/reset", "/help", "/exit", "Ctrl-C"):
            assert command in listing
        long = "word " * 300  # ~300 tokens: no room for any reply in 128
        answer = term.say(long.strip(), echo=False)
        assert len(answer.splitlines()) == 1 and answer.startswith("[message too long: ")
        assert term.say("/reset") == "[conversation reset]"
        assert term.say("and then?") == fresh
        term.type("/exit")
        term.expect("/exit\n")
    finally:
        code = term.close()
    assert code == 0


def test_ctrl_c_at_the_prompt_ends_the_chat(chat_ckpt):
    term = Terminal("chat", "--checkpoint", str(chat_ckpt))
    try:
        term.expect("\n> ")
        # Python's readline sees a signal only once it waits for keys: a Ctrl-C in the moment
        # between the prompt and the wait would stay pending until the next key.
        time.sleep(1)
        os.write(term.master, b"\x03")  # the terminal turns it into SIGINT
    finally:
        code = term.close()
    assert code == 0 and "Traceback" not in term.screen


def test_ctrl_c_during_a_reply_stops_the_reply_not_the_session(chat_ckpt, one_thread):
    from scratchllm.commands.chat import reply

    session = chat_session(chat_ckpt)
    full = "".join(chat_session(chat_ckpt).send("hello"))

    class PressCtrlC(io.StringIO):
        """The screen: Ctrl-C is pressed as the first piece of the reply appears."""

        pressed = False

        def write(self, text: str) -> int:
            if text and not self.pressed:
                self.pressed = True
                signal.raise_signal(signal.SIGINT)
            return super().write(text)

    out = PressCtrlC()
    reply(session, "hello", out)  # no KeyboardInterrupt escapes
    shown = out.getvalue()
    assert shown.endswith(" [stopped]\n") and len(shown) - len(" [stopped]\n") < len(full)
    assert full.startswith(shown[: -len(" [stopped]\n")])
    assert session.history == []  # a stopped reply is not part of the conversation
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    out = io.StringIO()
    reply(session, "hello", out)  # the session goes on, its engine clean
    assert out.getvalue() == full + "\n"
    assert session.engine.load["active"] == 0


def test_chat_budget_adapts_to_the_context(chat_ckpt, one_thread):
    assert [default_reply_tokens(n) for n in (128, 1024, 8192, 2)] == [32, 256, 256, 1]
    session = chat_session(chat_ckpt)
    # A message that leaves less than the budget gets the rest of the context, not an error.
    message = "word " * 80
    ids, _, _ = session.prompt(message)
    assert CONTEXT - 32 < len(ids) < CONTEXT
    assert "".join(session.send(message)) is not None
    assert session.reply_tokens == CONTEXT - len(ids)
    # Turns are dropped, oldest first, so a long conversation keeps getting replies.
    session.reset()
    for turn in range(5):
        "".join(session.send(f"this is message number {turn} of a long conversation"))
    assert session.history[-2]["content"].endswith("number 4 of a long conversation")
    assert len(session.history) < 10 and session.dropped >= 1


def test_chat_refuses_an_explicit_budget_the_context_cannot_hold(chat_ckpt, capsys):
    assert main(["chat", "--checkpoint", str(chat_ckpt), "--max-new-tokens", "128"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leave it out to use 32" in err


# -- honest MFU ----------------------------------------------------------------------------------
CPUINFO = """\
processor\t: {cpu}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+ @ 2.00GHz
physical id\t: 0
core id\t\t: {core}
cpu MHz\t\t: 1900.000
flags\t\t: fpu sse sse2 avx fma avx2 {extra}
"""


def fake_cpuinfo(cores: int, extra: str = "", smt: int = 1) -> str:
    return "\n".join(
        CPUINFO.format(cpu=c * smt + t, core=c, extra=extra)
        for c in range(cores)
        for t in range(smt)
    )


def test_peak_logic_from_the_cpu_features():
    from scratchllm.train.throughput import (
        cpu_peak,
        format_flops,
        gpu_sheet_peak,
        read_cpu_info,
    )

    # Hyper-threads share FMA units: 4 cores × 2 threads are 4 cores. The clock is the highest
    # named (the model name's 2.00 GHz over the current 1.9; cpufreq's max over both).
    info = read_cpu_info(fake_cpuinfo(4, smt=2), allowed=set(range(8)), max_khz=None)
    assert info is not None and info.cores == 4 and info.ghz == 2.0
    assert read_cpu_info(fake_cpuinfo(4), allowed={0, 1}, max_khz=3.5e6).ghz == 3.5
    assert read_cpu_info(fake_cpuinfo(4), allowed={0, 1}, max_khz=None).cores == 2
    assert read_cpu_info("", allowed=None) is None

    avx2 = cpu_peak(info, "fp32", threads=8)
    assert avx2.flops == 4 * 2.0e9 * 32 and "AVX2 FMA" in avx2.source
    assert avx2.label == "256 GFLOP/s fp32 peak"
    assert cpu_peak(info, "fp32", threads=1).flops == 2.0e9 * 32  # one thread: one core
    # bf16 without native support runs on the fp32 units: the same peak, never a lower one.
    emulated = cpu_peak(info, "bf16", threads=4)
    assert emulated.flops == avx2.flops and "no native bf16" in emulated.source
    four = set(range(4))
    avx512 = read_cpu_info(fake_cpuinfo(4, "avx512f avx512_bf16"), allowed=four, max_khz=None)
    assert cpu_peak(avx512, "fp32", 4).flops == 4 * 2.0e9 * 64
    assert cpu_peak(avx512, "bf16", 4).flops == 4 * 2.0e9 * 128
    amx = read_cpu_info(fake_cpuinfo(4, "avx512f amx_bf16"), allowed=four, max_khz=None)
    assert (
        cpu_peak(amx, "bf16", 4).flops == 4 * 2.0e9 * 1024
        and "AMX" in cpu_peak(amx, "bf16", 4).source
    )
    # Known GPUs by their data sheet; TF32 matmuls raise the fp32 peak.
    assert gpu_sheet_peak("NVIDIA H100 80GB HBM3", "bf16").flops == 989.4e12
    assert gpu_sheet_peak("NVIDIA H100 PCIe", "bf16").flops == 756e12
    assert gpu_sheet_peak("NVIDIA A100-SXM4-40GB", "fp32", tf32=True).flops == 156e12
    assert gpu_sheet_peak("Some GPU", "bf16") is None
    assert format_flops(1.23e12) == "1.23 TFLOP/s"


def test_the_peak_is_at_least_what_a_matmul_reaches():
    from scratchllm.train.throughput import hardware_peak, measure_peak_flops

    for dtype in (torch.float32, torch.bfloat16):
        peak = hardware_peak("cpu", dtype)
        assert peak.dtype == {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
        assert peak.flops >= measure_peak_flops("cpu", dtype, 256, seconds=0.05)
    # bf16 is never held to a lower peak than fp32 (an emulated bf16 matmul is ~100x slower).
    assert hardware_peak("cpu", torch.bfloat16).flops >= hardware_peak("cpu", torch.float32).flops


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_short_training_run_logs_mfu_at_most_one(tmp_path, dtype, capsys, one_thread):
    from scratchllm.commands._progress import ProgressCallback
    from scratchllm.train.settings import TrainConfig
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import Trainer

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0
    )
    tokens = torch.randint(0, 256, (4096,)).numpy().astype("uint16")
    task = LMTask(tokens, None, ByteTokenizer(), batch_size=8, context_length=32, seed=1)
    train = TrainConfig(
        max_steps=6,
        eval_every=100,
        eval_batches=2,
        sample_tokens=0,
        log_every=1,
        seed=1,
        dtype=dtype,
    )
    out = tmp_path / "run"
    callback = ProgressCallback()
    trainer = Trainer(GPTModel(config), task, train, out, ByteTokenizer(), callback=callback)
    trainer.fit()
    mfu = [r["mfu"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "mfu" in r]
    assert len(mfu) >= 5 and all(0 < m <= 1 for m in mfu), mfu
    name = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    assert trainer.peak is not None and trainer.peak.dtype == name
    shown = capsys.readouterr()
    assert f"MFU is a share of the {trainer.peak.label}" in shown.out  # above the bar
    assert f"% of {trainer.peak.label}" in shown.err  # the bar says against what


# -- messages that guide ------------------------------------------------------------------------
def test_a_folder_without_txt_files_names_what_it_found_and_a_glob(tmp_path):
    from scratchllm.data.corpus import list_sources
    from scratchllm.errors import InputError

    notes = tmp_path / "notes"
    (notes / "old").mkdir(parents=True)
    for name in ("a.md", "b.md", "old/c.md", "todo.rst"):
        (notes / name).write_text("some notes\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        list_sources([str(notes)])
    message = str(info.value)
    assert f"{notes}: no .txt files in it; found 3 .md files, 1 .rst file" in message
    glob = re.search(r"try --data '([^']+)'", message).group(1)
    assert glob == f"{notes}/**/*.md"
    assert len(list_sources([glob])) == 3  # the suggestion works
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nor any other files"):
        list_sources([str(tmp_path / "empty")])


def test_plural():
    from scratchllm.utils import plural

    assert [plural(1, "text"), plural(3, "text"), plural(0, "reply", "replies")] == [
        "1 text",
        "3 texts",
        "0 replies",
    ]


# -- generate's sampling flags -------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("generate") / "ckpt"
    save_checkpoint(path, small_model(257, seed=3), ByteTokenizer())
    return path


def generate(capsys, path: Path, *flags: str) -> str:
    argv = ["generate", "--checkpoint", str(path), "--max-new-tokens", "24", *flags]
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_generate_samples_stops_and_penalises_repetition(byte_ckpt, capsys, one_thread):
    prompt = ["--prompt", "ab ab ab ab ab ab ab ab"]
    one = generate(capsys, byte_ckpt, *prompt)
    text = one[:-1]
    assert one.endswith("\n") and len(text) >= 8
    # Greedy -n 2: two identical samples, each marked.
    two = generate(capsys, byte_ckpt, *prompt, "-n", "2")
    assert two == f"--- sample 1 of 2 ---\n{text}\n--- sample 2 of 2 ---\n{text}\n"
    # --stop cuts the text before the first occurrence (repeatable; a '\n' escape works too).
    stop = text[4:6]
    cut = generate(capsys, byte_ckpt, *prompt, "--stop", stop, "--stop", "\\n")
    at = min(i for i in (text.find(stop), text.find("\n")) if i >= 0)
    assert cut == text[:at] + "\n"
    # The penalty changes a repetitive continuation, and matches the engine's own.
    penalised = generate(capsys, byte_ckpt, *prompt, "--repetition-penalty", "3")
    assert penalised != one
    model = small_model(257, seed=3)
    params = SamplingParams(max_tokens=24, repetition_penalty=3.0)
    expected = Engine(model, ByteTokenizer()).generate([prompt[1]], params)[0][0].text
    assert penalised == expected + "\n"
    # Sampled -n 3 with a seed: three samples, reproducible.
    sampled = [*prompt, "-n", "3", "--temperature", "1", "--seed", "5"]
    samples = generate(capsys, byte_ckpt, *sampled)
    assert samples == generate(capsys, byte_ckpt, *sampled) and "--- sample 3 of 3 ---" in samples
    # Longer than the context: the book's sliding loop, where the penalty is not available.
    long = ["--max-new-tokens", "200"]
    book = generate_text(model, ByteTokenizer(), prompt[1], max_new_tokens=200)
    assert generate(capsys, byte_ckpt, *prompt, *long) == book + "\n"
    base = ["generate", "--checkpoint", str(byte_ckpt), *prompt]
    assert main([*base, *long, "--repetition-penalty", "2"]) == 2
    assert "--repetition-penalty" in capsys.readouterr().err
    assert main([*base, "-n", "0"]) == 2
    assert "-n: n must be a positive integer" in capsys.readouterr().err


# -- files people can share ----------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    from scratchllm.train.metrics import plot_losses

    old = os.umask(umask)
    try:
        ckpt = save_checkpoint(tmp_path / "ckpt", small_model(257), ByteTokenizer())
        plot = tmp_path / "loss.png"
        plot_losses([{"step": 1, "train_loss": 2.0}, {"step": 2, "val_loss": 1.5}], plot)
    finally:
        os.umask(old)
    for file in (ckpt / "model.safetensors", ckpt / "config.json", plot):
        assert file.stat().st_mode & 0o777 == mode, file
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask  # the folder too


# -- the Python API ------------------------------------------------------------------------------
def test_from_pretrained_and_save_pretrained_round_trip(tmp_path, one_thread):
    import scratchllm

    for name in ("load_checkpoint", "GPTModel", "__version__"):
        assert hasattr(scratchllm, name)
    model = small_model(257, seed=4)
    with pytest.raises(scratchllm.InputError, match="tokenizer"):
        model.save_pretrained(tmp_path / "none")
    model.save_pretrained(tmp_path / "a", tokenizer=ByteTokenizer())
    loaded = scratchllm.GPTModel.from_pretrained(tmp_path / "a")
    assert not loaded.training and isinstance(loaded.tokenizer, ByteTokenizer)
    ids = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    loaded.save_pretrained(tmp_path / "b")  # its own tokenizer, attached by from_pretrained
    again = scratchllm.GPTModel.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    # Generation from each handle agrees with generate_text / generate.
    ckpt = scratchllm.load_checkpoint(tmp_path / "b")
    expected = generate_text(model, ByteTokenizer(), "The meeting", max_new_tokens=12)
    assert ckpt.generate("The meeting", 12) == again.generate("The meeting", 12) == expected
    out = again.generate(ids[:1, :5], 7)
    assert out.shape == (1, 12) and torch.equal(out, scratchllm.generate(model, ids[:1, :5], 7))
    with pytest.raises(scratchllm.InputError, match="tokenizer"):
        model.generate("text")


# -- the pretrain header -------------------------------------------------------------------------
TINY = ["--model", "gpt-nano", "--context-length", "16", "--batch-size", "2", "--eval-every", "2"]


def test_pretrain_starts_with_a_header(tmp_path, capsys, one_thread):
    books = tmp_path / "books"
    books.mkdir()
    header = "The Project Gutenberg eBook of A Book\nlicence text\n"
    start, end = (
        "*** START OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n",
        "*** END OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n",
    )
    body = ("It was a quiet morning and the notes were read aloud. " * 20).strip() + "\n"
    footer = "The full licence follows here.\n"
    (books / "a.txt").write_text(header + start + body + end + footer, encoding="utf-8")
    (books / "b.txt").write_text(body, encoding="utf-8")
    removed = len((header + start + end + footer).encode())
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(books), "--strip-gutenberg", "--tokenizer", "bytes", *TINY]
    assert main([*argv, "--out", str(out), "--max-steps", "2"]) == 0, capsys.readouterr().err
    shown = capsys.readouterr().out
    head = shown.split("done:")[0]
    data = re.search(
        rf"data: 2 files read \({re.escape(str(books))}\): 2 documents, ([\d,]+) tokens", head
    )
    assert data is not None, head
    tokens = int(data.group(1).replace(",", ""))
    assert 2 * len(body) <= tokens <= 2 * len(body) + 2  # the bytes and a document separator
    assert f"--strip-gutenberg removed {removed:,} bytes of Project Gutenberg headers" in head
    assert "from 1 of 2 text files" in head
    train = re.search(r"split: ([\d,]+) train / ([\d,]+) validation tokens \(the last 10% of", head)
    assert train is not None
    assert sum(int(g.replace(",", "")) for g in train.groups()) == tokens
    parameters = GPTModel.from_pretrained(out).num_parameters()
    assert f"model: gpt-nano, {parameters:,} parameters" in head
    assert "device: cpu, dtype float32; world size 1 (one process)" in head
    assert "resuming" not in head
    resumed = ["pretrain", "--out", str(out), "--resume", "--max-steps", "4"]
    assert main(resumed) == 0, capsys.readouterr().err
    head = capsys.readouterr().out.split("done:")[0]
    assert "resuming from step 2" in head and f"{tokens:,} tokens" in head
