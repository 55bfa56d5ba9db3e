"""The checkpoint format: names, chunking, manifests, and what a state may hold."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager
from trainio.checkpoint._format.manifest import Manifest
from trainio.checkpoint._format.names import is_node_name, node_name
from trainio.checkpoint._format.zarr_layout import _chunk_files, chunk_shape
from trainio.storage import CheckpointError, FormatError, load_sealed, seal_json

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("key", ["w", "layers.0.weight", "a/b", "..", ".", "__x", "", "é", "%41", 7, "c.0"])
def test_node_names_are_valid_and_distinct(key: str | int) -> None:
    name = node_name(key)
    assert is_node_name(name)
    assert "/" not in name


def test_node_names_never_collide() -> None:
    keys = ["a/b", "a%2Fb", "%", "", "__", "%5F_", ".", "%2E", "x y", "x%20y"]
    names = [node_name(k) for k in keys]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("shape", [(), (0,), (5,), (7, 3), (1000, 33), (4, 5, 6), (3, 0, 2), (1, 1, 999)])
@pytest.mark.parametrize("target", [1, 16, 100, 4096])
def test_chunks_tile_the_array_contiguously(shape: tuple[int, ...], target: int) -> None:
    itemsize = 4
    chunks = chunk_shape(shape, itemsize, target)
    assert len(chunks) == len(shape)
    assert math.prod(chunks) * itemsize <= max(target, itemsize) or math.prod(chunks) == 1
    files = _chunk_files("a", shape, chunks, itemsize)
    nbytes = math.prod(shape) * itemsize
    covered = 0
    for f in files:  # in C order, each chunk starts where the previous ended
        assert f.start == covered
        assert 0 < f.length <= f.size == math.prod(chunks) * itemsize
        covered += f.length
    assert covered == nbytes


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.randn(64, 33), "b": torch.randn(33).to(torch.bfloat16),
                  "layers.0.norm": torch.ones(5, dtype=torch.float16)},
        "dtypes": {
            "f8": torch.randn(17).to(torch.float8_e4m3fn), "f8b": torch.randn(3, 3).to(torch.float8_e5m2),
            "bool": torch.tensor([True, False, True]), "c64": torch.randn(4, dtype=torch.complex64),
            "i8": torch.arange(-5, 5, dtype=torch.int8), "u8": torch.arange(200, 210, dtype=torch.uint8),
            "i64": torch.tensor(2**62), "f64": torch.randn(2, 2, dtype=torch.float64),
            "empty": torch.empty(0, 4), "scalar": torch.tensor(3.5),
            "strided": torch.arange(20.0).reshape(4, 5).t(), "grad": torch.ones(3, requires_grad=True),
        },
        "numpy": {"a": np.arange(12, dtype=np.int32).reshape(3, 4), "be": np.arange(4, dtype=">f8"),
                  "s": np.float32(2.5), "i": np.int64(-3), "flag": np.bool_(True), "view": np.arange(10)[::3]},
        "json": {"none": None, "t": True, "i": 12, "big": 2**80, "f": 0.1, "s": "héllo", "nan": float("nan"),
                 "inf": float("inf"), "ninf": float("-inf")},
        "tuple": (1, [2, (3,)], torch.zeros(2)),
        "int_keys": {0: {"x": 1}, 1: torch.ones(1)},
        "shape": torch.Size([3, 4]),
    }


def _bytes(t: Any) -> Any:
    """A tensor's elements as raw bytes, so NaNs and float8 compare bit for bit."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b) or (isinstance(a, torch.Size) and type(b) is tuple), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bytes(a), _bytes(b))
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=") and np.shape(a) == np.shape(b)
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_restore_returns_what_was_saved_type_for_type(tmp_path: Path) -> None:
    state = _state()
    with CheckpointManager([tmp_path / "t0"]) as manager:
        manager.save(3, state).wait()
        restored = manager.restore()
    _same(state, restored)
    assert isinstance(restored["numpy"]["s"], np.float32)
    assert isinstance(restored["tuple"], tuple) and isinstance(restored["tuple"][1], list)


def zarr_read(group: Any, path: str) -> np.ndarray[Any, Any]:
    """An array of a step as any zarr v3 reader gets it: its own array, its bytes in ``.packed``, or its chunks in
    the rank packs (``.rank_packs/*``, each saying in its attributes which chunk lies where)."""
    if path in group:
        return np.asarray(group[path][...])
    if ".rank_packs" in group:
        chunks = [(pack, m) for _, pack in group[".rank_packs"].arrays()
                  for m in pack.attrs["trainio"]["ranked"].values() if m["path"] == path]
        if chunks:
            first = chunks[0][1]
            stored = np.dtype(first["stored"]).newbyteorder("<")
            whole = np.zeros(first["shape"], stored)
            for pack, m in chunks:
                raw = pack[m["offset"]:m["offset"] + m["size"]].view(stored).reshape(m["chunks"])
                place = tuple(slice(i * c, min((i + 1) * c, n))
                              for i, c, n in zip(m["index"], m["chunks"], m["shape"], strict=True))
                whole[place] = raw[tuple(slice(0, s.stop - s.start) for s in place)]
            return whole
    member = group[".packed"].attrs["trainio"]["packed"][path]
    stored = np.dtype(member["stored"]).newbyteorder("<")
    start = member["offset"]
    raw = group[".packed"][start:start + stored.itemsize * math.prod(member["shape"])]
    return raw.view(stored).reshape(member["shape"])


def test_plain_zarr_reads_every_array(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    state = _state()
    state["big"] = torch.randn(300, 1000)  # an array of its own at the default pack size
    with CheckpointManager([tmp_path / "t0"]) as manager:
        manager.save(1, state).wait()
        manifest = manager._io[0].manifest(1)
    group = zarr.open_group(tmp_path / "t0" / "000000000001" / "state.zarr", mode="r")
    assert "big" in group and "model" not in group  # small arrays live in the pack
    for path, spec in manifest.arrays.items():
        array = zarr_read(group, path)
        assert array.shape == spec.shape
        assert str(array.dtype) == spec.stored
    assert group["big"].attrs["trainio"]["dtype"] == "float32"
    assert np.array_equal(zarr_read(group, "big"), state["big"].numpy())
    assert np.array_equal(zarr_read(group, "model/w"), state["model"]["w"].numpy())
    assert np.array_equal(zarr_read(group, "model/b"), state["model"]["b"].view(torch.uint16).numpy())
    assert np.array_equal(zarr_read(group, "dtypes/f8"), state["dtypes"]["f8"].view(torch.uint8).numpy())
    assert np.array_equal(zarr_read(group, "dtypes/strided"), state["dtypes"]["strided"].numpy())
    assert np.array_equal(zarr_read(group, "numpy/be"), state["numpy"]["be"])
    assert zarr_read(group, "dtypes/scalar") == 3.5
    assert zarr_read(group, "dtypes/empty").shape == (0, 4)


def test_unpacked_arrays_are_each_a_zarr_array(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    state = _state()
    with CheckpointManager([tmp_path], pack_bytes=0) as manager:
        manager.save(1, state).wait()
        manifest = manager._io[0].manifest(1)
    assert manifest.pack is None or manifest.pack.nbytes == 0
    group = zarr.open_group(tmp_path / "000000000001" / "state.zarr", mode="r")
    for path, spec in manifest.arrays.items():
        if spec.nbytes:
            assert group[path].shape == spec.shape and group[path].attrs["trainio"]["dtype"] == spec.dtype
    assert np.array_equal(group["model/w"][...], state["model"]["w"].numpy())
    assert np.array_equal(group["model/b"][...], state["model"]["b"].view(torch.uint16).numpy())


def test_chunked_arrays_round_trip_through_zarr(tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    state = {"a": torch.randn(37, 11), "b": torch.arange(1001, dtype=torch.int16), "c": torch.randn(3, 4, 300)}
    with CheckpointManager([tmp_path], chunk_bytes=1000, pack_bytes=100) as manager:
        manager.save(0, state).wait()
        restored = manager.restore()
        chunks = manager._io[0].manifest(0).arrays["c"].chunks
    assert chunks == (1, 1, 250)
    group = zarr.open_group(tmp_path / "000000000000" / "state.zarr", mode="r")
    for key, tensor in state.items():
        assert torch.equal(restored[key], tensor)
        assert np.array_equal(zarr_read(group, key), tensor.numpy())


class _NotState:
    pass


@pytest.mark.parametrize(("state", "where"), [
    ({"model": {"w": _NotState()}}, "state['model']['w']"),
    ({"x": [1, {2, 3}]}, "state['x'][1]"),
    ({"k": {(1, 2): 3}}, "state['k'][(1, 2)]"),
    ({"o": np.array(["a"], dtype=object)}, "state['o']"),
    ({"d": np.datetime64("2020-01-01")}, "state['d']"),
    ({"s": torch.zeros(3).to_sparse()}, "state['s']"),
    (torch.zeros(3), "state"),
])
def test_unsupported_values_are_refused_naming_their_place(tmp_path: Path, state: Any, where: str) -> None:
    with CheckpointManager([tmp_path]) as manager:
        with pytest.raises(CheckpointError) as info:
            manager.save(1, state)
        assert str(info.value).startswith(where)
        assert manager.steps() == {str(tmp_path): []}


def test_colliding_names_are_refused(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager, pytest.raises(CheckpointError, match="share the array name"):
        manager.save(1, {0: torch.ones(1), "0": torch.ones(1)})


def _manifest_doc(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(7, {"w": torch.randn(300, 300), "small": torch.ones(10), "n": 3}).wait()
    path = tmp_path / "000000000007" / "manifest.json"
    return load_sealed(path.read_bytes(), str(tmp_path), "manifest.json"), path


def _edit_files(doc: dict[str, Any]) -> None:
    key = next(k for k in doc["files"] if k.endswith("zarr.json"))
    doc["files"]["state.zarr/../../etc/passwd"] = doc["files"].pop(key)


@pytest.mark.parametrize(("edit", "problem"), [
    (_edit_files, "not a valid relative key"),
    (lambda d: d["files"].update({"/abs": {"size": 1, "xxh3": "0" * 32}}), "not a valid relative key"),
    (lambda d: d["files"].update({"other/x": {"size": 1, "xxh3": "0" * 32}}), "outside state.zarr"),
    (lambda d: [v.update(size=v["size"] + 1) for k, v in d["files"].items() if k.endswith("/c.0")], "size is"),
    (lambda d: [v.update(size=-1) for v in d["files"].values()], "size must be an integer"),
    (lambda d: d["writers"].update(w={"rank": 5}), "names no rank"),
    (lambda d: d["writers"].update(small={"rank": 0}), "exactly the arrays that are not packed"),
    (lambda d: d["parts"].append(None), "one per rank"),
    (lambda d: d.update(meshes=[[[2], [0, 0]]]), "each of the 1 ranks once"),
    (lambda d: d["files"].pop(next(k for k in d["files"] if k.endswith("zarr.json"))), "wrongly"),
    (lambda d: d["arrays"]["small"].update(packed=10**9), "beyond the end of the pack"),
    (lambda d: d.update(pack=None), "no pack"),
    (lambda d: d["arrays"]["w"].update(stored="float128"), "not a zarr data type"),
    (lambda d: d["arrays"]["w"].update(kind="pickle"), "kind"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["tree"]["items"].append(["x", {"t": "array", "path": "nope"}]), "different arrays"),
    (lambda d: d["tree"]["items"].append(["y", {"t": "pickle", "value": "..."}]), "invalid"),
    (lambda d: [v.update(xxh3="XYZ") for v in d["files"].values()], "hex"),
])
def test_hand_edited_manifests_are_refused(tmp_path: Path, edit: Any, problem: str) -> None:
    doc, path = _manifest_doc(tmp_path)
    edit(doc)
    path.write_bytes(seal_json(doc))  # edited and sealed again: the validation itself must refuse it
    with pytest.raises(FormatError, match=problem) as info:
        Manifest.from_bytes(path.read_bytes(), str(tmp_path), "000000000007/manifest.json")
    assert "manifest.json" in str(info.value)
    with CheckpointManager([tmp_path]) as manager, pytest.raises(CheckpointError, match="no tier has a readable"):
        manager.restore(7)


def test_manifest_that_is_not_json_is_refused(tmp_path: Path) -> None:
    _, path = _manifest_doc(tmp_path)
    path.write_bytes(b"{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        Manifest.from_bytes(path.read_bytes(), "here", "manifest.json")
