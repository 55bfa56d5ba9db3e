"""A rank pack read from a local tier in one pass: members straight into their memory, the rest held until the
pack's digest is found good."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainio.checkpoint._format.checks import FileEntry
from trainio.checkpoint._tiers import open_tier_io
from trainio.checkpoint._tiers.commit import TierIO
from trainio.checkpoint._tiers.pack_members import PackMember, PackMembers
from trainio.storage import IntegrityError, digest, open_store

STEP = 1
KEY = "state.zarr/.rank_packs/000000.0/c.0"
PIECE = 256 << 10  # the local tier's read size: members span several reads


def _pack(tmp_path: Path, data: bytes) -> tuple[TierIO, FileEntry]:
    path = tmp_path / "tier" / f"{STEP:012d}" / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return open_tier_io(open_store(tmp_path / "tier"), "tier"), FileEntry(len(data), digest(data))


class _Places:
    """Three members of a pack: two read into memory of their own (one shorter than its member: a padded edge
    chunk), one handed to a sink; a gap before each and a tail after the last."""

    def __init__(self) -> None:
        self.spans = [(64, 3 * PIECE + 5), (3 * PIECE + 128, 1000), (3 * PIECE + 1152, PIECE + 64)]
        self.first = np.zeros(3 * PIECE + 5, np.uint8)
        self.second = np.zeros(900, np.uint8)
        self.sunk: list[bytes] = []

    def members(self) -> PackMembers:
        (a, a_size), (b, b_size), (c, c_size) = self.spans
        return PackMembers([PackMember(c, c_size, None, lambda data: self.sunk.append(bytes(data))),
                            PackMember(a, a_size, memoryview(self.first)),
                            PackMember(b, b_size, memoryview(self.second))])

    def check(self, data: bytes) -> None:
        (a, a_size), (b, _), (c, c_size) = self.spans
        assert self.first.tobytes() == data[a:a + a_size]
        assert self.second.tobytes() == data[b:b + 900]
        assert self.sunk == [data[c:c + c_size]]


def _data(size: int = 4 * PIECE + 3000) -> bytes:
    return np.random.default_rng(3).integers(0, 256, size, np.uint8).tobytes()


def test_every_member_lands_where_it_goes_from_one_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data()
    tier, entry = _pack(tmp_path, data)
    places = _Places()
    with monkeypatch.context() as patched:
        patched.setattr(tier, "read", lambda *_: pytest.fail("the pack was read whole into memory of its own"))
        tier.read_members(STEP, KEY, entry, places.members())
    places.check(data)
    whole = _Places()  # the same through the whole pack's bytes, as a tier without local files reads it
    TierIO.read_members(tier, STEP, KEY, entry, whole.members())
    whole.check(data)


@pytest.mark.parametrize("where", [10, 64 + PIECE, 3 * PIECE + 100, 3 * PIECE + 1200, 4 * PIECE + 2999],
                         ids=["gap", "in-place member", "gap after it", "sunk member", "tail"])
def test_a_flipped_bit_anywhere_in_the_pack_is_refused_and_no_sink_is_fed(tmp_path: Path, where: int) -> None:
    data = _data()
    damaged = bytearray(data)
    damaged[where] ^= 0x10
    tier, _ = _pack(tmp_path, bytes(damaged))
    entry = FileEntry(len(data), digest(data))
    places = _Places()
    with pytest.raises(IntegrityError, match="000000.0/c.0"):
        tier.read_members(STEP, KEY, entry, places.members())
    assert places.sunk == [], "a sink is handed bytes only from a pack found good"


def test_a_truncated_pack_is_refused(tmp_path: Path) -> None:
    data = _data()
    tier, _ = _pack(tmp_path, data[:-1])
    with pytest.raises(IntegrityError):
        tier.read_members(STEP, KEY, FileEntry(len(data), digest(data)), _Places().members())


def test_overlapping_members_are_read_from_the_whole_pack(tmp_path: Path) -> None:
    data = _data(3 * PIECE)
    tier, entry = _pack(tmp_path, data)
    one, two = np.zeros(PIECE, np.uint8), np.zeros(PIECE, np.uint8)
    members = PackMembers([PackMember(100, PIECE, memoryview(one)), PackMember(200, PIECE, memoryview(two))])
    assert not members.disjoint
    tier.read_members(STEP, KEY, entry, members)
    assert one.tobytes() == data[100:100 + PIECE] and two.tobytes() == data[200:200 + PIECE]
