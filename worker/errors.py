"""The error tree, grouped by how the caller reacts.

    KqError
    ├── ValidationError          bad input at a boundary; names every bad field
    ├── ConfigError              a setting is missing or malformed
    ├── QueueUnavailable         the Celery broker took no message (restarting, away)
    └── ProviderError            anything the WaveSpeed client raises
        ├── TransientError       retry later with backoff (429, 5xx, connect errors)
        │   ├── RateLimited      429: no task was created
        │   └── ProviderResponseError  a read answered, but not in the documented shape
        ├── PermanentError       retrying cannot help (400, 401, 402, 403, 404)
        └── AmbiguousError       the submit may or may not have created a task

    (kq.procs.StackError, a KqError, is the local stack's: a child that failed to start.)

Messages never carry secrets: the client builds them from status codes and the
provider's own message, never from request headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class KqError(Exception):
    """Root of every error this package raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    """One rejected field: where, what was wrong, and what is allowed."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class ValidationError(KqError):
    """Input that crossed a boundary was refused; carries one entry per bad field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def single(cls, field: str, message: str) -> ValidationError:
        return cls([FieldError(field, message)])


class ConfigError(KqError):
    """A setting is missing or malformed; the message names the variable."""


class QueueUnavailable(KqError):
    """The Celery broker could not take a message. Jobs are recorded before their messages
    are sent, and a queued job is checked (and sent again) by the poller, so callers that
    wrote the job may carry on."""


class ProviderError(KqError):
    """A call to WaveSpeed did not give a usable answer."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class TransientError(ProviderError):
    """Retry later: rate limits, provider faults, network trouble before sending."""


class RateLimited(TransientError):
    """HTTP 429: the request was refused and no task was created."""


class PermanentError(ProviderError):
    """The provider refused the request and will refuse it again."""


class AmbiguousError(ProviderError):
    """The request may have been processed (e.g. a submit whose answer was lost)."""


class ProviderResponseError(TransientError):
    """The provider answered, but not in the documented shape (e.g. an HTML error page)."""
