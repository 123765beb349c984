"""The simulator's in-memory state: tasks, uploads, the request log, the rate limiter, the clock.

Nothing here is thread-safe on its own except ``RequestLog`` and ``UploadStore``: the
engine guards tasks and the limiter with its one lock. Two clocks are in play on purpose:

- ``SimClock`` (wall time plus an offset tests can advance) stamps ``created_at`` and
  decides the 7-day expiry and the list filters, so a test can jump a week ahead;
- ``time.monotonic()`` paces the lifecycle, the rate limit and webhook retries, so
  jumping the sim clock never makes a task finish early or a limit reset.
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from wavespeed_sim.config import TASK_ERRORS
from wavespeed_sim.params import inputs_of

FINAL_STATUSES = frozenset({"completed", "failed", "deleted"})
REQUEST_LOG_LIMIT = 100_000  # entries kept; older ones fall off (a long `kq up` stays bounded)
RATE_WINDOW_S = 60.0


def new_id() -> str:
    """A prediction or webhook-message id: 32 lowercase hex characters."""
    return secrets.token_hex(16)


def iso_ns(epoch_ns: int) -> str:
    """ISO-8601 UTC with nanoseconds and ``Z``, like WaveSpeed's ``created_at``."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    return f"{_iso_seconds(seconds)}.{nanos:09d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    # Every prediction shown formats its created_at; tasks come many per second.
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


class SimClock:
    """Wall-clock time that tests can move forward (``POST /_sim/clock/advance``)."""

    def __init__(self) -> None:
        self._offset_ns = 0

    def now_ns(self) -> int:
        """Simulated epoch nanoseconds."""
        return time.time_ns() + self._offset_ns

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self._offset_ns += int(seconds * 1_000_000_000)

    def reset(self) -> None:
        """Back to real time."""
        self._offset_ns = 0

    @property
    def offset_s(self) -> float:
        """How far ahead of real time the clock runs."""
        return self._offset_ns / 1_000_000_000


@dataclass
class TaskFaults:
    """The faults drawn for one task at submit time: the ground truth tests compare to."""

    fail_code: int | None = None
    drop_webhook: bool = False
    duplicate_webhook: bool = False
    delay_webhook_s: float = 0.0
    late_failed: bool = False
    bad_signature: bool = False
    stale_timestamp: bool = False
    ambiguous_submit: bool = False

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return dict(self.__dict__)


@dataclass
class Task:
    """One prediction and everything the simulator knows about it."""

    seq: int
    id: str
    model: str
    params: dict[str, object]
    webhook: str | None
    base_url: str
    created_ns: int
    charged: float
    faults: TaskFaults
    ready_mono: float  # when the queue delay ends
    # Where in +-inference_jitter_s this task's processing time falls (-1 to 1; drawn at
    # submit, applied when processing starts, so a changed config still applies).
    timing: float = 0.0
    submitted_unix: float = field(default_factory=time.time)
    status: str = "created"
    error: str = ""
    code: int | None = None
    outputs: list[str] = field(default_factory=list)
    started_mono: float | None = None
    finish_mono: float | None = None
    started_unix: float | None = None
    finished_unix: float | None = None
    execution_ms: int = 0
    removed: bool = False  # deleted after it had ended: gone from the API, as if expired

    @property
    def final(self) -> bool:
        """True once the task cannot change any more."""
        return self.status in FINAL_STATUSES

    @property
    def prompt(self) -> str:
        """The edit instruction (drawn on the output image)."""
        return str(self.params.get("prompt", ""))

    def result_url(self) -> str:
        """``urls.get``: where the prediction can be read."""
        return f"{self.base_url}/api/v3/predictions/{self.id}/result"

    def fail(self, code: int) -> None:
        """End the task failed with a task code."""
        self.status = "failed"
        self.code = code
        self.error = TASK_ERRORS.get(code, "task failed")
        self.outputs = []

    def prediction(self) -> dict[str, object]:
        """The prediction object, as ``data`` of a GET, a list item or a submit answer.

        Key order follows the spec's example. ``code`` appears only on failed tasks.
        """
        completed = self.status == "completed"
        body: dict[str, object] = {
            "id": self.id,
            "model": self.model,
            "outputs": list(self.outputs) if completed else [],
            "urls": {"get": self.result_url()},
            "has_nsfw_contents": [False] * len(self.outputs) if completed else [],
            "status": self.status,
            "created_at": iso_ns(self.created_ns),
            "error": self.error,
            "executionTime": self.execution_ms,
            "timings": {"inference": self.execution_ms},
        }
        if self.status == "failed" and self.code is not None:
            body["code"] = self.code
        return body

    def webhook_body(self) -> dict[str, object]:
        """The webhook body: the prediction plus ``input``, the parameters as submitted.

        Identity as the provider shows it: only a webhook says which request a task
        belongs to (``input`` here, the job in its URL). ``prediction()``, the GET result
        and list items, never carries ``input`` or the webhook URL. ``input`` holds the
        accepted parameters exactly as sent (unknown fields were dropped at submit). It is
        the task's own ``params``, not a copy: the body is serialized at once, never changed.
        """
        body: dict[str, object] = {}
        for key, value in self.prediction().items():
            body[key] = value
            if key == "model":
                body["input"] = self.params
        return body

    def as_dict(self, *, expired: bool) -> dict[str, object]:
        """The full ground-truth record for ``GET /_sim/tasks``."""
        return {
            "seq": self.seq,
            "id": self.id,
            "model": self.model,
            "status": self.status,
            "params": self.params,
            # The source image(s) the task was asked to edit, whichever field carried them.
            "inputs": inputs_of(self.params),
            "webhook": self.webhook,
            "base_url": self.base_url,
            "created_at": iso_ns(self.created_ns),
            "submitted_at": self.submitted_unix,
            "started_at": self.started_unix,
            "finished_at": self.finished_unix,
            "charged": self.charged,  # dollars, at the model's own price
            "charged_micros": round(self.charged * 1_000_000),
            "error": self.error,
            "code": self.code,
            "outputs": list(self.outputs),
            "removed": self.removed,
            "expired": expired,
            "faults": self.faults.as_dict(),
            "prediction": self.prediction(),
        }


@dataclass
class Upload:
    """A file given to the media endpoints; ``data`` stays None until the PUT arrives."""

    token: str
    filename: str
    content_type: str
    data: bytes | None = None


class UploadStore:
    """Uploaded files by token (thread-safe: uploads never touch tasks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uploads: dict[str, Upload] = {}

    def create(self, filename: str, content_type: str, data: bytes | None = None) -> Upload:
        """Register an upload: a ticket awaiting its PUT, or (with data) a finished one."""
        upload = Upload(token=new_id(), filename=filename, content_type=content_type, data=data)
        with self._lock:
            self._uploads[upload.token] = upload
        return upload

    def put(self, token: str, data: bytes) -> bool:
        """Store the bytes of a ticketed upload; False for an unknown ticket."""
        with self._lock:
            upload = self._uploads.get(token)
            if upload is None:
                return False
            upload.data = data
            return True

    def get(self, token: str) -> Upload | None:
        """A finished upload, or None."""
        with self._lock:
            upload = self._uploads.get(token)
            return upload if upload is not None and upload.data is not None else None

    def clear(self) -> None:
        """Forget every upload."""
        with self._lock:
            self._uploads.clear()


class RateLimiter:
    """Sliding one-minute window of accepted submits (monotonic time)."""

    def __init__(self) -> None:
        self._accepted: deque[float] = deque()

    def check(self, now: float, limit: int) -> float | None:
        """None when one more submit fits under ``limit``, else seconds until one does."""
        while self._accepted and now - self._accepted[0] >= RATE_WINDOW_S:
            self._accepted.popleft()
        if limit <= 0 or len(self._accepted) < limit:
            return None
        return max(RATE_WINDOW_S - (now - self._accepted[0]), 0.0)

    def record(self, now: float) -> None:
        """Count one accepted submit."""
        self._accepted.append(now)

    def reset(self) -> None:
        """Forget every accepted submit."""
        self._accepted.clear()


@dataclass
class RequestEntry:
    """One answered (or deliberately unanswered) HTTP request."""

    seq: int
    time: float
    method: str
    path: str
    query_string: str
    query: dict[str, str]
    kind: str
    status: int | None  # None: the connection was dropped without an answer
    task_id: str | None = None
    model: str | None = None
    fault: str | None = None
    body: object = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return dict(self.__dict__)


class RequestLog:
    """Every request the API side received, oldest first (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: deque[RequestEntry] = deque(maxlen=REQUEST_LOG_LIMIT)
        self._seq = 0

    def add(self, **fields: object) -> None:
        """Append one entry; ``fields`` are RequestEntry's fields except seq and time."""
        with self._lock:
            self._seq += 1
            self._entries.append(RequestEntry(seq=self._seq, time=time.time(), **fields))  # type: ignore[arg-type]

    def entries(self, *, kind: str | None = None, since: int = 0) -> list[dict[str, object]]:
        """Entries with ``seq > since``, optionally of one kind."""
        with self._lock:
            return [
                e.as_dict()
                for e in self._entries
                if e.seq > since and (kind is None or e.kind == kind)
            ]

    def clear(self) -> None:
        """Forget everything (the sequence keeps counting, so `since` stays meaningful)."""
        with self._lock:
            self._entries.clear()
