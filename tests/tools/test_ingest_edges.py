"""``trainio shard`` on real-world inputs: JSON lines of any length, bad lines, inputs that disagree, a --map module
beside the working directory, and shards that keep to the size asked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainio.loaders import Dataset, DatasetWriter

TRAINIO = str(Path(sys.executable).parent / "trainio")


def shard(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRAINIO, "shard", *argv], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_json_line_longer_than_pyarrows_block_is_read(tmp_path: Path) -> None:
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"i": i, "text": "x" * (3_000_000 if i in (1, 4) else 10)}) + "\n")
    result = shard("docs.jsonl", "--out", "ds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ds = Dataset(tmp_path / "ds")
    assert [int(ds[i]["i"]) for i in range(len(ds))] == list(range(6))
    assert [len(ds[i]["text"]) for i in range(6)] == [10, 3_000_000, 10, 10, 3_000_000, 10]


def test_json_lines_are_cut_at_newlines_whatever_the_run_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainio.storage import FormatError
    from trainio.tools import _inputs

    rows = [{"i": i, "text": "y" * (i * 37 % 200)} for i in range(300)]
    body = "".join(json.dumps(r) + "\n" for r in rows).rstrip("\n")  # the last line has no newline
    (tmp_path / "docs.jsonl").write_text(body)
    [source] = _inputs.find_inputs([str(tmp_path / "docs.jsonl")], None)
    for run in (7, 64, 1000, 1 << 20):
        monkeypatch.setattr(_inputs, "_JSON_RUN", run)
        got = list(_inputs.read_batches(source, 100))
        assert [r for b, _ in got for r in b.to_pylist()] == rows
        progress = [done for _, done in got]
        assert progress == sorted(progress) and progress[-1] == source.size
    monkeypatch.setattr(_inputs, "_JSON_RUN", 64)
    monkeypatch.setattr(_inputs, "_JSON_MAX_LINE", 300)
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "z" * 400}) + "\n")
    [long] = _inputs.find_inputs([str(tmp_path / "long.jsonl")], None)
    with pytest.raises(FormatError, match="long.jsonl.*a line is longer than"):
        list(_inputs.read_batches(long, 100))


def test_a_bad_json_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3,}\n')
    result = shard("docs.jsonl", "--out", "ds", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "docs.jsonl: line 4: not JSON" in result.stderr


def test_an_input_with_other_columns_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "a", "n": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b", "label": 2}\n')
    result = shard("a.jsonl", "b.jsonl", "--out", "ds", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "b.jsonl: its rows do not fit the dataset's schema" in result.stderr and "field 'n'" in result.stderr
    assert not (tmp_path / "ds" / "index.json").exists()


def test_a_map_module_in_the_working_directory_is_imported(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "ab"}\n{"text": "cde"}\n')
    (tmp_path / "tokenize_here.py").write_text(textwrap.dedent("""
        import pyarrow as pa
        def lengths(batch):
            return {"length": [len(t) for t in batch.column("text").to_pylist()]}
    """))
    for workers in ("1", "2"):
        result = shard("docs.jsonl", "docs.jsonl", "--out", f"ds{workers}", "--map", "tokenize_here:lengths",
                       "--workers", workers, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        ds = Dataset(tmp_path / f"ds{workers}")
        assert [int(ds[i]["length"]) for i in range(len(ds))] == [2, 3, 2, 3]


@pytest.mark.parametrize("batch_rows", [10, 100_000])
def test_shards_keep_within_a_tenth_of_the_size_asked_whatever_the_batches(tmp_path: Path, batch_rows: int) -> None:
    with DatasetWriter(tmp_path / "ds", shard_bytes=2 << 20, batch_rows=batch_rows) as writer:
        for _ in range(6):
            writer.write_batch({"x": np.zeros((2000, 1000), dtype=np.uint8)})  # 2 MB a call, 1 KB a row
    shards = Dataset(tmp_path / "ds").shards
    assert len(Dataset(tmp_path / "ds")) == 12_000
    assert all(s.bytes <= 1.1 * (2 << 20) for s in shards), [s.bytes for s in shards]
    assert all(s.bytes >= 0.9 * (2 << 20) for s in shards[:-1])


def test_a_saved_hugging_face_datasets_features_are_kept(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    features = {"label": {"names": ["cat", "dog"], "_type": "ClassLabel"}, "text": {"dtype": "string", "_type": "Value"}}
    folder = tmp_path / "hf"
    folder.mkdir()
    table = pa.table({"text": ["a", "b", "c"], "label": [0, 1, 0]})  # files without the features: info has them
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    result = shard("hf", "--out", "ds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kept = json.loads(Dataset(tmp_path / "ds").schema.metadata[b"huggingface"])
    assert kept["info"]["features"]["label"]["names"] == ["cat", "dog"]


def test_an_image_folder_gets_labels_from_its_class_folders_in_batches(tmp_path: Path) -> None:
    for cls, count in (("dog", 4), ("cat", 3)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "train" / cls / f"{i}.jpg").write_bytes(f"{cls}-{i}".encode())
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    result = shard("train", "--format", "imagefolder", "--out", "ds", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ds = Dataset(tmp_path / "ds")
    rows = [ds[i] for i in range(len(ds))]
    assert [(r["class"], int(r["label"])) for r in rows] == [("cat", 0)] * 3 + [("dog", 1)] * 4
    assert rows[0]["image"] == b"cat-0" and rows[0]["path"] == "cat/0.jpg"
    assert json.loads(ds.schema.metadata[b"classes"]) == ["cat", "dog"]
    assert sum(len(s.batches) for s in ds.shards) == 1  # seven files, one record batch
    (tmp_path / "train" / "loose.jpg").write_bytes(b"x")
    result = shard("train", "--format", "imagefolder", "--out", "ds2", cwd=tmp_path)
    assert result.returncode != 0 and "loose.jpg" in result.stderr and "outside any class folder" in result.stderr
