"""A Redis that survives losing its primary: one primary, one replica, three Sentinels.

For the failover test (`tests/test_sentinel.py`) and the multi-host run (`cluster/`):
every server runs from its own config file in `workdir`, so the Sentinels' CONFIG
REWRITE (a demoted primary becoming a replica of the new one) survives a restart, as it
does on a real host. `wrap` prefixes each command line (`ip netns exec HOST` in the
cluster); `host` is the address the servers bind and announce.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from kq.procs import wait_until

# How quickly the Sentinels act: a primary that does not answer for this long is down.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
PROBE_TIMEOUT_S = 1.0


def redis_binary() -> str | None:
    """redis-server (it runs Sentinels too, with --sentinel), or None if not installed."""
    return shutil.which("redis-server")


def wait_for(predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    """The predicate's first truthy value (polled as `kq.procs.wait_until` polls);
    TimeoutError naming `what` after timeout_s."""
    found = []

    def hit() -> bool:
        value = predicate()
        if value:
            found.append(value)
        return bool(value)

    if not wait_until(hit, timeout_s):
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
    return found[0]


class RedisHA:
    """Two data servers and three Sentinels; `start()`, then `stop()` (always)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host: str = "127.0.0.1",
        data_ports: Sequence[int],
        sentinel_ports: Sequence[int],
        master_name: str = "kq",
        wrap: Sequence[str] = (),
    ) -> None:
        if len(data_ports) != 2 or len(sentinel_ports) != 3:
            raise ValueError("expected 2 data ports and 3 sentinel ports")
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir.resolve()
        self.host = host
        self.data_ports = tuple(data_ports)
        self.sentinel_ports = tuple(sentinel_ports)
        self.master_name = master_name
        self.wrap = tuple(wrap)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- addresses ------------------------------------------------------------------------

    @property
    def sentinels(self) -> str:
        """The value of KQ_REDIS_SENTINELS."""
        return ",".join(f"{self.host}:{port}" for port in self.sentinel_ports)

    def url(self, port: int) -> str:
        return f"redis://{self.host}:{port}/0"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> None:
        primary, replica = self.data_ports
        for port in self.data_ports:
            self._write_data_config(port, replica_of=primary if port == replica else None)
            self._launch(port)
        for port in self.sentinel_ports:
            self._write_sentinel_config(port, primary)
            self._launch(port, sentinel=True)
        self.wait(lambda: self.replicas_of(primary) >= 1, timeout_s, "the replica to sync")
        self.wait(self._sentinels_agree, timeout_s, "the Sentinels to see each other")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[port]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(10)

    def restart(self, port: int) -> None:
        """Start a stopped data server again from its (possibly rewritten) config file."""
        if self.procs[port].poll() is None:
            raise RuntimeError(f"redis on port {port} is still running")
        self._launch(port)

    # -- questions ------------------------------------------------------------------------

    def primary(self) -> int | None:
        """The primary's port as a majority of the Sentinels see it (None: no agreement)."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                with self._client(port) as sentinel:
                    found = sentinel.sentinel_get_master_addr_by_name(self.master_name)
            except (redis.RedisError, OSError):
                continue
            if found:
                votes[int(found[1])] = votes.get(int(found[1]), 0) + 1
        best = max(votes.items(), key=lambda item: item[1], default=None)
        return best[0] if best and best[1] >= QUORUM else None

    def replicas_of(self, port: int) -> int:
        """How many replicas are connected to the server on `port` (0 if it is away)."""
        try:
            with self._client(port) as server:
                info = server.info("replication")
        except (redis.RedisError, OSError):
            return 0
        if info.get("role") != "master":
            return 0
        online = [
            value
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict)
        ]
        return sum(1 for value in online if value.get("state") == "online")

    def role(self, port: int) -> str:
        try:
            with self._client(port) as server:
                return str(server.info("replication").get("role", "?"))
        except (redis.RedisError, OSError):
            return "down"

    def failover(self, timeout_s: float = 30.0) -> tuple[int, int]:
        """`SENTINEL FAILOVER`: the replica is promoted; returns (old, new) primary ports."""
        old = self.primary()
        if old is None:
            raise RuntimeError("the Sentinels do not agree on a primary")
        with self._client(self.sentinel_ports[0]) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", self.master_name)

        def promoted() -> int | None:
            port = self.primary()
            if port is None or port == old or self.role(port) != "master":
                return None
            return port

        new = self.wait(promoted, timeout_s, "the Sentinels to promote the replica")
        return old, int(new)

    def settled_on(self, port: int) -> bool:
        """Every Sentinel names `port` the primary and none is still in a failover: only
        then is a restarted server sure to be told to follow it (a Sentinel mid-failover
        or not yet updated by its peers may otherwise leave it a primary for a while)."""
        views = self._sentinel_views()
        if views is None:
            return False
        for master in views:
            if int(master.get("port", 0)) != port:
                return False
            flags = str(master.get("flags", ""))
            if "failover_in_progress" in flags or "s_down" in flags or "o_down" in flags:
                return False
        return True

    def wait(self, predicate, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
        """`wait_for`, and on a timeout what the servers and Sentinels were doing."""
        try:
            return wait_for(predicate, timeout_s, what)
        except TimeoutError as timeout:
            raise TimeoutError(f"{timeout}\n{self.explain()}") from None

    def explain(self, events: int = 12) -> str:
        """What the servers and Sentinels were doing: each data server's role and
        replicas, and each Sentinel's last events (+tilt, +convert-to-slave, ...) from
        its log; for the message of a wait that timed out."""
        lines = []
        for port in self.data_ports:
            lines.append(f"redis {port}: {self.role(port)}, {self.replicas_of(port)} replica(s)")
            lines.extend(f"  {line}" for line in self._log_lines(port)[-events // 2 :])
        for port in self.sentinel_ports:
            recent = [line for line in self._log_lines(port) if " +" in line or " -" in line]
            lines.append(f"sentinel {port}, last events:")
            lines.extend(f"  {line}" for line in recent[-events:])
        return "\n".join(lines)

    def _log_lines(self, port: int) -> list[str]:
        log = self.workdir / f"{port}.log"
        return log.read_text(errors="replace").splitlines() if log.exists() else []

    # -- inside ---------------------------------------------------------------------------

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=self.host,
            port=port,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            decode_responses=True,
        )

    def _sentinel_views(self) -> list[dict[str, Any]] | None:
        """Each Sentinel's view of the primary (SENTINEL MASTER); None if one is away."""
        views = []
        for port in self.sentinel_ports:
            try:
                with self._client(port) as sentinel:
                    views.append(sentinel.sentinel_master(self.master_name))
            except (redis.RedisError, OSError):
                return None
        return views

    def _sentinels_agree(self) -> bool:
        views = self._sentinel_views()
        if views is None:
            return False
        for master in views:
            if int(master.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                return False
            if int(master.get("num-slaves", 0)) < 1:
                return False
        return True

    def _config_path(self, port: int) -> Path:
        return self.workdir / f"{port}.conf"

    def _write_data_config(self, port: int, replica_of: int | None) -> None:
        data_dir = self.workdir / f"data-{port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"port {port}",
            f"bind {self.host}",
            "protected-mode no",
            f"dir {data_dir}",
            "appendonly yes",
            'save ""',
            "maxmemory-policy noeviction",
            "hash-max-listpack-value 1024",
            f"replica-announce-ip {self.host}",
        ]
        if replica_of is not None:
            lines.append(f"replicaof {self.host} {replica_of}")
        self._config_path(port).write_text("\n".join(lines) + "\n")

    def _write_sentinel_config(self, port: int, primary: int) -> None:
        name = self.master_name
        lines = [
            f"port {port}",
            f"bind {self.host}",
            "protected-mode no",
            f"dir {self.workdir}",
            f"sentinel announce-ip {self.host}",
            f"sentinel monitor {name} {self.host} {primary} {QUORUM}",
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {name} 1",
        ]
        self._config_path(port).write_text("\n".join(lines) + "\n")

    def _launch(self, port: int, *, sentinel: bool = False) -> None:
        argv = [*self.wrap, self.binary, str(self._config_path(port))]
        if sentinel:
            argv.append("--sentinel")
        log = (self.workdir / f"{port}.log").open("ab")
        self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait(lambda: self._answers(port), 15, f"redis on port {port}")

    def _answers(self, port: int) -> bool:
        if self.procs[port].poll() is not None:
            raise RuntimeError(f"redis on port {port} exited: see {self.workdir}/{port}.log")
        try:
            with self._client(port) as server:
                return bool(server.ping())
        except redis.BusyLoadingError:
            return False
        except (redis.RedisError, OSError):
            return False
