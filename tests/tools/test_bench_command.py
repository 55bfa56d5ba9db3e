"""``trainio bench``: the whole job in one command, its figures, its plot and its errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from trainio.tools._cli import main

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

pytest.importorskip("torch")


def _numbers(document: Any, where: str = "") -> list[tuple[str, float]]:
    if isinstance(document, dict):
        return [n for k, v in document.items() for n in _numbers(v, f"{where}.{k}")]
    if isinstance(document, bool) or not isinstance(document, (int, float)):
        return []
    return [(where, float(document))]


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    parent = tmp_path_factory.mktemp("bench")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--size", "64MB", "--json", "--dir", str(parent)]) == 0
    return json.loads(out.getvalue()), parent


def test_bench_reports_every_figure(bench_json: tuple[dict[str, Any], Path]) -> None:
    document, _ = bench_json
    data, loader, ckpt = (document[k] for k in ("dataset", "loader", "checkpoint"))
    assert data["verified"] and data["rows"] == 64_000_000 // (4 * 2048) and data["bytes"] > 60_000_000
    assert set(loader) == {"warm", "cold"}
    for run in loader.values():
        assert run["samples"] == data["rows"] and run["bytes"] >= 64_000_000 // 2 and run["device"] == "cpu"
        assert run["wait_s"] >= 0 and len(run["timeline"]) >= data["rows"] // 64
    assert ckpt["bit_exact"] and ckpt["tensors"] > 100 and ckpt["bytes"] > 30_000_000
    figures = dict(_numbers({"dataset": data, "loader": loader, "checkpoint": ckpt}))
    assert all(v > 0 for k, v in figures.items() if not k.endswith("wait_s")), figures
    assert document["machine"]["rounds"] == 3
    assert set(document["ratios"]) >= {"dataset write", "loader -> cpu, first epoch, warm",
                                       "loader -> cpu, first epoch, cold", "save blocked", "committed (tier 1)",
                                       "promoted (tier 2)", "restore (tier 2)", "first save blocked, reserved"}
    assert all(0 < r < 10 for r in document["ratios"].values())


def test_bench_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--size", "2MB", "--rounds", "1", "--dir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["machine"]["rounds"] == 1


def test_bench_cleans_up_unless_kept(bench_json: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    _, parent = bench_json
    assert list(parent.iterdir()) == []
    assert main(["bench", "--size", "1MB", "--dir", str(tmp_path), "--keep"]) == 0
    kept = list(tmp_path.iterdir())
    assert len(kept) == 1 and (kept[0] / "dataset" / "index.json").is_file()
    assert list((kept[0] / "ckpt-slow").glob("*/manifest.json")), "the last steps are kept"


def test_bench_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    plot = tmp_path / "bench.png"
    assert main(["bench", "--size", "2MB", "--dir", str(tmp_path / "work"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert re.search(r"restore bit-exact\s+yes", capsys.readouterr().out)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int, text: str) -> None:
    with pytest.raises(SystemExit) if code == 2 else _NoExit():
        assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and text in err, err


class _NoExit:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


def test_a_bad_size_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(capsys, ["bench", "--size", "lots"], 2, "'lots' is not a size")
    _one_line_error(capsys, ["bench", "--size", "10KB"], 1, "give at least")


def test_an_unwritable_dir_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    _one_line_error(capsys, ["bench", "--size", "1MB", "--dir", str(blocker / "sub")], 1, str(blocker))


def test_an_unreachable_store_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.checkpoint._ranks import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    _one_line_error(capsys, ["bench", "--size", "1MB", "--dir", str(tmp_path), "--store", "s3://test-bucket/run"],
                    1, "cannot reach the checkpoint store")
    assert list(tmp_path.iterdir()) == []


def test_the_second_tier_can_be_s3(s3_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--size", "2MB", "--dir", str(tmp_path), "--store", s3_url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["checkpoint"]["bit_exact"] and document["checkpoint"]["tiers"][1].startswith(s3_url)


def test_the_images_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--size", "4MB", "--workload", "images", "--dir", str(tmp_path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["workload"] == "images" and document["dataset"]["verified"]
    assert document["loader"]["warm"]["samples"] == document["dataset"]["rows"] > 64 and document["checkpoint"]["bit_exact"]
