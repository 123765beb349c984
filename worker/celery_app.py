"""The Celery application and its configuration (see architecture.md, "Celery")."""

from __future__ import annotations

from celery import Celery

from worker.settings import Settings

SUBMIT_QUEUE = "kq"
POLL_QUEUE = "kq.poll"
# Well above the longest task (a submit is one HTTP call with a 30 s timeout): a
# message unacked this long is handed to another worker.
VISIBILITY_TIMEOUT_S = 3600

app = Celery("kq", set_as_current=True)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=SUBMIT_QUEUE,
    task_routes={"kq.poll_due": {"queue": POLL_QUEUE}, "kq.submit": {"queue": SUBMIT_QUEUE}},
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
    task_send_sent_event=False,
    # Recycle a worker child that grew past ~400 MB (prefork only; threads ignore it).
    worker_max_memory_per_child=400_000,
    # In-memory schedule: the sweep is idempotent, nothing needs persisting.
    beat_scheduler="celery.beat:Scheduler",
    include=["worker.tasks"],
)


def configure(settings: Settings) -> Celery:
    """Point the app at this deployment's Redis and schedule the polling sweep."""
    if app.conf.broker_url and app.conf.broker_url != settings.redis_url:
        # A process re-pointed at another Redis (tests, harnesses) must drop the
        # connections it pooled for the old one.
        _drop_broker_connections()
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Look for such messages every few seconds, not every ~100 s (kombu's default).
            "unacked_restore_interval": min(10.0, settings.visibility_timeout_s / 3),
            "unacked_restore_throttle": 1,
        },
        beat_schedule={
            "kq-poll-due": {
                "task": "kq.poll_due",
                "schedule": settings.sweep_interval_s,
                # A sweep that waited longer than a few ticks is useless; a later one runs.
                "options": {"expires": max(10.0, settings.sweep_interval_s * 5)},
            }
        },
    )
    return app


def _drop_broker_connections() -> None:
    # Celery caches a connection pool on the app and a producer pool on app.amqp;
    # neither notices a new broker_url by itself.
    pool = app._pool
    if pool is not None:
        pool.force_close_all()
        app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
