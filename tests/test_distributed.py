"""torchrun on CPU (gloo): 2 data-parallel ranks train exactly like 1 process with the same
global batch, and only rank 0 touches the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from scratchllm.checkpoint import load_state_dict

# Installed through PYTHONPATH in every torchrun worker: a Python audit hook records each
# file-system write (open for writing, rename, mkdir, remove, link) the rank makes under the
# run directory, and dumps the list when the process exits.
AUDIT = textwrap.dedent(
    """
    import atexit, json, os, sys
    _out = os.path.realpath(os.environ["AUDIT_WATCH"])
    _hits = []
    _EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.link", "shutil.rmtree",
               "os.truncate", "os.symlink"}
    def _under(p):
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(_out)
        except Exception:
            return False
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if writing and _under(args[0]):
                _hits.append(["open", os.fsdecode(args[0])])
        elif event in _EVENTS and args and _under(args[0]):
            _hits.append([event, os.fsdecode(args[0])])
    sys.addaudithook(_hook)
    def _dump():
        rank = os.environ.get("RANK", "single")
        with open(os.path.join(os.environ["AUDIT_DIR"], f"rank{rank}.json"), "w") as fh:
            json.dump(_hits, fh)
    atexit.register(_dump)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data_dir: Path, tmp_path: Path, out: str, batch: int, extra=()) -> list[str]:
    model = tmp_path / "tiny.json"
    model.write_text(
        json.dumps(dict(context_length=32, emb_dim=32, n_heads=4, n_layers=1, drop_rate=0.0))
    )
    return [
        "pretrain",
        "--data",
        str(data_dir / "corpora" / "the-verdict.txt"),
        "--model",
        str(model),
        "--tokenizer",
        "bytes",
        "--out",
        str(tmp_path / out),
        "--max-steps",
        "6",
        "--batch-size",
        str(batch),
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--log-every",
        "1",
        "--sample-tokens",
        "0",
        "--seed",
        "5",
        *extra,
    ]


def _env(tmp_path: Path, out: str) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    audit = tmp_path / f"audit-{out}"
    audit.mkdir(exist_ok=True)
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook), str(src), env.get("PYTHONPATH", "")]),
        AUDIT_WATCH=str(tmp_path / out),
        AUDIT_DIR=str(audit),
        OMP_NUM_THREADS="1",
    )
    return env


def _torchrun(data_dir, tmp_path, out, extra=()) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "scratchllm",
        *_args(data_dir, tmp_path, out, batch=2, extra=extra),
    ]
    return subprocess.run(cmd, env=_env(tmp_path, out), capture_output=True, text=True, timeout=240)


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "scratchllm", *_args(data_dir, tmp, "one", batch=4)]
    done = subprocess.run(cmd, env=_env(tmp, "one"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


# The wrappers of train/parallelize.py compose: FSDP2 over checkpointed blocks and a padded head.
MODES = {
    "ddp": [],
    "fsdp": ["--fsdp"],
    "fsdp-ac-pad": ["--fsdp", "--activation-checkpointing", "--vocab-multiple", "64"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_match_one_process_and_only_rank0_writes(single, data_dir, mode):
    tmp = single
    out = f"two-{mode}"
    done = _torchrun(data_dir, tmp, out, extra=MODES[mode])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # Same global batch (2 ranks x 2 = 1 x 4), same windows: the same losses step by step.
    one, two = _losses(tmp / "one"), _losses(tmp / out)
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, abs=1e-5, rel=0)
    assert one[-1] != pytest.approx(one[0], abs=1e-4)  # it did train
    a, b = load_state_dict(tmp / "one" / "checkpoint"), load_state_dict(tmp / out / "checkpoint")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    meta = json.loads((tmp / out / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 6 and meta["tokens"] == 6 * 4 * 32
    # The audit hook saw rank 0 write (so it works) and rank 1 write nothing in the run dir.
    audit = tmp / f"audit-{out}"
    rank0 = json.loads((audit / "rank0.json").read_text())
    rank1 = json.loads((audit / "rank1.json").read_text())
    assert any(p.endswith("model.safetensors") for _, p in rank0)
    assert rank1 == []
    state = torch.load(tmp / out / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert state["accum_position"] == 0


MUON = ["--optimizer", "muon", "--lr", "3e-3", "--muon-lr", "0.02"]


@pytest.fixture(scope="module")
def single_muon(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-muon")
    cmd = [sys.executable, "-m", "scratchllm", *_args(data_dir, tmp, "one", batch=4, extra=MUON)]
    done = subprocess.run(cmd, env=_env(tmp, "one"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_muon_under_two_ranks_matches_one_process(single_muon, data_dir, mode):
    """Muon under DDP (every rank orthogonalises the same averaged gradient) and FSDP2 (each rank
    gathers a matrix, orthogonalises it, keeps its shard) trains as one process does."""
    tmp = single_muon
    out = f"two-muon-{mode}"
    done = _torchrun(data_dir, tmp, out, extra=[*MUON, *MODES[mode]])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    one, two = _losses(tmp / "one"), _losses(tmp / out)
    assert len(one) == len(two) == 6
    # One process orthogonalises same-shape matrices in one batched product, FSDP2 one at a
    # time: the same arithmetic in another order (bf16 where it is native), so not bit for bit.
    assert one == pytest.approx(two, abs=1e-3, rel=0)
    assert one[-1] < one[0] - 0.1  # it did train
