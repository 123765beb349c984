"""The multi-host run: seven hosts, a stream of jobs, four faults, then the invariants.

Hosts (one network namespace each, on one bridge; see `cluster.net`):

    redis   primary :6379, replica :6380, Sentinels :26379-26381 (`chaos.redis_ha`)
    w1, w2  `kq worker` each (w2 also runs `kq beat`)
    r1, r2  `kq receiver` each, behind
    lb      haproxy :8080, health-checking GET /healthz; KQ_WEBHOOK_PUBLIC_URL points here
    sim     the WaveSpeed simulator :9000

Every process finds Redis through the Sentinels (KQ_REDIS_SENTINELS); the driver (this
process, in the root namespace) enqueues jobs over the same network while the faults
happen, one after the other. The faults follow the work, not the clock: the jobs are
released in four parts, and each fault waits for its moment (a submit in flight, a chunk
started on the host it hits) with the next part still held back, so however fast a run
goes, every fault meets jobs in flight (checked: "every fault met work in flight"):

1. Redis: `SENTINEL FAILOVER`, then kill -9 of the primary (the Sentinels promote the
   other server by themselves); the killed server is started again and rejoins as a replica.
2. w1's link goes down mid-submit for `link_down_s`, then comes back.
3. meanwhile, kill -9 of r1's processes while webhooks arrive; started again later.
4. SIGTERM to w2's processes (a graceful drain, bounded by KQ_DRAIN_TIMEOUT_S), then
   started again.

Then, once every job has settled: the invariants of `chaos.ha_checks` against the
simulator's ground truth, with their counts, and the timeline of the faults.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from chaos import ha_checks, invariants
from chaos.invariants import Check
from chaos.redis_ha import RedisHA, wait_for
from cluster.net import Host, Network
from cluster.procs import HostProc, kq
from worker import runtime
from worker.celery_app import configure
from worker.settings import Settings

SIM_KEY = "sim-cluster-key"
SIM_PORT = 9000
RECEIVER_PORT = 8000
LB_PORT = 8080
DATA_PORTS = (6379, 6380)
SENTINEL_PORTS = (26379, 26380, 26381)
# The jobs are released in these parts (cumulative fractions): one before each fault.
PARTS = (0.25, 0.5, 0.75, 1.0)
DRAIN_TIMEOUT_S = 10.0
# A drained worker exits within its drain timeout plus this (Celery's own steps).
DRAIN_MARGIN_S = 5.0
IMAGE = "https://example.com/source.jpg"


@dataclass(frozen=True)
class Plan:
    """How big and how long: the full run (`make chaos-cluster`) or the small one."""

    jobs: int = 2000
    seed: int = 1
    wave: int = 50  # jobs per enqueue, one every `wave_every_s` while released jobs remain
    wave_every_s: float = 1.0
    link_down_s: float = 30.0
    receiver_down_s: float = 10.0
    settle_s: float = 900.0
    max_in_flight: int = 60

    @property
    def ambiguous_grace_s(self) -> float:
        # A submit sent just before the link went down may reach the provider only when
        # it comes back (TCP retransmits, with back-off): the grace must outlast that.
        return max(30.0, 4 * self.link_down_s)


SMALL = Plan(jobs=300, wave=20, link_down_s=8.0, receiver_down_s=4.0, settle_s=240.0)


class Timeline:
    """What happened when, printed at the end."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, what: str) -> None:
        line = f"{time.monotonic() - self.start:7.1f} s  {what}"
        with self._lock:
            self.lines.append(line)
        print(line, flush=True)


class Cluster:
    """The hosts, their processes and the driver's clients; `run()` does it all."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        tag = f"kqc{os.getpid() % 10000}"
        self.net = Network(tag=tag, subnet=f"10.231.{os.getpid() % 250}")
        for role, octet in (
            ("redis", 10),
            ("w1", 21),
            ("w2", 22),
            ("r1", 31),
            ("r2", 32),
            ("lb", 40),
            ("sim", 50),
        ):
            self.net.add(role, octet)
        self.procs: dict[str, HostProc] = {}
        self.ha: RedisHA | None = None
        self.log = Timeline()
        self.http = httpx.Client(timeout=5, trust_env=False)
        self.ids: list[str] = []
        self.prompts: dict[str, str] = {}
        self.feed_paused = threading.Event()
        self.feed_done = threading.Event()
        self.released = 0  # how many jobs the feed may enqueue so far (see `release`)
        self.met_work: list[tuple[str, bool, str]] = []  # fault, met work in flight, counts
        self.feed_errors: list[str] = []
        self.extra_checks: list[Check] = []

    # -- addresses and environment ------------------------------------------------------

    def host(self, role: str) -> Host:
        return self.net.hosts[role]

    def url(self, role: str, port: int) -> str:
        return f"http://{self.host(role).ip}:{port}"

    def env(self, role: str) -> dict[str, str]:
        redis_host = self.host("redis")
        plan = self.plan
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "KQ_VAR_DIR": str(self.workdir / role / "var"),
            "KQ_REDIS_URL": f"redis://{redis_host.ip}:{DATA_PORTS[0]}/0",
            "KQ_REDIS_SENTINELS": ",".join(f"{redis_host.ip}:{p}" for p in SENTINEL_PORTS),
            "KQ_REDIS_MASTER_NAME": "kq",
            "KQ_REDIS_WAIT_TIMEOUT_MS": "500",
            "KQ_SECRET_KEY": self.secret_key,
            "KQ_WEBHOOK_SECRET": self.webhook_secret,
            "KQ_WEBHOOK_PUBLIC_URL": self.url("lb", LB_PORT),
            "WAVESPEED_API_KEY": SIM_KEY,
            "KQ_WAVESPEED_BASE_URL": self.url("sim", SIM_PORT),
            "KQ_LOG_FORMAT": "json",
            "KQ_MAX_IN_FLIGHT": str(plan.max_in_flight),
            "KQ_MAX_SUBMITS_PER_MINUTE": "100000",
            "KQ_POLL_AFTER_S": "5",
            "KQ_SWEEP_INTERVAL_S": "0.5",
            "KQ_SUBMIT_MAX_RETRIES": "12",
            "KQ_HTTP_TIMEOUT_S": "10",
            "KQ_AMBIGUOUS_GRACE_S": f"{plan.ambiguous_grace_s:g}",
            "KQ_AMBIGUOUS_SETTLE_S": "30",
            "KQ_DRAIN_TIMEOUT_S": f"{DRAIN_TIMEOUT_S:g}",
        }

    # -- bring-up -----------------------------------------------------------------------

    def up(self) -> None:
        self.secret_key = secrets.token_urlsafe(32)
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self.net.up()
        self.log(f"network {self.net.subnet}.0/24 up: {len(self.net.hosts)} hosts on one bridge")
        redis_host = self.host("redis")
        self.ha = RedisHA(
            self.workdir / "redis",
            host=redis_host.ip,
            data_ports=DATA_PORTS,
            sentinel_ports=SENTINEL_PORTS,
            wrap=redis_host.wrap(),
        )
        (self.workdir / "redis").mkdir(parents=True, exist_ok=True)
        self.ha.start()
        self.log(f"redis: primary :{DATA_PORTS[0]}, replica :{DATA_PORTS[1]}, 3 Sentinels")
        sim_args = (
            "--host", "0.0.0.0", "--port", str(SIM_PORT), "--seed", str(self.plan.seed),
            "--api-key", SIM_KEY, "--webhook-secret", self.webhook_secret,
            "--inference-time", "0.5", "--queue-delay", "0.3",
            # WaveSpeed retries a delivery for minutes; 3 + 6 + 12 s here outlasts the
            # ~15 s a failover leaves the new primary without a replica (webhooks 503).
            "--webhook-retry-base", "3.0", "--webhook-timeout", "3",
        )  # fmt: skip
        self._start("sim", "sim", kq("sim", *sim_args))
        self._wait_http(self.url("sim", SIM_PORT) + "/_sim/health", "sim")
        for role in ("r1", "r2"):
            argv = kq("receiver", "--host", "0.0.0.0", "--port", str(RECEIVER_PORT))
            self._start(f"receiver@{role}", role, argv)
        for role in ("r1", "r2"):
            self._wait_http(self.url(role, RECEIVER_PORT) + "/healthz", f"receiver@{role}")
        self._start_haproxy()
        self._wait_http(self.url("lb", LB_PORT) + "/healthz", "haproxy")
        for role in ("w1", "w2"):
            self._start_worker_host(role)
        self.log("hosts up: sim, r1 + r2 behind haproxy on lb, w1, w2 (+ beat on w2)")
        settings = Settings.from_env(self.env("driver"))
        configure(settings)
        self.settings = settings
        self.store = runtime.make_store(settings)
        self.producer = runtime.make_producer(settings)

    def _start(self, name: str, role: str, argv: list[str]) -> HostProc:
        proc = HostProc(name, self.host(role), argv, self.env(role), self.workdir / "logs")
        self.procs[name] = proc
        proc.start()
        return proc

    def _start_worker_host(self, role: str) -> None:
        procs = [self._start(f"worker@{role}", role, kq("worker", "--concurrency", "8"))]
        if role == "w2":
            procs.append(self._start(f"beat@{role}", role, kq("beat")))
        for proc in procs:
            self._wait_heartbeat(proc)

    def _start_haproxy(self) -> None:
        r1, r2, lb = self.host("r1"), self.host("r2"), self.host("lb")
        config = self.workdir / "haproxy.cfg"
        config.write_text(
            "\n".join(
                [
                    "global",
                    "  maxconn 4000",
                    "defaults",
                    "  mode http",
                    "  timeout connect 2s",
                    "  timeout client 30s",
                    "  timeout server 30s",
                    "  retries 2",
                    "  option redispatch",
                    "frontend webhooks",
                    f"  bind {lb.ip}:{LB_PORT}",
                    "  default_backend receivers",
                    "backend receivers",
                    "  balance roundrobin",
                    "  option httpchk GET /healthz",
                    "  http-check expect status 200",
                    "  default-server inter 500ms fall 2 rise 2",
                    f"  server r1 {r1.ip}:{RECEIVER_PORT} check",
                    f"  server r2 {r2.ip}:{RECEIVER_PORT} check",
                    "",
                ]
            )
        )
        self._start("haproxy@lb", "lb", ["haproxy", "-db", "-f", str(config)])

    def _wait_heartbeat(self, proc: HostProc) -> None:
        kind = proc.name.split("@")[0]
        self._wait(lambda: self._heartbeat(kind, proc), 60, proc.name)

    def _heartbeat(self, kind: str, proc: HostProc) -> bool:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            with self._probe_redis() as client:
                return bool(client.exists(runtime.heartbeat_key(kind, proc.pid)))
        except (redis.RedisError, OSError):
            return False

    def _probe_redis(self) -> redis.Redis:
        return runtime.make_redis(Settings.from_env(self.env("driver")), fail_fast=True)

    def _wait_http(self, url: str, what: str, timeout_s: float = 60) -> None:
        def ok() -> bool:
            try:
                return self.http.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        self._wait(ok, timeout_s, what)

    @staticmethod
    def _wait(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return wait_for(predicate, timeout_s, what)

    # -- the jobs -----------------------------------------------------------------------

    def feed(self) -> None:
        """Enqueue the released jobs, `wave` at a time, pausing while Redis fails over (an
        enqueue acknowledged by a primary that dies a moment later may be lost: that loss
        is documented, not what this run measures)."""
        plan = self.plan
        try:
            wave = 0
            while len(self.ids) < plan.jobs:
                count = min(plan.wave, self.released - len(self.ids))
                if count <= 0 or self.feed_paused.is_set():
                    time.sleep(0.05)
                    continue
                items = [
                    {"prompt": f"w{wave} j{i}", "image": IMAGE, "seed": wave * 10_000 + i}
                    for i in range(count)
                ]
                receipt = self.producer.enqueue_batch(items)
                members = self.store.batch_members(receipt.batch_id)
                self.ids.extend(members)
                self.prompts.update({m: f"w{wave} j{i}" for i, m in enumerate(members)})
                wave += 1
                time.sleep(plan.wave_every_s)
        except Exception as exc:  # reported as a failed check
            self.feed_errors.append(repr(exc))
        finally:
            self.feed_done.set()

    def release(self, part: int) -> None:
        """Let the feed enqueue up to the end of `part` (an index into PARTS)."""
        self.released = round(self.plan.jobs * PARTS[part])
        self.log(f"         jobs released: up to {self.released}")

    def note_work(self, fault: str, *, needs: tuple[str, ...], also: bool = True) -> None:
        """Record whether `fault` met jobs in one of the states `needs` (and `also`)."""
        counts = self.count_states()
        met = also and any(counts.get(state, 0) > 0 for state in needs)
        self.met_work.append((fault, met, ", ".join(f"{k} {v}" for k, v in counts.items())))
        self.log(f"         jobs now: {counts}")

    def count_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.store.get_many(list(self.ids)):
            state = job.state.value if job is not None else "missing"
            counts[state] = counts.get(state, 0) + 1
        return counts

    # -- the faults ---------------------------------------------------------------------

    def fault_failover(self) -> None:
        ha = self.ha
        assert ha is not None
        self.feed_paused.set()
        self.note_work("1 failover", needs=("submitting", "submitted"))
        try:
            old, new = ha.failover()
            self.log(f"fault 1: SENTINEL FAILOVER, primary :{old} -> :{new}")
            ha.wait(lambda: ha.replicas_of(new) >= 1, 90, "the old primary to follow")
            self.log(f"         :{old} is a replica of :{new}")
            ha.kill(new)
            self.log(f"fault 1: kill -9 the primary :{new}")
            ha.wait(lambda: ha.primary() == old, 60, "the Sentinels to promote the replica")
            self.log(f"         the Sentinels promoted :{old}")
            ha.wait(lambda: ha.settled_on(old), 60, "every Sentinel to end the failover")
            ha.restart(new)
            ha.wait(lambda: ha.replicas_of(old) >= 1, 90, "the killed server to rejoin")
            self.log(f"         :{new} started again, a replica of :{old}")
        finally:
            self.feed_paused.clear()

    def fault_link_and_receiver(self) -> None:
        plan = self.plan
        chunk = self._wait_for_chunk_on("w1", then=lambda: self.release(1))
        self.net.link("w1", up=False)
        cut = time.monotonic()
        self.log("fault 2: w1's link down mid-chunk")
        self.note_work("2 link cut", needs=("queued", "submitting", "submitted"), also=chunk)
        # Webhooks arrive for submitted jobs: wait (within the first half of the cut) until
        # some are out at the provider, so the kill lands while deliveries come in.
        deadline = cut + plan.link_down_s / 2
        time.sleep(min(1.0, plan.link_down_s / 4))
        while time.monotonic() < deadline and not self.count_states().get("submitted"):
            time.sleep(0.05)
        receiver = self.procs["receiver@r1"]
        receiver.signal(signal.SIGKILL)
        receiver.wait(10)
        self.log("fault 3: kill -9 r1's processes while webhooks arrive")
        self.note_work("3 receiver kill", needs=("submitted",))
        time.sleep(plan.receiver_down_s)
        receiver.start()
        self._wait_http(self.url("r1", RECEIVER_PORT) + "/healthz", "receiver@r1")
        self.log("         r1 started again")
        time.sleep(max(0.0, plan.link_down_s - (time.monotonic() - cut)))
        self.net.link("w1", up=True)
        self.log(f"         w1's link up again after {time.monotonic() - cut:.1f} s")

    def _wait_for_chunk_on(
        self, role: str, *, then: Callable[[], None], timeout_s: float = 90.0
    ) -> bool:
        """Call `then` (which releases jobs) and return True as soon as the host's worker
        starts a `kq.submit_chunk` after it (its submits take a few hundred milliseconds
        together): a fault fired then lands mid-submit. False after `timeout_s`."""
        log_path = self.procs[f"worker@{role}"].log_path
        offset = log_path.stat().st_size
        then()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with log_path.open("rb") as log:
                log.seek(offset)
                if b"Task kq.submit_chunk[" in log.read():
                    return True
            time.sleep(0.005)
        self.log(f"         no chunk reached {role} within {timeout_s:g} s: going on anyway")
        return False

    def fault_drain(self) -> None:
        worker, beat = self.procs["worker@w2"], self.procs["beat@w2"]
        chunk = self._wait_for_chunk_on("w2", then=lambda: self.release(2))
        began = time.monotonic()
        for proc in (worker, beat):
            proc.signal(signal.SIGTERM)
        self.log("fault 4: SIGTERM to w2's processes (graceful drain) mid-chunk")
        self.note_work("4 drain", needs=("queued", "submitting", "submitted"), also=chunk)
        code = worker.wait(DRAIN_TIMEOUT_S + DRAIN_MARGIN_S)
        took = time.monotonic() - began
        beat.wait(10)
        ok = code is not None
        if not ok:
            worker.signal(signal.SIGKILL)
            worker.wait(10)
        self.log(f"         w2's worker exited {code} after {took:.1f} s")
        self.extra_checks.append(
            Check(
                "drain within its timeout",
                ok and code == 0,
                f"w2's worker gone {took:.1f} s after SIGTERM, exit code {code} "
                f"(KQ_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S:g})",
            )
        )
        self._restart_worker_host("w2")
        self.log("         w2 started again")

    def _restart_worker_host(self, role: str) -> None:
        names = [n for n in (f"worker@{role}", f"beat@{role}") if n in self.procs]
        for name in names:
            self.procs[name].start()
        for name in names:
            self._wait_heartbeat(self.procs[name])

    # -- the run ------------------------------------------------------------------------

    def run(self) -> bool:
        feeder = threading.Thread(target=self.feed, name="cluster-feed", daemon=True)
        feeder.start()
        self.release(0)
        self._wait(lambda: len(self.ids) >= self.plan.jobs // 10, 60, "the first jobs")
        self._wait(lambda: self.count_states().get("submitted", 0) > 0, 60, "the first submits")
        self.fault_failover()
        self.fault_link_and_receiver()
        self.fault_drain()
        self.release(3)
        feed_s = self.plan.jobs / self.plan.wave * self.plan.wave_every_s
        self._wait(self.feed_done.is_set, feed_s + 120, "every job enqueued")
        self.log(f"all {len(self.ids)} jobs enqueued")

        def settled() -> bool:
            return all(j is not None and j.terminal for j in self.store.get_many(list(self.ids)))

        try:
            self._wait(settled, self.plan.settle_s, "every job to settle")
            self.log("every job terminal")
        except TimeoutError:
            self.log(f"not settled after {self.plan.settle_s:g} s: {self.count_states()}")
        return self.verdict()

    def verdict(self) -> bool:
        ev = ha_checks.gather(
            self.store, self.settings, self.url("sim", SIM_PORT), self.ids, self.prompts
        )
        checks = ha_checks.check_failover_run(ev, self.plan.max_in_flight)
        checks.append(
            Check(
                "every job was enqueued",
                not self.feed_errors and len(self.ids) == self.plan.jobs,
                f"{len(self.ids)}/{self.plan.jobs} enqueued; errors: {self.feed_errors[:3]}",
            )
        )
        gone = [p.name for p in self.procs.values() if not p.alive]
        checks.append(
            Check(
                "no process died unasked",
                not gone,
                f"{len(self.procs) - len(gone)}/{len(self.procs)} processes alive at the end "
                f"({sum(p.starts for p in self.procs.values())} starts)",
                tuple(gone),
            )
        )
        missed = [f"fault {fault}: {counts}" for fault, met, counts in self.met_work if not met]
        checks.append(
            Check(
                "every fault met work in flight",
                len(self.met_work) == 4 and not missed,
                f"{sum(met for _, met, _ in self.met_work)}/4 faults fired with jobs in flight "
                "(the link cut and the drain each while a chunk ran on their host)",
                tuple(missed),
            )
        )
        checks.extend(self.extra_checks)
        print("\ntimeline:\n" + "\n".join(self.log.lines), flush=True)
        print("\ninvariants:\n" + invariants.render(checks), flush=True)
        return all(check.ok for check in checks)

    def down(self) -> None:
        """Stop every process and remove the network, whatever state the run is in."""
        for proc in reversed(list(self.procs.values())):
            try:
                proc.stop(grace_s=5)
            except Exception:  # best effort: the namespaces go below anyway
                proc.signal(signal.SIGKILL)
        if self.ha is not None:
            self.ha.stop()
        store, producer = getattr(self, "store", None), getattr(self, "producer", None)
        if store is not None:
            store.redis.close()
        if producer is not None:
            producer.close()  # its Redis client and its provider client
        self.http.close()
        self.net.down()
