"""Prepared shard folders (data/prepare.py) and the loader over them (data/loader.py): resuming
after SIGKILL, reading across shards as one stream, exact resume, disjoint ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchllm import cli
from scratchllm.data import shards
from scratchllm.data.loader import BatchLoader, ConcatTokens, SlidingWindowDataset, split_tokens
from scratchllm.data.prepare import ShardSet, prepare_shards, read_index
from scratchllm.data.shards import TokenFile, write_token_file
from scratchllm.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
EOT = 50256


@pytest.fixture
def data_cli(monkeypatch):
    """`cli.main` with only the `data` command registered (real parsing and exit codes)."""
    monkeypatch.setattr(cli, "COMMANDS", {"data": cli.COMMANDS["data"]})
    return cli.main


def _books(data_dir: Path) -> list[str]:
    folder = data_dir / "corpora" / "gutenberg"
    names = ("pg84_frankenstein.txt", "pg1342_pride_and_prejudice.txt", "pg345_dracula.txt")
    return [str(folder / name) for name in names]


def _shard_files(out: Path) -> list[bytes]:
    return [(out / e["file"]).read_bytes() for e in read_index(out)["shards"]]


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TIKTOKEN_CACHE_DIR": ""}


# `scratchllm data ...` through cli.main, with only the data command registered (so a broken
# other command cannot fail these tests).
_DATA_CLI = (
    "import sys\nfrom scratchllm import cli\n"
    "cli.COMMANDS = {'data': cli.COMMANDS['data']}\nsys.exit(cli.main(sys.argv[1:]))"
)


# -- resuming --------------------------------------------------------------------------------------
def test_sigkill_then_rerun_gives_the_shards_of_an_uninterrupted_run(tmp_path, data_dir):
    books = _books(data_dir)
    tokenizer = f"gpt2:{data_dir / 'gpt2'}"
    out = tmp_path / "killed"
    args = ["--data", *books, "--tokenizer", tokenizer, "--shard-tokens", "60000"]
    cmd = [sys.executable, "-c", _DATA_CLI, "data", "prepare", *args, "--workers", "2"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "index.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no shard within 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed = read_index(out)
    kept = {e["file"]: _stamp(out / e["file"]) for e in killed["shards"]}
    assert not killed["complete"] and 1 <= len(kept) < 20

    again = subprocess.run([*cmd, "--out", str(out)], env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    # The shards the index listed were kept (same files), the rest written after them.
    assert {f: _stamp(out / f) for f in kept} == kept
    from scratchllm.tokenizers import load_tokenizer

    whole = prepare_shards(books, load_tokenizer(tokenizer), tmp_path / "whole", shard_tokens=60000)
    assert _shard_files(out) == [f.path.read_bytes() for f in whole.files]
    assert read_index(out)["shards"] == read_index(tmp_path / "whole")["shards"]
    assert len(whole.files) > len(kept)


_CRASH = """
import os, signal, sys
from scratchllm.data import shards
from scratchllm.data.prepare import prepare_shards
from scratchllm.tokenizers import ByteTokenizer
shards.CHUNK_BYTES = 3000
def hook(stage, shard):
    if (stage, shard) == (sys.argv[3], int(sys.argv[4])):
        os.kill(os.getpid(), signal.SIGKILL)
prepare_shards([sys.argv[1]], ByteTokenizer(), sys.argv[2], shard_tokens=10000, hook=hook)
"""


@pytest.mark.parametrize("stage", ["renamed", "indexed"])
def test_crash_around_the_index_write_resumes_exactly(tmp_path, data_dir, monkeypatch, stage):
    # Killed after shard 2 is renamed into place but before the index lists it (it is redone),
    # or just after the index lists it.
    book = _books(data_dir)[0]
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", _CRASH, book, str(out), stage, "2"], env=_env(), timeout=300
    )
    assert run.returncode == -signal.SIGKILL
    listed = read_index(out)["shards"]
    assert len(listed) == (2 if stage == "renamed" else 3)
    assert (out / "shard-00002.bin").exists()
    kept = {e["file"]: _stamp(out / e["file"]) for e in listed}
    monkeypatch.setattr(shards, "CHUNK_BYTES", 3000)
    resumed = prepare_shards([book], ByteTokenizer(), out, shard_tokens=10000)
    assert {f: _stamp(out / f) for f in kept} == kept  # listed shards were not rewritten
    whole = prepare_shards([book], ByteTokenizer(), tmp_path / "whole", shard_tokens=10000)
    assert [f.path.read_bytes() for f in resumed.files] == [
        f.path.read_bytes() for f in whole.files
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        *(e.path.name for e in whole.files),
    ]


def test_prepared_tinyshakespeare_matches_tiktoken_and_stats(
    tmp_path, data_dir, gpt2_tokenizer, monkeypatch, capsys, data_cli
):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from scratchllm.tokenizers import GPT2_PATTERN

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data_dir / "gpt2" / "vocab.bpe"),
        encoder_json_file=str(data_dir / "gpt2" / "encoder.json"),
    )
    enc = tiktoken.Encoding(
        "gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )
    path = data_dir / "corpora" / "tinyshakespeare.txt"
    monkeypatch.setattr(shards, "CHUNK_BYTES", 64 * 1024)  # ~17 tasks over 2 worker processes
    out = tmp_path / "shakespeare"
    got = prepare_shards([str(path)], gpt2_tokenizer, out, shard_tokens=100_000, workers=2)
    expected = [*enc.encode_ordinary(path.read_text(encoding="utf-8")), EOT]
    assert len(expected) == 338026 and [len(f) for f in got.files] == [100_000] * 3 + [38026]
    assert np.array_equal(np.asarray(got.tokens), expected)
    index = read_index(out)
    assert index["tokens"] == 338026 and index["documents"] == 1
    assert index["bytes"] == sum(e["bytes"] for e in index["shards"]) == path.stat().st_size
    assert (
        index["dtype"] == "uint16"
        and index["tokenizer"]["fingerprint"] == gpt2_tokenizer.fingerprint()
    )
    # Each shard's "next" is where the following one starts; the last one's is past the end.
    assert [e["next"][1] > 0 for e in index["shards"]] == [True, True, True, False]

    assert data_cli(["data", "stats", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "338026 tokens" in shown and "documents: 1" in shown and "shard-00003.bin" in shown
    assert f"bytes per token: {path.stat().st_size / 338026:.3f}" in shown

    # Up to date: nothing is rewritten. Another tokenizer: refused, unless --force.
    mtimes = [f.path.stat().st_mtime_ns for f in got.files]
    again = prepare_shards([str(path)], gpt2_tokenizer, out, shard_tokens=100_000)
    assert [f.path.stat().st_mtime_ns for f in again.files] == mtimes
    args = ["data", "prepare", "--data", str(path), "--out", str(out), "--shard-tokens", "100000"]
    assert data_cli(args) == 2
    assert "holds shards made with another tokenizer; pass --force" in capsys.readouterr().err
    assert data_cli([*args, "--force"]) == 0
    assert ShardSet(out).fingerprint == ByteTokenizer().fingerprint()


# -- the loader over shards ------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path) -> tuple[np.ndarray, ConcatTokens]:
    """4000 random ids, as one array and as five memory-mapped shard files of uneven sizes."""
    tokens = np.random.default_rng(0).integers(0, 50257, 4000).astype(np.uint16)
    cuts = [0, 700, 1500, 1501, 2900, 4000]
    files = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        path = write_token_file(tmp_path / f"s{i}.bin", [tokens[a:b]], 50257, "f" * 16)
        files.append(TokenFile(path).tokens)
    return tokens, ConcatTokens(files)


def _batches(loader: BatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def _same(a, b) -> bool:
    return all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [dict(mode="sliding"), dict(mode="sliding", shuffle=False, stride=7), dict(mode="random")],
)
def test_loader_over_shards_equals_one_concatenated_file(sharded, kwargs):
    flat, concat = sharded
    one = BatchLoader(flat, batch_size=4, context_length=32, seed=3, **kwargs)
    many = BatchLoader(concat, batch_size=4, context_length=32, seed=3, **kwargs)
    steps = 3 * one.batches_per_epoch + 2  # over epoch ends
    assert _same(_batches(one, steps), _batches(many, steps))
    windows = SlidingWindowDataset(concat, 32, 29)
    assert [w[0].tolist() for w in windows] == [
        w[0].tolist() for w in SlidingWindowDataset(flat, 32, 29)
    ]
    train, val = split_tokens(concat, 0.3)
    assert np.array_equal(np.asarray(train), flat[:2800]) and np.array_equal(
        np.asarray(val), flat[2800:]
    )
    assert concat[1499:1502].tolist() == flat[1499:1502].tolist()  # across a 1-token shard
    assert int(concat[-1]) == int(flat[-1]) and concat[100:200].base is not None  # a view


def test_resume_mid_shard_is_exact(sharded):
    _, concat = sharded
    loader = BatchLoader(concat, batch_size=2, context_length=50, seed=9, shuffle=False)
    _batches(loader, 13)  # the next window starts at 13 * 2 * 50 = 1300: shard 1, offset 600
    state = loader.state_dict()
    assert (state["epoch"], state["position"], state["shard"], state["offset"]) == (0, 13, 1, 600)
    expected = _batches(loader, 30)  # into the next epoch
    resumed = BatchLoader(concat, batch_size=2, context_length=50, seed=0, shuffle=False)
    resumed.load_state_dict(state)
    assert _same(expected, _batches(resumed, 30))
    shuffled = BatchLoader(concat, batch_size=3, context_length=40, seed=4)
    _batches(shuffled, 41)  # past the first epoch (33 batches)
    state = shuffled.state_dict()
    assert state["epoch"] == 1 and 0 <= state["shard"] < 5
    expected = _batches(shuffled, 10)
    again = BatchLoader(concat, batch_size=3, context_length=40, seed=4)
    again.load_state_dict(json.loads(json.dumps(state)))  # plain data: survives JSON
    assert _same(expected, _batches(again, 10))


def test_two_ranks_read_disjoint_parts_of_the_shards(tmp_path):
    ids = np.arange(4001, dtype=np.uint16)  # a token's value is its offset
    parts = []
    for i, (a, b) in enumerate([(0, 900), (900, 2000), (2000, 4001)]):
        path = write_token_file(tmp_path / f"s{i}.bin", [ids[a:b]], 50257, "f" * 16)
        parts.append(TokenFile(path).tokens)
    concat = ConcatTokens(parts)
    ranks = [BatchLoader(concat, 4, 25, seed=1, rank=r, world_size=2) for r in (0, 1)]
    starts = [[int(s) for x, _ in loader for s in x[:, 0]] for loader in ranks]
    assert len(starts[0]) == len(starts[1]) == 80
    assert not set(starts[0]) & set(starts[1])
    assert set(starts[0]) | set(starts[1]) == set(range(0, 4000, 25))
    for rank in starts:  # each rank reads from every shard, not one rank per shard
        assert {np.searchsorted([900, 2000], s, side="right") for s in rank} == {0, 1, 2}


# -- pretraining on a prepared folder --------------------------------------------------------------
def test_pretrain_on_a_prepared_folder_with_its_own_val_data(tmp_path, data_dir, gpt2_tokenizer):
    from scratchllm.settings import SettingError
    from scratchllm.train.pretrain import PretrainOptions, pretrain
    from scratchllm.train.trainer import TrainerCallback

    verdict = str(data_dir / "corpora" / "the-verdict.txt")
    prepared = tmp_path / "prepared"
    prepare_shards([verdict], ByteTokenizer(), prepared, shard_tokens=5000)  # 5 shards
    val = tmp_path / "val.jsonl"
    val.write_text(
        "".join(json.dumps({"body": f"A held-out line number {i}."}) + "\n" for i in range(40))
    )
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(dict(context_length=32, emb_dim=32, n_heads=4, n_layers=1)))

    def run(data: str, out: str, **kw) -> dict:
        base = dict(
            data=[data],
            val_data=[str(val)],
            text_field="body",
            model=str(model),
            tokenizer="bytes",
            out=str(tmp_path / out),
            max_steps=4,
            batch_size=4,
            eval_every=2,
            eval_batches=2,
            log_every=1,
            sample_tokens=0,
            seed=3,
        )
        opts = PretrainOptions(**{**base, **kw})
        return pretrain(opts, callback=TrainerCallback())

    from_folder = run(str(prepared), "a")
    from_file = run(verdict, "b", shard_tokens=3000)  # other shard sizes, the same token stream
    assert "val_loss" in from_folder["last_eval"]
    assert from_folder["last_eval"] == from_file["last_eval"]
    metrics = [(tmp_path / r / "metrics.jsonl").read_text() for r in ("a", "b")]
    losses = [[json.loads(line).get("loss") for line in m.splitlines()] for m in metrics]
    assert losses[0] == losses[1]
    # The prepared folder is read in place; only the validation inputs were tokenized.
    assert len(list((tmp_path / "a" / "data").glob("shards-*"))) == 1
    assert len(list((tmp_path / "b" / "data").glob("shards-*"))) == 2
    with pytest.raises(SettingError, match=r"was prepared with tokenizer bytes .* not gpt2"):
        run(str(prepared), "c", tokenizer=f"gpt2:{data_dir / 'gpt2'}")
