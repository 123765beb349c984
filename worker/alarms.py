"""The conditions worth waking someone for, decided from a status snapshot.

Pure: `find_alarms` looks only at a `StatusSnapshot` (before its alarms are set), the
recent webhook rejections and the thresholds; `worker.status.collect` attaches the
result. Every alarm's name is an `AlarmName`, so the exporter can list them all, and
its severity is `SEVERITY[name]` (deploy/prometheus/kq-alerts.yml labels its alert rules
the same way; tests/test_prometheus.py checks that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from worker.snapshot import (
    Alarm,
    AlarmName,
    Forwarding,
    OutputsBacklog,
    Severity,
    StatusConfig,
    StatusSnapshot,
)

SEVERITY: Final[Mapping[AlarmName, Severity]] = {
    AlarmName.OVERDUE_JOBS: Severity.CRITICAL,
    AlarmName.MISSED_WEBHOOKS: Severity.WARNING,
    AlarmName.WEBHOOK_REJECTIONS: Severity.CRITICAL,
    AlarmName.WORKER_DOWN: Severity.CRITICAL,
    AlarmName.BEAT_DOWN: Severity.CRITICAL,
    AlarmName.RECEIVER_DOWN: Severity.WARNING,
    AlarmName.FORWARD_FAILING: Severity.WARNING,
    AlarmName.OUTPUTS_NOT_COPIED: Severity.WARNING,
}


def find_alarms(
    snapshot: StatusSnapshot, rejected_recent: Mapping[str, int], cfg: StatusConfig
) -> tuple[Alarm, ...]:
    """The alarms firing in `snapshot`; `rejected_recent` is telemetry of the last minutes."""
    found: list[Alarm] = []

    def alarm(name: AlarmName, message: str) -> None:
        found.append(Alarm(name, SEVERITY[name], message))

    overdue = snapshot.overdue.count
    if overdue:
        alarm(
            AlarmName.OVERDUE_JOBS,
            f"{overdue} job(s) in flight past the {snapshot.deadline_s:.0f} s deadline",
        )
    window = snapshot.resolution.window
    settled = window.webhook + window.poll
    rate = window.missed_webhook_rate
    if (
        snapshot.webhooks_enabled
        and rate is not None
        and settled >= cfg.missed_webhook_min
        and rate > cfg.missed_webhook_rate
    ):
        alarm(
            AlarmName.MISSED_WEBHOOKS,
            f"{rate:.0%} of the last {settled} results came by polling, not webhook "
            f"(threshold {cfg.missed_webhook_rate:.0%}): is the receiver reachable?",
        )
    rejected = rejected_recent.get("webhook.bad_signature", 0) + rejected_recent.get(
        "webhook.bad_token", 0
    )
    if rejected >= cfg.rejected_min:
        alarm(
            AlarmName.WEBHOOK_REJECTIONS,
            f"the receiver refused {rejected} webhook(s) (bad signature or token) in the last "
            f"{cfg.rejected_window_min} min: rotated or leaked secret?",
        )
    beats = snapshot.heartbeats
    if not beats.worker:
        alarm(
            AlarmName.WORKER_DOWN,
            "no worker heartbeat: nothing submits or polls",
        )
    if not beats.beat:
        alarm(
            AlarmName.BEAT_DOWN,
            "no beat heartbeat: lost webhooks are not polled",
        )
    if snapshot.webhooks_enabled and not beats.receiver:
        alarm(
            AlarmName.RECEIVER_DOWN,
            "no receiver heartbeat: webhooks may be refused",
        )
    if snapshot.forward is not None:
        found.extend(forward_alarms(snapshot.forward, cfg))
    if snapshot.outputs is not None:
        found.extend(outputs_alarms(snapshot.outputs, cfg))
    return tuple(found)


def forward_alarms(forwarding: Forwarding, cfg: StatusConfig) -> tuple[Alarm, ...]:
    """`forward_failing`: an outbound webhook endpoint that is owed deliveries has failed
    every attempt for `cfg.forward_failing_s` (no success since its first failure)."""
    failing = [
        e
        for e in forwarding.endpoints
        if e.pending and e.failing_for_s is not None and e.failing_for_s >= cfg.forward_failing_s
    ]
    if not failing:
        return ()
    names = ", ".join(
        f"{e.subscriber} ({e.failing_for_s / 60:.0f} min, {e.pending} waiting"
        + (f", last: {e.last_error}" if e.last_error else "")
        + ")"
        for e in failing
        if e.failing_for_s is not None
    )
    return (
        Alarm(
            AlarmName.FORWARD_FAILING,
            SEVERITY[AlarmName.FORWARD_FAILING],
            f"outbound webhook endpoint(s) failing for {cfg.forward_failing_s / 60:.0f}+ min: "
            f"{names}",
        ),
    )


def outputs_alarms(backlog: OutputsBacklog, cfg: StatusConfig) -> tuple[Alarm, ...]:
    """`outputs_not_copied`: completed jobs whose outputs are still not stored
    `backlog.alert_after_s` after they completed (the copy keeps failing: the provider
    deletes outputs after ~7 days), or copies given up for good lately."""
    parts: list[str] = []
    if backlog.overdue:
        oldest = f", the oldest {backlog.oldest_s / 3600:.1f} h" if backlog.oldest_s else ""
        parts.append(
            f"{backlog.overdue} completed job(s) still without a stored copy of their outputs "
            f"{backlog.alert_after_s / 3600:g}+ h after completing{oldest} (the provider "
            "deletes them after ~7 days)"
        )
    if backlog.failed_recent:
        parts.append(
            f"{backlog.failed_recent} job(s)' outputs could not be copied at all in the last "
            f"{cfg.outputs_failed_window_s / 3600:g} h (`kq job ID` shows the reason)"
        )
    if not parts:
        return ()
    name = AlarmName.OUTPUTS_NOT_COPIED
    return (Alarm(name, SEVERITY[name], "; ".join(parts)),)
