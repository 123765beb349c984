"""The process and burst faults of a chaos run, and when each fires.

Each fault is a function of the running `ChaosRun` that does its damage, waits as long
as the damage needs, and returns one line for the timeline. They fire one after
another, each when its share of the jobs has been pushed (pushing goes on meanwhile on
its own thread, so a fault that waits for submits to hold finds some). Every window in
which Redis was away is noted (`ChaosRun.note_outage`), and so is every job a dead
worker had in hand (`ChaosRun.note_in_flight`): the checks use both to tell which
submits had their answer lost.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos.runner import ChaosConfig, ChaosRun

# Redis frozen (SIGSTOP) this long, then SIGCONT.
FREEZE_S = 20.0
# Answers of submits held while Redis is stopped, then handed to a worker that cannot
# record them (the Redis restart *during* submits).
HELD_AT_REDIS_RESTART = 6
REDIS_DOWN_S = 1.0
# Webhook deliveries held at the proxy, then let go at once into the receiver, whose
# gunicorn workers are killed -9 as they arrive. Held at most this long: less than the
# simulator's webhook timeout (3 s), so the burst is first attempts, not timeouts.
BURST_SIZE = 24
BURST_GATHER_S = 1.5
BURST_KILL_AFTER_S = 0.01
# The reproduction: submits held mid-POST when the worker dies, the provider
# slow to start their tasks (so they are unfinished when reconciliation first looks)
# and a fifth of their webhooks dropped.
HELD_AT_KILL = 9
PHASE_QUEUE_DELAY_S = 30.0
PHASE_DROP_WEBHOOK_RATE = 0.2


@dataclass(frozen=True)
class Fault:
    at: float  # share of the jobs pushed when it fires
    name: str
    action: Callable[[ChaosRun], str]
    heavy: bool = False  # left out of the small run in `make test` (time, not doubt)


def schedule(config: ChaosConfig) -> list[Fault]:
    """The process and burst faults, by the share of jobs pushed when each fires."""
    faults = [
        Fault(0.05, "429 burst", burst("burst_429_s", 2.0)),
        Fault(0.10, "kill -9 worker between POST and record", kill_mid_submit),
        Fault(0.17, "restart receiver", restart("receiver")),
        Fault(
            0.24,
            "restart redis while submits are in flight",
            restart_redis_mid_submit,
            heavy=True,
        ),
        Fault(0.30, "kill -9 worker", kill_worker),
        Fault(0.36, "start a second beat", start_second_beat),
        Fault(0.42, f"freeze redis {FREEZE_S:g} s (SIGSTOP, SIGCONT)", freeze_redis, heavy=True),
        Fault(0.48, "restart beat", restart("beat")),
        Fault(0.54, "kill -9 receiver workers during a webhook burst", kill_receiver_workers),
        Fault(0.60, "restart redis (AOF)", restart("redis")),
        Fault(
            0.66,
            f"kill -9 worker holding {HELD_AT_KILL} submits, webhooks dropped",
            kill_holding_submits,
            heavy=True,
        ),
        Fault(0.76, "stop the second beat", stop_second_beat),
        Fault(0.85, "5xx burst", burst("burst_5xx_s", 1.5)),
        Fault(0.92, "429 burst", burst("burst_429_s", 2.0)),
    ]
    if config.quick:
        # `make test`: every fault but the three that cost the most time (the 20 s freeze,
        # the 30 s provider queue of the reproduction, and the Redis restart mid-submit,
        # whose unsent retries wait out the 60 s check for lost submit messages); the
        # worker kills stay.
        faults = [f for f in faults if not f.heavy]
    if config.soak:
        # Memory is the subject: restarts would reset the worker's RSS under the samples.
        faults = [f for f in faults if "burst" in f.name and "webhook" not in f.name]
    return faults


# --- provider bursts and plain restarts ----------------------------------------------------


def burst(knob: str, seconds: float) -> Callable[[ChaosRun], str]:
    def act(run: ChaosRun) -> str:
        run.sim.post("/_sim/config", json={knob: seconds}).raise_for_status()
        return f"every submit refused for {seconds:g} s"

    return act


def restart(name: str) -> Callable[[ChaosRun], str]:
    def act(run: ChaosRun) -> str:
        if name == "redis":
            down = time.time()
            pid = run.stack.restart(name).pid
            run.note_outage("redis restart", down, time.time())
            return f"pid {pid}"
        return f"pid {run.stack.restart(name).pid}"

    return act


def start_second_beat(run: ChaosRun) -> str:
    return f"pid {run.start_second_beat()}"


def stop_second_beat(run: ChaosRun) -> str:
    run.stack.procs["beat2"].stop()
    return "stopped"


# --- the worker ----------------------------------------------------------------------------


def kill_mid_submit(run: ChaosRun) -> str:
    """kill -9 the worker while the proxy holds a submit's answer (task created)."""
    run.proxy.arm_hold()
    held = run.proxy.held.wait(30)
    run.stack.kill("worker")
    run.note_in_flight("kill -9")
    run.proxy.release()
    run.stack.restart("worker")
    if not held:
        return "no submit came to hold; killed anyway"
    return f"held the answer for job {run.proxy.held_job}; worker restarted"


def kill_worker(run: ChaosRun) -> str:
    """kill -9 the worker wherever it is, and start it again."""
    run.stack.kill("worker")
    caught = run.note_in_flight("kill -9")
    pid = run.stack.restart("worker").pid
    return f"{caught} jobs were mid-submit; restarted as pid {pid}"


def kill_holding_submits(run: ChaosRun) -> str:
    """The issue's reproduction: with the provider's queue slow and a fifth of webhooks
    dropped, hold `HELD_AT_KILL` submits' answers (their tasks exist), kill -9 the
    worker, drop the held connections, start the worker again; then back to normal."""
    before = run.sim.get("/_sim/config").json()
    phase = {"queue_delay_s": PHASE_QUEUE_DELAY_S, "drop_webhook_rate": PHASE_DROP_WEBHOOK_RATE}
    run.sim.post("/_sim/config", json=phase).raise_for_status()
    try:
        run.proxy.arm_hold(HELD_AT_KILL)
        held = run.proxy.wait_held(HELD_AT_KILL, 30)
        run.stack.kill("worker")
        caught = run.note_in_flight("kill -9")
        run.proxy.release()
        pid = run.stack.restart("worker").pid
    finally:
        restore = {knob: before[knob] for knob in phase}
        run.sim.post("/_sim/config", json=restore).raise_for_status()
    return (
        f"queue delay {PHASE_QUEUE_DELAY_S:g} s, {PHASE_DROP_WEBHOOK_RATE:.0%} webhooks "
        f"dropped; {held} answers held, {caught} jobs mid-submit; restarted as pid {pid}"
    )


# --- Redis ---------------------------------------------------------------------------------


def restart_redis_mid_submit(run: ChaosRun) -> str:
    """Stop Redis while submits are on the wire, hand their answers to a worker that
    cannot record them, then start Redis again (AOF)."""
    run.proxy.arm_hold(None)
    held = run.proxy.wait_held(HELD_AT_REDIS_RESTART, 15)
    redis_proc = run.stack.procs["redis"]
    down = time.time()
    redis_proc.stop()  # SIGTERM: a clean shutdown, the AOF written out
    run.proxy.release(answer=True)
    time.sleep(REDIS_DOWN_S)
    pid = run.stack.restart("redis").pid
    run.note_outage("redis restart mid-submit", down, time.time())
    return f"{held} submit answers delivered while Redis was down; restarted as pid {pid}"


def freeze_redis(run: ChaosRun) -> str:
    """SIGSTOP Redis for `FREEZE_S`, then SIGCONT; the pushing pauses with it."""
    start = time.time()
    run.stack.kill("redis", signal.SIGSTOP)
    try:
        time.sleep(FREEZE_S)
    finally:
        run.stack.kill("redis", signal.SIGCONT)
    end = time.time()
    run.note_outage("redis frozen", start, end)
    run.pause_pushing(end - start)
    during = [r for r in run.hooks.records if start <= r.arrived_at <= end]
    answers = Counter(str(r.status) if r.status is not None else "none" for r in during)
    slowest = max((r.answered_at - r.arrived_at for r in during), default=0.0)
    shown = ", ".join(f"{n}x {s}" for s, n in answers.most_common()) or "none"
    return f"{len(during)} webhooks came meanwhile, answered {shown}; slowest {slowest:.1f} s"


# --- the receiver --------------------------------------------------------------------------


def kill_receiver_workers(run: ChaosRun) -> str:
    """Gather webhook deliveries at the proxy, let them into the receiver at once, and
    kill -9 its gunicorn workers (not the master, which starts new ones) as they land."""
    master = run.stack.procs["receiver"].pid
    workers = children(master)
    run.hooks.gate()
    deadline = time.monotonic() + BURST_GATHER_S
    while run.hooks.waiting() < BURST_SIZE and time.monotonic() < deadline:
        time.sleep(0.01)
    opened = time.time()
    released = run.hooks.open_gate()
    time.sleep(BURST_KILL_AFTER_S)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    time.sleep(1.0)  # let the master bring new workers up and the burst's answers in
    burst = [r for r in run.hooks.records if r.gated and r.arrived_at <= opened]
    lost = sum(1 for r in burst if r.status is None)
    return (
        f"{released} deliveries let in at once; workers {', '.join(map(str, workers))} of "
        f"master {master} killed; {lost} of them got no answer; now workers "
        f"{', '.join(map(str, children(master))) or 'none'}"
    )


def children(pid: int) -> list[int]:
    """The direct children of a process (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return sorted(found)
