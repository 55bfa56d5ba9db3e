"""``trainio shard --engine ray``: the same dataset as the local engine, exactly once despite retries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainio.loaders import Dataset, verify_dataset
from trainio.storage import S3Store
from trainio.tools import ShardOptions, ShardTaskFailed, shard, shard_with_ray
from trainio.tools._cli import main

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (the ray extra)")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parquet")
    files = []
    for i in range(4):
        rng = np.random.default_rng(i)
        n = 3000 + 500 * i
        tokens = [rng.integers(0, 1000, rng.integers(1, 40), dtype=np.int32) for _ in range(n)]
        table = pa.table({"id": np.arange(n) + 10_000 * i, "text": [f"row {i}-{j}" for j in range(n)],
                          "tokens": tokens})
        files.append(root / f"part-{i}.parquet")
        pq.write_table(table, files[-1], row_group_size=700)
    return files


def _rows(url: str | Path) -> dict[str, Any]:
    dataset = Dataset(url)
    return dataset.take(list(range(len(dataset))))


def _same_rows(a: str | Path, b: str | Path) -> None:
    left, right = _rows(a), _rows(b)
    assert list(left) == list(right)
    for column in left:
        assert len(left[column]) == len(right[column])
        for x, y in zip(left[column], right[column], strict=True):
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, column


OPTIONS = ShardOptions(shard_bytes=64 << 10, batch_rows=256)


def test_ray_and_local_engines_write_the_same_rows(parquet_files: list[Path], tmp_path: Path) -> None:
    inputs = [str(p) for p in parquet_files]
    local = shard(inputs, tmp_path / "local", options=OPTIONS)
    on_ray = shard_with_ray(inputs, tmp_path / "ray", options=OPTIONS, shards_per_task=2)
    assert on_ray.rows == local.rows == sum(3000 + 500 * i for i in range(4))
    assert len(on_ray.shards) > 4
    _same_rows(tmp_path / "local", tmp_path / "ray")
    assert verify_dataset(tmp_path / "ray").ok


def test_the_output_does_not_depend_on_how_the_work_is_cut(parquet_files: list[Path], tmp_path: Path) -> None:
    inputs = [str(p) for p in parquet_files]
    shard_with_ray(inputs, tmp_path / "a", options=OPTIONS, shards_per_task=1)
    shard_with_ray(inputs, tmp_path / "b", options=OPTIONS, shards_per_task=16)
    _same_rows(tmp_path / "a", tmp_path / "b")


def _map_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "hook.py"
    path.write_text(f"import os\nimport pyarrow as pa\nMARK = {str(tmp_path / 'failed')!r}\n\n"
                    f"def hook(batch):\n{body}")
    return f"{path}:hook"


def test_a_task_that_fails_once_still_writes_every_row_once(parquet_files: list[Path], tmp_path: Path) -> None:
    hook = _map_file(tmp_path, "    if not os.path.exists(MARK):\n        open(MARK, 'w').close()\n"
                               "        raise RuntimeError('injected: the first attempt fails')\n    return batch\n")
    inputs = [str(p) for p in parquet_files]
    index = shard_with_ray(inputs, tmp_path / "ray", options=ShardOptions(shard_bytes=64 << 10, map=hook))
    assert (tmp_path / "failed").exists()  # the failure did happen, and was retried
    shard(inputs, tmp_path / "local", options=OPTIONS)
    _same_rows(tmp_path / "local", tmp_path / "ray")
    on_disk = sorted(p.name for p in (tmp_path / "ray" / "shards").iterdir())
    assert on_disk == sorted(Path(s.path).name for s in index.shards)  # no orphan, no duplicate


def test_a_task_that_always_fails_fails_the_command(parquet_files: list[Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    hook = _map_file(tmp_path, "    raise RuntimeError('injected: this map always fails')\n")
    with pytest.raises(ShardTaskFailed, match="injected: this map always fails"):
        shard_with_ray([str(parquet_files[0])], tmp_path / "out", options=ShardOptions(map=hook))
    assert not (tmp_path / "out" / "index.json").exists()
    code = main(["shard", str(parquet_files[0]), "--out", str(tmp_path / "cli"), "--engine", "ray", "--map", hook,
                 "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "injected: this map always fails" in err[-1] and err[-1].startswith("trainio: error:")
    assert not (tmp_path / "cli" / "index.json").exists()


def test_inputs_and_output_on_s3(parquet_files: list[Path], s3_store: S3Store, s3_url: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    for path in parquet_files:
        s3_store.put_file(f"raw/{path.name}", path)
    out = f"{s3_url}/ds"
    assert main(["shard", f"{s3_url}/raw/", "--out", out, "--engine", "ray", "--shard-size", "64KB",
                 "--batch-rows", "256", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "ray" and summary["rows"] == sum(3000 + 500 * i for i in range(4))
    shard([str(p) for p in parquet_files], tmp_path / "local", options=OPTIONS)
    _same_rows(tmp_path / "local", out)
    assert verify_dataset(out).ok


def test_formats_the_ray_engine_does_not_read_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.arrow").write_bytes(b"")
    with pytest.raises(Exception, match="the Ray engine reads one of parquet, jsonl, csv"):
        shard_with_ray([str(tmp_path / "a.arrow")], tmp_path / "out")


def test_without_ray_the_error_says_how_to_install_it(parquet_files: list[Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    code = main(["shard", str(parquet_files[0]), "--out", str(tmp_path / "out"), "--engine", "ray"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0 and "pip install 'trainio[ray]'" in err


def test_json_lines_and_csv_give_the_local_engine_s_dataset(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"id": i, "text": "x" * (i % 7), "ids": [i, i + 1]}) + "\n" for i in range(3000))
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.csv").write_text("id,name\n" + "".join(f"{i},n{i}\n" for i in range(2000)))
    for name in ("a.jsonl", "b.csv"):
        shard([str(tmp_path / name)], tmp_path / f"{name}-local", options=OPTIONS)
        shard_with_ray([str(tmp_path / name)], tmp_path / f"{name}-ray", options=OPTIONS)
        assert Dataset(tmp_path / f"{name}-ray").schema == Dataset(tmp_path / f"{name}-local").schema
        _same_rows(tmp_path / f"{name}-local", tmp_path / f"{name}-ray")
