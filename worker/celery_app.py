"""The Celery application and its configuration (see architecture.md, "Celery")."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import pools as kombu_pools
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from worker.settings import Settings

SUBMIT_QUEUE = "kq"
POLL_QUEUE = "kq.poll"
# Well above the longest task (a submit is one HTTP call with a 30 s timeout): a
# message unacked this long is handed to another worker.
VISIBILITY_TIMEOUT_S = 3600
# How often beat triggers a copy-out sweep (it only touches jobs that are due).
COPY_OUTPUTS_INTERVAL_S = 1.0


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel, failing with a connection error once its connection is gone.

    Works around a kombu bug (kombu 5.7, and the same code on kombu's main branch; the
    symptom of celery/kombu#582) that killed the worker whenever Redis went away while
    a late-acked task was unacked and the task channel had a BRPOP outstanding:

    1. Celery's consumer, losing the connection, calls `Connection.collect()`
       (celery/worker/consumer/consumer.py, `on_connection_error_after_connected`).
    2. collect closes the default channel; `Channel.close()` (kombu/transport/redis.py)
       first reads the outstanding BRPOP reply, and `_brpop_read` raises ConnectionError
       on the dead socket before the channel marks itself closed. `maybe_close_channel`
       swallows it, and collect drops the transport's client anyway
       (kombu/connection.py, `_do_close_transport`: `self._transport.client = None`).
    3. Celery then calls `connection.close()`, which closes the channel again: it drops
       its pools and restores its unacked messages, which needs a new pool, and
       `_connparams()` reads `self.connection.client.hostname` -> AttributeError.

    That is no connection error, so neither Celery's `ignore_errors` nor
    `Message.ack_log_error` catches it: "Unrecoverable error", and the worker stops
    (the same AttributeError comes from `Hub.close` -> `basic_ack` when a task finished
    meanwhile). Raising redis' ConnectionError instead lets kombu and Celery treat it as
    what it is: the consumer reconnects; the messages that channel could not restore or
    ack stay in kombu's unacked set and are restored after the visibility timeout (the
    tasks are idempotent, and a job whose message is held there is resent by the
    poller's queued check). Only where the stock code would crash does this differ.
    `tests/test_redis_restart.py` holds a canary that fails once kombu fixes it.
    """

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above; `configure` selects it for
    redis:// URLs. rediss:// keeps kombu's own transport, whose TLS defaults a transport
    override would bypass."""

    Channel = _Channel


class _SentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the same guard as `_Channel`: it inherits the
    `_connparams` that crashes on a collected connection, and its pool is built from
    `self.connection.client.alt`, which is just as gone by then."""

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection of this channel is closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with the channel above; `configure` selects it for
    sentinel:// URLs (kombu still splits the `;`-separated Sentinel list itself)."""

    Channel = _SentinelChannel


REDIS_TRANSPORT = f"{__name__}:RedisTransport"
SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"

# KQ_BROKER_URL schemes that mean RabbitMQ (kombu's py-amqp transport).
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


class KqCelery(Celery):  # type: ignore[misc]  # Celery ships no type hints
    """Celery, with countdowns rounded up to whole seconds on RabbitMQ.

    With quorum queues Celery sends a countdown through RabbitMQ's native delayed
    delivery, which counts whole seconds: `send_task` truncates the countdown with
    `int()` and kombu's `calculate_routing_key` refuses 0, so a retry due in 0.5-1 s
    (`worker.tasks.retry_countdown(0)`) raised ValueError instead of being sent
    (celery/app/base.py, Celery 5.7 and main). Rounding up keeps "not before" and lets
    the message arrive after the ETA it carries, so the worker runs it at once instead
    of holding it (and a prefetch slot, static on quorum queues) for the remainder.
    """

    def send_task(self, *args: Any, **options: Any) -> Any:
        countdown = options.get("countdown")
        if countdown and countdown > 0 and is_rabbitmq(self.conf.broker_url or ""):
            options["countdown"] = math.ceil(countdown)
        return super().send_task(*args, **options)


app = KqCelery("kq", set_as_current=True)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=SUBMIT_QUEUE,
    task_routes={
        "kq.poll_due": {"queue": POLL_QUEUE},
        "kq.submit": {"queue": SUBMIT_QUEUE},
        "kq.submit_chunk": {"queue": SUBMIT_QUEUE},
        "kq.copy_outputs": {"queue": POLL_QUEUE},
    },
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    broker_connection_retry_on_startup=True,
    # Redis restarting or away for a while must never end a worker: retry for ever
    # (Celery's default gives up after 100 attempts, ~50 minutes).
    broker_connection_max_retries=None,
    # Late-acked tasks that run across a lost connection keep running: a submit cut off
    # mid-call would leave an ambiguous job. Their acks fail harmlessly (the message is
    # redelivered after the visibility timeout and finds its job already moved on).
    worker_cancel_long_running_tasks_on_connection_loss=False,
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
    """Point the app at this deployment's broker and schedule the polling sweep.

    The broker is KQ_BROKER_URL, else the Redis of the job store (as before RabbitMQ
    was an option); the job store, admission and events stay on Redis either way.
    """
    broker = broker_url(settings)
    previous = app.conf.broker_url or ""
    if previous and previous != broker:
        # A process re-pointed at another broker (tests, harnesses) must drop the
        # connections it pooled for the old one.
        _drop_broker_connections()
    if is_rabbitmq(previous) != is_rabbitmq(broker):
        # app.amqp caches the queue declarations and routes the config below replaces.
        app.__dict__.pop("amqp", None)
    app.conf.update(
        broker_url=broker,
        broker_transport=broker_transport_for(broker),
        **(_rabbitmq_options() if is_rabbitmq(broker) else _redis_options(settings, broker)),
        beat_schedule={
            "kq-poll-due": {
                "task": "kq.poll_due",
                "schedule": settings.sweep_interval_s,
                # A sweep that waited longer than a few ticks is useless; a later one runs.
                "options": {"expires": max(10.0, settings.sweep_interval_s * 5)},
            },
            # Copy-out of completed jobs' outputs (worker/outputs/), when KQ_OUTPUTS is set.
            **(
                {
                    "kq-copy-outputs": {
                        "task": "kq.copy_outputs",
                        "schedule": COPY_OUTPUTS_INTERVAL_S,
                        "options": {"expires": 10.0},
                    }
                }
                if settings.keep_outputs
                else {}
            ),
        },
    )
    return app


def broker_url(settings: Settings) -> str:
    """The Celery broker: KQ_BROKER_URL when set, else the job store's Redis (through
    its Sentinels when KQ_REDIS_SENTINELS is set: `sentinel://h1:p1/db;sentinel://h2:p2/db`,
    with KQ_REDIS_URL's password for the primary)."""
    if settings.broker_url or not settings.redis_sentinels:
        return settings.broker_url or settings.redis_url
    parts = urlsplit(settings.redis_url)
    auth = parts.netloc.rpartition("@")[0]
    db = parts.path.strip("/") or "0"
    hosts = (f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in settings.redis_sentinels)
    return ";".join(f"sentinel://{auth + '@' if auth else ''}{hp}/{db}" for hp in hosts)


def is_rabbitmq(url: str) -> bool:
    return urlsplit(url).scheme in AMQP_SCHEMES


def _redis_options(settings: Settings, broker: str) -> dict[str, Any]:
    """Redis as the broker, as it always was: kombu's lists, queues created on use
    (through Sentinel: the same, on whichever server is the primary)."""
    options: dict[str, Any] = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Look for such messages every few seconds, not every ~100 s (kombu's default).
        "unacked_restore_interval": min(10.0, settings.visibility_timeout_s / 3),
        "unacked_restore_throttle": 1,
    }
    if urlsplit(broker).scheme == "sentinel":
        options["master_name"] = settings.redis_master_name
        # A Sentinel that does not answer is skipped quickly for the next one.
        options["sentinel_kwargs"] = {"socket_timeout": 5, "socket_connect_timeout": 5}
    return {
        "broker_transport_options": options,
        "task_queues": None,
        "task_default_queue_type": "classic",
        "task_default_exchange_type": "direct",
    }


def _rabbitmq_options() -> dict[str, Any]:
    """RabbitMQ as the broker, as Celery's "Using Quorum Queues" asks
    (docs/getting-started/backends-and-brokers/rabbitmq.rst, Celery 5.5+).

    - Both queues are quorum queues (replicated, durable; messages persistent, Celery's
      default delivery mode), declared the same way by every process that publishes
      or consumes, with publisher confirms (`confirm_publish`), so a send returns only
      once RabbitMQ has the message.
    - `worker_detect_quorum_queues` (on by default; kept explicit) makes the worker
      use per-consumer QoS, which quorum queues require (no global QoS): the prefetch
      stays concurrency x `worker_prefetch_multiplier` (1), with late acks as on Redis.
    - Topic exchanges, one per queue (direct ones cannot take part in native delayed
      delivery): a countdown (a submit's retry back-off) waits in RabbitMQ's delayed
      queues, not in the worker holding the message and a prefetch slot.

    A message a worker took and never acked (killed, or its connection lost) goes back
    to the queue as soon as RabbitMQ sees the connection close: no visibility timeout.
    """
    return {
        "broker_transport_options": {"confirm_publish": True},
        "task_queues": tuple(_quorum_queue(name) for name in (SUBMIT_QUEUE, POLL_QUEUE)),
        "task_default_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        "worker_detect_quorum_queues": True,
        "broker_native_delayed_delivery_queue_type": "quorum",
    }


def _quorum_queue(name: str) -> Queue:
    exchange = Exchange(name, type="topic")  # type: ignore[no-untyped-call]
    return Queue(  # type: ignore[no-untyped-call]
        name, exchange, routing_key=name, queue_arguments={"x-queue-type": "quorum"}
    )


def broker_transport_for(url: str) -> str | None:
    """Our patched transports for redis:// and sentinel:// URLs; None (kombu picks by
    scheme: amqp:// is py-amqp, which needs no such patch) else."""
    scheme = urlsplit(url).scheme
    return {"redis": REDIS_TRANSPORT, "sentinel": SENTINEL_TRANSPORT}.get(scheme)


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
    # The producer pool comes from kombu's process-wide registry, keyed by connection: a
    # pool closed here would be handed out again for the same broker URL. kombu's reset
    # closes every registered pool (their producers' connections with them, not left to
    # the GC) and empties the registry.
    kombu_pools.reset()  # type: ignore[no-untyped-call]
