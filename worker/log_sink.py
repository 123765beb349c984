"""A standard error that never blocks its process: lines queue for a writer thread.

The receiver must answer the provider within its 3 s timeout. Under gevent every
client of a receiver process is served by one OS thread, so a write to a stderr pipe
whose reader has stalled (a log shipper stuck, nobody reading the container's output)
would stop every delivery and `/healthz` until the reader came back; under gthread
the threads that log (duplicates, refusals) would pile up on the logger's lock. Here a
write only queues the line; one OS thread of its own (not a greenlet) writes them out,
several lines a write. Lines that would take the queue past MAX_PENDING_BYTES (a
stalled reader, or a burst faster than the pipe takes it) are dropped whole and
counted: a `log.dropped` line stands in their place.

Written by hand: the standard library's QueueHandler serves `logging` only (not
structlog's output, nor Python's own tracebacks), its queue is unbounded unless given
a bound it then raises at, and under gevent its listener would be a greenlet, blocked
with the rest.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

# What may wait for the reader (a receiver's line is ~200-300 bytes): past this, lines
# are dropped rather than held.
MAX_PENDING_BYTES = 1 << 20
# One write of the writer thread joins queued lines up to this size: a pipe writes as
# much at once without interleaving it with another writer's (the arbiter's and its
# workers' lines share the pipe).
WRITE_BYTES = 4096
# How long a process leaving waits for its queued lines to be written.
EXIT_DRAIN_S = 1.0

_sinks: weakref.WeakSet[NonBlockingStderr] = weakref.WeakSet()


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
        self._os = _OsThreads()
        self.dropped = 0  # lines dropped, in all
        self._start()
        _sinks.add(self)

    def _start(self) -> None:
        """A new queue, locks and writer thread (in a forked child too: the parent's
        queue is the parent's to write, and a lock held at the fork stays held)."""
        self._pending: deque[bytes | _Dropped] = deque()
        self._pending_bytes = 0  # queued, or taken by the writer and not yet written
        self._writing = False  # the writer holds a notice it has not written yet
        self._mid_line = False  # the last write queued did not end its line
        self._dropping_line = False  # the last write dropped did not end its line
        self._closed = False
        # Re-entrant: a signal handler, or a finalizer's "Exception ignored" report,
        # may write from inside a write of the same thread.
        self._lock = self._os.new_rlock()  # guards everything above
        self._wake = self._os.new_lock()  # released when something is queued
        self._wake.acquire()
        self._os.start_thread(self._write_out, ())

    # --- the stream's side: any thread or greenlet ---------------------------------

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        ends_line = data.endswith(b"\n")
        with self._lock:
            if self._closed:
                return len(text)
            if self._dropping_line:  # the rest of a line already dropped
                self._dropping_line = not ends_line
                return len(text)
            if (
                not self._mid_line  # a line is dropped whole or not at all
                and self._pending_bytes
                and self._pending_bytes + len(data) > self._max_pending
            ):
                self._drop_line()
                self._dropping_line = not ends_line
                return len(text)
            self._pending_bytes += len(data)
            self._pending.append(data)
            self._mid_line = not ends_line
        self._wake_writer()
        return len(text)

    def _drop_line(self) -> None:
        # Counted where the line would have been: the notice comes out after the lines
        # queued before it, and before any queued after.
        self.dropped += 1
        last = self._pending[-1] if self._pending else None
        if isinstance(last, _Dropped):
            last.lines += 1
        else:
            self._pending.append(_Dropped(1))
            self._wake_writer()

    def _wake_writer(self) -> None:
        try:
            self._wake.release()
        except RuntimeError:  # already released: the writer is awake
            pass

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
            self._os.sleep(0.005)
        return not self._unwritten()

    def close(self) -> None:
        """Stop the writer thread once it has written what is queued; writes after this
        are dropped (uncounted)."""
        with self._lock:
            self._closed = True
        self._wake_writer()
        super().close()

    def restart(self) -> None:
        """In a forked child: a writer thread of its own (unless closed)."""
        if not self._closed:
            self._start()

    def _unwritten(self) -> bool:
        with self._lock:
            return bool(self._pending or self._pending_bytes or self._writing)

    # --- the writer thread -----------------------------------------------------------

    def _write_out(self) -> None:
        while True:
            try:
                with self._lock:
                    closed = self._closed
                    lines, notice = self._take()
                if lines:
                    self._write_all(b"".join(lines))
                    with self._lock:
                        self._pending_bytes -= sum(map(len, lines))
                elif notice:
                    self._write_all(notice)
                    with self._lock:
                        self._writing = False
                elif closed:
                    return
                else:
                    self._wake.acquire(timeout=1.0)
            except Exception:  # never let the writer die: lines would pile up unwritten
                self._os.sleep(0.1)

    def _take(self) -> tuple[list[bytes], bytes]:
        """Under the lock: the next queued lines to write together (up to WRITE_BYTES,
        or one longer line), or else the next drop notice."""
        lines: list[bytes] = []
        size = 0
        while self._pending:
            head = self._pending[0]
            if isinstance(head, _Dropped):
                if lines:
                    break
                self._pending.popleft()
                self._writing = True
                return [], self._notice(head.lines)
            if lines and size + len(head) > WRITE_BYTES:
                break
            self._pending.popleft()
            lines.append(head)
            size += len(head)
        return lines, b""

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:  # someone made the descriptor non-blocking
                self._os.sleep(0.01)
            except OSError:  # the reader is gone for good: nothing more can be written
                return

    def _notice(self, dropped: int) -> bytes:
        event = "log.dropped"
        detail = "lines dropped while standard error was not being read fast enough"
        if self._json_lines:
            fields = {"lines": dropped, "detail": detail, "event": event, "level": "warning"}
            line = json.dumps(fields)
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
    configured, so that every handler and structlog write through it). Once a process."""
    if isinstance(sys.stderr, NonBlockingStderr):
        return sys.stderr
    sys.stderr.flush()
    stream = NonBlockingStderr(sys.stderr.fileno(), json_lines=json_lines)
    sys.stderr = stream
    atexit.register(stream.drain, EXIT_DRAIN_S)
    return stream


def _restart_in_child() -> None:
    for sink in list(_sinks):
        sink.restart()


# gunicorn forks its workers: a child has no writer thread until it starts one.
os.register_at_fork(after_in_child=_restart_in_child)


class _OsThreads:
    """The operating system's threads, locks and sleep: under gevent, the originals it
    patched (a greenlet writer would block with the rest)."""

    def __init__(self) -> None:
        import _thread

        self.start_thread: Callable[..., Any] = _thread.start_new_thread
        self.new_lock: Callable[[], Any] = _thread.allocate_lock
        self.new_rlock: Callable[[], Any] = _thread.RLock
        self.sleep: Callable[[float], None] = time.sleep
        if "gevent.monkey" in sys.modules:
            from gevent import monkey

            if monkey.is_module_patched("threading"):
                self.start_thread, self.new_lock, self.new_rlock = monkey.get_original(
                    "_thread", ["start_new_thread", "allocate_lock", "RLock"]
                )
                self.sleep = monkey.get_original("time", "sleep")
