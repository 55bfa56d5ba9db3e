"""The trainio error hierarchy.

Every error trainio raises on purpose derives from :class:`TrainioError`. Store
errors carry the store's ``url`` and the ``key``; each class also inherits the
matching builtin (``NotFound`` is a ``FileNotFoundError``) so generic handlers
keep working. All of them survive pickling, so they cross DataLoader workers
and process pools intact.
"""

from __future__ import annotations


class TrainioError(Exception):
    """Base class of every error trainio raises on purpose."""


class _LocatedError(TrainioError):
    """An error about one place: a store (``url``) and a key in it.

    Attributes:
        url: The store's URL (``file:///...`` or ``s3://bucket/prefix``).
        key: The key the error is about ("" for the store as a whole).
        problem: What went wrong.
        hint: What to do about it ("" when there is nothing to add).
    """

    def __init__(self, url: str, key: str, problem: str, hint: str = "") -> None:
        self.url = url
        self.key = key
        self.problem = problem
        self.hint = hint
        where = f"{url}: {key!r}" if key else url
        super().__init__(f"{where}: {problem}" + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return type(self), (self.url, self.key, self.problem, self.hint)


class StoreError(_LocatedError, OSError):
    """A store operation failed: says which store, which key, and what to do."""


class InvalidKey(StoreError, ValueError):
    """A key is not a valid relative, '/'-separated store key."""


class NotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class AlreadyExists(StoreError, FileExistsError):
    """A create-only write found the key already present."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached or kept failing after every retry."""


class IntegrityError(StoreError):
    """Bytes read back do not have the digest they were written with.

    Attributes:
        expected: The digest recorded when the bytes were written.
        actual: The digest of the bytes that were read.
        what: Which bytes and which digest: "xxh3-128" (the whole key's), or a part's, e.g.
            "row 7 of field 'tokens': xxh3-64".
    """

    def __init__(
        self, url: str, key: str, expected: str, actual: str, hint: str = "", what: str = "xxh3-128"
    ) -> None:
        self.expected = expected
        self.actual = actual
        self.what = what
        super().__init__(
            url,
            key,
            f"{what} is {actual}, expected {expected}",
            hint or "the stored bytes are corrupt or were replaced; re-fetch or rewrite them",
        )

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return type(self), (self.url, self.key, self.expected, self.actual, self.hint, self.what)


class FormatError(_LocatedError, ValueError):
    """A file trainio reads (an index, a manifest, a shard) is malformed or of another format.

    ``key`` names the file; ``problem`` names the field or part that is wrong.
    """


class SchemaMismatch(TrainioError, TypeError):
    """A row or column does not fit the dataset's schema.

    Attributes:
        field: The field's name.
        expected: The field's Arrow type, as text.
        row: The row's number among all rows written so far (-1 if unknown).
        got: What was found instead.
    """

    def __init__(self, field: str, expected: str, row: int, got: str) -> None:
        self.field, self.expected, self.row, self.got = field, expected, row, got
        where = f"row {row}, field {field!r}" if row >= 0 else f"field {field!r}"
        super().__init__(f"{where}: expected {expected}, got {got}")

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return type(self), (self.field, self.expected, self.row, self.got)


class CheckpointError(TrainioError):
    """A checkpoint could not be saved, promoted or restored."""
