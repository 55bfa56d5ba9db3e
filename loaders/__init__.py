"""trainio.loaders: the sharded dataset format, its writer and the streaming loader.

Nothing is public here yet: the dataset format arrives with the next milestone
(see the project's issues). The package exists so the layout and the import
direction ``tools -> loaders -> storage`` are fixed from the start.
"""

from __future__ import annotations

__all__: list[str] = []
