"""Every Redis key the product uses, in one place (all under `kq:`; one Redis, not a cluster).

    kq:job:{id}           hash: the job (see `domain.Job`), expires `result_ttl_s` after it ends
    kq:poll               zset: job id -> when the poller looks at it next
    kq:pred:{day}:{shard} hash: prediction id -> job id, one bucket per day and shard of
                          the id (store.index_keys; transition.lua); a version before
                          this one wrote kq:pred:{pid} strings, still read
    kq:events             stream: exactly one entry per job that became terminal
    kq:whid:{day}:{shard} hash: webhook-ids whose delivery was applied (dedupe), bucketed
                          the same way; kq:whid:{id} strings of older versions still read
    kq:batch:{id}         hash: per-batch counters and settings
    kq:batchjobs:{id}     list: a batch's job ids in enqueue order
    kq:dlq                zset: failed job id -> when it failed (the dead-letter list)
    kq:attempts           zset: "{job id}:{attempt}" -> when its submit began, for each
                          submit whose task is not known yet (reconciliation reads it)
    kq:stats              hash: state:<s>, resolved_by:<how>, now:<s>, paid
    kq:latency            hash: latency histogram counters (written by transition.lua and
                          the receiver, exported by worker.metrics)
    kq:outputs:due        zset: completed job id -> when its outputs are copied out next
                          (written by transition.lua when the store keeps outputs)
    kq:chain:{id}         hash: a chain of edits (see worker/chains.py, lua/chain_step.lua)
    kq:chainjobs:{id}     list: a chain's step job ids in creation order
    kq:chainends:{id}     hash: branch -> JSON of how that branch ended
    kq:adm:*              admission control (slots, submit window, waiting lines; admission.py)
    kq:tm:*               telemetry counters per minute and day (telemetry.py)
    kq:heartbeat:{role}:{host}:{pid}, kq:heartbeats   liveness of each process (the
                          host too: in containers every process id is 1)
    kq:replprobe          string: bumped before each Redis WAIT of a submit (replication.py)

Lua scripts get the fixed keys as KEYS; keys they derive from a job's own fields (its
batch, its prediction id) are built from the prefixes below, passed in as arguments.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "kq:"

EVENTS: Final = "kq:events"
POLL: Final = "kq:poll"
STATS: Final = "kq:stats"
DLQ: Final = "kq:dlq"
ATTEMPTS: Final = "kq:attempts"
LATENCY: Final = "kq:latency"
HEARTBEATS: Final = "kq:heartbeats"
# A counter a submit bumps just before Redis WAIT (see worker/replication.py).
REPLICATION_PROBE: Final = "kq:replprobe"
OUTPUTS_DUE: Final = "kq:outputs:due"

JOB_PREFIX: Final = "kq:job:"
BATCH_PREFIX: Final = "kq:batch:"
BATCH_JOBS_PREFIX: Final = "kq:batchjobs:"
PREDICTION_PREFIX: Final = "kq:pred:"
WEBHOOK_ID_PREFIX: Final = "kq:whid:"
HEARTBEAT_PREFIX: Final = "kq:heartbeat:"
CHAIN_PREFIX: Final = "kq:chain:"
CHAIN_JOBS_PREFIX: Final = "kq:chainjobs:"
CHAIN_ENDS_PREFIX: Final = "kq:chainends:"

# Admission control (see admission.py and lua/admission.lua).
ADM_SLOTS: Final = "kq:adm:slots"
ADM_SUBMITS: Final = "kq:adm:submits"
ADM_CTL: Final = "kq:adm:ctl"
ADM_RR: Final = "kq:adm:rr"
ADM_NWAIT: Final = "kq:adm:nwait"
ADM_SEQ: Final = "kq:adm:seq"
ADM_CLAIMED: Final = "kq:adm:claimed"
ADM_WAKE: Final = "kq:adm:wake"
ADM_WAIT_PREFIX: Final = "kq:adm:wait:"

# Telemetry counters (see telemetry.py).
TELEMETRY_PREFIX: Final = "kq:tm:"
TELEMETRY_TOTAL: Final = "kq:tm:total"


def job(job_id: str) -> str:
    return JOB_PREFIX + job_id


def batch(batch_id: str) -> str:
    return BATCH_PREFIX + batch_id


def batch_jobs(batch_id: str) -> str:
    return BATCH_JOBS_PREFIX + batch_id


def prediction(prediction_id: str) -> str:
    return PREDICTION_PREFIX + prediction_id


def webhook_id(delivery_id: str) -> str:
    return WEBHOOK_ID_PREFIX + delivery_id


def admission_wait(batch_id: str) -> str:
    return ADM_WAIT_PREFIX + batch_id


def chain(chain_id: str) -> str:
    return CHAIN_PREFIX + chain_id


def chain_jobs(chain_id: str) -> str:
    return CHAIN_JOBS_PREFIX + chain_id


def chain_ends(chain_id: str) -> str:
    return CHAIN_ENDS_PREFIX + chain_id


def heartbeat(role: str, host: str, pid: int) -> str:
    return f"{heartbeat_prefix(role)}{host}:{pid}"


def heartbeat_prefix(role: str) -> str:
    return f"{HEARTBEAT_PREFIX}{role}:"


# Outbound webhooks, `kq forward` (see worker/forward/):
#   kq:fwd:subscribers    hash: subscriber id -> JSON record (`kq subscribers add`)
#   kq:fwd:active         hash: subscriber id -> JSON summary, every subscriber a running
#                         forwarder serves (file ones too), so readers need only Redis
#   kq:fwd:stats          hash: "<subscriber id>|<outcome>" -> delivery attempts (totals)
#   kq:fwd:due:{id}       zset: event id -> when to try next (or until when it is leased)
#   kq:fwd:age:{id}       zset: event id -> when it was queued for this subscriber
#   kq:fwd:body:{id}      hash: event id -> the webhook body (pending and dead ones)
#   kq:fwd:meta:{id}      hash: event id -> JSON attempts, first try, last error
#   kq:fwd:dead:{id}      zset: event id -> when it was parked (the subscriber's dead list)
#   kq:fwd:health:{id}    hash: failing_since, last_success_at, last_failure_at, last_error
FWD_PREFIX: Final = "kq:fwd:"
FWD_SUBSCRIBERS: Final = "kq:fwd:subscribers"
FWD_ACTIVE: Final = "kq:fwd:active"
FWD_STATS: Final = "kq:fwd:stats"


def fwd_due(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}due:{subscriber_id}"


def fwd_age(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}age:{subscriber_id}"


def fwd_body(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}body:{subscriber_id}"


def fwd_meta(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}meta:{subscriber_id}"


def fwd_dead(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}dead:{subscriber_id}"


def fwd_health(subscriber_id: str) -> str:
    return f"{FWD_PREFIX}health:{subscriber_id}"


# Copy-out of outputs (see worker/outputs/). kq:outputs:due (OUTPUTS_DUE above) holds the
# completed jobs whose outputs are not stored yet, scored by when to try (or until when
# a copier holds them); its Lua scripts are lua/outputs_*.lua.
#   kq:outputs:failed     zset: job id -> when its copy failed for good (alarm, metrics)
#   kq:outputs:stats      hash: stored, failed, retries, bytes (totals, for metrics)
OUTPUTS_FAILED: Final = "kq:outputs:failed"
OUTPUTS_STATS: Final = "kq:outputs:stats"
