"""Chains of edits: validation, and the whole stack (real Redis, worker, receiver,
simulator) running chains, checked against the simulator's ground truth."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kq.stack import Stack
from tests.conftest import wait_for
from tests.support import fast_stack
from worker import runtime
from worker.celery_app import configure
from worker.chains import MAX_BRANCHES, PREVIOUS_OUTPUT, chain_from_dict, step_job_id
from worker.errors import ValidationError
from worker.events import ChainEvent, ResultEvent, replay
from worker.producer import Producer
from worker.settings import Settings

IMAGE = "https://example.com/source.jpg"


def chain(*prompts: str, **extra: Any) -> dict[str, Any]:
    return {"image": IMAGE, "steps": [{"prompt": p} for p in prompts], **extra}


# --- validation (pure) -----------------------------------------------------------------


def test_a_chain_is_validated_whole_naming_each_field() -> None:
    bad = {
        "image": IMAGE,
        "prompt": "x",
        "steps": [
            {"prompt": "ok"},
            {"prompt": "", "seed": "7"},
            {"prompt": "fan", "variants": [{"seed": 1}]},
            {"prompt": "z", "colour": "red"},
        ],
    }
    with pytest.raises(ValidationError) as caught:
        chain_from_dict(bad)
    fields = {e.field for e in caught.value.errors}
    assert {"prompt", "steps[1].prompt", "steps[1].seed", "steps[2].variants"} <= fields
    assert "steps[3].colour" in fields
    with pytest.raises(ValidationError) as caught:
        chain_from_dict({"steps": [{"prompt": "a"}]})
    assert [e.field for e in caught.value.errors] == ["image"]
    with pytest.raises(ValidationError) as caught:
        chain_from_dict({"image": IMAGE, "steps": []})
    assert [e.field for e in caught.value.errors] == ["steps"]
    fans = [{"prompt": "p", "variants": [{"seed": i} for i in range(5)]}] * 2
    with pytest.raises(ValidationError) as caught:
        chain_from_dict({"image": IMAGE, "steps": fans})
    assert any(f"at most {MAX_BRANCHES}" in e.message for e in caught.value.errors)


def test_chain_defaults_step_overrides_and_price() -> None:
    item = chain_from_dict(
        {
            "image": IMAGE,
            "seed": 5,
            "steps": [
                {"prompt": "a"},
                {"prompt": "b", "variants": [{"seed": 1}, {"seed": 2, "prompt": "c"}]},
                {"prompt": "d", "model": "wavespeed-ai/flux-kontext-pro", "seed": None},
            ],
        }
    )
    assert item.branches == 2
    assert [v.request.seed for v in item.steps[1]] == [1, 2]
    assert [v.request.prompt for v in item.steps[1]] == ["b", "c"]
    assert item.steps[0][0].request.seed == 5
    # 1 max + 2 max + 2 pro (one per branch).
    expected = 80_000 + 2 * 80_000 + 2 * item.steps[2][0].request.price_micros
    assert item.price_micros == expected
    templates = json.loads(item.steps_json())
    assert json.loads(templates[1][0]["request"])["image"] == PREVIOUS_OUTPUT
    assert json.loads(templates[0][0]["request"])["image"] == IMAGE
    # Same key, same chain id and step ids: re-enqueueing writes nothing twice.
    again = chain_from_dict({"image": IMAGE, "steps": [{"prompt": "a"}], "idempotency_key": "k"})
    twin = chain_from_dict({"image": IMAGE, "steps": [{"prompt": "a"}], "idempotency_key": "k"})
    assert again.chain_id == twin.chain_id
    assert again.first_jobs()[0][0] == step_job_id(again.chain_id, "1", 1)


# --- the real stack --------------------------------------------------------------------


class Harness:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.producer: Producer = runtime.make_producer(self.settings)
        self.store = self.producer.store
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)

    def close(self) -> None:
        # The simulator keeps connections alive: close them here, not in the GC.
        self.sim.close()
        self.producer.close()

    def tasks_by_job(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for task in self.sim.get("/_sim/tasks").json()["tasks"]:
            hook = str(task.get("webhook") or "")
            if "job=" in hook:
                out.setdefault(hook.split("job=")[1].split("&")[0], []).append(task)
        return out

    def wait_chain(self, chain_id: str, timeout_s: float = 60) -> Any:
        def ended() -> Any:
            found = self.producer.get_chain(chain_id)
            return found if found is not None and found.terminal else None

        return wait_for(ended, timeout_s=timeout_s, interval_s=0.2)

    def events(self) -> list[Any]:
        return list(replay(self.store.redis))

    def chain_events(self, chain_id: str) -> list[ChainEvent]:
        return [e for e in self.events() if isinstance(e, ChainEvent) and e.chain_id == chain_id]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with fast_stack(tmp_path_factory.mktemp("chains"), seed=5) as stack:
        harness = Harness(stack)
        yield harness
        harness.close()


@pytest.fixture
def h(shared: Harness) -> Harness:
    # Celery's app is process-wide: a test with a stack of its own re-pointed it.
    configure(shared.settings)
    return shared


def test_three_step_chain_feeds_each_output_into_the_next_step(h: Harness) -> None:
    write = h.producer.enqueue_chain(chain("night", "snow", "oil painting"))
    done = h.wait_chain(write.chain_id)
    assert done.state == "completed" and len(done.job_ids) == 3
    jobs = h.store.get_many(done.job_ids)
    assert [j.step for j in jobs if j] == [1, 2, 3]
    tasks = h.tasks_by_job()
    # Ground truth: one paid task per step, each step's input the previous step's output.
    per_step = [tasks[j] for j in done.job_ids]
    assert all(len(t) == 1 for t in per_step), per_step
    assert per_step[0][0]["params"]["image"] == IMAGE
    for before, after in itertools.pairwise(per_step):
        assert after[0]["params"]["image"] == before[0]["outputs"][0]
    assert [t[0]["params"]["prompt"] for t in per_step] == ["night", "snow", "oil painting"]
    # One terminal event per step (with its place in the chain), one chain event.
    step_events = [
        e for e in h.events() if isinstance(e, ResultEvent) and e.chain_id == write.chain_id
    ]
    assert sorted((e.step, e.job_id) for e in step_events) == [
        (n, j) for n, j in enumerate(done.job_ids, start=1)
    ]
    (event,) = h.chain_events(write.chain_id)
    assert event.state == "completed" and event.steps == 3 and event.run == 1
    assert list(event.outputs) == per_step[2][0]["outputs"]


def test_fan_out_makes_one_branch_per_variant(h: Harness) -> None:
    spec = {
        "image": IMAGE,
        "steps": [
            {"prompt": "a"},
            {"prompt": "b", "variants": [{"seed": 1}, {"seed": 2}, {"seed": 3}]},
            {"prompt": "c"},
        ],
    }
    write = h.producer.enqueue_chain(spec)
    done = h.wait_chain(write.chain_id)
    assert done.state == "completed" and len(done.job_ids) == 1 + 3 + 3
    assert sorted(e.branch for e in done.ends) == ["1.1", "1.2", "1.3"]
    (event,) = h.chain_events(write.chain_id)
    assert event.branches == 3 and len(event.outputs) == 3
    tasks = h.tasks_by_job()
    assert all(len(tasks[j]) == 1 for j in done.job_ids)


def test_failed_step_stops_its_branch_and_retry_resumes_the_chain(h: Harness) -> None:
    h.sim.post("/_sim/config", json={"fail_rate": 1.0}).raise_for_status()
    try:
        write = h.producer.enqueue_chain(chain("one", "two"))
        failed = h.wait_chain(write.chain_id)
    finally:
        h.sim.post("/_sim/config", json={"fail_rate": 0.0}).raise_for_status()
    assert failed.state == "failed" and len(failed.job_ids) == 1
    (first,) = h.chain_events(write.chain_id)
    assert first.failed_step == 1 and first.reason
    new_ids = h.producer.redrive([failed.job_ids[0]])
    assert list(new_ids) == [failed.job_ids[0]]
    done = wait_for(
        lambda: (c := h.producer.get_chain(write.chain_id)) and c.run == 2 and c.terminal and c,
        timeout_s=60,
        interval_s=0.2,
    )
    assert done.state == "completed" and len(done.job_ids) == 3
    events = h.chain_events(write.chain_id)
    assert [(e.run, e.state) for e in events] == [(1, "failed"), (2, "completed")]
    # Retrying again changes nothing: the same new job, nothing written twice.
    assert h.producer.redrive([failed.job_ids[0]]) == new_ids
    assert len(h.producer.get_chain(write.chain_id).job_ids) == 3  # type: ignore[union-attr]


def test_cancelling_a_chain_stops_it_with_one_event(h: Harness) -> None:
    h.sim.post("/_sim/config", json={"inference_time_s": 3.0}).raise_for_status()
    try:
        write = h.producer.enqueue_chain(chain("a", "b", "c"))
        assert h.producer.cancel_chain(write.chain_id) >= 1
        done = h.wait_chain(write.chain_id)
    finally:
        h.sim.post("/_sim/config", json={"inference_time_s": 0.2}).raise_for_status()
    assert done.state == "cancelled" and len(done.job_ids) == 1
    (event,) = h.chain_events(write.chain_id)
    assert event.state == "cancelled"
    assert h.producer.cancel_chain(write.chain_id) == 0


def test_kill_9_mid_batch_loses_no_chain_and_pays_no_step_twice(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    """50 chains of 3 steps; the worker is SIGKILLed twice while they run."""
    var: Path = tmp_path_factory.mktemp("chain-kill")
    # A submit cut by the kill is known for what it is within seconds, not minutes.
    quick = {"KQ_HTTP_TIMEOUT_S": "3", "KQ_AMBIGUOUS_GRACE_S": "3"}
    with fast_stack(var, seed=9, worker_concurrency=4, extra_env=quick) as stack:
        hh = Harness(stack)
        request.addfinalizer(hh.close)
        # Three steps of 1.5 s each: the kills land while chains are mid-way.
        hh.sim.post("/_sim/config", json={"inference_time_s": 1.5}).raise_for_status()
        items = [chain_from_dict(chain(f"s1-{n}", f"s2-{n}", f"s3-{n}")) for n in range(50)]
        receipt = hh.producer.enqueue_batch(items, batch_id="chains50", keep_job_ids=True)
        chain_ids = [item.chain_id for item in items]
        assert list(receipt.job_ids or ()) == [item.first_jobs()[0][0] for item in items]
        unfinished_at_kill = []
        for pause in (1.0, 2.0):
            time.sleep(pause)
            chains_now = [hh.producer.get_chain(c) for c in chain_ids]
            unfinished_at_kill.append(sum(1 for c in chains_now if c and not c.terminal))
            stack.kill("worker", signal.SIGKILL)
            time.sleep(0.5)
            stack.restart("worker")

        assert unfinished_at_kill[0] > 0, "the kill came after the work: it proves nothing"

        def all_ended() -> bool:
            chains = [hh.producer.get_chain(c) for c in chain_ids]
            return all(c is not None and c.terminal for c in chains)

        wait_for(all_ended, timeout_s=240, interval_s=0.5)
        chains = [hh.producer.get_chain(c) for c in chain_ids]
        assert all(c is not None and c.state == "completed" for c in chains)
        tasks = hh.tasks_by_job()
        step_jobs = [j for c in chains if c for j in c.job_ids]
        assert len(step_jobs) == 150 == len(set(step_jobs))
        paid = {j: len(tasks.get(j, [])) for j in step_jobs}
        assert all(n == 1 for n in paid.values()), {j: n for j, n in paid.items() if n != 1}
        assert not set(tasks) - set(step_jobs)  # no task for a job outside the chains
        events = hh.events()
        chain_events = [e for e in events if isinstance(e, ChainEvent)]
        assert sorted(e.chain_id for e in chain_events) == sorted(chain_ids)
        job_events = [e.job_id for e in events if isinstance(e, ResultEvent)]
        assert sorted(job_events) == sorted(step_jobs)


def test_the_dashboard_lookup_of_a_step_shows_its_chain(h: Harness) -> None:
    from ops_dashboard.views import job_view

    write = h.producer.enqueue_chain(chain("first", "second"))
    done = h.wait_chain(write.chain_id)
    view = job_view(h.store.redis, done.job_ids[1])
    assert view is not None and view["job"]["step"] == 2
    assert view["chain"]["id"] == write.chain_id and view["chain"]["state"] == "completed"
    assert [j["job_id"] for j in view["chain"]["jobs"]] == list(done.job_ids)
    assert view["event"]["chain_id"] == write.chain_id and view["event"]["step"] == 2


def test_the_receiver_sends_the_next_step_itself(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With the poller's sweep 60 s apart, a chain of three finishes in seconds only if the
    receiver, having completed a step, sends the step it wrote."""
    slow_sweep = {"KQ_SWEEP_INTERVAL_S": "60"}
    with fast_stack(tmp_path, seed=3, extra_env=slow_sweep) as stack:
        hh = Harness(stack)
        request.addfinalizer(hh.close)
        started = time.monotonic()
        write = hh.producer.enqueue_chain(chain("a", "b", "c"))
        done = hh.wait_chain(write.chain_id, timeout_s=50)
        assert done.state == "completed" and len(done.job_ids) == 3
        assert time.monotonic() - started < 50
        jobs = hh.store.get_many(done.job_ids)
        assert all(j is not None and j.resolved_by == "webhook" for j in jobs)


def test_a_multi_image_step_gets_the_previous_output_first(h: Harness) -> None:
    """A later step on a /multi model takes `images`: the previous output, then its own."""
    reference = "https://example.com/reference.jpg"
    spec = {
        "image": IMAGE,
        "steps": [
            {"prompt": "make it night", "model": "wavespeed-ai/flux-kontext-pro"},
            {
                "prompt": "put the style of the second image on the first",
                "model": "wavespeed-ai/flux-kontext-max/multi",
                "images": [reference],
            },
        ],
    }
    write = h.producer.enqueue_chain(spec)
    done = h.wait_chain(write.chain_id)
    assert done.state == "completed"
    tasks = h.tasks_by_job()
    first, second = (tasks[j][0] for j in done.job_ids)
    assert first["model"] == "wavespeed-ai/flux-kontext-pro"
    assert second["model"] == "wavespeed-ai/flux-kontext-max/multi"
    assert second["params"]["images"] == [first["outputs"][0], reference]


def test_batch_files_take_chain_lines_and_csv_says_to_use_jsonl(tmp_path: Path) -> None:
    from worker.batchfile import BatchFile
    from worker.chains import ChainItem

    lines = [
        json.dumps({"prompt": "plain", "image": IMAGE}),
        json.dumps(chain("a", "b")),
        json.dumps({"image": IMAGE, "steps": [{"prompt": "x", "seed": "nope"}]}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with BatchFile(str(path)) as batch:
        scan = batch.scan()
        assert (scan.valid, scan.invalid) == (2, 1)
        assert [e.field for e in scan.errors[0].errors] == ["steps[0].seed"]
        items = list(batch.items("b1"))
    assert isinstance(items[1], ChainItem) and len(items[1].steps) == 2
    # The same line always makes the same chain (a re-run resumes it).
    with BatchFile(str(path)) as batch:
        again = list(batch.items("b1"))
    assert isinstance(again[1], ChainItem) and again[1].chain_id == items[1].chain_id

    csv_path = tmp_path / "chains.csv"
    csv_path.write_text("prompt,image,steps\nx,https://example.com/a.jpg,[]\n")
    with BatchFile(str(csv_path)) as batch, pytest.raises(ValidationError) as caught:
        batch.scan()
    assert "JSONL" in str(caught.value)
