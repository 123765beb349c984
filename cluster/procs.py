"""The processes of a host: started in its namespace, each in its own process group,
logging to a file; signalled by group, so a kill reaches what the process started too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cluster.net import Host


class HostProc:
    """One long-running process (`kq worker`, `kq receiver`, haproxy, ...) on one host."""

    def __init__(
        self, name: str, host: Host, argv: Sequence[str], env: Mapping[str, str], logs: Path
    ) -> None:
        self.name = name
        self.host = host
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.host.wrap(), *self.argv],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 10.0) -> None:
        if not self.alive:
            return
        self.signal(signal.SIGTERM)
        if self.wait(grace_s) is None:
            self.signal(signal.SIGKILL)
            self.wait(10)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def kq(*args: str) -> list[str]:
    """A `kq` command line with this interpreter (same venv, same code)."""
    return [sys.executable, "-m", "kq.cli", *args]
