"""The conditions worth waking someone for, decided from a status snapshot.

Pure: `find_alarms` looks only at a `StatusSnapshot` (before its alarms are set), the
recent webhook rejections and the thresholds; `worker.status.collect` attaches the
result. Every alarm's name is an `AlarmName`, so the exporter can list them all.
"""

from __future__ import annotations

from collections.abc import Mapping

from worker.snapshot import Alarm, AlarmName, Severity, StatusConfig, StatusSnapshot


def find_alarms(
    snapshot: StatusSnapshot, rejected_recent: Mapping[str, int], cfg: StatusConfig
) -> tuple[Alarm, ...]:
    """The alarms firing in `snapshot`; `rejected_recent` is telemetry of the last minutes."""
    found: list[Alarm] = []

    def alarm(name: AlarmName, severity: Severity, message: str) -> None:
        found.append(Alarm(name, severity, message))

    overdue = snapshot.overdue.count
    if overdue:
        alarm(
            AlarmName.OVERDUE_JOBS,
            Severity.CRITICAL,
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
            Severity.WARNING,
            f"{rate:.0%} of the last {settled} results came by polling, not webhook "
            f"(threshold {cfg.missed_webhook_rate:.0%}): is the receiver reachable?",
        )
    rejected = rejected_recent.get("webhook.bad_signature", 0) + rejected_recent.get(
        "webhook.bad_token", 0
    )
    if rejected >= cfg.rejected_min:
        alarm(
            AlarmName.WEBHOOK_REJECTIONS,
            Severity.CRITICAL,
            f"the receiver refused {rejected} webhook(s) (bad signature or token) in the last "
            f"{cfg.rejected_window_min} min: rotated or leaked secret?",
        )
    beats = snapshot.heartbeats
    if not beats.worker:
        alarm(
            AlarmName.WORKER_DOWN,
            Severity.CRITICAL,
            "no worker heartbeat: nothing submits or polls",
        )
    if not beats.beat:
        alarm(
            AlarmName.BEAT_DOWN,
            Severity.CRITICAL,
            "no beat heartbeat: lost webhooks are not polled",
        )
    if snapshot.webhooks_enabled and not beats.receiver:
        alarm(
            AlarmName.RECEIVER_DOWN,
            Severity.WARNING,
            "no receiver heartbeat: webhooks may be refused",
        )
    return tuple(found)
