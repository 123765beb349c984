"""Where copied outputs go: a small storage protocol and its local-directory backend.

A backend stores one object under a key (`<job id>/<n>.<ext>`) from a file object and
answers the object's durable URI. `worker.outputs.backends.open_storage(url)` picks the
backend KQ_OUTPUTS names (this one, or S3Storage in worker/outputs/s3.py).

Every failure of a backend is a `StorageError`: to the copier a bucket that refuses a
write is a transient condition (retried with back-off until the overall deadline, and
alarmed on meanwhile), never a reason to drop the job's outputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Protocol

from worker.errors import KqError


class StorageError(KqError):
    """The backend could not store an object (unreachable, refused, disk full...)."""


class Storage(Protocol):
    """A place that keeps output images for good."""

    def put(self, key: str, body: IO[bytes], *, size: int, content_type: str, sha256: str) -> str:
        """Store `body` (read from its current position) under `key`; the durable URI.

        Idempotent: storing the same key again replaces the object (the copier may
        copy a job twice when a lease runs out, with the same bytes)."""
        ...

    def describe(self) -> str:
        """Where objects go, for logs (no credentials)."""
        ...


class LocalStorage:
    """Files under a directory; each written to a temporary name, flushed to disk, then
    renamed into place, so a reader never sees half an image."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def put(self, key: str, body: IO[bytes], *, size: int, content_type: str, sha256: str) -> str:
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root):
            raise StorageError(f"refusing a key outside {self.root}: {key!r}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(body, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        return target.as_uri()

    def describe(self) -> str:
        return str(self.root)
