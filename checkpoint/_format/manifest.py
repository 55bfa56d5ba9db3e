"""``manifest.json``: the commit point of a step, and everything a reader trusts.

It records the step, the state's skeleton (JSON leaves inline), every array's
type, shape and chunking, and every file of the step with its size and
xxh3-128. Since version 2 the manifest is sealed: a digest of its own bytes
is checked before it is parsed (see ``checkpoint/FORMAT.md``). Since version
3 it is a root: it lists its own files (the metadata documents and the pack)
and one part manifest per rank (``parts.py``) with each part's digest, and
who wrote each array's chunks (``writers.py``). Reading one validates all of it, so a hand-edited manifest naming ``../`` paths,
impossible sizes or unknown types is refused before a byte of data is touched.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from trainio.storage import (
    DIGEST_NAME,
    check_seal,
    digest,
    is_sealed,
    load_sealed,
    parse_json,
    seal_json,
)

from .._recent import Recent
from .checks import Checks
from .checks import FileEntry as FileEntry  # where every module finds it
from .dtypes import ZARR_NATIVE, stored_dtype
from .names import is_node_name
from .nodes import Node
from .placement import Mesh
from .state_tree import array_paths
from .zarr_layout import ArraySpec, pack_spec, parse_compression

FORMAT = "trainio.checkpoint"
VERSION = 4
"""The manifest version this trainio writes: 4, a sealed root listing sealed part manifests (one per rank), whose
small shards of sharded arrays may lie in a pack of their rank's (``ranked`` arrays)."""
PARTS_VERSION = 3
"""The first version with part manifests; version 4 adds ``ranked`` arrays and the parts' ``members``."""
WHOLE_VERSION = 2
"""Sealed, every file listed in the one manifest: still read, and written when such a step is promoted."""
UNSEALED_VERSION = 1
"""The earlier version, without a seal: still read, its files still checked against it."""
MANIFEST = "manifest.json"
"""The manifest's key relative to the step's directory."""

_KINDS = frozenset({"torch", "numpy", "numpy_scalar"})
_NODE_KINDS = frozenset({"json", "float", "array", "dict", "list", "tuple", "object", "per_rank"})


@dataclass
class Manifest:
    """A step's manifest.

    Attributes:
        step: The training step.
        tree: The state's skeleton.
        arrays: Every array, by its path in the zarr group.
        files: Every file of the step except the manifest, by key relative to the step.
        time: When the step was saved (seconds since the epoch).
        world_size: How many ranks saved it.
        pack: The array holding the small arrays (those with ``packed`` set), or None.
        metrics: Numbers the job gave with the step (``save(..., metrics=)``),
            such as a validation loss; retention by metric reads them.
    """

    step: int
    tree: Node
    arrays: dict[str, ArraySpec]
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    world_size: int = 1
    pack: ArraySpec | None = None
    parts: list[FileEntry | None] | None = None
    writers: dict[str, Any] = field(default_factory=dict)
    meshes: list[Mesh] = field(default_factory=list)
    totals: tuple[int, int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of all the step's files."""
        if self.totals is not None:
            return self.totals[0]
        return sum(entry.size for entry in self.files.values())

    def bind(self, read: Callable[[str, FileEntry], bytes], where: str) -> Manifest:
        """This manifest with ``files`` listing every file of the step, parts read with ``read`` when needed.

        A version-3 root lists only its own files and the parts; the copy's
        :class:`~.parts.StepFiles` reads a part (checked against the root)
        when one of its files is asked for. Earlier versions list every file
        already and are returned as they are.
        """
        if self.parts is None:
            return self
        from .parts import StepFiles

        return replace(self, files=StepFiles(self, read, where))

    @property
    def own_files(self) -> dict[str, FileEntry]:
        """The files the manifest document itself lists (version 3: the root's own, not the parts')."""
        root = getattr(self.files, "root", None)
        return dict(root if root is not None else self.files)

    def to_bytes(self) -> bytes:
        """The manifest as written: JSON, keys in a stable order (version 3 when it has parts, else 2)."""
        files = self.own_files
        if self.parts is not None:
            return seal_json({
                "format": FORMAT, "version": VERSION, "step": self.step, "time": self.time,
                "world_size": self.world_size, "digest": DIGEST_NAME, "tree": self.tree,
                "arrays": {path: spec.to_json() for path, spec in self.arrays.items()},
                "pack": self._pack_json(),
                "files": {key: {"size": e.size, "xxh3": e.xxh3} for key, e in sorted(files.items())},
                "meshes": [mesh.to_json() for mesh in self.meshes],
                "writers": self.writers,
                "parts": [None if e is None else {"size": e.size, "xxh3": e.xxh3} for e in self.parts],
                "bytes": self.nbytes, "file_count": self.totals[1] if self.totals else len(files),
                **({"metrics": self.metrics} if self.metrics else {})})
        document = {
            "format": FORMAT,
            "version": WHOLE_VERSION,
            "step": self.step,
            "time": self.time,
            "world_size": self.world_size,
            "digest": DIGEST_NAME,
            "tree": self.tree,
            "arrays": {path: spec.to_json() for path, spec in self.arrays.items()},
            "pack": self._pack_json(),
            "files": {key: {"size": e.size, "xxh3": e.xxh3} for key, e in sorted(files.items())},
        }
        return seal_json(document)

    def _pack_json(self) -> dict[str, Any] | None:
        if self.pack is None:
            return None
        return {"size": self.pack.shape[0], "chunk": self.pack.chunks[0],
                **({"codec": self.pack.codec} if self.pack.codec else {})}

    @classmethod
    def from_bytes(cls, data: bytes, where: str, key: str = MANIFEST) -> Manifest:
        """Parse and validate a manifest.

        A sealed manifest's digest is checked over its bytes before it is
        parsed; only a version-1 manifest may lack the seal.

        Raises:
            FormatError: its seal does not match, it is too large or too deeply
                nested, not valid JSON, not this format, or any field is wrong;
                the message names the field.
        """
        sealed = is_sealed(data)
        known = None
        if sealed:
            check_seal(data, where, key)
            known = digest(data)
            parsed = _parsed.get(known)
            if parsed is not None:
                return parsed  # these very bytes were parsed and validated before
        document = load_sealed(data, where, key) if sealed else parse_json(data, where, key)
        validator = _Validator(where, key)
        if not sealed:
            version = document.get("version") if isinstance(document, dict) else None
            validator.check(version == UNSEALED_VERSION,
                            "has no valid 'document_xxh3_128' seal (only a version-1 manifest may lack one; this "
                            f"one says version {version!r}): it is damaged")
        manifest = validator.manifest(document)
        return manifest if known is None else _parsed.keep(known, manifest)


_parsed: Recent[str, Manifest] = Recent(32)  # by the xxh3-128 of sealed manifest bytes: a restore, a promotion and
#                                              every tier read the same manifest; validating one takes milliseconds


class _Validator(Checks):
    def manifest(self, doc: Any) -> Manifest:
        self.check(isinstance(doc, dict), "the manifest must be a JSON object")
        self.check(doc.get("format") == FORMAT, f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        self.check(doc.get("version") in (UNSEALED_VERSION, WHOLE_VERSION, PARTS_VERSION, VERSION),
                   f"version {doc.get('version')!r} is not supported (this trainio reads versions "
                   f"{UNSEALED_VERSION} to {VERSION})")
        self.check(doc.get("digest") == DIGEST_NAME, f"digest must be {DIGEST_NAME!r}")
        step = self.integer(doc.get("step"), "step")
        world_size = self.integer(doc.get("world_size"), "world_size", 1)
        self.world_size = world_size
        self.version = doc["version"]
        wall = doc.get("time")
        self.check(isinstance(wall, (int, float)) and math.isfinite(wall), "time must be a number")
        arrays_doc = doc.get("arrays")
        self.check(isinstance(arrays_doc, dict), "arrays must be an object")
        arrays = {path: self.array(path, spec) for path, spec in arrays_doc.items()}
        files_doc = doc.get("files")
        self.check(isinstance(files_doc, dict), "files must be an object")
        files = {self.file_key(k): self.file_entry(k, v) for k, v in files_doc.items()}
        tree = doc.get("tree")
        self.node(tree, 0)
        self.check(isinstance(tree, dict) and tree.get("t") in ("dict", "list", "tuple", "object"),
                   "tree must be a dict, list, tuple or object node")
        used = list(array_paths(tree))
        self.check(len(used) == len(set(used)), "tree names an array twice")
        self.check(set(used) == set(arrays), "tree and arrays name different arrays")
        pack = self.pack(doc.get("pack"), arrays)
        if doc["version"] < PARTS_VERSION:
            self.layout(arrays, files, pack)
            return Manifest(step, tree, arrays, files, float(wall), world_size, pack)
        self.root_files(arrays, files, pack)
        meshes = self.meshes(doc.get("meshes"), world_size)
        writers = self.writers(doc.get("writers"), arrays, meshes, world_size)
        parts_doc = doc.get("parts")
        self.check(isinstance(parts_doc, list) and len(parts_doc) == world_size,
                   f"parts must list {world_size} entries, one per rank")
        parts = [None if e is None else self.file_entry(f"parts[{r}]", e) for r, e in enumerate(parts_doc)]
        totals = (self.integer(doc.get("bytes"), "bytes"), self.integer(doc.get("file_count"), "file_count"))
        return Manifest(step, tree, arrays, files, float(wall), world_size, pack, parts, writers, meshes, totals,
                        self.metrics(doc.get("metrics", {})))

    def metrics(self, doc: Any) -> dict[str, float]:
        self.check(isinstance(doc, dict) and all(isinstance(k, str) and isinstance(v, (int, float))
                                                 and not isinstance(v, bool) and math.isfinite(v)
                                                 for k, v in doc.items()),
                   "metrics must be an object of finite numbers")
        return {k: float(v) for k, v in doc.items()}

    def pack(self, doc: Any, arrays: dict[str, ArraySpec]) -> ArraySpec | None:
        members = [spec for spec in arrays.values() if spec.packed is not None]
        if doc is None:
            self.check(not members, "arrays are packed but there is no pack")
            return None
        self.check(isinstance(doc, dict), "pack must be an object or null")
        size = self.integer(doc.get("size"), "pack.size")
        chunk = self.integer(doc.get("chunk"), "pack.chunk", 1)
        for spec in members:
            assert spec.packed is not None
            self.check(spec.packed + spec.nbytes <= size,
                       f"arrays[{spec.path!r}] lies beyond the end of the pack ({size} bytes)")
        return pack_spec(size, chunk, self.codec(doc.get("codec"), "pack.codec"))

    def array(self, path: Any, spec: Any) -> ArraySpec:
        self.check(isinstance(path, str) and path != "" and all(is_node_name(p) for p in path.split("/")),
                   f"array path {path!r} is not a valid node path")
        self.check(isinstance(spec, dict), f"arrays[{path!r}] must be an object")
        kind, dtype, stored = spec.get("kind"), spec.get("dtype"), spec.get("stored")
        self.check(kind in _KINDS, f"arrays[{path!r}].kind {kind!r} is unknown")
        self.check(stored in ZARR_NATIVE, f"arrays[{path!r}].stored {stored!r} is not a zarr data type")
        self.check(isinstance(dtype, str) and re.fullmatch(r"[a-z0-9_]+", dtype) is not None,
                   f"arrays[{path!r}].dtype {dtype!r} is not a dtype name")
        self.check(dtype in ZARR_NATIVE or kind == "torch", f"arrays[{path!r}]: numpy arrays are stored as themselves")
        shape, chunks = spec.get("shape"), spec.get("chunks")
        self.check(isinstance(shape, list) and isinstance(chunks, list) and len(shape) == len(chunks),
                   f"arrays[{path!r}]: shape and chunks must be lists of one length")
        shape_t = tuple(self.integer(n, f"arrays[{path!r}].shape") for n in shape)
        chunks_t = tuple(self.integer(n, f"arrays[{path!r}].chunks", 1) for n in chunks)
        packed = spec.get("packed")
        if packed is not None:
            self.integer(packed, f"arrays[{path!r}].packed")
        codec = self.codec(spec.get("codec"), f"arrays[{path!r}].codec")
        ranked = spec.get("ranked", False)
        self.check(ranked is False or ranked is True and self.version >= VERSION and packed is None and codec is None,
                   f"arrays[{path!r}].ranked must be true or absent, only in version {VERSION}, and only for an "
                   "uncompressed array that is not packed")
        result = ArraySpec(path, kind, dtype, stored, shape_t, chunks_t, packed, codec, ranked)
        self.check(dtype in ZARR_NATIVE and stored == dtype or dtype not in ZARR_NATIVE
                   and stored == stored_dtype(dtype, result.itemsize), f"arrays[{path!r}]: {dtype} is not stored as {stored}")
        self.check(math.prod(chunks_t) * result.itemsize <= 1 << 40, f"arrays[{path!r}]: chunks are too large")
        return result

    def codec(self, codec: Any, name: str) -> str | None:
        if codec is None:
            return None
        try:
            known = isinstance(codec, str) and parse_compression(codec) == codec
        except ValueError:
            known = False
        self.check(known, f"{name} {codec!r} is not a known compression")
        return str(codec)

    def node(self, node: Any, depth: int) -> None:
        self.check(depth < 1000, "tree is nested too deeply")
        self.check(isinstance(node, dict) and node.get("t") in _NODE_KINDS, f"tree node {str(node)[:80]!r} is invalid")
        kind = node["t"]
        if kind == "float":
            self.check(node.get("value") in ("nan", "inf", "-inf"), "a float node must be nan, inf or -inf")
        elif kind == "array":
            self.check(isinstance(node.get("path"), str), "an array node needs a path")
        elif kind == "object":
            self.check(isinstance(node.get("type"), str), "an object node needs a type")
            self.node(node.get("state"), depth + 1)
        elif kind == "dict":
            items = node.get("items")
            self.check(isinstance(items, list), "a dict node needs items")
            for item in items:
                self.check(isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int),
                           "dict items must be [str or int key, node] pairs")
                self.node(item[1], depth + 1)
        elif kind in ("list", "tuple"):
            items = node.get("items")
            self.check(isinstance(items, list), f"a {kind} node needs items")
            for item in items:
                self.node(item, depth + 1)
        elif kind == "per_rank":  # a PerRank value: one sub-tree per rank that saved the step
            ranks = node.get("ranks")
            self.check(isinstance(ranks, list) and len(ranks) == self.world_size,
                       f"a per_rank node needs one sub-tree per rank ({self.world_size})")
            for item in ranks:
                self.check(isinstance(item, dict) and item.get("t") != "per_rank", "a per_rank node inside another")
                self.node(item, depth + 1)
        else:
            self.check("value" in node, "a json node needs a value")
