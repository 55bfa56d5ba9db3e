"""trainio.checkpoint: the tiered, asynchronous, verified checkpoint store.

Nothing is public here yet: the checkpoint store arrives with a later
milestone (see the project's issues). The package exists so the layout and
the import direction ``tools -> checkpoint -> storage`` are fixed from the start.
"""

from __future__ import annotations

__all__: list[str] = []
