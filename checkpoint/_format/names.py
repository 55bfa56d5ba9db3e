"""Names in a checkpoint: a step's directory, and the node names in its zarr group made from the state's keys.

Every name is a valid zarr v3 node name and a valid store key part, and
distinct keys give distinct names: characters outside ``[A-Za-z0-9._-]`` are
percent-encoded, as is the leading character of names starting with ``.``
(reserved for trainio's own nodes, such as the pack of small arrays) or
``__`` (reserved by zarr). Readable keys stay as they are.
"""

from __future__ import annotations

import re

_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_NAME = re.compile(r"(?:[A-Za-z0-9._-]|%[0-9A-F]{2})+|%")


def _encode(text: str) -> str:
    if _SAFE.fullmatch(text):  # most keys: nothing to encode
        return text
    return "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in text)


def node_name(key: str | int) -> str:
    """The zarr node name for the state key ``key``."""
    text = str(key)
    if text == "":
        return "%"
    name = _encode(text)
    if text.startswith((".", "__")):
        name = f"%{ord(text[0]):02X}{name[1:]}"
    return name


def is_node_name(name: str) -> bool:
    """Whether ``name`` could have come from :func:`node_name`."""
    return bool(_NAME.fullmatch(name)) and not name.startswith((".", "__"))


def step_name(step: int) -> str:
    """The directory name of ``step`` on a tier."""
    return f"{step:012d}"
