"""The chaos run: a full stack on private ports, N jobs, provider and process faults,
then every invariant checked against the simulator's ground truth.

Timeline: the stack starts (private Redis with AOF, the simulator with seeded provider
faults behind `ProviderProxy`, the gunicorn receiver behind `WebhookProxy`, a Celery
worker, beat); jobs are pushed at a steady pace over `push_s` on their own thread; at
fixed shares of the jobs pushed the process faults fire, one after another (see
`chaos.faults`); then the run waits until every job is terminal and the simulator has
no webhook left to send, and checks (see `chaos.invariants`).

Longer than our ~400-line guideline: it is the one timeline of a run (start, push,
faults, settle, check) and reads best in one place; the faults live in faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from chaos.chains import PushedChain, is_chain_slot, make_chain
from chaos.faults import Fault, schedule
from chaos.invariants import Check, Evidence, Outage, Timing, check_all, render
from chaos.observer import Observer
from chaos.proxy import ProviderProxy, WebhookProxy
from kq.procs import describe_exit
from kq.stack import Stack, StackConfig, StackError
from worker import keys, runtime
from worker.admission import Admission
from worker.celery_app import configure
from worker.chains import ChainItem
from worker.domain import EditRequest, Job, job_id_for_key
from worker.producer import Item, Producer
from worker.settings import Settings
from worker.signing import job_token
from worker.tasks import enqueue_submits
from worker.wavespeed import WaveSpeedClient

# Known, throwaway values (the simulator is the only provider), so the logs can be
# searched for them afterwards; the webhook secret is the simulator's, fetched by the
# receiver as in production and by the harness to search for it. None is passed on a
# command line: process logs start with their command line.
API_KEY = "chaos-api-key-0f5e2d9c7b"
SECRET_KEY = "chaos-token-key-8a1f3e6d4c2b"  # noqa: S105
POLL_AFTER_S = 3.0
BATCH_ID = "chaos"
PROGRESS_EVERY_S = 5.0
PUSH_STEP_S = 0.05
# The processes a deployment's process manager would bring back if they died.
SUPERVISED = ("worker", "receiver", "beat")
SUPERVISE_EVERY_S = 0.5
Announce = Callable[[str], None]


@dataclass(frozen=True)
class ChaosConfig:
    """What to run; the defaults are `make chaos`."""

    jobs: int = 2000
    seed: int = 7
    push_s: float = 40.0  # jobs are pushed at a steady pace over this long
    quick: bool = False  # the CI variant: the faults that cost little time (faults.schedule)
    soak: bool = False  # short TTLs and memory sampling (see chaos.soak)
    var_dir: Path | None = None  # None: a fresh temporary directory
    # After the last push every job must end within this: past the job deadline (120 s)
    # and a provider slot's lease (deadline + 125 s), so only a job that would never end
    # runs it out.
    settle_timeout_s: float = 300.0
    worker_concurrency: int = 8
    # An ambiguous submit no webhook has named fails `submit_ambiguous` this long after
    # every task that could be its own finished: past the simulator's webhook retries
    # (4 attempts with a 3 s timeout, 0.5 + 1 + 2 s apart) and its 9 s delayed webhooks.
    ambiguous_settle_s: float = 30.0
    ambiguous_grace_s: float = 5.0
    job_deadline_s: float = 120.0
    # Polls back off up to this (the default 60 s would dwarf the settle time above).
    poll_max_interval_s: float = 10.0
    # `kq receiver --worker-class`: gunicorn's gevent workers (its default) or gthread.
    receiver_worker_class: str = "gevent"

    @classmethod
    def small(cls, **changes: Any) -> ChaosConfig:
        """The version in `make test`: ~180 jobs, worker kills included, under a minute."""
        base: dict[str, Any] = {
            "jobs": 180,
            "push_s": 8.0,
            "quick": True,
            "settle_timeout_s": 90.0,
            # Shorter waits, still past the webhook retries here (the receiver answers
            # or refuses at once in the small run: 9 s delay + 3.5 s of retries).
            "ambiguous_settle_s": 15.0,
            "poll_max_interval_s": 5.0,
        }
        return cls(**{**base, **changes})

    def stack_env(self, proxy_url: str, webhook_url: str) -> dict[str, str]:
        env = {
            "WAVESPEED_API_KEY": API_KEY,
            "KQ_WAVESPEED_BASE_URL": proxy_url,
            # Webhooks reach the receiver through the recording proxy.
            "KQ_WEBHOOK_PUBLIC_URL": webhook_url,
            "KQ_SECRET_KEY": SECRET_KEY,
            "KQ_POLL_AFTER_S": str(POLL_AFTER_S),
            "KQ_POLL_MAX_INTERVAL_S": f"{self.poll_max_interval_s:g}",
            "KQ_SWEEP_INTERVAL_S": "0.5",
            "KQ_HTTP_TIMEOUT_S": "5",
            "KQ_AMBIGUOUS_GRACE_S": f"{self.ambiguous_grace_s:g}",
            "KQ_AMBIGUOUS_SETTLE_S": f"{self.ambiguous_settle_s:g}",
            "KQ_JOB_DEADLINE_S": f"{self.job_deadline_s:g}",
            "KQ_SUBMIT_MAX_RETRIES": "12",
            # Few enough slots that jobs wait in line and slots are handed on all the time.
            "KQ_MAX_IN_FLIGHT": "60",
            "KQ_MAX_SUBMITS_PER_MINUTE": "60000",
            # A worker killed with messages in hand gets them back this soon (not an hour).
            "KQ_VISIBILITY_TIMEOUT_S": "15",
            "KQ_LOG_FORMAT": "json",
        }
        if self.soak:
            env |= {"KQ_RESULT_TTL_S": "60", "KQ_EVENTS_MAXLEN": "5000"}  # soak.RESULT_TTL_S
        return env

    def sim_args(self) -> tuple[str, ...]:
        """The simulator's seeded provider faults (shares per task or per submit)."""
        return (
            "--seed", str(self.seed),
            "--balance", "10000000",  # never the limit: a soak pays for 20,000 images
            "--inference-time", "0.3",
            "--queue-delay", "0",
            "--webhook-timeout", "3",
            "--webhook-retry-base", "0.5",
            "--webhook-workers", "32",  # deliveries go out side by side: bursts happen
            "--drop-webhook-rate", "0.10",
            "--duplicate-webhook-rate", "0.10",
            "--delay-webhook-rate", "0.05",
            "--delay-webhook-s", str(POLL_AFTER_S * 3),  # past the poll threshold
            "--late-failed-rate", "0.05",
            "--fail-rate", "0.05",
            "--fail-codes", "1200,1402,5000,5003",
            "--submit-5xx-rate", "0.05",
            "--ambiguous-submit-rate", "0.02",
            "--bad-signature-rate", "0.01",
            "--stale-timestamp-rate", "0.01",
        )  # fmt: skip

    def describe(self) -> str:
        """The settings that decide how long a lost submit may take to end."""
        return (
            f"chaos settings: job deadline {self.job_deadline_s:g} s, ambiguous grace "
            f"{self.ambiguous_grace_s:g} s, ambiguous settle {self.ambiguous_settle_s:g} s "
            f"(KQ_AMBIGUOUS_SETTLE_S), polls back off to {self.poll_max_interval_s:g} s: an "
            "unattributable submit fails submit_ambiguous within the run"
        )


@dataclass
class ChaosResult:
    """The verdict of one run."""

    config: ChaosConfig
    checks: list[Check]
    timeline: list[str]
    seconds: float
    var_dir: Path
    extra: list[str] = field(default_factory=list)  # e.g. the soak report

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def render(self) -> str:
        head = (
            f"chaos run: {self.config.jobs} jobs, seed {self.config.seed}, "
            f"{self.seconds:.0f} s, logs in {self.var_dir / 'logs'}"
        )
        parts = [head, self.config.describe(), "faults:", *(f"  {line}" for line in self.timeline)]
        parts += self.extra
        parts += ["invariants:", render(self.checks)]
        parts.append("ALL INVARIANTS HELD" if self.ok else "SOME INVARIANTS FAILED")
        return "\n".join(parts)


class ChaosRun:
    """One run in progress: the stack, the proxies, the observer and the pushed jobs."""

    def __init__(
        self, config: ChaosConfig, stack: Stack, proxy: ProviderProxy, hooks: WebhookProxy
    ) -> None:
        self.config = config
        self.stack = stack
        self.proxy = proxy
        self.hooks = hooks
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=60, trust_env=False)
        with WaveSpeedClient(stack.sim_url, API_KEY) as provider:
            self.webhook_secret = provider.webhook_secret()
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store = runtime.make_store(self.settings)
        self.producer = Producer(store=self.store, send=enqueue_submits)
        self.observer = Observer(
            redis.Redis.from_url(self.settings.redis_url, decode_responses=True, socket_timeout=10)
        )
        self.ids: list[str] = []
        self.chains: list[PushedChain] = []
        self.prompts: dict[str, str] = {}
        # Jobs in `submitting` when a worker died (kill -9, or on its own), and when.
        self.killed_in_flight: dict[str, list[float]] = {}
        self.outages: list[Outage] = []
        self.timeline: list[str] = []
        self.push_errors = 0
        self._t0 = time.monotonic()
        self._paused_s = 0.0
        # Faults and the supervisor never touch the processes at the same time.
        self._lock = threading.Lock()
        self._supervising = threading.Event()
        self._supervisor = threading.Thread(
            target=self._supervise, name="chaos-supervisor", daemon=True
        )

    def start_supervisor(self) -> None:
        self._supervising.set()
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        self._supervising.clear()
        self._supervisor.join(30)

    def _supervise(self) -> None:
        """Restart a kq process that died on its own, as a process manager would, and
        put it on the timeline: such a death is a finding, not part of the plan."""
        while self._supervising.is_set():
            time.sleep(SUPERVISE_EVERY_S)
            with self._lock:
                for name in SUPERVISED:
                    proc = self.stack.procs.get(name)
                    if proc is None or not proc.started or proc.alive:
                        continue
                    began = self.elapsed()
                    how = describe_exit(proc.poll())
                    caught = self.note_in_flight("died") if name == "worker" else 0
                    try:
                        pid = self.stack.restart(name).pid
                    except StackError as exc:
                        self.timeline.append(f"{began:6.1f}s  supervisor: cannot restart {exc}")
                        self._supervising.clear()
                        return
                    held = f", {caught} jobs were mid-submit" if name == "worker" else ""
                    self.timeline.append(
                        f"{began:6.1f}s  supervisor: {name} died on its own ({how}{held}); "
                        f"restarted as pid {pid}"
                    )

    def close(self) -> None:
        self.sim.close()
        self.store.redis.close()

    # --- what faults use and note -----------------------------------------------------------

    def start_second_beat(self) -> int:
        client = self.store.redis

        def ready(proc: Any) -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(client.exists(runtime.heartbeat_key("beat", proc.pid)))
            return False

        argv = [sys.executable, "-m", "kq.cli", "beat"]
        return self.stack._spawn("beat2", argv, ready).pid

    def note_in_flight(self, cause: str) -> int:
        """Note every job mid-submit now (`submitting`, not yet flagged ambiguous): the
        one worker, which just died, held them."""
        when = time.time()
        for attempt in range(30):
            try:
                caught = self.observer.in_submit_now()
                break
            except redis.RedisError:
                time.sleep(min(0.1 * attempt, 1.0))
        else:
            self.timeline.append(f"{self.elapsed():6.1f}s  ({cause}: job states unreadable)")
            return 0
        for job_id in caught:
            self.killed_in_flight.setdefault(job_id, []).append(when)
        return len(caught)

    def note_outage(self, kind: str, start: float, end: float) -> None:
        """Redis was away (stopped or frozen) from `start` to `end` (wall clock)."""
        self.outages.append(Outage(kind, start, end))

    def pause_pushing(self, seconds: float) -> None:
        """Shift the push schedule by `seconds` (Redis was frozen: nobody could push)."""
        self._paused_s += seconds

    # --- the run --------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def push_all(self, faults: list[Fault], announce: Announce) -> None:
        """Push every job at a steady pace on a thread of its own, firing each fault (one
        after another) when its share of the jobs has been pushed."""
        total = self.config.jobs
        pusher = threading.Thread(target=self._push_steadily, name="chaos-push", daemon=True)
        pusher.start()
        for fault in faults:
            while len(self.ids) < fault.at * total and pusher.is_alive():
                time.sleep(0.02)
            began = self.elapsed()
            with self._lock:
                detail = fault.action(self)
            line = f"{began:6.1f}s  {fault.name}: {detail} ({self.elapsed() - began:.1f} s)"
            self.timeline.append(line)
            announce(f"fault  {line}")
        pusher.join()
        if self.push_errors:
            self.timeline.append(
                f"{self.elapsed():6.1f}s  pushing: {self.push_errors} enqueue calls met Redis "
                "away and were retried (safe: idempotency keys)"
            )

    def _push_steadily(self) -> None:
        total = self.config.jobs
        start = time.monotonic()
        while len(self.ids) < total:
            share = (time.monotonic() - start - self._paused_s) / self.config.push_s
            due = min(total, max(len(self.ids) + 1, int(total * share)))
            if due > len(self.ids):
                self._push(len(self.ids), due)
            time.sleep(PUSH_STEP_S)

    def _push(self, first: int, end: int) -> None:
        items: list[Item | ChainItem] = []
        ids: list[str] = []
        watched: list[str] = []
        chains: list[PushedChain] = []
        for i in range(first, end):
            key = f"chaos-{self.config.seed}-{i}"
            if is_chain_slot(i):
                item, pushed = make_chain(self.config.seed, i, key)
                items.append(item)
                chains.append(pushed)
                self.prompts.update(zip(pushed.step_ids, pushed.prompts, strict=True))
                ids.append(pushed.step_ids[0])  # later steps join `ids` once written
                watched.extend(pushed.step_ids)
                continue
            prompt = f"chaos {self.config.seed} #{i}: make it blue"
            image = f"https://example.com/chaos/{i}.jpg"
            items.append(Item(EditRequest(prompt=prompt, image=image), idempotency_key=key))
            job_id = job_id_for_key(key)
            self.prompts[job_id] = prompt
            ids.append(job_id)
            watched.append(job_id)
        # Watched before they exist, so no event can arrive for an unknown job.
        self.observer.watch(watched)
        for attempt in range(100):
            try:
                # Idempotency keys make a retry after a Redis error safe: jobs already
                # written are not written twice, and those still queued are sent again.
                self.producer.enqueue_batch(items, batch_id=BATCH_ID)
                break
            except redis.RedisError:
                self.push_errors += 1
                time.sleep(min(0.1 * (attempt + 1), 1.0))
        else:
            raise RuntimeError("cannot push jobs: Redis stayed unreachable")
        self.ids.extend(ids)
        self.chains.extend(chains)

    def settle(self, announce: Announce) -> bool:
        """Wait until every job is terminal and no webhook is left to send."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        next_note = 0.0
        while time.monotonic() < deadline:
            seen = self.observer.seen
            done = sum(1 for j in self.ids if j in seen.events)
            chains_open = sum(1 for c in self.chains if c.chain_id not in seen.chain_events)
            pending = self._pending_deliveries()
            if done == len(self.ids) and pending == 0 and chains_open == 0:
                announce(f"settled at {self.elapsed():.1f} s: all {done} jobs terminal")
                return True
            if time.monotonic() >= next_note:
                states = Counter(s for s, _ in seen.last_seen.values())
                announce(
                    f"{self.elapsed():6.1f}s  {done}/{len(self.ids)} terminal, "
                    f"{pending} webhooks pending, {chains_open} chains open; "
                    + ", ".join(f"{k} {v}" for k, v in states.items())
                )
                next_note = time.monotonic() + PROGRESS_EVERY_S
            time.sleep(0.25)
        return False

    def _pending_deliveries(self) -> int:
        try:
            return int(self.sim.get("/_sim/health").json()["pending_deliveries"])
        except (httpx.HTTPError, KeyError, ValueError):
            return -1

    def evidence(self) -> Evidence:
        # A chain's later steps count as jobs once written (seen by an event or in Redis).
        later = [j for c in self.chains for j in c.step_ids[1:]]
        pipe = self.store.redis.pipeline(transaction=False)
        for job_id in later:
            pipe.exists(keys.job(job_id))
        in_redis = dict(zip(later, pipe.execute(), strict=True))
        written = {j: bool(in_redis[j]) or j in self.observer.seen.events for j in later}
        self.ids.extend(j for j in later if written[j])
        jobs: dict[str, Job | None] = {}
        for start in range(0, len(self.ids), 1000):
            chunk = self.ids[start : start + 1000]
            jobs.update(zip(chunk, self.store.get_many(chunk), strict=True))
        stats: dict[str, str] = self.store.redis.hgetall(keys.STATS)  # type: ignore[assignment]
        s = self.settings
        return Evidence(
            ids=self.ids,
            prompts=self.prompts,
            jobs=jobs,
            seen=self.observer.seen,
            tasks=self.sim.get("/_sim/tasks").json()["tasks"],
            killed_in_flight=set(self.killed_in_flight),
            kill_times=dict(self.killed_in_flight),
            submits=list(self.proxy.submits),
            webhooks=list(self.hooks.records),
            outages=list(self.outages),
            timing=Timing(
                settle_s=s.ambiguous_settle_s,
                deadline_s=s.job_deadline_s,
                poll_max_interval_s=s.poll_max_interval_s,
                sweep_interval_s=s.sweep_interval_s,
                http_timeout_s=s.http_timeout_s,
                webhook_timeout_s=float(self.sim.get("/_sim/config").json()["webhook_timeout_s"]),
            ),
            stats={k: int(v) for k, v in stats.items()},
            admission=Admission(self.store.redis, self.settings).snapshot(time.time()),
            expired_ok=self.config.soak,
            chains=list(self.chains),
            step_written=written,
        )


def save_evidence(ev: Evidence, path: Path) -> None:
    """Everything the checks saw, as JSON next to the logs, for a post-mortem."""
    jobs = {
        job_id: None
        if job is None
        else {
            "state": job.state.value,
            "reason": job.reason,
            "prediction_id": job.prediction_id,
            "attempts": job.attempts,
            "created_at": job.created_at,
            "submitting_at": job.submitting_at,
            "submitted_at": job.submitted_at,
            "finished_at": job.finished_at,
            "candidates_final_at": job.candidates_final_at,
            "candidates": list(job.candidates),
            "error": job.error,
        }
        for job_id, job in ev.jobs.items()
    }
    dump = {
        "jobs": jobs,
        "tasks": list(ev.tasks),
        "submits": [asdict(r) for r in ev.submits],
        "webhooks": [asdict(r) for r in ev.webhooks],
        "outages": [asdict(o) for o in ev.outages],
        "kill_times": dict(ev.kill_times),
        "timing": asdict(ev.timing),
    }
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(dump))


_HEX32 = re.compile(r"[0-9a-f]{32}")


def scan_logs(logs: Path, job_ids: list[str], webhook_secret: str) -> dict[str, list[str]]:
    """file:line -> the secrets found on it (fixed secrets, or any job's URL token)."""
    fixed = {
        "api key": API_KEY,
        "webhook secret": webhook_secret.removeprefix("whsec_"),
        "KQ_SECRET_KEY": SECRET_KEY,
    }
    tokens = {job_token(SECRET_KEY, job_id) for job_id in job_ids}
    found: dict[str, list[str]] = {}
    for path in sorted(logs.glob("*.log")):
        with path.open(errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                names = [name for name, value in fixed.items() if value in line]
                if any(m in tokens for m in _HEX32.findall(line)):
                    names.append("a job's URL token")
                if names:
                    found[f"{path.name}:{number}"] = names
    return found


def run(config: ChaosConfig, announce: Announce = print) -> ChaosResult:
    """Run the whole thing and return the verdict (raises only if the stack cannot start)."""
    var_dir = config.var_dir or Path(tempfile.mkdtemp(prefix="kq-chaos-"))
    started = time.monotonic()
    proxy = ProviderProxy()
    proxy.start()
    hooks = WebhookProxy()
    hooks.start()
    stack_config = StackConfig(
        var_dir=var_dir,
        sim_args=config.sim_args(),
        receiver_args=("--worker-class", config.receiver_worker_class),
        worker_concurrency=config.worker_concurrency,
        extra_env=config.stack_env(proxy.url, hooks.url),
    )
    extra: list[str] = []
    soak_checks: list[Check] = []
    stack = Stack(stack_config, announce=lambda line: announce(f"stack  {line}"))
    try:
        stack.start()
        proxy.upstream = stack.sim_url
        hooks.upstream = stack.receiver_url
        chaos = ChaosRun(config, stack, proxy, hooks)
        chaos.observer.start()
        chaos.start_supervisor()
        soak = None
        if config.soak:
            from chaos.soak import SoakMonitor

            soak = SoakMonitor(chaos)
            soak.start()
        announce(config.describe())
        announce(f"pushing {config.jobs} jobs over {config.push_s:g} s")
        chaos.push_all(schedule(config), announce)
        if not chaos.settle(announce):
            announce("NOT SETTLED: some jobs are not terminal at the deadline")
        if soak is not None:
            extra, soak_checks = soak.stop_and_report()
        chaos.stop_supervisor()
        chaos.observer.stop()
        # Ground truth is read while Redis and the simulator still run ...
        evidence = chaos.evidence()
        chaos.close()
    finally:
        stack.stop()
        proxy.stop()
        hooks.stop()
    # ... and the logs once every process has exited and flushed them.
    evidence.log_leaks = scan_logs(var_dir / "logs", chaos.ids, chaos.webhook_secret)
    save_evidence(evidence, var_dir / "evidence.json")
    checks = check_all(evidence) + soak_checks
    return ChaosResult(config, checks, chaos.timeline, time.monotonic() - started, var_dir, extra)
