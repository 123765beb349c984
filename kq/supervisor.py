"""The children of a stack as a group: started one at a time, each ready before the next,
watched while they run, stopped in reverse start order.

`kq.procs` knows how one child runs; this knows the group; `kq.stack.Stack` (a
Supervisor) decides which children, in which order, with which environment.
"""

from __future__ import annotations

import atexit
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from kq.procs import Proc, ReadyCheck, StackError, signals_as_keyboard_interrupt, wait_ready
from kq.stack_config import StackConfig

# How often `wait_forever` looks at its children.
MONITOR_INTERVAL_S = 0.5


class Supervisor:
    """Named children in start order; `stop()` (idempotent) stops all of them, only them."""

    def __init__(self, config: StackConfig, announce: Callable[[str], None] = print) -> None:
        self.config = config
        self._announce = announce
        self._procs: dict[str, Proc] = {}
        self._checks: dict[str, ReadyCheck] = {}

    @property
    def procs(self) -> Mapping[str, Proc]:
        """name -> Proc, in start order (read-only view)."""
        return MappingProxyType(self._procs)

    def stop(self) -> None:
        """Stop every child in reverse start order: SIGTERM, grace, SIGKILL. Idempotent."""
        self._stop(grace_s=None)

    def restart(self, name: str) -> Proc:
        """Stop one child and start it again with the same command, env and port."""
        proc = self._proc(name)
        proc.stop()
        proc.start()
        try:
            wait_ready(proc, self._checks[name], self.config.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._announce(f"{name} restarted (pid {proc.pid})")
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one child's process group and return at once (for chaos tests)."""
        self._proc(name).send_signal(sig)

    def wait_forever(self, poll_interval_s: float = MONITOR_INTERVAL_S) -> None:
        """Block while the children run; stop all and return on Ctrl-C or SIGTERM.

        A child that exits on its own stops everything and raises StackError with its log
        tail: a half-stack would look alive while jobs pile up. Signals can only be caught
        in the main thread; elsewhere this returns only by that StackError.
        """
        # SIGTERM (kill, systemd, docker stop) and SIGHUP (terminal closed) get the same clean
        # stop as Ctrl-C, and keep it during the stop, so a second signal hurries the stop
        # instead of killing the parent and orphaning the children.
        with signals_as_keyboard_interrupt():
            try:
                while True:
                    for proc in list(self._procs.values()):  # a harness may _spawn meanwhile
                        if proc.started and proc.poll() is not None:
                            raise StackError.for_child(proc, "exited unexpectedly")
                    time.sleep(poll_interval_s)
            except KeyboardInterrupt:
                self._announce("stopping the stack")
                self._stop_hurriable()
            except StackError:
                self._stop_hurriable()
                raise

    # -- launching ------------------------------------------------------------------------

    def _launch(
        self, name: str, argv: Sequence[str], check: ReadyCheck, stop_timeout_s: float | None = None
    ) -> Proc:
        """Start one child and wait until it is ready; on failure stop it and raise."""
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
