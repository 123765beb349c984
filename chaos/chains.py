"""Chains in the chaos run: a share of the pushed items are 2- and 3-step chains, and
their own invariants (one chain event per chain, steps that go on exactly when the step
before completed, each step fed the previous step's output) are checked against the
simulator's ground truth. The per-job invariants cover every step job as well: each is
an ordinary job, watched and checked like the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.chains import ChainItem, chain_from_dict, step_job_id

# Every CHAIN_EVERY-th pushed item is a chain: 3 steps for every second one, else 2.
CHAIN_EVERY = 8


@dataclass(frozen=True)
class PushedChain:
    chain_id: str
    step_ids: tuple[str, ...]  # the job each step would get (linear chains: branch "1")
    prompts: tuple[str, ...]


def is_chain_slot(i: int) -> bool:
    return i % CHAIN_EVERY == CHAIN_EVERY - 1


def make_chain(seed: int, i: int, key: str) -> tuple[ChainItem, PushedChain]:
    steps = 3 if (i // CHAIN_EVERY) % 2 == 0 else 2
    prompts = tuple(f"chaos {seed} #{i} step {n}: make it blue" for n in range(1, steps + 1))
    item = chain_from_dict(
        {
            "image": f"https://example.com/chaos/{i}.jpg",
            "steps": [{"prompt": p} for p in prompts],
            "idempotency_key": key,
        }
    )
    ids = tuple(step_job_id(item.chain_id, "1", n) for n in range(1, steps + 1))
    return item, PushedChain(item.chain_id, ids, prompts)


def step_ids_written(chain: PushedChain, exists: Mapping[str, bool]) -> list[str]:
    """The chain's step jobs that were written (a step after a failed one never is)."""
    return [j for j in chain.step_ids if exists.get(j)]


# --- invariants (each returns (name, ok, counts, examples)) --------------------------------


def _final(events: Mapping[str, Sequence[Mapping[str, str]]], job_id: str) -> Mapping[str, str]:
    found = events.get(job_id, [])
    return found[0] if len(found) == 1 else {}


def one_event_per_chain(
    chains: Sequence[PushedChain], chain_events: Mapping[str, Sequence[Mapping[str, str]]]
) -> tuple[str, bool, str, tuple[str, ...]]:
    wanted = {c.chain_id for c in chains}
    bad = [
        f"{c.chain_id}: {len(chain_events.get(c.chain_id, []))} chain events"
        for c in chains
        if len(chain_events.get(c.chain_id, [])) != 1
    ]
    foreign = sum(len(v) for k, v in chain_events.items() if k not in wanted)
    states: dict[str, int] = {}
    for c in chains:
        for e in chain_events.get(c.chain_id, [])[:1]:
            states[e.get("state", "?")] = states.get(e.get("state", "?"), 0) + 1
    counts = (
        f"{len(chains) - len(bad)}/{len(chains)} chains with exactly one chain event ("
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        + f"); {foreign} for unknown chains"
    )
    return ("exactly one chain event per chain", not bad and not foreign, counts, tuple(bad[:5]))


def chain_steps_follow(
    chains: Sequence[PushedChain],
    events: Mapping[str, Sequence[Mapping[str, str]]],
    chain_events: Mapping[str, Sequence[Mapping[str, str]]],
    tasks: Sequence[Mapping[str, Any]],
    exists: Mapping[str, bool],
    task_job: Any,
) -> tuple[str, bool, str, tuple[str, ...]]:
    """Step k+1 exists exactly when step k completed; step k+1's task was fed step k's
    first output; the chain event agrees with its steps (state, failed step, outputs)."""
    by_job: dict[str, list[Mapping[str, Any]]] = {}
    for each in tasks:
        by_job.setdefault(task_job(each), []).append(each)
    problems: list[str] = []
    steps_run = fed = 0
    for chain in chains:
        finals = [_final(events, j) for j in chain.step_ids]
        for n, job_id in enumerate(chain.step_ids):
            if n == 0:
                continue
            before = finals[n - 1]
            should = before.get("state") == "completed"
            if bool(exists.get(job_id)) != should:
                problems.append(
                    f"{chain.chain_id}: step {n + 1} {'missing' if should else 'written'} after "
                    f"step {n} ended {before.get('state') or 'without an event'}"
                )
                continue
            if not should:
                continue
            steps_run += 1
            found = by_job.get(job_id, [])
            task: Mapping[str, Any] | None = found[0] if found else None
            first_output = (json.loads(before.get("outputs") or "[]") or [""])[0]
            if task is None:
                if finals[n].get("state") == "completed":
                    problems.append(f"{chain.chain_id}: step {n + 1} completed with no task")
            elif task["params"].get("image") != first_output:
                problems.append(
                    f"{chain.chain_id}: step {n + 1} was fed {task['params'].get('image')}, "
                    f"not step {n}'s output {first_output}"
                )
            else:
                fed += 1
        chain_event = (chain_events.get(chain.chain_id) or [{}])[0]
        if not chain_event:
            continue
        ran = [f for f in finals if f]
        last = ran[-1] if ran else {}
        expect = (
            "completed"
            if len(ran) == len(chain.step_ids) and last.get("state") == ("completed")
            else (last.get("state") or "?")
        )
        if chain_event.get("state") != expect:
            problems.append(
                f"{chain.chain_id}: chain event says {chain_event.get('state')}, steps say {expect}"
            )
        elif expect == "completed" and json.loads(chain_event.get("outputs") or "[]") != json.loads(
            last.get("outputs") or "[]"
        ):
            problems.append(f"{chain.chain_id}: chain outputs differ from its last step's")
        elif expect == "failed" and chain_event.get("failed_step") != str(len(ran)):
            problems.append(
                f"{chain.chain_id}: failed_step {chain_event.get('failed_step')}, "
                f"but step {len(ran)} failed"
            )
    counts = (
        f"{steps_run} later steps written after their step completed, {fed} fed the previous "
        f"step's output; {len(problems)} problems"
    )
    return (
        "chains go on exactly from each completed step",
        not problems,
        counts,
        tuple(problems[:5]),
    )
