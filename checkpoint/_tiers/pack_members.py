"""Where the members of a rank pack go when a restore reads the pack (see FORMAT.md, "Rank packs")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PackMember:
    """One chunk in a rank pack: its ``offset`` and ``size`` there, and where its bytes go: the first
    ``target.nbytes`` of them into ``target``, or all of them to ``sink`` (then ``target`` is None)."""

    offset: int
    size: int
    target: memoryview | None
    sink: Callable[[memoryview], None] | None = None


class PackMembers:
    """The members of one rank pack that a restore wants, in the order they lie in the pack.

    A reader may put ``target`` members' bytes in place as it reads, before
    the pack is checked (a failed check is an error, and a read from another
    tier puts them in place again); a ``sink`` is handed its bytes only once
    the whole pack is found good.
    """

    def __init__(self, members: Sequence[PackMember]) -> None:
        self.members = sorted(members, key=lambda m: m.offset)

    @property
    def disjoint(self) -> bool:
        """Whether no two members overlap (each can be read in one pass through the pack)."""
        return all(a.offset + a.size <= b.offset for a, b in zip(self.members, self.members[1:]))

    def fill(self, pack: memoryview) -> None:
        """Put every member's bytes where they go, from the whole pack's bytes (already checked)."""
        for member in self.members:
            piece = pack[member.offset:member.offset + member.size]
            if member.sink is not None:
                member.sink(piece)
            else:
                assert member.target is not None
                member.target[:] = piece[:member.target.nbytes]
