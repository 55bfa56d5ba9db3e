"""Compressed checkpoints: zstd chunks any zarr reader decodes, checked and repaired like raw ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, verify_checkpoint
from trainio.checkpoint._format.manifest import Manifest
from trainio.checkpoint._format.zarr_layout import parse_compression
from trainio.storage import FormatError, load_sealed, seal_json

from .test_format import _same, _state, zarr_read

torch = pytest.importorskip("torch")
zarr = pytest.importorskip("zarr")


def _compressible() -> dict[str, object]:
    return {"w": (torch.arange(300_000, dtype=torch.float32) % 17).reshape(300, 1000),
            "e": torch.zeros(7, 5, 301, dtype=torch.bfloat16), "n": np.tile(np.arange(50), 4000)}


def test_compressed_steps_restore_type_for_type(tmp_path: Path) -> None:
    state = {**_state(), **_compressible()}
    with CheckpointManager([tmp_path], compression="zstd:5", chunk_bytes=64 << 10, pack_bytes=1024) as manager:
        manager.save(1, state).wait()
        restored = manager.restore()
        manifest = manager._io[0].manifest(1)
    _same(state, restored)
    assert manifest.arrays["w"].codec == "zstd:5" and manifest.pack is not None and manifest.pack.codec == "zstd:5"
    assert len(manifest.arrays["w"].chunk_files()) > 1
    raw = sum(c.size for c in manifest.arrays["w"].chunk_files())
    assert sum(manifest.files[c.key].size for c in manifest.arrays["w"].chunk_files()) < raw // 4


def test_plain_zarr_decodes_compressed_steps(tmp_path: Path) -> None:
    state = {**_state(), **_compressible()}
    with CheckpointManager([tmp_path], compression="zstd", chunk_bytes=10_000, pack_bytes=2048) as manager:
        manager.save(2, state).wait()
        manifest = manager._io[0].manifest(2)
    group = zarr.open_group(tmp_path / "000000000002" / "state.zarr", mode="r")
    assert [c.to_dict()["name"] for c in group["w"].compressors] == ["zstd"]
    assert np.array_equal(zarr_read(group, "w"), state["w"].numpy())  # type: ignore[attr-defined]
    assert np.array_equal(zarr_read(group, "n"), state["n"])
    assert np.array_equal(zarr_read(group, "model/w"), state["model"]["w"].numpy())  # type: ignore[index]
    for path, spec in manifest.arrays.items():
        assert zarr_read(group, path).shape == spec.shape


def test_unchanged_compressed_chunks_are_linked(tmp_path: Path) -> None:
    state = _compressible()
    with CheckpointManager([tmp_path], compression="zstd") as manager:
        manager.save(1, state).wait()
        state["n"] = state["n"] + 1  # type: ignore[operator]
        manager.save(2, state).wait()
        assert verify_checkpoint(tmp_path, [2]).ok
    chunk = Path("state.zarr", "w", "c.0.0")
    assert os.stat(tmp_path / "000000000001" / chunk).st_ino == os.stat(tmp_path / "000000000002" / chunk).st_ino


def test_a_damaged_compressed_chunk_falls_back_to_the_next_tier(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    state = _compressible()
    with CheckpointManager([fast, slow], compression="zstd", chunk_bytes=100_000) as manager:
        manager.save(4, state).wait()
        manager.wait()
        chunk = fast / "000000000004" / "state.zarr" / "w" / "c.1.0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
        restored, report = manager.restore_with_report(repair=True)
    assert torch.equal(restored["w"], state["w"])
    assert any("c.1.0" in key for key in report.fell_back) and any("c.1.0" in key for key in report.repaired)
    assert verify_checkpoint(fast, [4]).ok


@pytest.mark.parametrize(("text", "canonical"), [(None, None), ("none", None), ("zstd", "zstd:3"),
                                                 ("zstd:19", "zstd:19"), ("zstd:-1", "zstd:-1")])
def test_compression_settings(text: str | None, canonical: str | None) -> None:
    assert parse_compression(text) == canonical


@pytest.mark.parametrize("text", ["gzip", "zstd:23", "zstd:x", "ZSTD", ""])
def test_unknown_compression_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ValueError, match="compression"):
        CheckpointManager([tmp_path], compression=text)


@pytest.mark.parametrize("codec", ["gzip:1", "zstd", "zstd:99", 3])
def test_a_manifest_with_an_unknown_codec_is_refused(tmp_path: Path, codec: object) -> None:
    with CheckpointManager([tmp_path], compression="zstd") as manager:
        manager.save(1, _compressible()).wait()
    path = tmp_path / "000000000001" / "manifest.json"
    doc = load_sealed(path.read_bytes(), str(tmp_path), "manifest.json")
    doc["arrays"]["w"]["codec"] = codec
    with pytest.raises(FormatError, match=r"arrays\['w'\].codec"):
        Manifest.from_bytes(seal_json(doc), str(tmp_path), "000000000001/manifest.json")
