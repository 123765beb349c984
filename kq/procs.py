"""Child processes of the local stack: spawn, wait until ready, stop the whole group.

`kq.stack` decides *what* runs; this module knows *how* one child is run:

- Each child gets its own session, hence its own process group. Ctrl-C in a terminal
  then reaches only the parent, which stops the children in order instead of every
  process dying at once, and one `killpg` reaches whatever a child forked (gunicorn
  workers, pool processes) so nothing outlives the stack.
- Output goes to an append-only log file per child. The offset where the current run
  begins is remembered, so an error shows this run's last lines, not an older run's.
- Readiness is a predicate polled with a deadline; a child that exits first fails fast.
- Stop is SIGTERM to the group, a grace period, then SIGKILL to the group, then a reap.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from worker.errors import KqError

# Grace between SIGTERM and SIGKILL; long enough for a clean shutdown of a web server.
DEFAULT_STOP_TIMEOUT_S = 10.0
# How long a child may take to become ready (Celery imports alone take a few seconds).
DEFAULT_READY_TIMEOUT_S = 30.0
# Lines of a child's log quoted in an error: enough for a traceback, short enough to read.
TAIL_LINES = 20
# Only the end of a long log is read for the tail; a day-old worker log can be large.
_TAIL_MAX_BYTES = 64 * 1024
# Readiness polling starts fast (most children are up in well under a second) and backs off.
_POLL_MIN_S = 0.02
_POLL_MAX_S = 0.25
# After SIGKILL the kernel reaps promptly; waiting longer means a process stuck in the kernel.
_KILL_WAIT_S = 5.0
# Signals that mean "stop now" to a foreground `kq up`, besides SIGINT (Ctrl-C).
# SIGINT too: a stack started in the background inherits SIGINT as ignored.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StackError(KqError):
    """The local stack could not start, or one of its children failed.

    Carries the child's `name`, its `returncode` (None while it runs) and the last lines
    of its log, which are also part of the message so a CLI can print just `str(exc)`.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        returncode: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(message)

    @classmethod
    def for_child(cls, proc: Proc, what: str) -> StackError:
        """An error about `proc` ("worker exited before it was ready ...") with its log tail."""
        tail = proc.tail()
        quoted = textwrap.indent(tail, "  | ") if tail else "  (nothing in the log)"
        pid = proc.pid if proc.started else "-"
        return cls(
            f"{proc.name} {what} (pid {pid}, {describe_exit(proc.returncode)}); "
            f"last lines of {proc.log_path}:\n{quoted}",
            name=proc.name,
            returncode=proc.returncode,
            log_tail=tail,
        )


ReadyCheck = Callable[["Proc"], bool]
"""Answers "is this child ready?"; must not raise for "not yet" (connection refused etc.)."""


def describe_exit(returncode: int | None) -> str:
    """Human words for a Popen return code: negative codes are signals."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def free_port(host: str) -> int:
    """A TCP port that is free on `host` right now.

    The port is released before the child binds it, so another process can take it in
    between; callers retry on "address in use" rather than pretend the race away.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `predicate` with backoff until it is true (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    delay = _POLL_MIN_S
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX_S)


class Proc:
    """One child of the stack: its command, environment and log; restartable.

    The environment is fixed when the Proc is made, so a restart gets exactly what the
    first run got (same ports, same URLs). It holds secrets, so it is not in the repr.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self._env = dict(env)
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = describe_exit(self.returncode) if self.started else "not started"
        pid = self._popen.pid if self._popen is not None else None
        return f"<Proc {self.name} pid={pid} {state} log={self.log_path}>"

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def pid(self) -> int:
        """The pid of the last run (also its process group id)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); otherwise as `Popen.returncode`."""
        return self.poll()

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def poll(self) -> int | None:
        """Reap the child if it has exited and return its code, like `Popen.poll`."""
        return None if self._popen is None else self._popen.poll()

    def start(self) -> None:
        """Spawn the child in a new session, output appended to its log."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} starting {self.name}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StackError(
                    f"cannot start {self.name} ({self.argv[0]}): {exc.strerror or exc}",
                    name=self.name,
                ) from exc
        # The child holds its own copy of the log descriptor; ours is closed by the `with`.

    def send_signal(self, sig: int) -> None:
        """Signal the child's whole process group; a group that is gone is not an error."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._popen.pid, sig)

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Wait for the child to exit; its return code, or None if `timeout_s` passed."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the group, wait up to `timeout_s` (default: `stop_timeout_s`), SIGKILL.

        Idempotent; returns the exit code (None if never started).
        """
        if self._popen is None:
            return None
        grace = self.stop_timeout_s if timeout_s is None else timeout_s
        if self._popen.poll() is None:
            self.send_signal(signal.SIGTERM)
            self.wait(grace)
        # SIGKILL the group even when the leader exited on its own: anything it forked and
        # left behind (a pool process that ignores SIGTERM) would otherwise outlive the stack.
        self.send_signal(signal.SIGKILL)
        if self.wait(_KILL_WAIT_S) is None:
            raise StackError(f"{self.name} (pid {self.pid}) survived SIGKILL", name=self.name)
        return self._popen.returncode

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last `lines` lines this run wrote to its log ("" if none)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self._log_offset, size - _TAIL_MAX_BYTES))
                data = log.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def signals_as_keyboard_interrupt() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt (main thread only).

    By default they end Python without running `finally` blocks or atexit, and children
    in their own sessions would be orphaned; with this, `with Stack(...)` still stops them.
    `kq run` can wrap its batch in it; `Stack.wait_forever` does.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def wait_ready(proc: Proc, check: ReadyCheck, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
    """Return once `check(proc)` is true; raise StackError if the child exits or time runs out.

    The exit check comes first on every round: a child that crashed on import should fail
    the start within a poll interval, not after the whole deadline.
    """
    deadline = time.monotonic() + timeout_s
    delay = _POLL_MIN_S
    while True:
        if proc.poll() is not None:
            raise StackError.for_child(proc, "exited before it was ready")
        if check(proc):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StackError.for_child(proc, f"was not ready within {timeout_s:g} s")
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX_S)
