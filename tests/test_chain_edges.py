"""Chains at their edges (found in review): scenarios driven at the store level (JobStore.transition
moves step jobs directly; ChainStore writes, cancels and retries chains)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from worker import keys
from worker.chain_store import ChainStore
from worker.chains import chain_from_dict
from worker.domain import JobState
from worker.errors import ValidationError
from worker.store import REMOVE, JobStore

IMAGE = "https://example.com/source.jpg"
NOW = 1_000_000.0


def chain(*prompts: str, **extra: Any) -> dict[str, Any]:
    return {"image": IMAGE, "steps": [{"prompt": p} for p in prompts], **extra}


def submit(store: JobStore, job_id: str, pid: str) -> None:
    assert store.transition(job_id, JobState.SUBMITTING, now=NOW).applied
    r = store.transition(job_id, JobState.SUBMITTED, now=NOW, fields={"prediction_id": pid})
    assert r.applied


def complete(store: JobStore, job_id: str, outputs: list[str] | None = None) -> tuple[str, ...]:
    submit(store, job_id, f"p-{job_id}")
    out = outputs if outputs is not None else [f"https://cdn.example.com/out/{job_id}.png"]
    r = store.transition(
        job_id,
        JobState.COMPLETED,
        now=NOW,
        fields={"outputs": json.dumps(out), "finished_at": NOW, "prediction_id": f"p-{job_id}"},
        poll_at=REMOVE,
    )
    assert r.applied, r
    return r.spawned


def fail(store: JobStore, job_id: str) -> tuple[str, ...]:
    r = store.transition(
        job_id,
        JobState.FAILED,
        now=NOW,
        fields={"reason": "provider_failed", "error": "boom", "finished_at": NOW},
        poll_at=REMOVE,
    )
    assert r.applied, r
    return r.spawned


def cancel(store: JobStore, job_id: str) -> bool:
    r = store.transition(
        job_id,
        JobState.CANCELLED,
        now=NOW,
        fields={"reason": "cancelled_by_user", "finished_at": NOW},
        poll_at=REMOVE,
    )
    return r.applied


def chain_events(store: JobStore, chain_id: str) -> list[dict[str, str]]:
    return [f for _, f in store.events() if f.get("type") == "chain" and f["chain_id"] == chain_id]


def gauges(client: redis.Redis) -> dict[str, int]:
    raw: dict[str, str] = client.hgetall(keys.STATS)  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items() if k.startswith("now:") and int(v) != 0}


def test_sanity_three_steps_by_hand(store: JobStore, redis_client: redis.Redis) -> None:
    chains = ChainStore(redis_client)
    item = chain_from_dict(chain("a", "b", "c"))
    write = chains.create(item, batch_id="b1", now=NOW)
    (j1,) = write.to_send
    (j2,) = complete(store, j1)
    (j3,) = complete(store, j2)
    assert complete(store, j3) == ()
    c = chains.get(item.chain_id)
    assert c is not None and c.state == "completed"
    assert len(chain_events(store, item.chain_id)) == 1
    assert gauges(redis_client) == {}
    assert redis_client.zcard(keys.POLL) == 0


# --- 1. validation: a later step's `images` that is not a list -------------------------

MULTI = "wavespeed-ai/flux-kontext-max/multi"


def test_a_later_steps_images_of_the_wrong_type_is_a_validation_error(tmp_path: Any) -> None:
    """chains._variant spreads `fields.get("images") or []`: a number raises TypeError (kq
    batch / kq run / POST /v1/batches crash instead of naming the line), and `{}` is taken
    as "no images". Only POST /v1/chains guards against it (_without_bad_step_images).
    Fails at commit 1e49bfa; passes with the uncommitted chains.py edit in the tree."""
    from worker.batchfile import BatchFile

    for bad in (5, {}):
        spec = {
            "image": IMAGE,
            "steps": [{"prompt": "a"}, {"prompt": "b", "model": MULTI, "images": bad}],
        }
        with pytest.raises(ValidationError):
            chain_from_dict(spec)
    path = tmp_path / "chains.jsonl"
    line = {
        "image": IMAGE,
        "steps": [{"prompt": "a"}, {"prompt": "b", "model": MULTI, "images": 5}],
    }
    path.write_text(json.dumps(line) + "\n")
    with BatchFile(str(path)) as batch:
        scan = batch.scan()  # TypeError today
    assert scan.invalid == 1


# --- 2. validation: step 1's own `images` are dropped for the chain's source ------------


def test_step_one_variant_images_are_not_silently_replaced_by_the_source() -> None:
    """_variant does request.update(source) on step 1: a step's or variant's `images`
    (a /multi model's reference images) are overwritten without a word, so two variants
    that differ only in their images become two identical paid tasks. Fails at commit
    1e49bfa; passes with the uncommitted chains.py edit in the tree."""
    spec = {
        "images": ["https://example.com/A.png"],
        "model": MULTI,
        "steps": [
            {
                "prompt": "blend",
                "variants": [
                    {"images": ["https://example.com/B.png"]},
                    {"images": ["https://example.com/C.png"]},
                ],
            }
        ],
    }
    try:
        item = chain_from_dict(spec)
    except ValidationError:
        return  # refusing the conflict is a fine answer too
    first, second = (v.request for v in item.steps[0])
    assert first != second, "two variants, one identical request: paid twice for one edit"


# --- 3. cjson: numbers in a step template --------------------------------------------


def test_guidance_scale_reaches_a_later_step_unchanged(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """chain_step.lua decodes the template and re-encodes it with cjson, whose numbers
    keep 14 significant digits: 10/3 becomes 3.3333333333333 on every step after the
    first (step 1 keeps Python's repr)."""
    chains = ChainStore(redis_client)
    item = chain_from_dict(chain("a", "b", guidance_scale=10 / 3, seed=2_147_483_647))
    (j1,) = chains.create(item, batch_id="", now=NOW).to_send
    (j2,) = complete(store, j1)
    step1 = store.get(j1)
    step2 = store.get(j2)
    assert step1 is not None and step2 is not None
    assert step2.request["seed"] == 2_147_483_647  # fine: integers up to 2^31 survive
    assert step1.request["guidance_scale"] == 10 / 3
    assert step2.request["guidance_scale"] == 10 / 3, step2.request


# --- 4. a cancelled chain comes back to life through a DLQ redrive ---------------------


def fan_out(*, steps: int = 3) -> dict[str, Any]:
    rest = [{"prompt": f"s{n}"} for n in range(3, steps + 1)]
    return {
        "image": IMAGE,
        "steps": [
            {"prompt": "s1"},
            {"prompt": "s2", "variants": [{"seed": 1}, {"seed": 2}]},
            *rest,
        ],
    }


def test_redriving_the_dlq_does_not_resume_a_chain_the_user_cancelled(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """Branch 1.1 fails (its job goes to the DLQ), then the user cancels the chain, whose
    other branch is cancelled: the chain ends `failed` (a failure outranks a cancel).
    A routine `kq dlq redrive` of failed jobs then reopens it: retry_chain_step.lua sets
    cancel back to 0 for any chain not running, so the cancelled chain runs (and pays)
    again."""
    from worker.producer import Producer

    sent: list[str] = []
    producer = Producer(store=store, send=sent.extend)
    item = chain_from_dict(fan_out())
    (j1,) = producer.chains.create(item, batch_id="", now=NOW).to_send
    a, b = complete(store, j1)
    fail(store, a)
    assert producer.chains.request_cancel(item.chain_id)
    assert cancel(store, b)  # what cancel_chain does to the live step
    ended = producer.get_chain(item.chain_id)
    assert ended is not None and ended.terminal and ended.cancel_requested
    assert store.dlq() == [a]

    producer.redrive(store.dlq())  # the operator redrives the dead letters

    after = producer.get_chain(item.chain_id)
    assert after is not None
    assert after.terminal, f"the cancelled chain runs again: {after.state}, sent {sent}"


# --- 5. a budget spent on first steps -------------------------------------------------


def test_a_budget_for_one_chain_completes_one_chain(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """All step-1 jobs of a batch are queued at once, later steps only when their step
    ends: were budgets reserved per step, a budget that covers one whole chain would be
    spent on the first steps of every chain and each would fail later (`budget`). A chain
    reserves its whole price at its first submit instead: one chain completes, the others
    fail at their first step, nothing is spent on intermediate images."""
    price = 80_000
    chains = ChainStore(redis_client)
    store.set_batch_fields("bud", {"budget_micros": 3 * price})  # one 3-step chain
    items = [chain_from_dict(chain(f"a{n}", f"b{n}", f"c{n}")) for n in range(3)]
    heads = [chains.create(i, batch_id="bud", now=NOW).to_send[0] for i in items]

    def run(job_id: str) -> tuple[str, ...]:
        # What submit_job does first: reserve the step's price (a chain step: its chain's,
        # once), or fail the job `budget`.
        chain_id = str(redis_client.hget(keys.job(job_id), "chain_id") or "")
        if not store.reserve_budget(job_id, "bud", price, chain_id=chain_id):
            fail(store, job_id)
            return ()
        return complete(store, job_id)

    wave = heads
    while wave:  # FIFO, like the submit queue: whatever is queued goes first
        wave = [s for job_id in wave for s in run(job_id)]
    states = [c.state for c in (chains.get(i.chain_id) for i in items) if c]
    assert sorted(states) == ["completed", "failed", "failed"], states


# --- 6. a redrive that lands while a cancel is under way ------------------------------


def test_a_redrive_during_a_cancel_does_not_outlive_the_cancel(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """cancel_chain = request_cancel, read the job list, cancel each live job. A redrive
    landing between the read and the end of the loop is written (the chain is still
    `running`, so retry_chain_step.lua keeps neither the flag nor refuses), is not in the
    list the cancel works through, and runs: a paid step of a chain being cancelled, which
    then ends `cancelled` anyway once that step completes."""
    from worker.producer import Producer

    producer = Producer(store=store, send=lambda ids: None)
    item = chain_from_dict(fan_out())
    (j1,) = producer.chains.create(item, batch_id="", now=NOW).to_send
    a, _ = complete(store, j1)
    fail(store, a)
    # cancel_chain, interleaved with an operator's redrive of the failed branch:
    assert producer.chains.request_cancel(item.chain_id)
    listed = producer.chains.get(item.chain_id)
    assert listed is not None
    new_ids = producer.redrive([a])  # lands here
    for job in store.get_many(listed.job_ids):
        if job is not None and not job.terminal:
            cancel(store, job.id)
    after = producer.get_chain(item.chain_id)
    assert after is not None
    live = [j.id for j in store.get_many(after.job_ids) if j is not None and not j.terminal]
    assert not new_ids or not live, f"cancel_chain returned with {live} still to be paid for"


# --- 7. latent: a branch end the tally does not know becomes a user cancel -------------


def test_a_completed_last_step_is_never_reported_as_cancelled_by_the_user(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """chain_finish's tally: `completed and #outputs > 0` -> completed, `failed` -> failed,
    anything else -> `cancelled` / `cancelled_by_user`. A last step completed without an
    output (Prediction.from_json refuses that today, so this is latent) ends the chain as
    cancelled by a user who never cancelled it."""
    chains = ChainStore(redis_client)
    item = chain_from_dict(chain("x", "y"))
    (j1,) = chains.create(item, batch_id="", now=NOW).to_send
    (j2,) = complete(store, j1)
    complete(store, j2, outputs=[])
    (event,) = chain_events(store, item.chain_id)
    assert event["reason"] != "cancelled_by_user", event


# --- 8. cancel_batch does not stop the chains of the batch -----------------------------


def test_cancelling_a_batch_stops_its_chains_from_writing_steps(
    store: JobStore, redis_client: redis.Redis
) -> None:
    """cancel_batch walks the batch's members and cancels each live job, but never sets
    the chains' cancel flag (cancel_chain does, first). A step that completes while the
    walk is under way (a batch cancel of thousands of jobs takes minutes: one provider
    DELETE per submitted job) writes and sends its next step, which a worker may submit
    and pay before the walk reaches it."""
    from worker.producer import Producer

    chains = ChainStore(redis_client)
    items = [chain_from_dict(chain(f"a{n}", f"b{n}", f"c{n}")) for n in range(2)]
    heads = [chains.create(i, batch_id="bc", now=NOW).to_send[0] for i in items]
    submit(store, heads[1], "p-late")  # chain 2's step 1 is at the provider

    written: list[str] = []

    class Walk(Producer):
        def cancel_job(self, job_id: str) -> bool:
            if not written:  # meanwhile, chain 2's step 1 completes (webhook)
                r = store.transition(
                    heads[1],
                    JobState.COMPLETED,
                    now=NOW,
                    fields={"outputs": json.dumps([IMAGE]), "prediction_id": "p-late"},
                    poll_at=REMOVE,
                )
                written.extend(r.spawned)
            return cancel(store, job_id)

    Walk(store=store, send=lambda ids: None).cancel_batch("bc")
    assert not written, f"step {written} was written (and sent) during the batch cancel"
