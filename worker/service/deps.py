"""The adapters a use case needs, handed in by the entry point that calls it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from worker.admission import Admission
from worker.settings import Settings
from worker.store import JobStore
from worker.wavespeed import WaveSpeedClient


@dataclass
class Deps:
    """The adapters a use case needs, built by the entry point that calls it."""

    store: JobStore
    provider: WaveSpeedClient
    settings: Settings
    clock: Callable[[], float] = field(default=time.time)
    # Puts a job id back on the submit queue (the Celery side hands this in).
    enqueue_submit: Callable[[str], None] = field(default=lambda job_id: None)
    # Account-wide limits shared through Redis; None: no admission control.
    admission: Admission | None = None
