"""The children of a stack as a group: started one at a time, each ready before the next,
watched while they run (a child that dies stops the group, unless it is one to revive),
stopped in reverse start order.

`kq.procs` knows how one child runs; this knows the group; `kq.stack.Stack` (a
Supervisor) decides which children, in which order, with which environment.
"""

from __future__ import annotations

import atexit
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from kq.procs import (
    Proc,
    ReadyCheck,
    StackError,
    describe_exit,
    signals_as_keyboard_interrupt,
    wait_ready,
)
from kq.stack_config import StackConfig

# How often `wait_forever` looks at its children.
MONITOR_INTERVAL_S = 0.5
# A child that is brought back when it dies (see `_revive_on_exit`) may die this many
# times within REVIVE_WINDOW_S; one more and the stack stops, as for any other child.
MAX_REVIVES = 5
REVIVE_WINDOW_S = 60.0


class Supervisor:
    """Named children in start order; `stop()` (idempotent) stops all of them, only them."""

    def __init__(self, config: StackConfig, announce: Callable[[str], None] = print) -> None:
        self.config = config
        self._announce = announce
        self._procs: dict[str, Proc] = {}
        self._checks: dict[str, ReadyCheck] = {}
        # Children brought back (same command, env, port) when they die on their own,
        # instead of stopping the stack; the stack's private redis-server is one.
        self._revive_on_exit: set[str] = set()
        self._revived_at: dict[str, list[float]] = {}
        # Held while children are started, restarted or stopped, so that watching (in
        # `wait_forever`, perhaps on another thread) never mistakes a child being stopped
        # or restarted for one that died; set once `stop()` begins.
        self._lock = threading.RLock()
        self._stopping = threading.Event()

    @property
    def procs(self) -> Mapping[str, Proc]:
        """name -> Proc, in start order (read-only view)."""
        return MappingProxyType(self._procs)

    def stop(self) -> None:
        """Stop every child in reverse start order: SIGTERM, grace, SIGKILL. Idempotent."""
        self._stop(grace_s=None)

    def restart(self, name: str, down_s: float = 0.0) -> Proc:
        """Stop one child and start it again with the same command, env and port,
        after `down_s` seconds without it (an outage rather than a blip)."""
        with self._lock:
            proc = self._proc(name)
            proc.stop()
            time.sleep(down_s)
            self._start_again(proc)
            self._announce(f"{name} restarted (pid {proc.pid})")
            return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one child's process group and return at once (for chaos tests)."""
        self._proc(name).send_signal(sig)

    def wait_forever(self, poll_interval_s: float = MONITOR_INTERVAL_S) -> None:
        """Block while the children run; stop all and return on Ctrl-C or SIGTERM.

        A child that exits on its own stops everything and raises StackError with its log
        tail: a half-stack would look alive while jobs pile up. The exceptions are the
        children marked to be revived (the private redis-server): they are started again,
        same port and data, and the others carry on. Signals can only be caught in the
        main thread; elsewhere this returns when `stop()` is called, or by that StackError.
        """
        # SIGTERM (kill, systemd, docker stop) and SIGHUP (terminal closed) get the same clean
        # stop as Ctrl-C, and keep it during the stop, so a second signal hurries the stop
        # instead of killing the parent and orphaning the children.
        with signals_as_keyboard_interrupt():
            try:
                while not self._stopping.is_set():
                    self.check_children()
                    time.sleep(poll_interval_s)
            except KeyboardInterrupt:
                self._announce("stopping the stack")
                self._stop_hurriable()
            except StackError:
                self._stop_hurriable()
                raise

    def check_children(self) -> None:
        """One look at the children: revive those marked so, raise StackError for another
        that exited. Does nothing once the stack is stopping."""
        with self._lock:
            if self._stopping.is_set():
                return
            for name, proc in list(self._procs.items()):  # a harness may _spawn meanwhile
                if not proc.started or proc.poll() is None:
                    continue
                if name not in self._revive_on_exit or not self._may_revive(name):
                    raise StackError.for_child(proc, "exited unexpectedly")
                self._announce(f"{name} exited unexpectedly ({describe_exit(proc.returncode)})")
                self._start_again(proc)
                self._announce(f"{name} started again (pid {proc.pid}); the others carry on")

    def _may_revive(self, name: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self._revived_at.get(name, []) if now - t < REVIVE_WINDOW_S]
        self._revived_at[name] = [*recent, now]
        return len(recent) < MAX_REVIVES

    # -- launching ------------------------------------------------------------------------

    def _launch(
        self, name: str, argv: Sequence[str], check: ReadyCheck, stop_timeout_s: float | None = None
    ) -> Proc:
        """Start one child and wait until it is ready; on failure stop it and raise."""
        with self._lock:
            return self._launch_locked(name, argv, check, stop_timeout_s)

    def _launch_locked(
        self, name: str, argv: Sequence[str], check: ReadyCheck, stop_timeout_s: float | None
    ) -> Proc:
        current = self._procs.get(name)
        if current is not None and current.alive:
            raise RuntimeError(f"{name} is already running (pid {current.pid})")
        proc = Proc(
            name,
            argv,
            env=self._child_env(),
            log_path=self.config.var_dir / "logs" / f"{name}.log",
            stop_timeout_s=self.config.stop_timeout_s if stop_timeout_s is None else stop_timeout_s,
        )
        # Registered before it starts, so a stop() from anywhere (atexit, Ctrl-C) finds it.
        self._procs[name] = proc
        self._checks[name] = check
        proc.start()
        try:
            wait_ready(proc, check, self.config.ready_timeout_s)
        except BaseException:
            proc.stop()
            raise
        return proc

    def _start_again(self, proc: Proc) -> None:
        """Start a stopped child again and wait until it is ready; on failure stop all."""
        proc.start()
        try:
            wait_ready(proc, self._checks[proc.name], self.config.ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        ready_check: ReadyCheck,
        stop_timeout_s: float | None = None,
    ) -> Proc:
        """Start any child as part of the running stack (tests, harnesses).

        Like the built-in children: its own group, log in var_dir/logs/<name>.log, the
        stack's env, stopped with the rest; a readiness failure stops the whole stack.
        """
        try:
            return self._launch(name, argv, ready_check, stop_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _child_env(self) -> dict[str, str]:
        """The environment a child is started with (the stack decides)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Called once the children are stopped: close what watching them needed."""

    # -- stopping -------------------------------------------------------------------------

    def _stop(self, grace_s: float | None) -> None:
        # Before the lock: a watcher waiting for it must find the stack stopping.
        self._stopping.set()
        with self._lock:
            self._stop_locked(grace_s)

    def _stop_locked(self, grace_s: float | None) -> None:
        atexit.unregister(self.stop)
        stopped: list[str] = []
        errors: list[StackError] = []
        for name, proc in reversed(list(self._procs.items())):
            if not proc.started:
                continue
            was_alive = proc.alive
            try:
                proc.stop(grace_s)
            except StackError as exc:
                errors.append(exc)  # keep going: the others must still be stopped
            if was_alive:
                stopped.append(name)
        self._release()
        if stopped:
            self._announce(f"stopped {', '.join(stopped)}")
        if errors:
            raise errors[0]

    def _stop_hurriable(self) -> None:
        """Stop gracefully; a second Ctrl-C (or SIGTERM) while waiting kills at once."""
        try:
            self._stop(grace_s=None)
        except KeyboardInterrupt:
            self._announce("interrupted again: killing the stack now")
            self._stop(grace_s=0)

    def _proc(self, name: str) -> Proc:
        try:
            return self._procs[name]
        except KeyError:
            known = ", ".join(self._procs) or "none"
            raise KeyError(f"no child named {name!r} (running: {known})") from None
