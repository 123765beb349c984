"""`python -m chaos [--jobs N] [--seed S] [--soak] [--receiver-worker-class gthread]`: one
chaos run; exit 1 if an invariant fails."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chaos.runner import ChaosConfig, run

SOAK_JOBS = 20_000
SOAK_PUSH_S = 600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description="Push jobs through a full local stack under provider and process faults, "
        "then check every invariant against the simulator's ground truth.",
    )
    parser.add_argument("--jobs", type=int, help="jobs to push (default 2000; 20000 with --soak)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulator's faults")
    parser.add_argument("--push-s", type=float, help="seconds over which jobs are pushed")
    parser.add_argument(
        "--soak",
        action="store_true",
        help="the long run: short record TTL, Redis memory and worker RSS sampled",
    )
    parser.add_argument(
        "--var-dir", type=Path, help="where logs and Redis data go (default: a temp dir)"
    )
    parser.add_argument(
        "--receiver-worker-class",
        choices=("gevent", "gthread"),
        default=ChaosConfig.receiver_worker_class,
        help="`kq receiver --worker-class` (default: gevent, as `kq receiver` runs)",
    )
    args = parser.parse_args(argv)
    jobs = args.jobs or (SOAK_JOBS if args.soak else ChaosConfig.jobs)
    if jobs < 1:
        parser.error("--jobs: expected at least 1")
    default_push = SOAK_PUSH_S if args.soak else ChaosConfig.push_s * jobs / ChaosConfig.jobs
    config = ChaosConfig(
        jobs=jobs,
        seed=args.seed,
        push_s=args.push_s or max(5.0, default_push),
        soak=args.soak,
        var_dir=args.var_dir,
        receiver_worker_class=args.receiver_worker_class,
        settle_timeout_s=1800.0 if args.soak else ChaosConfig.settle_timeout_s,
    )
    result = run(config)
    print(result.render(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
