"""A standard error that never blocks its process: lines queue for a writer thread.

The receiver must answer the provider within its 3 s timeout. Under gevent every
client of a receiver process is served by one OS thread, so a write to a stderr pipe
whose reader has stalled (a log shipper stuck, nobody reading the container's output)
would stop every delivery and `/healthz` until the reader came back; under gthread
the threads that log (duplicates, refusals) would pile up on the logger's lock. Here a
write only queues the line; one OS thread of its own (not a greenlet) writes them out.
While the reader is stalled, lines past MAX_PENDING_BYTES are dropped and counted; once
writing resumes, a line says how many were lost.

Written by hand: the standard library's QueueHandler blocks or raises when its queue is
full, and under gevent its listener would be a greenlet, blocked with the rest.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

# What may wait for a stalled reader (a receiver's line is ~200-300 bytes): beyond
# this, lines are dropped rather than held.
MAX_PENDING_BYTES = 1 << 20
# How long a process leaving waits for its queued lines to be written.
EXIT_DRAIN_S = 1.0


class NonBlockingStderr(io.TextIOBase):
    """A text stream over file descriptor `fd` whose `write` never waits on `fd`."""

    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(
        self,
        fd: int,
        *,
        json_lines: bool = False,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        super().__init__()
        self._fd = fd
        self._json_lines = json_lines
        self._max_pending = max_pending_bytes
        self._start_thread, self._new_lock, self._sleep = _os_threads()
        self.dropped = 0  # lines dropped, in all
        self._start()
        # gunicorn forks its workers: a child has no writer thread until it starts one.
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        # In a forked child: the parent's queue is the parent's to write, and a lock
        # the parent's writer held at the fork would never be released here.
        self._pending: deque[bytes | _Dropped] = deque()
        self._pending_bytes = 0
        self._lock = self._new_lock()  # guards the queue's end and _pending_bytes
        self._wake = self._new_lock()  # released when a line is queued
        self._wake.acquire()
        self._start_thread(self._write_out, ())

    # --- the stream's side: any thread or greenlet ---------------------------------

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        with self._lock:
            if self._pending_bytes + len(data) <= self._max_pending:
                self._pending_bytes += len(data)
                self._pending.append(data)
            else:
                # Counted where the line would have been: the notice comes out after
                # the lines queued before it, and before any queued after.
                self.dropped += 1
                last = self._pending[-1] if self._pending else None
                if isinstance(last, _Dropped):
                    last.lines += 1
                else:
                    self._pending.append(_Dropped(1))
        try:
            self._wake.release()
        except RuntimeError:  # already released: the writer is awake
            pass
        return len(text)

    def flush(self) -> None:
        """Nothing to do: the writer thread writes each line as soon as it can."""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every queued line to be written; True if they were."""
        deadline = time.monotonic() + timeout_s
        while self._unwritten() and time.monotonic() < deadline:
            self._sleep(0.005)
        return not self._unwritten()

    def _unwritten(self) -> bool:
        # _pending_bytes counts a line until it is written, also once taken off the queue.
        return bool(self._pending or self._pending_bytes)

    # --- the writer thread -----------------------------------------------------------

    def _write_out(self) -> None:
        while True:
            with self._lock:
                item = self._pending.popleft() if self._pending else None
            if item is None:
                self._wake.acquire(timeout=1.0)
            elif isinstance(item, _Dropped):
                self._write_all(self._notice(item.lines))
            else:
                self._write_all(item)
                with self._lock:
                    self._pending_bytes -= len(item)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except InterruptedError:
                continue
            except OSError:  # the reader is gone for good: nothing more can be written
                return

    def _notice(self, dropped: int) -> bytes:
        event = "log.dropped"
        detail = "lines dropped while standard error was not being read"
        if self._json_lines:
            line = json.dumps(
                {"lines": dropped, "detail": detail, "event": event, "level": "warning"}
            )
        else:
            line = f"[warning  ] {event:<30} lines={dropped} detail={detail!r}"
        return (line + "\n").encode()


class _Dropped:
    """Lines dropped in a row, in the queue where they would have been."""

    __slots__ = ("lines",)

    def __init__(self, lines: int) -> None:
        self.lines = lines


def install(*, json_lines: bool) -> NonBlockingStderr:
    """Make this process's `sys.stderr` a NonBlockingStderr over fd 2 (before logging is
    configured, so that every handler and structlog write through it)."""
    sys.stderr.flush()
    stream = NonBlockingStderr(sys.stderr.fileno(), json_lines=json_lines)
    sys.stderr = stream
    atexit.register(stream.drain, EXIT_DRAIN_S)
    return stream


def _os_threads() -> tuple[Callable[..., Any], Callable[[], Any], Callable[[float], None]]:
    """Start-a-thread, new-lock and sleep of the operating system's threads: under gevent,
    the originals it patched (a greenlet writer would block with the rest)."""
    import _thread

    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            start, lock = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])
            return start, lock, monkey.get_original("time", "sleep")
    return _thread.start_new_thread, _thread.allocate_lock, time.sleep
