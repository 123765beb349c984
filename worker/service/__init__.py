"""The use cases every entry point goes through: the only code that moves a job or sets
its flags (each through one atomic `JobStore.transition` or `JobStore.flag` call).

Adapters (store, provider client, clock) are handed in as `Deps`; nothing here builds
a connection.

    submit      submit a queued job (at most once per paid task)
    results     record a task, apply a result, fail, cancel
    ambiguous   flag a submit whose answer was lost, then adopt, requeue or fail it
"""

from worker.service.ambiguous import (
    adopt_task,
    fail_ambiguous,
    mark_ambiguous,
    note_candidates_final,
    requeue_unsent,
)
from worker.service.deps import Deps
from worker.service.results import (
    Verifying,
    apply_update,
    apply_webhook,
    best_effort_delete,
    cancel_job,
    fail_job,
    record_submitted,
)
from worker.service.submit import SubmitOutcome, SubmitResult, submit_job, submit_watchdog_s

__all__ = [
    "Deps",
    "SubmitOutcome",
    "SubmitResult",
    "Verifying",
    "adopt_task",
    "apply_update",
    "apply_webhook",
    "best_effort_delete",
    "cancel_job",
    "fail_ambiguous",
    "fail_job",
    "mark_ambiguous",
    "note_candidates_final",
    "record_submitted",
    "requeue_unsent",
    "submit_job",
    "submit_watchdog_s",
]
