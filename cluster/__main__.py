"""`python -m cluster [--small] [--jobs N] [--seed S]`: build the hosts, run, check, tear down.

Exits 0 when every invariant held, 1 when one did not, 2 when the hosts could not be
built (no root, no `ip`, no haproxy, no redis-server). Namespaces and processes are
removed on every way out, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from cluster.net import why_impossible
from cluster.scenario import SMALL, Cluster, Plan


def _missing() -> str | None:
    for binary in ("haproxy", "redis-server"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    return why_impossible()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    parser.add_argument("--small", action="store_true", help="few jobs, short faults")
    parser.add_argument("--jobs", type=int, default=None, help="how many jobs")
    parser.add_argument("--seed", type=int, default=1, help="the simulator's seed")
    parser.add_argument("--workdir", type=Path, default=None, help="logs and data (kept)")
    args = parser.parse_args(argv)
    plan = SMALL if args.small else Plan()
    plan = dataclasses.replace(plan, seed=args.seed)
    if args.jobs is not None:
        plan = dataclasses.replace(plan, jobs=args.jobs)
    missing = _missing()
    if missing is not None:
        print(f"cannot build the hosts: {missing}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kq-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"cluster run: {plan.jobs} jobs, seed {plan.seed}, logs in {workdir}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    began = time.monotonic()
    cluster = Cluster(plan, workdir.resolve())
    try:
        cluster.up()
        ok = cluster.run()
    finally:
        cluster.down()
    print(f"\n{'PASSED' if ok else 'FAILED'} in {time.monotonic() - began:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
