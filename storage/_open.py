"""open_store: a Store from a URL."""

from __future__ import annotations

import os
from dataclasses import replace
from urllib.parse import unquote, urlparse

from ._local import LocalOptions, LocalStore
from ._s3 import S3Store
from ._s3_options import S3Options
from ._store import Store
from .errors import StoreError


def open_store(url: str | os.PathLike[str], *, options: LocalOptions | S3Options | None = None) -> Store:
    """Open the store a URL names.

    Accepted forms: a local path (``/nvme/data``, ``./data``), ``file:///nvme/data``,
    and ``s3://bucket/prefix``. For S3, an ``options`` without an
    ``endpoint_url`` takes it from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
    when set; credentials and region come from boto3's standard chain unless
    ``options`` names them.

    Raises:
        StoreError: the URL's scheme is unknown, or the options do not fit it.
    """
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if options is not None and not isinstance(options, S3Options):
            raise StoreError(text, "", f"options must be S3Options for an s3:// URL, not {type(options).__name__}")
        if not parsed.netloc:
            raise StoreError(text, "", "an s3:// URL needs a bucket: s3://bucket/prefix")
        opts = options or S3Options()
        if opts.endpoint_url is None:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                opts = replace(opts, endpoint_url=endpoint)
        return S3Store(parsed.netloc, unquote(parsed.path).strip("/"), options=opts)
    if parsed.scheme in ("", "file"):
        if options is not None and not isinstance(options, LocalOptions):
            raise StoreError(text, "", f"options must be LocalOptions for a local path, not {type(options).__name__}")
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StoreError(text, "", f"file:// URLs must name a local path, not host {parsed.netloc!r}")
            path = unquote(parsed.path)
        else:
            path = text
        if not path:
            raise StoreError(text, "", "the URL names no path")
        return LocalStore(os.path.expanduser(path), options=options or LocalOptions())
    raise StoreError(text, "", f"unknown URL scheme {parsed.scheme!r}", "use a local path, file:///path or s3://bucket/prefix")

