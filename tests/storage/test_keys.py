"""Key validation as a property: whatever a key is, it is refused or stays inside the store."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from trainio.storage import InvalidKey, LocalOptions, LocalStore

_PART = st.text(alphabet=st.sampled_from(list("ab.-_ \\\x00\x01\x7f\n/é")), max_size=12) | st.just(".trainio-tmp.x")
_KEYS = st.lists(_PART, min_size=0, max_size=4).map("/".join) | st.text(max_size=30)


@settings(max_examples=300, deadline=None)
@given(key=_KEYS)
def test_every_key_is_refused_or_stays_inside_the_root(key: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "root")
        store = LocalStore(root, options=LocalOptions(durable=False))
        try:
            store.put(key, b"payload")
        except InvalidKey as exc:
            assert exc.key in (key, repr(key))
            return
        resolved = os.path.realpath(os.path.join(root, key))
        assert resolved.startswith(os.path.realpath(root) + os.sep)
        assert store.get(key) == b"payload"
        assert store.list() == [key]
        parts = key.split("/")
        assert all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _follows_the_rules(key: str) -> bool:
    """The key rules of ``check_key``'s doc, part by part, as plainly as they can be written."""
    if not key or key.startswith("/"):
        return False
    return all(part not in ("", ".", "..") and "\\" not in part and not part.startswith(".trainio-tmp.")
               and all(32 <= ord(c) != 127 for c in part) for part in key.split("/"))


@settings(max_examples=2000, deadline=None)
@given(key=_KEYS | st.lists(_PART | st.sampled_from([".trainio-tmp", "-tmp.", "x.trainio-tmp.y"]), max_size=4)
       .map("/".join))
def test_exactly_the_keys_that_follow_the_rules_are_accepted(key: str) -> None:
    from trainio.storage._keys import check_key

    try:
        check_key("mem://", key)
    except InvalidKey:
        assert not _follows_the_rules(key)
    else:
        assert _follows_the_rules(key)
