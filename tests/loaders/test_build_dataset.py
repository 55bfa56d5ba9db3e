"""build_dataset: a dataset from any inputs and a function, in parallel processes, committed whole or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.loaders import Dataset, build_dataset, verify_dataset
from trainio.storage import AlreadyExists, FormatError


def documents(n: int) -> Iterator[dict[str, Any]]:
    for k in range(n % 3):  # 0, 1 or 2 samples per input
        yield {"input": n, "k": k, "tokens": np.arange(n % 7, dtype=np.int32)}


@pytest.mark.parametrize("workers", [1, 3])
def test_every_input_s_samples_in_order_whatever_the_workers(tmp_path: Path, workers: int) -> None:
    index = build_dataset(documents, list(range(200)), tmp_path / "ds", workers=workers, shard_bytes="4KB")
    ds = Dataset(tmp_path / "ds")
    assert index.rows == len(ds) == sum(n % 3 for n in range(200)) and verify_dataset(tmp_path / "ds").ok
    rows = [(int(ds[i]["input"]), int(ds[i]["k"])) for i in range(len(ds))]
    assert rows == [(n, k) for n in range(200) for k in range(n % 3)]
    assert len(ds.shards) >= workers  # each worker's run in shards of its own, all listed by one index


def single(n: int) -> dict[str, Any] | None:
    return None if n == 5 else {"n": n, "square": n * n}


def test_one_sample_or_none_per_input(tmp_path: Path) -> None:
    build_dataset(single, range(10), tmp_path / "ds", workers=2)
    assert [int(Dataset(tmp_path / "ds")[i]["square"]) for i in range(9)] == [n * n for n in range(10) if n != 5]


def fails_on_77(n: int) -> dict[str, Any]:
    if n == 77:
        raise RuntimeError("bad input")
    return {"n": n}


def other_type_late(n: int) -> dict[str, Any]:
    return {"n": n if n < 150 else f"text {n}"}


@pytest.mark.parametrize(("make", "message"), [
    (fails_on_77, r"make\(\) failed on input 77 \(77\): RuntimeError: bad input"),
    (other_type_late, r"a sample of input 150 does not fit the schema of the first: field .n."),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_leaves_no_dataset_and_keeps_the_old_one(tmp_path: Path, make: Any, message: str,
                                                           workers: int) -> None:
    build_dataset(single, range(10), tmp_path / "ds")
    with pytest.raises(FormatError, match=message):
        build_dataset(make, range(200), tmp_path / "ds", workers=workers, overwrite=True)
    assert len(Dataset(tmp_path / "ds")) == 9 and verify_dataset(tmp_path / "ds").ok
    assert sorted(p.name for p in (tmp_path / "ds" / "shards").iterdir()) == \
        sorted(Path(key).name for s in Dataset(tmp_path / "ds").shards for key in s.files)
    with pytest.raises(AlreadyExists):
        build_dataset(single, range(3), tmp_path / "ds")
