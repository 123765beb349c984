"""Models as data: the Kontext family's registry, validation and price per model, the stored
request JSON (old records included), the inputs that name a model, and one run through the
real stack checked against the simulator's ground truth."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.support import Clock, fast_stack
from wavespeed_sim.app import create_app
from wavespeed_sim.config import SimConfig
from wavespeed_sim.engine import Simulator
from wavespeed_sim.params import SIM_MODELS, ParamError, price_of, validate_submit
from wavespeed_sim.server import SimServer
from worker import runtime
from worker.batchfile import BatchFile
from worker.celery_app import configure
from worker.domain import MODEL, PRICE_PER_IMAGE_MICROS, EditRequest, Job, JobState
from worker.errors import ValidationError
from worker.items import Item, item_from_dict
from worker.models import (
    DEFAULT_MODEL,
    MAX,
    MAX_MULTI,
    MODELS,
    PRO,
    PRO_MULTI,
    average_price_micros,
)
from worker.poller import sweep
from worker.service import Deps, SubmitOutcome, submit_job
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient

A = "https://example.com/a.jpg"
B = "https://example.com/b.jpg"


def make(model: str, **extra: Any) -> EditRequest:
    """A minimal valid request for `model`, with `extra` fields on top."""
    spec = MODELS[model]
    source: dict[str, Any] = {"images": [A, B]} if spec.multi else {"image": A}
    return EditRequest.from_dict({"prompt": "p", "model": model, **source, **extra})


def refused(data: dict[str, Any]) -> dict[str, str]:
    """The field errors of a refused request, as {field: message}."""
    with pytest.raises(ValidationError) as exc:
        EditRequest.from_dict(data)
    return {e.field: e.message for e in exc.value.errors}


# --- the registry ------------------------------------------------------------------------


def test_registry_holds_the_family_with_max_as_default() -> None:
    """The four Kontext models are registered; the default is today's max, at $0.08."""
    assert set(MODELS) == {
        "wavespeed-ai/flux-kontext-max",
        "wavespeed-ai/flux-kontext-max/multi",
        "wavespeed-ai/flux-kontext-pro",
        "wavespeed-ai/flux-kontext-pro/multi",
    }
    assert DEFAULT_MODEL is MAX and MAX.path == MODEL
    assert PRICE_PER_IMAGE_MICROS == MAX.price_micros == 80_000


@pytest.mark.parametrize(
    ("model", "price", "params"),
    [
        (MAX, 80_000, ("prompt", "image", "seed", "guidance_scale", "aspect_ratio")),
        (MAX_MULTI, 80_000, ("prompt", "images", "guidance_scale", "aspect_ratio")),
        (PRO, 40_000, ("prompt", "image", "guidance_scale")),
        (PRO_MULTI, 40_000, ("prompt", "images", "seed", "guidance_scale", "aspect_ratio")),
    ],
)
def test_price_and_params_per_model(model: Any, price: int, params: tuple[str, ...]) -> None:
    """Each model has its own price (integer micro-dollars) and parameter list; a request
    is priced at its model's price and its submit body holds only that model's parameters."""
    assert model.price_micros == price
    assert model.params == params
    request = make(model.path)
    assert request.price_micros == price
    assert set(request.submit_body()) <= set(params)
    assert "model" not in request.submit_body()


def test_simulator_table_mirrors_the_provider_like_the_registry() -> None:
    """The simulator keeps its own table (it imports nothing of ours); today both tables
    describe the provider alike: same paths, prices and image limits."""
    assert set(SIM_MODELS) == set(MODELS)
    for path, sim in SIM_MODELS.items():
        ours = MODELS[path]
        assert round(price_of(path, 0.08) * 1_000_000) == ours.price_micros
        assert (sim.max_images, sim.seed, sim.aspect_ratio) == (
            ours.max_images,
            ours.seed,
            ours.aspect_ratio,
        )
        assert sim.guidance_max == ours.guidance_max


# --- validation per model ----------------------------------------------------------------


def test_unknown_model_names_the_known_ones() -> None:
    """An unknown model is refused on `model`, listing every registered path."""
    errors = refused({"prompt": "p", "image": A, "model": "wavespeed-ai/flux-kontext-dev"})
    assert set(errors) == {"model"}
    assert "flux-kontext-dev" in errors["model"]
    for path in MODELS:
        assert path in errors["model"]
    assert set(refused({"prompt": "p", "image": A, "model": 7})) == {"model"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # A single-image model refuses `images` and says which models take several.
        (
            {"model": PRO.path, "image": A, "images": [A]},
            {"images": "multi-image model (wavespeed-ai/flux-kontext-max/multi"},
        ),
        # A multi model refuses `image` and requires `images`.
        (
            {"model": MAX_MULTI.path, "image": A},
            {"image": "give the source images as `images`", "images": "1 to 5 image URLs"},
        ),
        ({"model": PRO_MULTI.path, "images": []}, {"images": "1 to 5 http(s) URLs"}),
        ({"model": PRO_MULTI.path, "images": [A] * 6}, {"images": "got 6 URLs"}),
        ({"model": PRO_MULTI.path, "images": [A, "ftp://x/y"]}, {"images": "item 1:"}),
        ({"model": PRO_MULTI.path, "images": A}, {"images": "got a string"}),
        # max/multi has no seed; pro has neither seed nor aspect_ratio, and guidance <= 10.
        ({"model": MAX_MULTI.path, "images": [A], "seed": 1}, {"seed": "not taken by"}),
        (
            {"model": PRO.path, "image": A, "seed": 1, "aspect_ratio": "1:1"},
            {"seed": "it takes prompt, image, guidance_scale", "aspect_ratio": "not taken"},
        ),
        (
            {"model": PRO.path, "image": A, "guidance_scale": 12},
            {"guidance_scale": "from 1.0 to 10.0 for wavespeed-ai/flux-kontext-pro, got 12"},
        ),
        ({"model": PRO_MULTI.path, "images": [A], "seed": -2}, {"seed": "-1 to 2147483647"}),
        ({"model": MAX.path, "image": A, "guidance_scale": 20.5}, {"guidance_scale": "20.0"}),
    ],
)
def test_each_model_refuses_by_field_with_what_is_expected(
    data: dict[str, Any], expected: dict[str, str]
) -> None:
    """Every refusal names the field and what that model expects there."""
    errors = refused({"prompt": "p", **data})
    assert set(errors) == set(expected), errors
    for field, text in expected.items():
        assert text in errors[field], (field, errors[field])


def test_limits_per_model_are_inclusive() -> None:
    """Each model's own limits are accepted at their edges."""
    make(PRO.path, guidance_scale=10.0)
    make(MAX.path, guidance_scale=20.0, seed=2_147_483_647, aspect_ratio="21:9")
    make(PRO_MULTI.path, seed=-1, images=[A] * 5)
    make(MAX_MULTI.path, images=[A], guidance_scale=1.0, aspect_ratio="9:21")


# --- stored JSON ------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_request_json_round_trips_for_every_model(model: str) -> None:
    """to_dict -> from_dict gives the same request; `model` is stored unless default."""
    request = make(model, guidance_scale=2.5)
    stored = json.loads(json.dumps(request.to_dict()))
    assert EditRequest.from_dict(stored) == request
    assert ("model" in stored) == (model != MODEL)
    assert request.to_payload() == request.to_dict()  # the name JobStore writes with


def test_old_request_json_without_model_reads_as_max() -> None:
    """A job stored before models existed (no `model`) is a Kontext [max] edit, unchanged."""
    old = {"prompt": "make it blue", "image": A, "seed": 5, "aspect_ratio": "16:9"}
    request = EditRequest.from_dict(old)
    assert request.model == MODEL and request.price_micros == 80_000
    assert request.to_dict() == old and request.submit_body() == old
    # null means the same as absent, as for every optional field.
    assert EditRequest.from_dict({**old, "model": None}) == request


def test_multi_request_keeps_images_as_a_tuple_and_sends_a_list() -> None:
    """`images` is a tuple on the request (hashable), an array on the wire."""
    request = EditRequest(prompt="p", model=PRO_MULTI.path, images=[A, B])  # type: ignore[arg-type]
    assert request.images == (A, B) and request.inputs == (A, B)
    assert request.submit_body() == {"prompt": "p", "images": [A, B]}
    assert hash(request) == hash(make(PRO_MULTI.path))


# --- inputs: JSONL, CSV, the Python API --------------------------------------------------


def test_jsonl_item_with_model_and_images() -> None:
    """A batch item (JSONL line, API body) names `model` and `images`; errors are by field."""
    item = item_from_dict({"prompt": "p", "model": PRO_MULTI.path, "images": [A, B], "seed": 3})
    assert item.request.images == (A, B) and item.request.price_micros == 40_000
    with pytest.raises(ValidationError) as exc:
        item_from_dict({"prompt": "p", "model": MAX_MULTI.path, "images": [A, "https://a b/"]})
    assert {e.field for e in exc.value.errors} == {"images"}
    with pytest.raises(ValidationError) as exc:
        item_from_dict({"model": MAX_MULTI.path})
    assert {e.field for e in exc.value.errors} == {"prompt", "images"}


def test_csv_model_column_and_space_separated_images(tmp_path: Path) -> None:
    """CSV takes a `model` column, and an `images` cell of URLs separated by spaces."""
    path = tmp_path / "edits.csv"
    path.write_text(
        "prompt,image,images,model\n"
        f"one,{A},,\n"
        f'two,,"{A} {B}",{PRO_MULTI.path}\n'
        f"three,{A},,{PRO.path}\n"
    )
    batch = BatchFile(str(path))
    scan = batch.scan()
    assert not scan.errors, scan.errors
    requests = [item.request for item in batch.items("b") if isinstance(item, Item)]
    assert len(requests) == 3
    assert [r.model for r in requests] == [MODEL, PRO_MULTI.path, PRO.path]
    assert requests[1].images == (A, B)


def test_csv_refuses_a_bad_images_cell_by_field(tmp_path: Path) -> None:
    """A CSV line with too many images is refused naming `images`, like a JSONL line."""
    path = tmp_path / "bad.csv"
    path.write_text(f'prompt,images,model\nx,"{" ".join([A] * 6)}",{MAX_MULTI.path}\n')
    scan = BatchFile(str(path)).scan()
    assert [e.field for e in scan.errors[0].errors] == ["images"]


def test_mean_price_for_cost() -> None:
    """Cost uses the mean price of priced jobs; nothing priced means the default price."""
    assert average_price_micros(0, 0) == 80_000
    assert average_price_micros(3, 120_000) == 40_000
    assert average_price_micros(2, 120_000) == 60_000


# --- the simulator's validation per model ------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body", "field"),
    [
        (PRO.path, {"prompt": "p", "image": A, "guidance_scale": 10.5}, "guidance_scale"),
        (PRO_MULTI.path, {"prompt": "p", "images": [A] * 6}, "images"),
        (PRO_MULTI.path, {"prompt": "p", "images": [A], "seed": 2**31}, "seed"),
        (PRO_MULTI.path, {"prompt": "p", "image": A}, "images"),
        (PRO.path, {"prompt": "p", "images": [A]}, "image"),
    ],
)
def test_simulator_refuses_like_the_provider(model: str, body: dict[str, Any], field: str) -> None:
    """The simulator's 400 names the field, per model (its own table)."""
    with pytest.raises(ParamError) as exc:
        validate_submit(model, body)
    assert exc.value.field == field and str(exc.value).startswith(f"{field}: ")


def test_simulator_drops_what_a_model_does_not_read() -> None:
    """Like any unknown field, a parameter the model does not read is not kept."""
    params = validate_submit(
        PRO.path, {"prompt": "p", "image": A, "seed": 4, "aspect_ratio": "1:1"}
    )
    assert params == {"prompt": "p", "image": A}


@pytest.fixture
def sim_http() -> Iterator[Any]:
    """The simulator's Flask app on its engine, through Flask's test client."""
    sim = Simulator(SimConfig(inference_time_s=0.05, queue_delay_s=0.0).resolved())
    sim.start()
    try:
        yield create_app(sim).test_client()
    finally:
        sim.stop()


def test_simulator_serves_every_model_path(sim_http: Any) -> None:
    """Each registered path answers like max's: a 400 envelope naming the field, a created
    prediction of that model, GET, the list's `model` filter, delete; ground truth records
    the model, the input images and the price."""
    auth = {"Authorization": "Bearer k"}
    ids: dict[str, str] = {}
    for path, spec in SIM_MODELS.items():
        source: dict[str, Any] = {"images": [A, B]} if spec.max_images else {"image": A}
        bad = sim_http.post(
            f"/api/v3/{path}", json={"prompt": "p", **source, "guidance_scale": 99}, headers=auth
        )
        assert bad.status_code == 400 and bad.json["data"] is None
        assert bad.json["message"].startswith("guidance_scale: ")
        created = sim_http.post(f"/api/v3/{path}", json={"prompt": "p", **source}, headers=auth)
        assert created.status_code == 200, created.json
        assert created.json["data"]["model"] == path and created.json["data"]["status"] == "created"
        ids[path] = created.json["data"]["id"]
    for path, task_id in ids.items():
        got = sim_http.get(f"/api/v3/predictions/{task_id}/result", headers=auth)
        assert got.json["data"]["model"] == path
        listed = sim_http.post("/api/v3/predictions", json={"model": path}, headers=auth)
        assert [i["id"] for i in listed.json["data"]["items"]] == [task_id]
        truth = sim_http.get(f"/_sim/tasks/{task_id}").json
        assert truth["model"] == path
        assert truth["inputs"] == ([A, B] if SIM_MODELS[path].max_images else [A])
        assert truth["charged_micros"] == MODELS[path].price_micros
    deleted = sim_http.post(
        "/api/v3/predictions/delete", json={"ids": list(ids.values())}, headers=auth
    )
    assert deleted.json["data"]["deleted_count"] == len(ids)


@pytest.fixture
def deps(sim: SimServer, store: JobStore, settings: Settings) -> Iterator[Deps]:
    httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
    client = WaveSpeedClient(sim.url, "sim-key", timeout_s=5)
    yield Deps(
        store=store,
        provider=client,
        settings=replace(settings, wavespeed_base_url=sim.url, job_deadline_s=600),
        clock=Clock(),
        enqueue_submit=lambda job_id: None,
    )
    client.close()


def test_ambiguous_submit_is_reconciled_among_its_own_models_tasks(
    deps: Deps, sim: SimServer, store: JobStore, request: pytest.FixtureRequest
) -> None:
    """A pro/multi submit whose answer is lost is adopted from the list call filtered by
    its model: an unowned [max] task in the same window is not a candidate."""
    control = httpx.Client(base_url=sim.url, timeout=10)
    request.addfinalizer(control.close)
    control.post("/_sim/config", json={"ambiguous_submit_rate": 1.0}).raise_for_status()
    assert store.create("job-multi", make(PRO_MULTI.path), now=time.time())
    assert submit_job(deps, "job-multi").outcome is SubmitOutcome.AMBIGUOUS
    control.post("/_sim/config", json={"ambiguous_submit_rate": 0.0}).raise_for_status()
    other = control.post(
        f"/api/v3/{MAX.path}",
        json={"prompt": "someone else's", "image": A},
        headers={"Authorization": "Bearer sim-key"},
    )
    assert other.status_code == 200
    assert isinstance(deps.clock, Clock)
    deps.clock.advance(15)
    sweep(deps)
    tasks = control.get("/_sim/tasks").json()["tasks"]
    (mine,) = [t for t in tasks if t["model"] == PRO_MULTI.path]
    job = store.get("job-multi")
    assert job is not None and job.prediction_id == mine["id"]
    assert job.state in (JobState.SUBMITTED, JobState.COMPLETED)
    control.close()


# --- through the real stack ---------------------------------------------------------------


class Harness:
    def __init__(self, stack: Any) -> None:
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store = runtime.make_store(self.settings)
        self.producer = runtime.make_producer(self.settings)
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)

    def task_for(self, job_id: str) -> dict[str, Any]:
        tasks = self.sim.get("/_sim/tasks").json()
        tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
        (task,) = [t for t in tasks if f"job={job_id}" in (t.get("webhook") or "")]
        return dict(task)

    def wait_all(self, job_ids: tuple[str, ...] | None, timeout_s: float = 40) -> list[Job]:
        assert job_ids is not None

        def done() -> list[Job] | None:
            jobs = [self.store.get(j) for j in job_ids]
            if all(j is not None and j.terminal for j in jobs):
                return [j for j in jobs if j is not None]
            return None

        jobs: list[Job] = wait_for(done, timeout_s=timeout_s, interval_s=0.1)
        return jobs


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with fast_stack(tmp_path_factory.mktemp("models"), seed=23) as stack:
        harness = Harness(stack)
        yield harness
        # The simulator keeps connections alive: close them here, not in the GC.
        harness.sim.close()
        harness.producer.close()


@pytest.mark.integration
def test_pro_and_pro_multi_edits_complete_at_their_price(harness: Harness) -> None:
    """A pro/multi edit of 2 images and a pro edit complete; the simulator saw each at its
    model's path with only that model's parameters and its own images, and charged $0.04
    each. Their batch budget of $0.08 holds both (at max's price it would hold one)."""
    h = harness
    receipt = h.producer.enqueue_batch(
        [
            {
                "prompt": "the two, side by side",
                "model": PRO_MULTI.path,
                "images": [A, B],
                "seed": 9,
            },
            {"prompt": "make it blue", "model": PRO.path, "image": A, "guidance_scale": 9.5},
        ],
        batch_id="models-pro",
        budget_usd=0.08,
        keep_job_ids=True,
    )
    multi_job, pro_job = h.wait_all(receipt.job_ids)
    assert multi_job.state is JobState.COMPLETED, multi_job
    assert pro_job.state is JobState.COMPLETED, pro_job

    multi = h.task_for(multi_job.id)
    assert multi["model"] == PRO_MULTI.path
    assert multi["inputs"] == [A, B]
    assert multi["params"] == {"prompt": "the two, side by side", "images": [A, B], "seed": 9}
    assert multi["charged_micros"] == 40_000
    pro = h.task_for(pro_job.id)
    assert pro["model"] == PRO.path and pro["inputs"] == [A]
    assert pro["params"] == {"prompt": "make it blue", "image": A, "guidance_scale": 9.5}
    assert pro["charged_micros"] == 40_000
    assert tuple(multi["prediction"]["outputs"]) == tuple(multi_job.outputs)

    # The submit went to each model's own path (the request log).
    logged = h.sim.get("/_sim/requests").json()
    logged = logged["requests"] if isinstance(logged, dict) else logged
    paths = {
        r["path"]
        for r in logged
        if r["kind"] == "submit" and r["task_id"] in (multi["id"], pro["id"])
    }
    assert paths == {f"/api/v3/{PRO_MULTI.path}", f"/api/v3/{PRO.path}"}

    # The batch's cost is priced per model, and the list call filters by model.
    progress = h.producer.batch_progress("models-pro")
    assert progress is not None and progress.cost_usd == 0.08
    with WaveSpeedClient(h.settings.wavespeed_base_url, h.settings.wavespeed_api_key) as client:
        listed = client.list_predictions(model=PRO.path)
    assert {i["id"] for i in listed} == {pro["id"]}


@pytest.mark.integration
def test_batch_budget_reserves_each_jobs_own_price(harness: Harness) -> None:
    """Three pro edits ($0.04 each) on a $0.08 budget: two are submitted, one fails with
    reason `budget`; a max edit ($0.08) on a $0.06 budget is refused outright."""
    h = harness
    receipt = h.producer.enqueue_batch(
        [{"prompt": f"pro {i}", "model": PRO.path, "image": A} for i in range(3)],
        batch_id="models-budget",
        budget_usd=0.08,
        keep_job_ids=True,
    )
    jobs = h.wait_all(receipt.job_ids)
    states = sorted(j.state.value for j in jobs)
    assert states == ["completed", "completed", "failed"], [(j.state, j.reason) for j in jobs]
    assert {j.reason for j in jobs if j.state is JobState.FAILED} == {"budget"}
    raw = h.store.batch_counts("models-budget")
    assert raw["reserved_micros"] == 80_000

    receipt = h.producer.enqueue_batch(
        [{"prompt": "max", "image": A}], batch_id="models-max", budget_usd=0.06, keep_job_ids=True
    )
    (job,) = h.wait_all(receipt.job_ids)
    assert job.state is JobState.FAILED and job.reason == "budget"


@pytest.mark.integration
def test_a_mixed_batch_costs_each_task_at_its_own_price(harness: Harness) -> None:
    """One max ($0.08) and one pro ($0.04) edit: the batch and the account's totals
    count $0.12 exactly (not two tasks at a mean price), as the simulator charged."""
    h = harness
    before = h.store.stats().get("paid_micros", 0)
    receipt = h.producer.enqueue_batch(
        [{"prompt": "max", "image": A}, {"prompt": "pro", "model": PRO.path, "image": A}],
        batch_id="models-mixed",
        keep_job_ids=True,
    )
    jobs = h.wait_all(receipt.job_ids)
    assert all(j.state is JobState.COMPLETED for j in jobs)
    charged = sum(h.task_for(j.id)["charged_micros"] for j in jobs)
    assert charged == 120_000
    progress = h.producer.batch_progress("models-mixed")
    assert progress is not None and progress.cost_usd == 0.12
    assert h.store.stats()["paid_micros"] - before == charged
