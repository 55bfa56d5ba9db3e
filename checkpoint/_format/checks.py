"""The checks a manifest's parts share: keys, file entries, the files an array needs, who wrote what.

Every failure is a :class:`FormatError` naming the document and what is
wrong; nothing in a document is believed before it passed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from trainio.storage import FormatError, check_key
from trainio.storage.errors import InvalidKey

from .placement import Mesh
from .zarr_layout import ROOT, ArraySpec, group_metadata_key, stored_groups

MAX_FILE_BYTES = 1 << 40
"""The largest file a manifest may list (1 TiB): more is damage, not a checkpoint."""

_HEX = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class FileEntry:
    """One file of a step: its size and xxh3-128."""

    size: int
    xxh3: str


class Checks:
    """Checks of one document (``key`` at ``where``), raising a FormatError that names it."""

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

    def root_files(self, arrays: dict[str, ArraySpec], files: dict[str, FileEntry], pack: ArraySpec | None) -> None:
        """A version-3 or 4 root lists exactly the metadata documents and the pack's chunks."""
        own = [s for s in arrays.values() if s.stored_alone]
        expected = {group_metadata_key(g) for g in stored_groups(list(arrays.values()))}
        expected.update(spec.metadata_key for spec in own)
        if pack is not None:
            expected.add(pack.metadata_key)
            for chunk in pack.chunk_files():
                expected.add(chunk.key)
                if pack.codec is None and chunk.key in files:
                    self.check(files[chunk.key].size == chunk.size, f"files[{chunk.key!r}].size is "
                               f"{files[chunk.key].size}, but the pack's chunk holds {chunk.size} bytes")
        self.check(set(files) == expected, f"files lists {sorted(set(files) ^ expected)[:1]} wrongly: a root lists "
                   "exactly the metadata documents and the pack")

    def meshes(self, doc: Any, world_size: int) -> list[Mesh]:
        self.check(isinstance(doc, list), "meshes must be a list")
        meshes = []
        for number, item in enumerate(doc):
            self.check(isinstance(item, list) and len(item) == 2 and all(isinstance(x, list) for x in item),
                       f"meshes[{number}] must be [shape, ranks]")
            shape = tuple(self.integer(n, f"meshes[{number}] shape", 1) for n in item[0])
            ranks = tuple(self.integer(r, f"meshes[{number}] ranks") for r in item[1])
            self.check(sorted(ranks) == list(range(world_size)) and math.prod(shape) == len(ranks),
                       f"meshes[{number}] must place each of the {world_size} ranks once")
            meshes.append(Mesh(shape, ranks))
        return meshes

    def writers(self, doc: Any, arrays: dict[str, ArraySpec], meshes: list[Mesh], world: int) -> dict[str, Any]:
        self.check(isinstance(doc, dict), "writers must be an object")
        own = {path for path, spec in arrays.items() if spec.packed is None}
        self.check(set(doc) == own, "writers must name exactly the arrays that are not packed")
        for path, entry in doc.items():
            ndim = len(arrays[path].shape)
            name = f"writers[{path!r}]"
            self.check(isinstance(entry, dict) and len(entry) in (1, 3), f"{name} must be an object")
            if "rank" in entry:
                self.check(self.integer(entry["rank"], name) < world, f"{name} names no rank of the step")
            elif "mesh" in entry:
                mesh = self.integer(entry.get("mesh"), f"{name}.mesh")
                self.check(mesh < len(meshes), f"{name}.mesh names no mesh")
                shards = entry.get("shards")
                self.check(isinstance(shards, list) and len(shards) == len(meshes[mesh].shape)
                           and all(d is None or type(d) is int and 0 <= d < ndim for d in shards),
                           f"{name}.shards must give a tensor dimension or null per mesh dimension")
                self.integer(entry.get("turn"), f"{name}.turn")
            else:
                boxes = entry.get("boxes")
                self.check(isinstance(boxes, list) and all(
                    isinstance(b, list) and len(b) == 3 and isinstance(b[0], list) and isinstance(b[1], list)
                    and len(b[0]) == len(b[1]) == ndim and type(b[2]) is int and 0 <= b[2] < world
                    and all(type(x) is int and x >= 0 for x in b[0] + b[1]) for b in boxes),
                    f"{name}.boxes must be [offset, shape, rank] lists")
        return dict(doc)

    def layout(self, arrays: dict[str, ArraySpec], files: Mapping[str, FileEntry], pack: ArraySpec | None,
               members: Mapping[str, int] | None = None, packs: Collection[str] = ()) -> None:
        """``files`` (and the ranks' pack ``members``, chunk key to size) hold exactly the arrays' chunks and
        metadata documents, each chunk of its size; ``packs`` are the files of the rank packs that hold the members
        (each pack's chunk and ``zarr.json``), which ``files`` must list too."""
        members = members or {}
        own = [s for s in arrays.values() if s.packed is None] + ([pack] if pack is not None else [])
        chunk_count = sum(math.prod(-(-n // c) for n, c in zip(s.shape, s.chunks, strict=True))
                          if all(s.shape) else 0 for s in own)
        self.check(chunk_count <= len(files) + len(members),
                   f"the arrays have {chunk_count} chunks but files lists {len(files) + len(members)}")
        groups = stored_groups([s for s in own if s is not pack])
        expected: dict[str, int | None] = {group_metadata_key(g): None for g in groups}
        ranked: dict[str, int] = {}
        for spec in own:
            if spec.ranked:
                ranked.update((chunk.key, chunk.size) for chunk in spec.chunk_files())
                continue
            expected[spec.metadata_key] = None
            for chunk in spec.chunk_files():
                expected[chunk.key] = chunk.size if spec.codec is None else None
        missing = sorted((set(expected) | set(packs)) - set(files))
        self.check(not missing, f"files lacks {len(missing)} file(s) of the arrays, e.g. {missing[:1]}")
        extra = sorted(set(files) - set(expected) - set(packs))
        self.check(not extra, f"files lists {len(extra)} file(s) no array uses, e.g. {extra[:1]}")
        unlisted = sorted(set(ranked) ^ set(members))
        self.check(not unlisted, f"the rank packs' members and the ranked arrays' chunks differ in {len(unlisted)} "
                   f"chunk(s), e.g. {unlisted[:1]}")
        for key, chunk_size in ranked.items():
            self.check(members[key] == chunk_size, f"members[{key!r}] is {members[key]} bytes, but the array's chunk "
                       f"holds {chunk_size}")
        for key, size in expected.items():
            if size is not None:
                self.check(files[key].size == size, f"files[{key!r}].size is {files[key].size}, "
                           f"but the array's chunk holds {size} bytes")
