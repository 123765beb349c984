"""The multi-host proof, small version (issue 14): `python -m cluster --small`.

Seven hosts from Linux network namespaces on this machine (Redis with Sentinel, two
worker hosts, two receiver hosts behind haproxy, the simulator), a few hundred jobs,
and the four faults with shorter outages: a Redis failover and a kill -9 of the primary,
a worker host cut off, a receiver host killed, a worker host drained. Every invariant
must hold. The full run (2,000 jobs, a 30 s cut) is `make chaos-cluster`.

Needs root, iproute2 and haproxy: skipped locally when namespaces cannot be built here,
failing under CI (`CI=true`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.net import leftovers, why_impossible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

# The small run takes 1.5 to 2.5 minutes; this bounds a stuck one.
RUN_TIMEOUT_S = 360


def _impossible() -> str | None:
    for binary in ("haproxy", "redis-server"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    return why_impossible()


def test_small_cluster_run_holds_every_invariant(tmp_path: Path) -> None:
    """Seven namespaced hosts through the four faults: every job terminal with one
    event, none paid twice, the provider cap held, the drain bounded, no namespace left."""
    reason = _impossible()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the cluster test cannot run in CI: {reason}", pytrace=False)
        pytest.skip(f"network namespaces are not possible here: {reason}")
    before = set(leftovers())
    run = subprocess.run(
        [sys.executable, "-m", "cluster", "--small", "--seed", "7", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "invariants:" in run.stdout and "FAIL " not in run.stdout
    assert set(leftovers()) - before == set()
