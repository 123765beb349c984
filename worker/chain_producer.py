"""The chain side of `worker.producer.Producer`: enqueue a chain of edits, read it back,
cancel it (see worker/chains.py for what a chain is)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from worker import keys
from worker.chain_store import ChainStore, ChainWrite
from worker.chains import Chain, ChainItem, chain_from_dict, chain_json
from worker.domain import check_key
from worker.store import JobStore


class ChainMethods:
    """Mixed into Producer, which provides the attributes and methods declared here."""

    store: JobStore
    chains: ChainStore
    clock: Callable[[], float]

    def cancel_job(self, job_id: str) -> bool:
        raise NotImplementedError

    def _send_deferrable(self, job_ids: list[str]) -> None:
        raise NotImplementedError

    def enqueue_chain(
        self, chain: ChainItem | Mapping[str, object], *, batch_id: str = ""
    ) -> ChainWrite:
        """Validate and write a chain of edits (see worker/chains.py); its step-1 jobs are
        sent now, every later step by the move that ends the step before it. Idempotent
        for a repeated `idempotency_key`: the same chain, nothing written twice."""
        item = chain if isinstance(chain, ChainItem) else chain_from_dict(chain)
        if batch_id:
            check_key("batch_id", batch_id)
        return self._write_chain(item, batch_id)

    def get_chain(self, chain_id: str) -> Chain | None:
        return self.chains.get(chain_id)

    def chain_json(self, chain_id: str) -> dict[str, Any] | None:
        """The chain and its step jobs as JSON (None: unknown or expired)."""
        chain = self.chains.get(chain_id)
        return None if chain is None else chain_json(chain, self.store.get_many(chain.job_ids))

    def cancel_chain(self, chain_id: str) -> int:
        """Stop a chain: no further step is written, and its unfinished steps are
        cancelled; returns how many were. The chain ends `cancelled` (its one event)."""
        self.chains.request_cancel(chain_id)
        chain = self.chains.get(chain_id)
        if chain is None:
            return 0
        jobs = self.store.get_many(chain.job_ids)
        return sum(1 for j in jobs if j is not None and not j.terminal and self.cancel_job(j.id))

    def _write_chain(self, chain: ChainItem, batch_id: str) -> ChainWrite:
        write = self.chains.create(chain, batch_id=batch_id, now=self.clock())
        self._send_deferrable(list(write.to_send))
        return write

    def _stop_chains_of_batch(self, batch_id: str) -> None:
        """Flag every chain with a job in the batch (no further step is written)."""
        seen: set[str] = set()
        offset = 0
        while ids := self.store.batch_members(batch_id, offset, offset + 999):
            pipe = self.store.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(keys.job(job_id), "chain_id")
            for chain_id in pipe.execute():
                if chain_id and chain_id not in seen:
                    seen.add(chain_id)
                    self.chains.request_cancel(chain_id)
            offset += len(ids)
