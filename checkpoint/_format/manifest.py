"""``manifest.json``: the commit point of a step, and everything a reader trusts.

It records the step, the state's skeleton (JSON leaves inline), every array's
type, shape and chunking, and every file of the step with its size and
xxh3-128. Since version 2 the manifest is sealed: a digest of its own bytes
is checked before it is parsed (see ``checkpoint/FORMAT.md``). Reading one
validates all of it, so a hand-edited manifest naming ``../`` paths,
impossible sizes or unknown types is refused before a byte of data is touched.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from trainio.storage import (
    DIGEST_NAME,
    FormatError,
    check_key,
    check_seal,
    digest,
    is_sealed,
    load_sealed,
    parse_json,
    seal_json,
)
from trainio.storage.errors import InvalidKey

from .._recent import Recent
from .dtypes import ZARR_NATIVE, stored_dtype
from .names import is_node_name
from .nodes import Node
from .state_tree import array_paths
from .zarr_layout import ROOT, ArraySpec, group_metadata_key, group_paths, pack_spec, parse_compression

FORMAT = "trainio.checkpoint"
VERSION = 2
"""The manifest version this trainio writes: 2, sealed by a digest of its own bytes."""
UNSEALED_VERSION = 1
"""The earlier version, without a seal: still read, its files still checked against it."""
MAX_FILE_BYTES = 1 << 40
"""The largest file a manifest may list (1 TiB): more is damage, not a checkpoint."""
MANIFEST = "manifest.json"
"""The manifest's key relative to the step's directory."""

_HEX = re.compile(r"[0-9a-f]{32}")
_KINDS = frozenset({"torch", "numpy", "numpy_scalar"})
_NODE_KINDS = frozenset({"json", "float", "array", "dict", "list", "tuple", "object", "per_rank"})


@dataclass(frozen=True)
class FileEntry:
    """One file of a step: its size and xxh3-128."""

    size: int
    xxh3: str


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
    """

    step: int
    tree: Node
    arrays: dict[str, ArraySpec]
    files: dict[str, FileEntry] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    world_size: int = 1
    pack: ArraySpec | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of all the step's files."""
        return sum(entry.size for entry in self.files.values())

    def to_bytes(self) -> bytes:
        """The manifest as written: JSON, keys in a stable order."""
        document = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "time": self.time,
            "world_size": self.world_size,
            "digest": DIGEST_NAME,
            "tree": self.tree,
            "arrays": {path: spec.to_json() for path, spec in self.arrays.items()},
            "pack": None if self.pack is None else {"size": self.pack.shape[0], "chunk": self.pack.chunks[0],
                                                    **({"codec": self.pack.codec} if self.pack.codec else {})},
            "files": {key: {"size": e.size, "xxh3": e.xxh3} for key, e in sorted(self.files.items())},
        }
        return seal_json(document)

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


class _Validator:
    def __init__(self, where: str, key: str) -> None:
        self.where, self.key = where, key

    def fail(self, problem: str) -> FormatError:
        return FormatError(self.where, self.key, problem, "the manifest was damaged or edited; restore another step")

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            raise self.fail(problem)

    def integer(self, value: Any, name: str, minimum: int = 0) -> int:
        self.check(type(value) is int and value >= minimum, f"{name} must be an integer >= {minimum}, not {value!r}")
        return int(value)

    def manifest(self, doc: Any) -> Manifest:
        self.check(isinstance(doc, dict), "the manifest must be a JSON object")
        self.check(doc.get("format") == FORMAT, f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        self.check(doc.get("version") in (UNSEALED_VERSION, VERSION),
                   f"version {doc.get('version')!r} is not supported (this trainio reads versions "
                   f"{UNSEALED_VERSION} and {VERSION})")
        self.check(doc.get("digest") == DIGEST_NAME, f"digest must be {DIGEST_NAME!r}")
        step = self.integer(doc.get("step"), "step")
        world_size = self.integer(doc.get("world_size"), "world_size", 1)
        self.world_size = world_size
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
        self.layout(arrays, files, pack)
        return Manifest(step, tree, arrays, files, float(wall), world_size, pack)

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

    def file_key(self, key: Any) -> str:
        try:
            check_key(self.where, key)
        except InvalidKey as exc:
            raise self.fail(f"file {key!r} is not a valid relative key: {exc.problem}") from None
        self.check(key.startswith(f"{ROOT}/"), f"file {key!r} lies outside {ROOT}/")
        return str(key)

    def file_entry(self, key: str, entry: Any) -> FileEntry:
        self.check(isinstance(entry, dict), f"files[{key!r}] must be an object")
        size = self.integer(entry.get("size"), f"files[{key!r}].size")
        self.check(size <= MAX_FILE_BYTES, f"files[{key!r}].size {size} is more than the {MAX_FILE_BYTES} bytes "
                   "a checkpoint file may have")
        digest = entry.get("xxh3")
        self.check(isinstance(digest, str) and bool(_HEX.fullmatch(digest)),
                   f"files[{key!r}].xxh3 must be 32 lowercase hex digits")
        return FileEntry(size, digest)

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
        result = ArraySpec(path, kind, dtype, stored, shape_t, chunks_t, packed, codec)
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

    def layout(self, arrays: dict[str, ArraySpec], files: dict[str, FileEntry], pack: ArraySpec | None) -> None:
        own = [s for s in arrays.values() if s.packed is None] + ([pack] if pack is not None else [])
        chunk_count = sum(math.prod(-(-n // c) for n, c in zip(s.shape, s.chunks, strict=True))
                          if all(s.shape) else 0 for s in own)
        self.check(chunk_count <= len(files), f"the arrays have {chunk_count} chunks but files lists {len(files)}")
        groups = group_paths([s.path for s in own if s is not pack])
        expected: dict[str, int | None] = {group_metadata_key(g): None for g in groups}
        for spec in own:
            expected[spec.metadata_key] = None
            for chunk in spec.chunk_files():
                expected[chunk.key] = chunk.size if spec.codec is None else None
        missing = sorted(set(expected) - set(files))
        self.check(not missing, f"files lacks {len(missing)} file(s) of the arrays, e.g. {missing[:1]}")
        extra = sorted(set(files) - set(expected))
        self.check(not extra, f"files lists {len(extra)} file(s) no array uses, e.g. {extra[:1]}")
        for key, size in expected.items():
            if size is not None:
                self.check(files[key].size == size, f"files[{key!r}].size is {files[key].size}, "
                           f"but the array's chunk holds {size} bytes")
