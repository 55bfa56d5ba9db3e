"""S3Options: how an S3Store talks to its endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._retry import RetryPolicy

_MIB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Options:
    """How an S3Store talks to its endpoint.

    Credentials left as None come from boto3's standard chain (environment,
    shared files, instance metadata); an ``endpoint_url`` of None means
    ``AWS_ENDPOINT_URL`` or AWS itself. Credentials never appear in reprs,
    logs or error messages.

    Memory: an upload holds at most ``part_size_bytes * max_concurrency``
    bytes of parts in flight (256 MiB by default), and so does a streamed
    download; ``get`` and ``get_into`` write the parts straight into one buffer.

    Attributes:
        endpoint_url: The S3 endpoint, e.g. ``http://127.0.0.1:8333``.
        region: The signing region (default: boto3's chain, else us-east-1).
        profile: A profile of the shared AWS config files.
        access_key_id, secret_access_key, session_token: Explicit credentials.
        part_size_bytes: Size of multipart-upload parts and of parallel
            ranged GETs (default 16 MiB; S3 needs >= 5 MiB).
        multipart_threshold_bytes: Objects at least this big are uploaded and
            copied in parallel parts (default 32 MiB).
        max_concurrency: Parallel requests of one transfer, and threads of the
            pool the ``_async`` twins run on (default 16).
        connect_timeout_s, read_timeout_s: Socket timeouts of one request.
        retry: The retry policy of every request.
    """

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    part_size_bytes: int = 16 * _MIB
    multipart_threshold_bytes: int = 32 * _MIB
    max_concurrency: int = 16
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()

    def __post_init__(self) -> None:
        if self.part_size_bytes < 5 * _MIB:
            raise ValueError(f"S3Options.part_size_bytes={self.part_size_bytes}: S3 needs parts >= 5 MiB")
        if self.multipart_threshold_bytes < self.part_size_bytes:
            raise ValueError(
                f"S3Options.multipart_threshold_bytes={self.multipart_threshold_bytes}: "
                f"must be >= part_size_bytes ({self.part_size_bytes})"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"S3Options.max_concurrency={self.max_concurrency}: must be >= 1")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("S3Options: timeouts must be > 0 seconds")
