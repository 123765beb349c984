"""Chain records in Redis: write a chain with its first step, read it back, ask it to
stop, reopen it for a retried step. Steps after the first are written by the transition
that ends their previous step (lua/chain_step.lua), never from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import redis

from worker import keys
from worker.chains import Chain, ChainItem, decode_chain
from worker.store import QUEUED_CHECK_S, _script


@dataclass(frozen=True)
class ChainWrite:
    """What writing a chain did: created now or found, and the step jobs to send."""

    chain_id: str
    created: bool
    state: str
    to_send: tuple[str, ...]


RETRIED: Final = "new"
# Only a running chain takes the flag (lua/chain_step.lua reads it when a step ends).
_CANCEL: Final = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 1
"""


class ChainStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._create = client.register_script(_script("create_chain.lua"))
        self._retry = client.register_script(_script("retry_chain_step.lua"))
        self._cancel = client.register_script(_CANCEL)

    def create(self, chain: ChainItem, *, batch_id: str, now: float) -> ChainWrite:
        """Write `chain` and its step-1 jobs if its id is free (idempotent)."""
        args: list[Any] = [
            chain.chain_id,
            batch_id,
            now,
            now + QUEUED_CHECK_S,
            chain.steps_json(),
            chain.idempotency_key,
            chain.priority,
            ""
            if chain.metadata is None
            else json.dumps(chain.metadata, separators=(",", ":"), ensure_ascii=False),
            keys.JOB_PREFIX,
            chain.price_micros,
        ]
        for job_id, branch, request in chain.first_jobs():
            args.extend((job_id, branch, json.dumps(request.to_payload(), separators=(",", ":"))))
        answer: Any = self._create(
            keys=[
                keys.chain(chain.chain_id),
                keys.chain_jobs(chain.chain_id),
                keys.STATS,
                keys.batch(batch_id),
                keys.batch_jobs(batch_id),
                keys.POLL,
            ],
            args=args,
        )
        status, state, *ids = (str(a) for a in answer)
        return ChainWrite(chain.chain_id, status == "new", state, tuple(ids))

    def get(self, chain_id: str) -> Chain | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.chain(chain_id))
        pipe.lrange(keys.chain_jobs(chain_id), 0, -1)
        pipe.hgetall(keys.chain_ends(chain_id))
        raw, job_ids, ends = pipe.execute()
        if not raw:
            return None
        return decode_chain(raw, job_ids, ends)

    def request_cancel(self, chain_id: str) -> bool:
        """Stop the chain from writing further steps; False if it is unknown or ended."""
        return bool(self._cancel(keys=[keys.chain(chain_id)]))

    def retry_step(self, old_job_id: str, new_job_id: str, chain_id: str, *, now: float) -> str:
        """Write a failed/cancelled step again as `new_job_id` and reopen its branch."""
        batch_id = self.redis.hget(keys.job(old_job_id), "batch_id") or ""
        answer: Any = self._retry(
            keys=[
                keys.chain(chain_id),
                keys.chain_jobs(chain_id),
                keys.chain_ends(chain_id),
                keys.job(old_job_id),
                keys.job(new_job_id),
                keys.STATS,
                keys.batch(str(batch_id)),
                keys.batch_jobs(str(batch_id)),
                keys.POLL,
            ],
            args=[new_job_id, now, now + QUEUED_CHECK_S],
        )
        return str(answer)
