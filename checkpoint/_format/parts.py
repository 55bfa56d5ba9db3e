"""Part manifests (version 3 and 4): each rank's chunk files, in a sealed document of its own, read only when needed.

``parts/<rank:06d>.json`` lists the files one rank wrote: ``format``
(``"trainio.checkpoint.part"``), ``version`` (3 or 4), ``step``, ``rank``,
``files`` (``{key: {"size", "xxh3"}}``), in version 4 ``members`` (the chunks
of ranked arrays in the rank's packs: ``{chunk key: [pack, offset, size]}``,
absent when there are none), then the seal. The root manifest lists every part with
its size and xxh3-128, so a part is believed only once its bytes match the
root; a reader opens just the parts that list the chunks it reads
(``writers.py`` says which).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainio.storage import check_seal, digest, load_sealed, seal_json

from .._recent import Recent
from .checks import Checks, FileEntry
from .names import step_name
from .writers import chunk_writer
from .zarr_layout import RANK_PACKS, ROOT

if TYPE_CHECKING:
    from .manifest import Manifest

PART_FORMAT = "trainio.checkpoint.part"
_RANK_PACK_NAME = re.compile(r"(\d{6,})\.\d+")
PARTS = "parts"
"""The folder of the part manifests, relative to the step."""


def part_key(rank: int) -> str:
    """The key of rank ``rank``'s part manifest, relative to the step."""
    return f"{PARTS}/{rank:06d}.json"


def rank_pack_key(rank: int, number: int) -> str:
    """The key of rank ``rank``'s pack ``number`` (chunks of ranked arrays it wrote, back to back: the one chunk of
    a 1-D uint8 zarr array), relative to the step."""
    return f"{rank_pack_path(rank, number)}/c.0"


def rank_pack_metadata_key(rank: int, number: int) -> str:
    """The key of the ``zarr.json`` of rank ``rank``'s pack ``number``, relative to the step."""
    return f"{rank_pack_path(rank, number)}/zarr.json"


def rank_pack_path(rank: int, number: int) -> str:
    """The key of the zarr array that is rank ``rank``'s pack ``number`` (its ``zarr.json`` lies in it)."""
    return f"{ROOT}/{RANK_PACKS}/{rank:06d}.{number}"


def part_bytes(step: int, rank: int, files: Mapping[str, FileEntry],
               members: Mapping[str, tuple[int, int, int]] | None = None) -> bytes:
    """Rank ``rank``'s part manifest of ``step`` (version 4), sealed; ``members`` are its packs' chunks."""
    document: dict[str, object] = {"format": PART_FORMAT, "version": 4, "step": step, "rank": rank,
                                   "files": {key: {"size": e.size, "xxh3": e.xxh3} for key, e in sorted(files.items())}}
    if members:
        document["members"] = {key: list(place) for key, place in sorted(members.items())}
    return seal_json(document)


@dataclass(frozen=True)
class Part:
    """What one part manifest lists: the rank's files, and the chunks in its packs (key: pack number, offset and
    size there)."""

    files: dict[str, FileEntry]
    members: dict[str, tuple[int, int, int]]


_parsed: Recent[str, Part] = Recent(64)  # by the part's xxh3-128


def parse_part(data: bytes, where: str, key: str, step: int, rank: int) -> Part:
    """The files (and pack members) a part manifest lists, validated (its digest against the root's is checked by
    the caller).

    Raises:
        FormatError: the seal, the format, the step, the rank, an entry or a member is wrong.
    """
    known = digest(data)
    cached = _parsed.get(known)
    if cached is not None:
        return cached
    check_seal(data, where, key)
    document = load_sealed(data, where, key)
    validator = Checks(where, key)
    version = document.get("version")
    validator.check(document.get("format") == PART_FORMAT and version in (3, 4),
                    f"is not a version-3 or 4 {PART_FORMAT} document")
    validator.check(document.get("step") == step and document.get("rank") == rank,
                    f"is the part of step {document.get('step')!r}, rank {document.get('rank')!r}, not of step "
                    f"{step}, rank {rank}")
    listed = document.get("files")
    if not isinstance(listed, dict):
        raise validator.fail("files must be an object")
    files = {validator.file_key(k): validator.file_entry(k, v) for k, v in listed.items()}
    members = _members(validator, document.get("members", {}) if version == 4 else {}, files, rank)
    validator.check(version == 4 or "members" not in document, "a version-3 part has no members")
    return _parsed.keep(known, Part(files, members))


def _members(validator: Checks, listed: object, files: dict[str, FileEntry], rank: int
             ) -> dict[str, tuple[int, int, int]]:
    """The members of a rank's packs, each a range inside a pack file the part lists, none overlapping another."""
    validator.check(isinstance(listed, dict), "members must be an object")
    assert isinstance(listed, dict)
    members: dict[str, tuple[int, int, int]] = {}
    for key, place in listed.items():
        validator.check(isinstance(place, list) and len(place) == 3, f"members[{key!r}] must be [pack, offset, size]")
        number, offset, size = (validator.integer(n, f"members[{key!r}]") for n in place)
        pack = files.get(rank_pack_key(rank, number))
        validator.check(pack is not None, f"members[{key!r}] lies in pack {number}, which the part does not list")
        assert pack is not None
        validator.check(offset + size <= pack.size, f"members[{key!r}] lies beyond the end of pack {number} "
                        f"({pack.size} bytes)")
        members[validator.file_key(key)] = (number, offset, size)
    ends = sorted(members.values())
    validator.check(all(p != q or a + n <= b for (p, a, n), (q, b, _) in zip(ends, ends[1:])),
                    "members overlap in a pack")
    return members


class StepFiles(Mapping[str, "FileEntry"]):
    """Every file of a version-3 step on one tier: the root's own, the parts, and each part's files.

    ``read(key, entry)`` reads a file of the step from the tier, checked
    against ``entry``; a part is read and parsed the first time one of its
    files is asked for. Iterating reads every part and checks that together
    they list exactly the files of the step's arrays. Thread-safe: a restore's
    threads share it, and each part is read once.
    """

    def __init__(self, manifest: Manifest, read: Callable[[str, FileEntry], bytes], where: str) -> None:
        assert manifest.parts is not None
        self.root = dict(manifest.files)
        self._manifest = manifest
        self._read = read
        self._where = where
        self._listed = {part_key(rank): entry for rank, entry in enumerate(manifest.parts) if entry is not None}
        self._parts: dict[int, Part] = {}
        self._lock = threading.Lock()
        self._writers: dict[str, Callable[[tuple[int, ...]], int]] = {}
        self._found: dict[str, FileEntry] = {}  # chunk files already looked up in their writer's part
        self._complete = False

    def part(self, rank: int) -> dict[str, FileEntry]:
        """The files rank ``rank``'s part lists (empty when the rank wrote none)."""
        return self._part(rank).files

    def _part(self, rank: int) -> Part:
        with self._lock:
            found = self._parts.get(rank)
            if found is None:
                key = part_key(rank)
                entry = self._listed.get(key)
                found = Part({}, {}) if entry is None else parse_part(self._read(key, entry), self._where,
                                                                       f"{step_name(self._manifest.step)}/{key}",
                                                                       self._manifest.step, rank)
                self._parts[rank] = found
            return found

    def member(self, key: str) -> tuple[str, int, int]:
        """Where chunk ``key`` of a ranked array lies: its rank's pack (a file of the step), offset and size.

        Raises:
            KeyError: its writer's part lists no such member.
        """
        rank = self.writer(key)
        if rank is None or not 0 <= rank < len(self._manifest.parts or ()):
            raise KeyError(key)
        number, offset, size = self._part(rank).members[key]
        return rank_pack_key(rank, number), offset, size

    def writer(self, key: str) -> int | None:
        """The rank whose part lists chunk file (or rank pack) ``key``, or None when ``key`` is neither."""
        path, _, name = key.rpartition("/")
        folder, _, pack = path.rpartition("/")
        if folder == f"{ROOT}/{RANK_PACKS}":
            match = _RANK_PACK_NAME.fullmatch(pack)
            return int(match.group(1)) if match and name in ("c.0", "zarr.json") else None
        path = path[len(ROOT) + 1:] if path.startswith(f"{ROOT}/") else ""
        spec = self._manifest.arrays.get(path)
        writers = self._manifest.writers.get(path)
        if spec is None or writers is None or not name.startswith("c."):
            return None
        try:
            index = tuple(int(i) for i in name[2:].split("."))
        except ValueError:
            return None
        if len(index) != len(spec.chunks):
            return None
        resolve = self._writers.get(path)
        if resolve is None:
            resolve = self._writers[path] = chunk_writer(writers, self._manifest.meshes, spec.shape, spec.chunks)
        try:
            return resolve(index)
        except KeyError:
            return None

    def __getitem__(self, key: str) -> FileEntry:
        entry = self.root.get(key) or self._listed.get(key) or self._found.get(key)
        if entry is not None:
            return entry
        rank = self.writer(key)
        if rank is None or not 0 <= rank < len(self._manifest.parts or ()):
            raise KeyError(key)
        entry = self._found[key] = self.part(rank)[key]
        return entry

    def _every(self) -> dict[str, FileEntry]:
        every = {**self.root, **self._listed}
        members: dict[str, int] = {}
        packs: list[str] = []
        for rank in range(len(self._manifest.parts or ())):
            part = self._part(rank)
            every.update(part.files)
            members.update((key, size) for key, (_, _, size) in part.members.items())
            for number in {number for number, _, _ in part.members.values()}:
                packs += [rank_pack_key(rank, number), rank_pack_metadata_key(rank, number)]
        if not self._complete:
            chunks = {k: e for k, e in every.items() if k not in self._listed}
            Checks(self._where, f"{step_name(self._manifest.step)}/parts").layout(
                self._manifest.arrays, chunks, self._manifest.pack, members, packs)
            self._complete = True
        return every

    def __iter__(self) -> Iterator[str]:
        return iter(self._every())

    def __len__(self) -> int:
        return self._manifest.totals[1] if self._manifest.totals is not None else len(self._every())


def pack_member(files: Mapping[str, FileEntry], key: str) -> tuple[str, int, int]:
    """Where chunk ``key`` of a ranked array lies among a step's ``files``: its rank pack's key, offset and size.

    Raises:
        KeyError: no part lists it (a step without parts has no rank packs).
    """
    if not isinstance(files, StepFiles):
        raise KeyError(key)
    return files.member(key)
