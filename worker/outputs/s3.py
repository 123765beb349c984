"""S3-compatible storage for copied outputs, through boto3.

Why boto3 (over obstore or fsspec/s3fs): it is AWS's own SDK, released weekly and used
by nearly every Python S3 user, so any S3-compatible store (AWS, MinIO, Ceph, R2,
GCS interop) is tested against it; its credential chain is the standard one (the
AWS_* environment variables, profiles, instance roles) with nothing of ours to
configure; its clients are thread-safe, which the copier's thread pool needs; and it
is synchronous like the rest of the worker. obstore is fast but young and its API
still moves; s3fs adds fsspec's filesystem layer and aiobotocore's pinned botocore
for nothing we use. botocore also retries throttling and 5xx answers itself
(`retries={"mode": "standard"}`) before the copier's own back-off sees a failure.

Objects are written with their content type and their SHA-256 in the metadata
(`x-amz-meta-sha256`), so a reader can check a copy without our records.
"""

from __future__ import annotations

from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.outputs.storage import StorageError

# Connect and read timeouts of one S3 call; botocore retries it up to 3 times.
S3_TIMEOUT_S = 30.0


class S3Storage:
    """Objects in one bucket under a key prefix; URIs are `s3://bucket/prefix/key`."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=S3_TIMEOUT_S,
            read_timeout=S3_TIMEOUT_S,
            retries={"max_attempts": 3, "mode": "standard"},
            # Path-style addressing works with every S3-compatible server (MinIO, moto);
            # AWS accepts it too.
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        # A client of our own session: boto3's default session is not thread-safe.
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config
        )

    def put(self, key: str, body: IO[bytes], *, size: int, content_type: str, sha256: str) -> str:
        name = f"{self.prefix}/{key}" if self.prefix else key
        extra = {"ContentType": content_type, "Metadata": {"sha256": sha256}}
        try:
            self._client.upload_fileobj(body, self.bucket, name, ExtraArgs=extra)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"s3://{self.bucket}/{name}: {_describe(exc)}") from exc
        return f"s3://{self.bucket}/{name}"

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint_url}" if self.endpoint_url else where


def _describe(exc: Exception) -> str:
    """The S3 error code and message, or the exception's class: never credentials."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"
