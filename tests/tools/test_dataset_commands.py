"""``trainio shard``, ``verify`` and ``inspect`` end to end, on local and S3 datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from trainio.loaders import Dataset
from trainio.storage import S3Store
from trainio.tools._cli import main

from .._writers import kill_a_dataset_writer_midway
from ..loaders._damage import edit_index, flip_bit

N = 3000


def source_table(offset: int = 0, n: int = N) -> pa.Table:
    ids = np.arange(offset, offset + n)
    return pa.table({
        "id": ids,
        "text": [f"document {i}" for i in ids],
        "score": ids / 3.0,
    })


def all_rows(url: str | Path | S3Store) -> pa.Table:
    ds = Dataset(url if isinstance(url, S3Store) else str(url))
    return pa.concat_tables([ds.read_shard(i) for i in range(len(ds.shards))])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(source_table(0), folder / "part-0.parquet", row_group_size=500)
    pq.write_table(source_table(N), folder / "part-1.parquet", row_group_size=500)
    return folder


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "arrow"])
def test_shard_each_format_keeps_every_row_in_order(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = source_table()
    path = tmp_path / f"input.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=700)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    else:
        with ipc.new_file(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=400)
    code, out, _ = run(capsys, "shard", str(path), "--out", str(tmp_path / "ds"), "--shard-size", "20KB",
                       "--batch-rows", "256")
    assert code == 0 and f"wrote {N:,} rows" in out
    got = all_rows(tmp_path / "ds")
    assert got.column("id").to_pylist() == table.column("id").to_pylist()
    assert got.column("text").to_pylist() == table.column("text").to_pylist()
    assert len(Dataset(str(tmp_path / "ds")).shards) > 1


def test_directories_and_globs_are_sorted(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (inputs / "notes.txt").write_text("not an input")
    assert run(capsys, "shard", str(inputs), "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, "shard", str(inputs / "part-*.parquet"), "--out", str(tmp_path / "b"))[0] == 0
    for ds in ("a", "b"):
        assert all_rows(tmp_path / ds).column("id").to_pylist() == list(range(2 * N))


def test_workers_give_the_same_rows_as_one_process(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq.write_table(source_table(2 * N), inputs / "part-2.parquet")
    code, out, _ = run(capsys, "shard", str(inputs), "--out", str(tmp_path / "par"), "--workers", "2",
                       "--shard-size", "30KB", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["rows"] == 3 * N and summary["shards"] >= 2
    assert all_rows(tmp_path / "par").column("id").to_pylist() == list(range(3 * N))
    assert run(capsys, "verify", str(tmp_path / "par"))[0] == 0


def test_raw_files_become_path_and_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    blobs = {"b.jpg": b"\xff\xd8" * 50, "a.png": b"\x89PNG" * 10, "sub/c.bin": bytes(range(256))}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    assert run(capsys, "shard", str(folder), "--format", "files", "--out", str(tmp_path / "ds"))[0] == 0
    got = all_rows(tmp_path / "ds")
    assert got.column("path").to_pylist() == ["a.png", "b.jpg", "sub/c.bin"]
    assert got.column("data").to_pylist() == [blobs["a.png"], blobs["b.jpg"], blobs["sub/c.bin"]]


def test_saved_hugging_face_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The layout Dataset.save_to_disk writes: Arrow *stream* files listed in state.json.
    folder = tmp_path / "hf"
    folder.mkdir()
    table = source_table()
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {}}})})
    for i, part in enumerate((table.slice(0, 1000), table.slice(1000))):
        with ipc.new_stream(folder / f"data-0000{i}-of-00002.arrow", table.schema) as writer:
            writer.write_table(part, max_chunksize=300)
    (folder / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")
    assert run(capsys, "shard", str(folder), "--out", str(tmp_path / "ds"))[0] == 0
    assert all_rows(tmp_path / "ds").column("id").to_pylist() == list(range(N))


def test_map_hook_transforms_every_batch(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hook = tmp_path / "hooks.py"
    hook.write_text(textwrap.dedent("""
        import numpy as np
        def tokenize(batch):
            ids = batch.column("id").to_numpy()
            return {"id": ids, "tokens": [np.arange(i % 5, dtype=np.int32) for i in ids]}
    """))
    code, _, _ = run(capsys, "shard", str(inputs), "--out", str(tmp_path / "ds"), "--map", f"{hook}:tokenize")
    assert code == 0
    ds = Dataset(str(tmp_path / "ds"))
    assert ds.schema.names == ["id", "tokens"] and str(ds.schema.field("tokens").type) == "list<item: int32>"
    np.testing.assert_array_equal(ds[7]["tokens"], np.arange(2, dtype=np.int32))


def test_s3_input_and_output(s3_store: S3Store, s3_url: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    local = tmp_path / "x.parquet"
    pq.write_table(source_table(), local)
    s3_store.put_file("raw/x.parquet", local)
    source, target = f"{s3_url}/raw/", f"{s3_url}/ds"
    code, out, err = run(capsys, "shard", source, "--out", target, "--shard-size", "20KB")
    assert code == 0, err
    assert run(capsys, "verify", target)[0] == 0
    code, out, _ = run(capsys, "inspect", target, "--json", "--head", "2")
    document = json.loads(out)
    assert document["rows"] == N and document["head"][1]["text"] == "document 1"


def test_inspect_shows_schema_shards_and_rows(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "shard", str(inputs), "--out", str(tmp_path / "ds"), "--compression", "zstd")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "ds"), "--head", "3")
    assert code == 0
    assert f"rows         {2 * N:,}" in out and "compression zstd" in out
    assert "text   string" in out and "document 2" in out
    document = json.loads(run(capsys, "inspect", str(tmp_path / "ds"), "--json")[1])
    assert document["compression"] == "zstd" and [f["name"] for f in document["schema"]] == ["id", "text", "score"]


@pytest.fixture
def sharded(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(capsys, "shard", str(inputs), "--out", str(tmp_path / "ds"), "--shard-size", "20KB")[0] == 0
    return tmp_path / "ds"


def _shard_file(ds: Path, number: int = 1) -> Path:
    return ds / json.loads((ds / "index.json").read_text())["shards"][number]["path"]


def _damage_flip(ds: Path) -> None:
    path = _shard_file(ds)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04
    path.write_bytes(bytes(data))


def _damage_truncate(ds: Path) -> None:
    path = _shard_file(ds)
    path.write_bytes(path.read_bytes()[:-50])


def _damage_remove(ds: Path) -> None:
    _shard_file(ds).unlink()


def _more_rows(document: dict[str, Any]) -> None:
    document["shards"][1]["rows"] += 1
    document["rows"] += 1


def _damage_rows(ds: Path) -> None:
    edit_index(ds, _more_rows)


def _damage_path(ds: Path) -> None:
    edit_index(ds, lambda d: d["shards"][1].update(path="../../etc/passwd"))


def _damage_index_unsealed(ds: Path) -> None:
    edit_index(ds, _more_rows, seal=False)


def _damage_index_bit(ds: Path) -> None:
    flip_bit(ds / "index.json", 40)


@pytest.mark.parametrize(("damage", "where", "reason"), [
    (_damage_flip, "shard-00001", "xxh3-128 is"),
    (_damage_truncate, "shard-00001", "bytes, the index says"),
    (_damage_remove, "shard-00001", "missing"),
    (_damage_rows, "shard-00001", "the index says"),
    (_damage_path, "index.json", "'../../etc/passwd' is not a path inside the dataset"),
    (_damage_index_unsealed, "index.json", "must end with its 'document_xxh3_128' member"),
    (_damage_index_bit, "index.json", "the document is damaged"),
])
def test_verify_reports_each_damage(
    sharded: Path, capsys: pytest.CaptureFixture[str], damage: object, where: str, reason: str
) -> None:
    assert run(capsys, "verify", str(sharded))[0] == 0
    damage(sharded)  # type: ignore[operator]
    code, _, err = run(capsys, "verify", str(sharded))
    assert code == 1
    assert where in err and reason in err, err
    document = json.loads(run(capsys, "verify", str(sharded), "--json")[1])
    assert not document["ok"] and any(reason in p["reason"] for p in document["problems"])


def test_verify_after_a_killed_writer_says_there_is_no_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kill_a_dataset_writer_midway(tmp_path / "ds")
    code, _, err = run(capsys, "verify", str(tmp_path / "ds"))
    assert code == 1
    assert "index.json: missing: this is not a dataset" in err and "unfinished or killed write" in err


@pytest.mark.parametrize("argv", [
    ["verify", "/no/such/dataset"],
    ["inspect", "/no/such/dataset"],
    ["shard", "/no/such/input.parquet", "--out", "OUT"],
    ["shard", "BADFILE", "--out", "OUT"],
    ["shard", "NOTADATASET", "--out", "OUT", "--shard-size", "12XB"],
    ["inspect", "NOTADATASET"],
])
def test_bad_input_is_one_line_and_non_zero(tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("BADFILE", str(tmp_path / "bad.parquet"))
            .replace("NOTADATASET", str(tmp_path / "plain")) for a in argv]
    script = Path(sys.executable).parent / "trainio"
    result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not Path("/no").exists()


@pytest.mark.slow
def test_help_has_examples() -> None:
    for command in ("shard", "verify", "inspect"):
        result = subprocess.run([sys.executable, "-m", "trainio.tools", command, "--help"],
                                capture_output=True, text=True, check=True)
        assert "examples:" in result.stdout and f"trainio {command}" in result.stdout


def test_a_failing_worker_stops_the_others_and_leaves_nothing(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for part in range(2, 6):
        pq.write_table(source_table(part * N), inputs / f"part-{part}.parquet", row_group_size=200)
    hook = tmp_path / "failing.py"
    hook.write_text(textwrap.dedent(f"""
        def explode(batch):
            if batch.column("id")[0].as_py() >= {5 * N}:
                raise ValueError("bad record in the last input")
            return batch
    """))
    code, _, err = run(capsys, "shard", str(inputs), "--out", str(tmp_path / "ds"), "--workers", "2",
                       "--shard-size", "10KB", "--map", f"{hook}:explode")
    assert code == 1 and "bad record in the last input" in err
    assert not (tmp_path / "ds" / "index.json").exists()
    assert list((tmp_path / "ds").rglob("*.arrow")) == []


# -- hostile files: one line and a non-zero exit, never a hang or a traceback ----------------------------------------


def _written(tmp_path: Path) -> Path:
    """A small dataset of three shards, written by the library (not through ``trainio shard``)."""
    from trainio.loaders import DatasetWriter

    with DatasetWriter(tmp_path / "ds", shard_bytes=20_000, batch_rows=256) as writer:
        writer.write_table(source_table())
    return tmp_path / "ds"


def _fifo_shard(ds: Path) -> None:
    path = _shard_file(ds, 0)
    path.unlink()
    os.mkfifo(path)


def _fifo_index(ds: Path) -> None:
    (ds / "index.json").unlink()
    os.mkfifo(ds / "index.json")


def _deep_index(ds: Path) -> None:
    (ds / "index.json").write_bytes(b'{"format": "trainio.dataset", "shards": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def _linked_shards(ds: Path) -> None:
    elsewhere = ds.parent / "elsewhere"
    (ds / "shards").rename(elsewhere)
    (ds / "shards").symlink_to(elsewhere, target_is_directory=True)


def _linked_shard(ds: Path) -> None:
    path = _shard_file(ds, 0)
    outside = ds.parent / "outside.arrow"
    path.rename(outside)
    path.symlink_to(outside)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize(("damage", "message"), [
    (_fifo_shard, "not a regular file"),
    (_fifo_index, "not a regular file"),
    (_deep_index, "nested more than"),
    (_linked_shards, "symbolic link leads it out"),
    (_linked_shard, "symbolic link leads it out"),
])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_hostile_files_are_one_line_errors(tmp_path: Path, damage: Any, message: str, command: str) -> None:
    ds = _written(tmp_path)
    damage(ds)
    script = Path(sys.executable).parent / "trainio"
    result = subprocess.run([str(script), command, str(ds)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()  # verify: one line per damaged file; inspect: the first one
    assert "Traceback" not in result.stderr and (len(lines) == 1 or command == "verify"), result.stderr
    assert all(line.startswith("trainio: error: ") and message in line for line in lines), result.stderr
    assert any(name in result.stderr for name in ("index.json", "shard-00000.arrow"))
