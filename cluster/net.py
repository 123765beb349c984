"""Hosts on one machine: a Linux network namespace per host, joined by veth pairs to one
bridge, as separate machines on one switch (needs root and iproute2's `ip`).

The driver (the process running the scenario) stays in the root namespace and holds the
bridge's address, so it reaches every host over the same network the hosts use. A
host's link goes down on the bridge side of its veth pair: its packets are dropped, its
sockets see nothing (a cable pulled, not a process killed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


class NetError(RuntimeError):
    """A network namespace could not be set up (no root, no `ip`, ...)."""


@dataclass(frozen=True)
class Host:
    """One namespace: its role name, namespace name, address and bridge-side veth."""

    role: str
    ns: str
    ip: str
    veth: str

    def wrap(self) -> list[str]:
        """The argv prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.ns]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def why_impossible() -> str | None:
    """Why namespaces cannot be built here (None: they can), without building any."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"kqprobe{os.getpid() % 100000}"
    try:
        ip("netns", "add", probe)
    except NetError as exc:
        return f"cannot create a network namespace: {exc}"
    ip("netns", "del", probe, check=False)
    return None


@dataclass
class Network:
    """A bridge and the hosts on it; `up()` builds it, `down()` removes every trace."""

    tag: str  # a short prefix, unique per run: names stay within IFNAMSIZ (15)
    subnet: str  # the first three octets, e.g. "10.231.7"
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        """The driver's address on the bridge."""
        return f"{self.subnet}.1"

    def add(self, role: str, last_octet: int) -> Host:
        host = Host(
            role=role,
            ns=f"{self.tag}-{role}",
            ip=f"{self.subnet}.{last_octet}",
            veth=f"{self.tag}v{len(self.hosts)}",
        )
        self.hosts[role] = host
        return host

    def up(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for host in self.hosts.values():
            ip("netns", "add", host.ns)
            ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            ip("link", "set", host.veth, "master", self.bridge)
            ip("link", "set", host.veth, "up")
            inside = ["-n", host.ns]
            ip(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            ip(*inside, "link", "set", "eth0", "up")
            ip(*inside, "link", "set", "lo", "up")

    def link(self, role: str, *, up: bool) -> None:
        """Plug a host's cable in or pull it out."""
        ip("link", "set", self.hosts[role].veth, "up" if up else "down")

    def down(self) -> None:
        """Kill whatever still runs in the namespaces, delete them and the bridge."""
        for host in self.hosts.values():
            pids = ip("netns", "pids", host.ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", host.ns, check=False)
        ip("link", "del", self.bridge, check=False)


def leftovers(prefix: str = "kqc") -> list[str]:
    """Namespaces a crashed run may have left (their names start with `prefix`)."""
    listed = ip("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(prefix)]
