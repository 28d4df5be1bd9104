"""Input formats (data/formats.py, data/records.py): every format gives the same tokens, weighted
mixing, and one clear line (exit 2) for each kind of bad input."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from scratchllm import cli
from scratchllm.data import formats, records, shards
from scratchllm.data.formats import iter_documents
from scratchllm.data.prepare import ShardSet, prepare_shards, read_index
from scratchllm.data.shards import TokenFile
from scratchllm.errors import InputError
from scratchllm.tokenizers import ByteTokenizer

EOT = 50256


@pytest.fixture
def data_cli(monkeypatch):
    """`cli.main` with only the `data` command registered: the real parsing and exit codes,
    without importing every other command."""
    monkeypatch.setattr(cli, "COMMANDS", {"data": cli.COMMANDS["data"]})
    return cli.main


@pytest.fixture(scope="module")
def docs(data_dir) -> list[str]:
    """Five documents: the Verdict in four parts (LF only) and a non-ASCII one."""
    text = (data_dir / "corpora" / "the-verdict.txt").read_text(encoding="utf-8")
    cuts = [0, 4000, 9000, 15000, len(text)]
    parts = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    return [*parts, 'Grüße — 日本語 🙂\n\n  tabs\tand "quotes" [brackets], {braces}\n']


def _write_all_formats(folder: Path, docs: list[str]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    paths = {"txt": folder / "txt"}
    paths["txt"].mkdir()
    for i, doc in enumerate(docs):
        (paths["txt"] / f"{i}.txt").write_text(doc, encoding="utf-8")
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    paths["jsonl"] = folder / "d.jsonl"
    paths["jsonl"].write_bytes(lines)
    paths["jsonl.gz"] = folder / "d.jsonl.gz"
    paths["jsonl.gz"].write_bytes(gzip.compress(lines[:5000]) + gzip.compress(lines[5000:]))
    paths["jsonl.zst"] = folder / "d.jsonl.zst"
    zstd = zstandard.ZstdCompressor(write_checksum=True)
    paths["jsonl.zst"].write_bytes(zstd.compress(lines[:7000]) + zstd.compress(lines[7000:]))
    paths["json"] = folder / "d.json"
    paths["json"].write_text(
        json.dumps([{"text": d, "n": [1, {"x": "]"}]} for d in docs], indent=2)
    )
    paths["parquet"] = folder / "d.parquet"
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, paths["parquet"], row_group_size=2)  # three row groups
    paths["datasets"] = folder / "saved"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(paths["datasets"]))
    return paths


def test_every_format_gives_identical_shards(tmp_path, docs, gpt2_tokenizer, tiktoken_gpt2):
    paths = _write_all_formats(tmp_path / "in", docs)
    expected = [t for d in docs for t in [*tiktoken_gpt2.encode_ordinary(d), EOT]]
    shard_bytes = {}
    for name, path in paths.items():
        out = tmp_path / f"out-{name}"
        got = prepare_shards([str(path)], gpt2_tokenizer, out, shard_tokens=1500, workers=1)
        assert got.tokens.tolist() == expected, name
        assert got.documents == len(docs) and len(got.files) == -(-len(expected) // 1500)
        assert got.bytes == sum(len(d.encode()) for d in docs)
        shard_bytes[name] = [f.path.read_bytes() for f in got.files]
    assert all(v == shard_bytes["txt"] for v in shard_bytes.values())


@pytest.fixture(scope="module")
def tiktoken_gpt2(data_dir):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from scratchllm.tokenizers import GPT2_PATTERN

    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data_dir / "gpt2" / "vocab.bpe"),
        encoder_json_file=str(data_dir / "gpt2" / "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )


def test_records_stream_across_tiny_read_blocks(tmp_path, docs, monkeypatch):
    # Blocks of 7 bytes cut lines, JSON values, UTF-8 characters and gzip/zstd frames.
    paths = _write_all_formats(tmp_path / "in", docs)
    monkeypatch.setattr(records, "READ_BYTES", 7)
    for name in ("jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet", "datasets"):
        got = [text for _, text in iter_documents([str(paths[name])])]
        assert got == docs, name
    # A forced format reads a file whatever its name says.
    odd = tmp_path / "records.data"
    odd.write_bytes(paths["jsonl"].read_bytes())
    assert [t for _, t in iter_documents([str(odd)], fmt="jsonl")] == docs
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"body": d}) + "\n\n" for d in docs))
    assert [t for _, t in iter_documents([str(other)], text_field="body")] == docs


def test_split_weight_and_spec_forms(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    colon = tmp_path / "b:2.txt"
    colon.write_text("y")
    assert formats.split_weight(f"{path}:0.7") == (str(path), 0.7)
    assert formats.split_weight(f"{path}:1e-1") == (str(path), 0.1)
    assert formats.split_weight(str(colon)) == (str(colon), None)
    assert formats.split_weight("hf:org/name") == ("hf:org/name", None)
    assert formats.split_weight("hf:org/name:validation") == ("hf:org/name:validation", None)
    assert formats.split_weight("hf:org/name:train:3") == ("hf:org/name:train", 3.0)
    assert formats.split_weight("builtin:python-docs:2") == ("builtin:python-docs", 2.0)
    (spec,) = formats.resolve(["hf:org/name:test:0.5"])
    assert spec.weight == 0.5 and spec.sources[0].split == "test"


def _counter_jsonl(path: Path, letter: str, n: int) -> None:
    path.write_text("".join(json.dumps({"text": f"{letter}{i}"}) + "\n" for i in range(n)))


def test_weighted_mix_hits_its_proportions_and_is_reproducible(tmp_path):
    _counter_jsonl(tmp_path / "a.jsonl", "a", 6000)
    _counter_jsonl(tmp_path / "b.jsonl", "b", 6000)
    specs = formats.resolve([f"{tmp_path / 'a.jsonl'}:0.7", f"{tmp_path / 'b.jsonl'}:0.3"])

    def names(seed: int) -> list[str]:
        return ["".join(p) for _, p, _ in formats.iter_docs(specs, seed=seed)]

    first = names(1)
    share = sum(t.startswith("a") for t in first) / len(first)
    assert abs(share - 0.7) < 0.015
    assert len(first) == 6000 + sum(t.startswith("b") for t in first)  # stops when `a` runs out
    # Each input is read in its own order; the mix is the same for a seed, another for another.
    assert [t for t in first if t[0] == "b"] == [f"b{i}" for i in range(len(first) - 6000)]
    assert names(1) == first and names(2) != first
    # Through the shards too: the same seed gives the same bytes.
    tok = ByteTokenizer()
    spec_args = [f"{tmp_path / 'a.jsonl'}:0.7", f"{tmp_path / 'b.jsonl'}:0.3"]
    runs = [
        prepare_shards(spec_args, tok, tmp_path / f"mix{i}", shard_tokens=4096, seed=seed)
        for i, seed in enumerate((5, 5, 6))
    ]
    contents = [[f.path.read_bytes() for f in r.files] for r in runs]
    assert contents[0] == contents[1] != contents[2]
    assert runs[0].documents == len(names(5))


def test_iter_documents_dispatches_and_mixes_builtin(tmp_path):
    (tmp_path / "n.md").write_text("# notes\n")
    docs = list(iter_documents([str(tmp_path / "n.md")]))
    assert docs == [(str(tmp_path / "n.md"), "# notes\n")]  # .md is text, as any other file
    with pytest.raises(InputError, match=r"compressed input is read as JSON lines only"):
        (tmp_path / "x.txt.gz").write_bytes(gzip.compress(b"text"))
        list(iter_documents([str(tmp_path / "x.txt.gz")]))


def test_datasets_dict_folder_names_its_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"holds the splits test, train; expected one split"):
        formats.resolve([str(tmp_path / "dd")])
    assert [t for _, t in iter_documents([str(tmp_path / "dd" / "test")])] == ["a", "b"]


# -- bad input: one line, exit 2 -------------------------------------------------------------------
def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    good = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)).encode()
    (tmp_path / "notjson.jsonl").write_text('{"text": "ok"}\n\n{"text": nope}\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x", "id": 3}\n')
    (tmp_path / "notstr.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
    (tmp_path / "array.json").write_text('[{"text": "a"},\n {"text": "b"}\n {"text": "c"}]')
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "zero.parquet").write_bytes(b"")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    gz = gzip.compress(good)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "junk.jsonl.gz").write_bytes(gz[:10] + b"\xff" * 40 + gz[50:])
    zst = zstandard.ZstdCompressor(write_checksum=True).compress(good)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (tmp_path / "junk.jsonl.zst").write_bytes(b"definitely not zstd" * 3)
    a = tmp_path / "notjson.jsonl"
    return [
        ([str(a)], r"notjson\.jsonl line 3: not JSON \(Expecting value at column 10\)"),
        ([str(tmp_path / "nofield.jsonl")], r"line 2: no field 'text' \(fields: 'body', 'id'\)"),
        ([str(tmp_path / "notstr.jsonl")], r"notstr\.jsonl line 2: field 'text' is int, expected"),
        (
            [str(tmp_path / "array.json")],
            r"array\.json line 3: expected ',' or ']' after element 1",
        ),
        ([str(tmp_path / "empty.parquet")], r"empty\.parquet: empty \(no rows\)"),
        ([str(tmp_path / "zero.parquet")], r"zero\.parquet: cannot read it .*expected a Parquet"),
        (
            [str(tmp_path / "nocol.parquet")],
            r"nocol\.parquet: no column 'text' \(columns: 'body'\)",
        ),
        ([str(tmp_path / "ints.parquet")], r"ints\.parquet: column 'text' has type int64"),
        ([str(tmp_path / "null.parquet")], r"null\.parquet row 1: field 'text' is null, expected"),
        ([str(tmp_path / "cut.jsonl.gz")], r"cut\.jsonl\.gz: corrupt gzip stream \(truncated"),
        ([str(tmp_path / "junk.jsonl.gz")], r"junk\.jsonl\.gz: corrupt gzip stream \(Error -3"),
        ([str(tmp_path / "cut.jsonl.zst")], r"cut\.jsonl\.zst: corrupt zstd stream \(truncated"),
        ([str(tmp_path / "junk.jsonl.zst")], r"junk\.jsonl\.zst: corrupt zstd stream \(.*frame"),
        ([f"{a}:-1"], r"weight '-1' is not a positive number"),
        ([f"{a}:0"], r"weight '0' is not a positive number"),
        ([f"{a}:abc"], r"weight 'abc' is not a positive number"),
        ([f"{a}:0.5", f"{a}:nan"], r"weight 'nan' is not a positive number"),
    ]


def test_each_bad_input_exits_2_naming_it(tmp_path, capsys, data_cli):
    for data, pattern in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        code = data_cli(["data", "prepare", "--data", *data, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (data, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scratchllm data: error: "), err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert not (out / "index.json").exists() and not list(out.glob("shard-*"))


def test_bad_record_after_some_shards_keeps_them_valid(tmp_path, capsys, monkeypatch, data_cli):
    monkeypatch.setattr(shards, "CHUNK_BYTES", 500)  # tasks, so shards, before the bad line
    path = tmp_path / "late.jsonl"
    good = "".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(400))
    path.write_text(good + '{"text": "last good"}\n{"text": [1, 2]}\n')
    out = tmp_path / "out"
    args = ["data", "prepare", "--data", str(path), "--out", str(out), "--shard-tokens", "1000"]
    assert data_cli(args) == 2
    assert "late.jsonl line 402: field 'text' is list, expected a string" in capsys.readouterr().err
    index = read_index(out)
    assert not index["complete"] and len(index["shards"]) >= 5
    for entry in index["shards"]:
        assert len(TokenFile(out / entry["file"])) == entry["tokens"] == 1000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", *(e["file"] for e in index["shards"])]
    )  # no temporary file left
    with pytest.raises(InputError, match=r"incomplete .* run `scratchllm data prepare` again"):
        ShardSet(out)


# -- hub datasets: a local server stands in for the hub (HF_ENDPOINT) ------------------------------
_SHA = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(files: dict[str, bytes]):
    """A minimal hub for one dataset repo, user/tiny: what `datasets` streaming asks for."""
    import hashlib
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?")[0]
            repo = "/datasets/user/tiny/resolve/"
            if path.startswith(repo) and path[len(repo) :].partition("/")[2] in files:
                body = files[path[len(repo) :].partition("/")[2]]
                etag = f'"{hashlib.sha256(body).hexdigest()}"'
                return self._send(200, body, {"ETag": etag, "X-Repo-Commit": _SHA})
            if path.startswith(repo):
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
            if re.fullmatch(r"/api/datasets/user/tiny(/revision/\w+)?", path):
                info = {
                    "id": "user/tiny",
                    "sha": _SHA,
                    "siblings": [{"rfilename": f} for f in files],
                }
                return self._send(200, json.dumps(info).encode(), {})
            if path.startswith("/api/datasets/user/tiny/tree/"):
                items = [
                    {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()
                ]
                return self._send(200, json.dumps(items).encode(), {})
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_hub_dataset_streams_from_a_local_server(tmp_path, docs):
    import os
    import subprocess
    import sys

    pytest.importorskip("datasets")
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    server = _fake_hub({"train.jsonl": lines})
    env = {
        **os.environ,
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_HOME": str(tmp_path / "hf"),  # no cache outside the test
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)  # this test's hub is on 127.0.0.1: an offline flag would refuse it
    (tmp_path / "local.jsonl").write_bytes(lines)
    try:
        script = (
            "import sys\nfrom scratchllm import cli\n"
            "cli.COMMANDS = {'data': cli.COMMANDS['data']}\n"
            f"args = ['data', 'prepare', '--shard-tokens', '3000', '--out', {str(tmp_path)!r}]\n"
            "code = cli.main([*args[:-1], args[-1] + '/hub', '--data', 'hf:user/tiny:train'])\n"
            "bad = cli.main([*args[:-1], args[-1] + '/bad', '--data', 'hf:user/missing'])\n"
            "sys.exit(10 * code + bad)\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        server.shutdown()
    assert run.returncode == 2, run.stderr[-2000:]  # 0 for the hub dataset, 2 for the missing
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert (
        len(errors) == 1 and "hub dataset user/missing (split train): cannot stream it" in errors[0]
    )
    local = prepare_shards(
        [str(tmp_path / "local.jsonl")], ByteTokenizer(), tmp_path / "l", shard_tokens=3000
    )
    hub = ShardSet(tmp_path / "hub")
    assert [f.path.read_bytes() for f in hub.files] == [f.path.read_bytes() for f in local.files]
