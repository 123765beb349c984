"""Pick the storage backend KQ_OUTPUTS names.

    file:///abs/dir  or a plain path   LocalStorage (worker/outputs/storage.py): files
                                       under that directory
    s3://bucket/prefix                 S3Storage (worker/outputs/s3.py): any S3-compatible
                                       store; KQ_S3_ENDPOINT_URL for non-AWS endpoints,
                                       credentials from the standard AWS_* variables

Any other scheme is a ConfigError that names KQ_OUTPUTS.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError
from worker.outputs.storage import LocalStorage, Storage


def open_storage(url: str, *, s3_endpoint_url: str = "") -> Storage:
    """The backend KQ_OUTPUTS names; ConfigError for a URL it cannot use."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"KQ_OUTPUTS: a file URL names a local path, got {url!r}")
        return LocalStorage(Path(unquote(parts.path)))
    if parts.scheme == "s3":
        from worker.outputs.s3 import S3Storage  # boto3 is imported only when used

        if not parts.netloc:
            raise ConfigError(f"KQ_OUTPUTS: expected s3://bucket[/prefix], got {url!r}")
        return S3Storage(parts.netloc, parts.path.strip("/"), endpoint_url=s3_endpoint_url)
    if not parts.scheme:
        return LocalStorage(Path(url))
    raise ConfigError(
        f"KQ_OUTPUTS: expected file:///dir, a directory or s3://bucket/prefix, got {url!r}"
    )
