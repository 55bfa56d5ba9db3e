"""``python -m trainio.tools``: the same as the ``trainio`` command."""

from __future__ import annotations

from . import main

main()
