"""The `kq:events` contract and its consumer API, on a real private redis-server.

Events are produced the real way (jobs moved by `JobStore.transition`, the one Lua
script), then read back through `worker.events` and `kq events`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from kq.cli import main as kq_main
from worker import keys
from worker.domain import EditRequest, JobState
from worker.events import (
    EventConsumer,
    ResultEvent,
    decode_event,
    follow,
    parse_since,
    replay,
    time_to_id,
)
from worker.store import JobStore

pytestmark = pytest.mark.integration

REQUEST = EditRequest(prompt="make it blue", image="https://example.com/a.jpg")
CONTRACT_FIELDS = {
    "schema", "job_id", "batch_id", "state", "prediction_id", "outputs", "error", "reason",
    "task_code", "resolved_by", "created_at", "submitted_at", "finished_at", "attempts",
    "version", "type",
}  # fmt: skip


def finish(store: JobStore, *, batch_id: str = "", state: JobState = JobState.FAILED) -> str:
    """Create a job and move it to a terminal state through the real transition."""
    job_id = uuid.uuid4().hex
    now = time.time()
    assert store.create(job_id, REQUEST, batch_id=batch_id, now=now)
    fields = {"finished_at": now + 1, "resolved_by": "worker", "reason": "budget", "error": "x"}
    assert store.transition(job_id, state, now=now + 1, fields=fields).applied
    return job_id


def test_every_contract_field_is_written_and_decoded(store: JobStore) -> None:
    """A terminal move writes exactly the documented fields; decode types them."""
    job_id = uuid.uuid4().hex
    now = time.time()
    store.create(job_id, REQUEST, batch_id="b1", now=now)
    store.transition(job_id, JobState.SUBMITTING, now=now, fields={"attempts": 1})
    store.transition(
        job_id,
        JobState.SUBMITTED,
        now=now + 1,
        fields={"prediction_id": "p1", "submitted_at": now + 1},
        expect_prediction_id="p1",
    )
    store.transition(
        job_id,
        JobState.COMPLETED,
        now=now + 3,
        fields={
            "finished_at": now + 3,
            "resolved_by": "webhook",
            "outputs": json.dumps(["https://cdn/x.jpg"]),
            "task_code": "",
        },
        expect_prediction_id="p1",
    )
    ((entry_id, raw),) = store.events()
    assert set(raw) == CONTRACT_FIELDS
    event = decode_event(entry_id, raw)
    assert (event.schema, event.type, event.job_id, event.batch_id, event.state) == (
        2,
        "job",
        job_id,
        "b1",
        "completed",
    )
    assert event.prediction_id == "p1" and event.outputs == ("https://cdn/x.jpg",)
    assert event.resolved_by == "webhook" and event.attempts == 1 and event.task_code is None
    assert event.latency_s == pytest.approx(3, abs=0.01)
    assert event.submitted_at == pytest.approx(now + 1)
    assert event.version == 4 and event.time == int(entry_id.split("-")[0]) / 1000
    assert json.loads(json.dumps(event.to_dict()))["outputs"] == ["https://cdn/x.jpg"]


def test_racing_terminal_moves_write_one_event(store: JobStore) -> None:
    """Many threads racing completed/failed/cancelled on one job: one move, one event."""
    job_id = uuid.uuid4().hex
    now = time.time()
    store.create(job_id, REQUEST, now=now)
    targets = [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED] * 6
    store.transition(job_id, JobState.SUBMITTING, now=now)
    barrier = threading.Barrier(len(targets))
    outcomes: list[str] = []

    def move(target: JobState) -> None:
        barrier.wait()
        outcomes.append(store.transition(job_id, target, now=time.time()).outcome)

    threads = [threading.Thread(target=move, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("applied") == 1
    assert [f["job_id"] for _, f in store.events()] == [job_id]


def test_crash_before_ack_redelivers_to_the_same_consumer(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """Read but not acked, then the process dies: the restarted consumer gets it again."""
    ids = [finish(store) for _ in range(3)]
    first = EventConsumer(redis_client, "g", "c1")
    got = first.read(count=2)
    assert [e.job_id for e in got] == ids[:2]
    first.ack(got[0].id)
    del first  # "crash": the second event was never acked

    restarted = EventConsumer(redis_client, "g", "c1")
    again = restarted.read(count=10)
    assert [e.job_id for e in again] == [ids[1]]  # the unacked one, first
    restarted.ack(*(e.id for e in again))
    assert [e.job_id for e in restarted.read(count=10)] == [ids[2]]


def test_acked_events_are_never_delivered_again(store: JobStore, redis_client: redis.Redis) -> None:
    """Once acked, an event comes back neither by read, restart, nor reclaim."""
    for _ in range(4):
        finish(store)
    consumer = EventConsumer(redis_client, "g", "c1")
    events = consumer.read(count=10)
    assert len(events) == 4 and consumer.pending_count() == 4
    assert consumer.ack(*(e.id for e in events)) == 4
    assert consumer.pending_count() == 0
    assert EventConsumer(redis_client, "g", "c1").read(count=10) == []
    assert EventConsumer(redis_client, "g", "c2").reclaim(min_idle_ms=0) == []
    new = finish(store)
    assert [e.job_id for e in consumer.read(count=10)] == [new]


def test_reclaim_takes_over_what_a_dead_consumer_left(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """XAUTOCLAIM hands a dead consumer's idle pending events to a live one."""
    ids = [finish(store) for _ in range(3)]
    dead = EventConsumer(redis_client, "g", "dead")
    assert len(dead.read(count=10)) == 3
    live = EventConsumer(redis_client, "g", "live")
    assert live.read(count=10) == []  # nothing new: all three are pending with `dead`
    assert live.reclaim(min_idle_ms=60_000) == []  # not idle long enough yet
    claimed = live.reclaim(min_idle_ms=0)
    assert sorted(e.job_id for e in claimed) == sorted(ids)
    live.ack(*(e.id for e in claimed))
    assert live.pending_count() == 0


def test_group_starts_where_told_and_groups_are_independent(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A new group at "$" sees only later events; another group still sees all."""
    old = finish(store)
    late = EventConsumer(redis_client, "late", "c", start="$")
    late.ensure_group()
    new = finish(store)
    assert [e.job_id for e in late.read()] == [new]
    assert [e.job_id for e in EventConsumer(redis_client, "all", "c").read()] == [old, new]


def test_batch_filter_in_a_group_acks_other_batches(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """A group filtered by batch returns that batch only and leaves nothing pending."""
    mine = [finish(store, batch_id="mine") for _ in range(2)]
    for _ in range(3):
        finish(store, batch_id="other")
    consumer = EventConsumer(redis_client, "g", "c", batch_id="mine")
    got = consumer.read(count=2)  # the first page holds only one of ours: it reads on
    got += consumer.read(count=10)
    assert [e.job_id for e in got] == mine
    consumer.ack(*(e.id for e in got))
    assert consumer.pending_count() == 0


def test_replay_from_an_id_or_a_time(store: JobStore, redis_client: redis.Redis) -> None:
    """Replay returns everything from an id (inclusive) or time, oldest first, by batch."""
    ids = [finish(store, batch_id="b" if i % 2 else "") for i in range(1200)]
    everything = list(replay(redis_client))
    assert [e.job_id for e in everything] == ids  # pages of 500 joined in order
    middle = everything[700]
    assert [e.job_id for e in replay(redis_client, middle.id)] == ids[700:]
    assert [e.job_id for e in replay(redis_client, "0-0", batch_id="b")] == ids[1::2]
    assert list(replay(redis_client, time_to_id(time.time() + 60))) == []
    assert len(list(replay(redis_client, parse_since("1h")))) == 1200


def test_follow_yields_retained_then_new_events(store: JobStore, redis_client: redis.Redis) -> None:
    """follow() replays from `since`, then blocks for events written later."""
    first = finish(store)
    seen: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        for event in follow(redis_client, "0-0", block_ms=100, stop=stop.is_set):
            seen.append(event.job_id)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        second = finish(store)
        deadline = time.monotonic() + 10
        while seen != [first, second] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [first, second]
    finally:
        stop.set()
        thread.join(timeout=5)


def test_parse_since_forms() -> None:
    """--since accepts ids, durations, unix seconds, ISO times, beginning and now."""
    now = 1_700_000_000.0
    assert parse_since("1712345678901-3", now=now) == "1712345678901-3"
    assert parse_since("1712345678901", now=now) == "1712345678901-0"
    assert parse_since("beginning", now=now) == "0-0"
    assert parse_since("now", now=now) == "$"
    assert parse_since("15m", now=now) == f"{int((now - 900) * 1000)}-0"
    assert parse_since("1700000000.5", now=now) == "1700000000500-0"
    assert parse_since("2023-11-14T22:13:20Z", now=now) == "1700000000000-0"
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday-ish", now=now)


def test_trimmed_pending_entries_are_dropped(store: JobStore, redis_client: redis.Redis) -> None:
    """A pending event trimmed from the stream is skipped, not returned empty."""
    ids = [finish(store) for _ in range(3)]
    consumer = EventConsumer(redis_client, "g", "c")
    got = consumer.read(count=3)
    redis_client.xdel(keys.EVENTS, got[0].id)
    again = EventConsumer(redis_client, "g", "c").read(count=10)
    assert [e.job_id for e in again] == ids[1:]


@pytest.fixture
def kq_env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KQ_REDIS_URL", redis_url)
    monkeypatch.setenv("KQ_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("KQ_WEBHOOK_PUBLIC_URL", raising=False)


@pytest.mark.usefixtures("kq_env")
def test_kq_events_group_acks_as_it_prints(
    store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kq events --group`: stopped half-way and restarted, each event is printed once."""
    ids = [finish(store, batch_id="b") for _ in range(6)]
    argv = ["events", "--group", "g", "--consumer", "c", "--json"]
    assert kq_main([*argv, "--count", "4"]) == 0
    first = [json.loads(line)["job_id"] for line in capsys.readouterr().out.splitlines()]
    assert kq_main(argv) == 0
    second = [json.loads(line)["job_id"] for line in capsys.readouterr().out.splitlines()]
    assert first + second == ids
    assert kq_main(argv) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.usefixtures("kq_env")
def test_kq_events_replay_by_batch_and_text(
    store: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kq events --since --batch` replays one batch; the text form names job and state."""
    finish(store, batch_id="a")
    wanted = finish(store, batch_id="b", state=JobState.CANCELLED)
    assert kq_main(["events", "--since", "beginning", "--batch", "b"]) == 0
    out = capsys.readouterr().out
    assert wanted in out and "cancelled" in out and out.count("\n") == 1
    assert kq_main(["events", "--since", "nonsense"]) == 2
    assert "--since" in capsys.readouterr().err


class _Lines:
    """Collects a subprocess's stdout lines in a thread, so waits can have deadlines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.proc = proc
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, n: int) -> list[str]:
        deadline = time.monotonic() + 20
        while len(self.lines) < n:
            assert self.proc.poll() is None, "the consumer exited early"
            assert time.monotonic() < deadline, f"{len(self.lines)} of {n} lines"
            time.sleep(0.05)
        return self.lines


def test_kq_events_follow_consumer_killed_and_restarted_half_way(
    store: JobStore, redis_url: str, tmp_path: Path
) -> None:
    """A `--follow` group consumer stopped by SIGTERM half-way and restarted prints
    every job's event exactly once across both runs."""
    env = {**os.environ, "KQ_REDIS_URL": redis_url, "KQ_VAR_DIR": str(tmp_path)}
    argv = [sys.executable, "-m", "kq.cli", "events", "--group", "g", "--consumer", "c"]
    argv += ["--follow", "--json"]
    seen: list[str] = []
    ids: list[str] = []
    for _ in range(2):
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as proc:
            lines = _Lines(proc)
            try:
                new = [finish(store) for _ in range(5)]  # half of them while it runs
                ids += new
                lines.wait_for(len(new))
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0  # a clean stop between two events
                lines.thread.join(5)
        seen += [json.loads(line)["job_id"] for line in lines.lines]
    assert seen == ids


def test_every_type_decodes_into_its_own_class_and_old_entries_are_jobs() -> None:
    from worker.events import ChainEvent, OutputsEvent, decode_any

    old = decode_any("1-0", {"schema": "1", "job_id": "j", "state": "completed"})
    assert isinstance(old, ResultEvent) and old.type == "job" and old.schema == 1
    chain = decode_any(
        "2-0",
        {
            "schema": "2",
            "type": "chain",
            "chain_id": "c",
            "state": "failed",
            "run": "2",
            "steps": "3",
            "branches": "1",
            "outputs": "[]",
            "results": '[{"branch": "1", "state": "failed", "step": 2}]',
            "failed_step": "2",
        },
    )
    assert isinstance(chain, ChainEvent) and (chain.run, chain.failed_step) == (2, 2)
    assert chain.results[0]["step"] == 2 and chain.to_dict()["outputs"] == []
    stored = '[{"uri": "file:///o/a.png", "size": 5, "sha256": "ab"}]'
    outputs = decode_any(
        "3-0",
        {"schema": "2", "type": "outputs", "job_id": "j", "state": "stored", "stored": stored},
    )
    assert isinstance(outputs, OutputsEvent) and outputs.stored[0].size == 5
    assert outputs.to_dict()["stored"][0]["uri"] == "file:///o/a.png"
