"""The Redis job store: job records, the one atomic transition, the poll schedule.

Key names live in `worker.keys`; the Lua scripts beside this module get them from here.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import redis
from redis.client import NEVER_DECODE
from redis.exceptions import NoScriptError

from worker import keys
from worker.domain import ALLOWED_FROM, EditRequest, Job, JobState, TransitionOutcome
from worker.scripts import LuaScript, packed_evalsha

NEW: Final = "new"
# A WaveSpeed delivery is retried for minutes, not days; a day of memory is plenty.
WEBHOOK_ID_TTL_S: Final = 24 * 3600
# Fixed keys the transition script touches, in its KEYS order (see lua/transition.lua).
_TRANSITION_KEYS: Final = (
    keys.EVENTS,
    keys.POLL,
    keys.STATS,
    keys.DLQ,
    keys.ADM_SLOTS,
    keys.ADM_CLAIMED,
    keys.ADM_NWAIT,
    keys.ADM_WAKE,
    keys.ATTEMPTS,
)
_TRANSITION_PREFIXES: Final = (
    keys.PREDICTION_PREFIX,
    keys.BATCH_PREFIX,
    keys.BATCH_JOBS_PREFIX,
    keys.ADM_WAIT_PREFIX,
    keys.JOB_PREFIX,
    keys.CHAIN_PREFIX,
    keys.CHAIN_JOBS_PREFIX,
    keys.CHAIN_ENDS_PREFIX,
)
REMOVE: Final = "rm"
# ARGV[2] of the transition script per target: the states it may come from.
_ALLOWED_ARG: Final = {
    target: ",".join(sorted(s.value for s in sources)) for target, sources in ALLOWED_FROM.items()
}
# A job still `queued` this long after it was written (or put back) is looked at by the
# poller: its submit message may be gone (see poller.poll_job), so it gets another.
QUEUED_CHECK_S: Final = 60.0
# A chain step written by a transition is sent by whoever made the move (the worker, or
# the receiver once its answer is out); if that send is lost, the poller's check of
# queued jobs sends it this soon after (sooner than QUEUED_CHECK_S: a chain is waiting).
SPAWNED_CHECK_S: Final = 10.0

# The prediction index and the webhook-id marks: hashes per day and shard of the id
# (lua/transition.lua, which repeats these two numbers).
INDEX_PERIOD_S: Final = 24 * 3600
INDEX_SHARDS: Final = 1024
_HEX32: Final = re.compile("[0-9a-f]{32}")

FieldValue = str | int | float
# A job to write: (id, request, idempotency key, priority), optionally with its metadata.
NewJob = (
    tuple[str, EditRequest, str, int] | tuple[str, EditRequest, str, int, Mapping[str, Any] | None]
)


# Job records' JSON fields, compact (json.dumps(..., separators=(",", ":")) without the
# per-call set-up: a batch writes 100,000 of them).
_COMPACT = json.JSONEncoder(separators=(",", ":"))
_COMPACT_UTF8 = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# A string as _COMPACT writes it (ASCII-only JSON), without an encoder call around it.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


@dataclass(frozen=True)
class CreateCall:
    """create_jobs.lua's keys and arguments for some new jobs (`create_call`), built
    before they are sent (`JobStore.create_many_started`)."""

    keys: list[str]
    args: list[FieldValue]
    jobs: int


def create_call(jobs: Sequence[NewJob], *, batch_id: str = "", now: float) -> CreateCall:
    """The call that writes these (job id, request, idempotency key, priority[, metadata])
    tuples, as `JobStore.create_many` does."""
    args: list[FieldValue] = [batch_id, _stamp(now), now + QUEUED_CHECK_S]
    for job in jobs:
        job_id, request, key, priority = job[:4]
        metadata = job[4] if len(job) > 4 else None
        meta = "" if metadata is None else _COMPACT_UTF8.encode(metadata)
        args += (job_id, _stored_request(request), key, priority, meta)
    script_keys = [keys.STATS, keys.batch(batch_id), keys.batch_jobs(batch_id), keys.POLL]
    script_keys.extend(keys.job(job[0]) for job in jobs)
    return CreateCall(script_keys, args, len(jobs))


def encode_request(payload: Mapping[str, Any]) -> str:
    """A request as a job record stores it: compact JSON, and the usual edit (a prompt and
    one image, nothing else) as a 2-array `[prompt, image]` without the names (18 bytes
    fewer for the record's whole life). `decode_job` reads both forms."""
    if len(payload) == 2 and "prompt" in payload and "image" in payload:
        return _COMPACT.encode([payload["prompt"], payload["image"]])
    return _COMPACT.encode(payload)


def _stored_request(request: EditRequest) -> str:
    """encode_request(request.to_payload()), made directly for the usual edit: 0.3 µs
    instead of 2 µs through a JSON encoder, for each of a bulk file's 100,000 lines."""
    if request.is_plain:
        assert request.image is not None
        return f"[{_json_string(request.prompt)},{_json_string(request.image)}]"
    return encode_request(request.to_payload())


def decode_request(text: str) -> dict[str, Any]:
    """The stored request back as its JSON object ({} when unreadable)."""
    try:
        value: Any = json.loads(text or "{}")
    except ValueError:
        return {}
    if isinstance(value, list) and len(value) == 2:
        return {"prompt": value[0], "image": value[1]}
    return value if isinstance(value, dict) else {}


def _stamp(value: float) -> float:
    """A time as written to a job record (and so to its event): to the millisecond, which
    is all a latency needs, in 14 characters instead of 18 (bench/memory.py)."""
    return round(value, 3)


def _record_value(name: str, value: FieldValue) -> FieldValue:
    """A field value as written to a job record: times (`*_at`) by `_stamp`."""
    return _stamp(value) if isinstance(value, float) and name.endswith("_at") else value


def index_keys(prefix: str, entry_id: str, ttl_s: float) -> list[str]:
    """The buckets of the prediction index or of the webhook-id marks that may hold
    `entry_id` (an entry lives at least `ttl_s`), newest first: see the top of
    lua/transition.lua. One more day each side than the script reads, for the skew
    between this clock and the Redis server's."""
    shard = index_shard(entry_id)
    now = time.time()
    newest = int(now // INDEX_PERIOD_S) + 1
    oldest = int((now - ttl_s) // INDEX_PERIOD_S) - 2
    return [f"{prefix}{period}:{shard}" for period in range(newest, oldest - 1, -1)]


def index_shard(entry_id: str) -> int:
    """The shard of the buckets that hold `entry_id` (lua/transition.lua does the same)."""
    digest = hashlib.sha1(entry_id.encode(), usedforsecurity=False).hexdigest()
    return int(digest[:3], 16) % INDEX_SHARDS


def index_name(entry_id: str) -> str | bytes:
    """An entry's name in its bucket: an id of 32 hex digits (a prediction id) as its 16
    bytes, anything else as it is (lua/transition.lua does the same)."""
    return bytes.fromhex(entry_id) if _HEX32.fullmatch(entry_id) else entry_id


def index_job_value(job_id: str) -> str | bytes:
    """A job id as the prediction index stores it (see index_job_id)."""
    return b"\0" + bytes.fromhex(job_id) if _HEX32.fullmatch(job_id) else job_id


def _index_hint(entry_id: str) -> tuple[str, str | bytes]:
    """(shard, name) of an id, worked out here for lua/transition.lua ('', '' for none)."""
    return (str(index_shard(entry_id)), index_name(entry_id)) if entry_id else ("", "")


def index_job_id(value: bytes) -> str:
    """A job id as the prediction index stores it: 32 hex digits as a zero byte and their
    16 bytes, anything else as it is (lua/transition.lua writes it)."""
    if len(value) == 17 and value[0] == 0:
        return value[1:].hex()
    return value.decode()


def _script(name: str) -> str:
    return resources.files("worker").joinpath("lua", name).read_text()


@dataclass(frozen=True)
class TransitionResult:
    """What the store did with a requested move, and where the job is now."""

    outcome: TransitionOutcome
    state: str
    version: int
    # Chain step jobs the move wrote, queued (see lua/chain_step.lua): send them.
    spawned: tuple[str, ...] = ()

    @property
    def applied(self) -> bool:
        return self.outcome is TransitionOutcome.APPLIED


def _result(answer: Any) -> TransitionResult:
    outcome, state, version = answer[:3]
    spawned = tuple(str(answer[3]).split(",")) if len(answer) > 3 and answer[3] else ()
    return TransitionResult(TransitionOutcome(str(outcome)), str(state), int(version), spawned)


class JobStore:
    """Job records in Redis; every state change goes through `transition`."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        result_ttl_s: int,
        events_maxlen: int,
        keep_outputs: bool = False,
    ) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.events_maxlen = events_maxlen
        # Completed jobs are queued for copy-out (kq:outputs:due, worker/outputs/).
        self.keep_outputs = keep_outputs
        self._transition = LuaScript(client, _script("chain_step.lua") + _script("transition.lua"))
        self._claim_due = LuaScript(client, _script("claim_due.lua"))
        self._create_jobs = LuaScript(client, _script("create_jobs.lua"))
        self._reserve_budget = LuaScript(client, _script("reserve_budget.lua"))
        self._flag = LuaScript(client, _script("flag.lua"))

    def on_client(self, client: redis.Redis) -> JobStore:
        """This store (same settings, same scripts) on another client of the same Redis."""
        return JobStore(
            client,
            result_ttl_s=self.result_ttl_s,
            events_maxlen=self.events_maxlen,
            keep_outputs=self.keep_outputs,
        )

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def create(
        self,
        job_id: str,
        request: EditRequest,
        *,
        batch_id: str = "",
        now: float,
        idempotency_key: str = "",
    ) -> bool:
        """Write a new queued job; False when the id already exists (nothing changes)."""
        answers = self.create_many(
            [(job_id, request, idempotency_key, 0)], batch_id=batch_id, now=now
        )
        return answers[0] == NEW

    def create_many(
        self,
        jobs: Sequence[NewJob],
        *,
        batch_id: str = "",
        now: float,
    ) -> list[str]:
        """Write (job id, request, idempotency key, priority[, metadata]) tuples in one
        round trip. `metadata` is the producer's JSON object (or None), stored as JSON.

        Atomic per call: each job is written only if its id is free. Answers, per job,
        NEW or the state of the job that already had that id.
        """
        if not jobs:
            return []
        return self._created(create_call(jobs, batch_id=batch_id, now=now))

    def create_many_started(self, call: CreateCall) -> Callable[[], list[str]]:
        """`create_many` in two steps, so the caller works while Redis does: the call is
        sent now, on a connection of its own, and calling what this returns reads its
        answers (call it once, before sending anything that needs the jobs written).

        A lost connection, or a script Redis does not hold yet, makes the read run the
        call again the usual way (with the client's retries): it is idempotent, so a job
        the lost call did write answers its state ('queued') instead of NEW.
        """
        if not call.jobs:
            return list
        pool = self.redis.connection_pool
        conn: Any = pool.get_connection()  # redis-py types its connections loosely
        try:
            conn.send_packed_command(
                packed_evalsha(conn, self._create_jobs.sha, call.keys, call.args)
            )
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            pool.release(conn)
            return lambda: self._created(call)

        def answers() -> list[str]:
            try:
                reply: Any = conn.read_response()
            except NoScriptError:
                pool.release(conn)  # the error was read whole: the connection is clean
                return self._created(call)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                pool.release(conn)
                return self._created(call)
            except BaseException:
                conn.disconnect()  # a reply may be left unread on it
                pool.release(conn)
                raise
            pool.release(conn)
            return [str(a) for a in reply]

        return answers

    def _created(self, call: CreateCall) -> list[str]:
        answers = self._create_jobs(keys=call.keys, args=call.args)
        return [str(a) for a in answers]

    def batch_members(self, batch_id: str, start: int = 0, end: int = -1) -> list[str]:
        """Job ids of a batch in enqueue order (a slice of them with start/end)."""
        members: Any = self.redis.lrange(keys.batch_jobs(batch_id), start, end)
        return [str(x) for x in members]

    def set_batch_fields(self, batch_id: str, fields: Mapping[str, FieldValue]) -> None:
        self.redis.hset(keys.batch(batch_id), mapping=_mapping(fields))

    def reserve_budget(
        self, job_id: str, batch_id: str, price_micros: int, *, chain_id: str = ""
    ) -> bool:
        """Reserve one image's price against the job's batch budget (idempotent per job);
        a chain step reserves its whole chain's price, once per chain."""
        if not batch_id:
            return True
        ok = self._reserve_budget(
            keys=[keys.job(job_id), keys.batch(batch_id), keys.chain(chain_id)],
            args=[price_micros],
        )
        return bool(ok)

    def dlq(self, start: int = 0, count: int = 100) -> list[str]:
        """Failed job ids, most recent first; ids whose records expired are pruned."""
        raw: Any = self.redis.zrevrange(keys.DLQ, start, start + count - 1)
        ids = [str(x) for x in raw]
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.job(job_id))
        alive = pipe.execute()
        gone = [job_id for job_id, ok in zip(ids, alive, strict=True) if not ok]
        if gone:
            self.redis.zrem(keys.DLQ, *gone)
        return [job_id for job_id, ok in zip(ids, alive, strict=True) if ok]

    def dlq_size(self) -> int:
        size: Any = self.redis.zcard(keys.DLQ)
        return int(size)

    def remove_from_dlq(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.redis.zrem(keys.DLQ, *job_ids)

    def get(self, job_id: str) -> Job | None:
        raw: dict[str, str] = self.redis.hgetall(keys.job(job_id))  # type: ignore[assignment]
        if not raw or "state" not in raw:
            return None
        return decode_job(raw, job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [
            decode_job(raw, job_id) if raw and "state" in raw else None
            for job_id, raw in zip(job_ids, pipe.execute(), strict=True)
        ]

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        now: float,
        fields: Mapping[str, FieldValue] | None = None,
        expect_version: int | None = None,
        expect_prediction_id: str = "",
        poll_at: float | str | None = None,
        attempt_created_no_task: bool = False,
        webhook_id: str = "",
    ) -> TransitionResult:
        """Move a job to `target` if the transition table allows it from where it is now.

        Atomic: the state check, the writes, the poll schedule and (for a terminal
        target) the event append happen in one Lua call, so racing callers (webhook,
        poller, retries, duplicates) can never produce two results or a step back.
        `poll_at` is a time to (re)schedule the job's next poll, REMOVE, or None.
        `attempt_created_no_task`: the submit attempt being left is known to have created
        no task at the provider (it stops counting as an open attempt).
        `webhook_id`: the move applies that webhook delivery; it is marked as seen in the
        same step, and a delivery seen before comes back DUPLICATE with nothing done.
        """
        # The prediction id this move may index, if the caller knows it (see the script).
        indexed = str((fields or {}).get("prediction_id") or expect_prediction_id)
        args: list[FieldValue | bytes] = [
            target.value,
            _ALLOWED_ARG[target],
            "" if expect_version is None else expect_version,
            expect_prediction_id,
            _stamp(now),
            self.result_ttl_s,
            self.events_maxlen,
            "1" if target.terminal else "0",
            "" if poll_at is None else poll_at,
            "1" if attempt_created_no_task else "0",
            WEBHOOK_ID_TTL_S if webhook_id else "",
            *_TRANSITION_PREFIXES,
            now + SPAWNED_CHECK_S,
            "1" if self.keep_outputs else "0",
            webhook_id,
            keys.WEBHOOK_ID_PREFIX,
            *_index_hint(webhook_id),
            indexed,
            *_index_hint(indexed),
            index_job_value(job_id),
        ]
        for name, value in (fields or {}).items():
            args.extend((name, _record_value(name, value)))
        script_keys = [
            keys.job(job_id),
            *_TRANSITION_KEYS,
            keys.webhook_id(webhook_id),
            keys.LATENCY,
            keys.OUTPUTS_DUE,
            keys.ADM_SUBMITS,
        ]
        return _result(self._transition(keys=script_keys, args=args))

    def flag(
        self,
        job_id: str,
        state: JobState,
        fields: Mapping[str, FieldValue],
        *,
        now: float,
        expect_version: int | None = None,
        poll_at: float | None = None,
    ) -> TransitionResult:
        """Set fields on a job that stays where it is, as one compare-and-set on its state
        (and version, if given); the version moves on. Use cases call this, nothing else."""
        args: list[FieldValue] = [
            state.value,
            "" if expect_version is None else expect_version,
            "" if poll_at is None else poll_at,
            _stamp(now),
        ]
        for name, value in fields.items():
            args.extend((name, _record_value(name, value)))
        return _result(self._flag(keys=[keys.job(job_id), keys.POLL], args=args))

    def schedule_poll(self, job_id: str, at: float, *, only_if_scheduled: bool = False) -> None:
        """(Re)schedule a job's next poll. `only_if_scheduled`: leave a job that a move
        took off the schedule meanwhile (it finished) off it."""
        self.redis.zadd(keys.POLL, {job_id: at}, xx=only_if_scheduled)

    def unschedule_poll(self, job_id: str) -> None:
        self.redis.zrem(keys.POLL, job_id)

    def open_attempts(self, start: float, end: float) -> list[tuple[str, float]]:
        """Open submit attempts ("{job id}:{attempt}", began at) that began in [start, end]."""
        raw: Any = self.redis.zrangebyscore(keys.ATTEMPTS, start, end, withscores=True)
        return [(str(member), float(score)) for member, score in raw]

    def forget_attempts_before(self, before: float) -> None:
        """Drop open attempts too old to matter to any reconciliation still running."""
        self.redis.zremrangebyscore(keys.ATTEMPTS, "-inf", f"({before}")

    def claim_due(
        self, now: float, *, limit: int, min_interval: float, max_interval: float
    ) -> list[str]:
        """Due job ids, each rescheduled with back-off so no other sweep takes it now."""
        due = self._claim_due(
            keys=[keys.POLL], args=[now, limit, min_interval, max_interval, keys.JOB_PREFIX]
        )
        return [str(x) for x in due]

    def poll_backlog(self, now: float) -> tuple[int, int]:
        """(jobs due now, jobs scheduled in all)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcount(keys.POLL, "-inf", now)
        pipe.zcard(keys.POLL)
        due, total = pipe.execute()
        return int(due), int(total)

    def webhook_seen(self, webhook_id: str) -> bool:
        """Whether a delivery with this webhook-id was applied already (read only)."""
        pipe = self.redis.pipeline(transaction=False)
        name = index_name(webhook_id)
        for key in index_keys(keys.WEBHOOK_ID_PREFIX, webhook_id, WEBHOOK_ID_TTL_S):
            pipe.hexists(key, name)
        pipe.exists(keys.webhook_id(webhook_id))  # a mark of its own (earlier versions)
        return any(pipe.execute())

    def job_for_prediction(self, prediction_id: str) -> str | None:
        pipe = self.redis.pipeline(transaction=False)
        name = index_name(prediction_id)
        raw = {NEVER_DECODE: True}  # a job id of 32 hex digits is stored as bytes
        for key in index_keys(keys.PREDICTION_PREFIX, prediction_id, self.result_ttl_s):
            pipe.execute_command("HGET", key, name, **raw)  # type: ignore[no-untyped-call]
        pipe.get(keys.prediction(prediction_id))  # a key of its own (earlier versions)
        *values, legacy = pipe.execute()
        for value in values:
            if value is not None:
                return index_job_id(value)
        return None if legacy is None else str(legacy)

    def stats(self) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(keys.STATS)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}

    def batch_counts(self, batch_id: str) -> dict[str, float]:
        """A batch's counters and settings (numbers; created_at is a Unix time)."""
        raw: dict[str, str] = self.redis.hgetall(keys.batch(batch_id))  # type: ignore[assignment]
        return {k: float(v) for k, v in raw.items()}

    def events(
        self, start: str = "-", count: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        """Read the event stream from `start` (inclusive), oldest first."""
        entries: Any = self.redis.xrange(keys.EVENTS, min=start, count=count)
        return [(str(i), dict(f)) for i, f in entries]

    def reserve_budgets(self, items: Sequence[tuple[str, str, int, str]]) -> list[bool]:
        """`reserve_budget` for many (job id, batch id, price, chain id) at once, in one
        pipelined round trip (each reservation is still its own atomic script call)."""
        answers = [True] * len(items)
        sent = [i for i, item in enumerate(items) if item[1]]
        if not sent:
            return answers
        # EVALSHA itself, not the script object: redis-py would first ask whether the
        # script is loaded (SCRIPT EXISTS), a round trip per call for an answer that is
        # yes but after a Redis restart, which the one-by-one path below handles.
        pipe = self.redis.pipeline(transaction=False)
        for i in sent:
            job_id, batch_id, price_micros, chain_id = items[i]
            pipe.evalsha(
                self._reserve_budget.sha,
                3,
                keys.job(job_id),
                keys.batch(batch_id),
                keys.chain(chain_id),
                price_micros,
            )
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            # Reservations are idempotent per job: any that did run are not made twice.
            replies = [
                self.reserve_budget(items[i][0], items[i][1], items[i][2], chain_id=items[i][3])
                for i in sent
            ]
        for i, ok in zip(sent, replies, strict=True):
            answers[i] = bool(ok)
        return answers


def _mapping(fields: Mapping[str, FieldValue]) -> Any:
    """redis-py's stubs want a wider key type than str; the values are what we say."""
    return dict(fields)


def decode_job(raw: Mapping[str, str], job_id: str) -> Job:
    """Turn a stored hash into a Job; tolerant of fields added later, and of fields left
    out at their defaults (a missing field reads as its default). `job_id`: the id in the
    record's key (a record written by create_jobs.lua has no `id` field).
    """

    def num(name: str) -> float:
        try:
            return float(raw.get(name) or 0)
        except ValueError:
            return 0.0

    try:
        outputs = tuple(json.loads(raw.get("outputs") or "[]"))
    except ValueError:
        outputs = ()
    code = raw.get("task_code") or ""
    try:
        metadata: Any = json.loads(raw["metadata"]) if raw.get("metadata") else None
    except ValueError:
        metadata = None
    return Job(
        id=raw.get("id") or job_id,
        state=JobState(raw["state"]),
        version=int(num("version")),
        request=decode_request(raw.get("request") or ""),
        batch_id=raw.get("batch_id", ""),
        prediction_id=raw.get("prediction_id", ""),
        idempotency_key=raw.get("idempotency_key", ""),
        priority=int(num("priority")),
        attempts=int(num("attempts")),
        ambiguous=raw.get("ambiguous") == "1",
        created_at=num("created_at"),
        submitting_at=num("submitting_at"),
        submitted_at=num("submitted_at"),
        finished_at=num("finished_at"),
        outputs=outputs,
        error=raw.get("error", ""),
        reason=raw.get("reason", ""),
        task_code=int(code) if code.lstrip("-").isdigit() else None,
        resolved_by=raw.get("resolved_by", ""),
        poll_count=int(num("poll_count")),
        candidates_final_at=num("candidates_final_at"),
        answer_lost_at=num("answer_lost_at"),
        candidates=tuple(c for c in (raw.get("candidates") or "").split(",") if c),
        candidates_seen=_seen(raw.get("candidates_seen") or ""),
        metadata=metadata if isinstance(metadata, dict) else None,
        chain_id=raw.get("chain_id", ""),
        step=int(num("step")),
        branch=raw.get("branch", ""),
    )


def _seen(value: str) -> tuple[tuple[str, float], ...]:
    """`id@time,id@time` -> ((id, time), ...); malformed parts are skipped."""
    pairs = []
    for part in value.split(","):
        task_id, _, at = part.partition("@")
        try:
            pairs.append((task_id, float(at)))
        except ValueError:
            continue
    return tuple(pairs)
