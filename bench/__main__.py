"""Run the benchmarks: `python -m bench [--quick] [--full-scale] [--only NAME ...]`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from rich.table import Table

from bench import (
    bulk_enqueue,
    latency,
    limit_bound,
    machine,
    memory,
    pipeline_overhead,
    rate_bound,
    receiver,
    ultra_scale,
    webhook_storm,
)
from bench.chart import draw
from bench.common import Row
from kq.ui import make_console

SCENARIOS: dict[str, Callable[..., list[Row]]] = {
    "bulk_enqueue": bulk_enqueue.run,
    "pipeline_overhead": pipeline_overhead.run,
    "receiver": receiver.run,
    "limit_bound": limit_bound.run,
    "rate_bound": rate_bound.run,
    "memory": memory.run,
    "ultra_scale": ultra_scale.run,
    "webhook_storm": webhook_storm.run,
    "latency": latency.run,
}
HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run for CI")
    parser.add_argument(
        "--full-scale",
        action="store_true",
        help="ultra_scale at the issue's sizes (10,000 in flight, 100,000 waiting; slow here)",
    )
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run these only")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    console = make_console()
    versions = machine.versions()
    console.print("measured with " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    # The machine's speed before each scenario and after the last (bench/machine.py).
    speed: dict[str, float] = {}
    rows: list[Row] = []
    for name in args.only or SCENARIOS:
        speed[name] = machine.speed_ms()
        console.print(
            f"[bold]running {name}[/bold]{' (quick)' if args.quick else ''} ... "
            f"(machine: reference work {speed[name]:.0f} ms)"
        )
        started = time.monotonic()
        scenario = SCENARIOS[name]
        if name == "ultra_scale":
            scenario = partial(ultra_scale.run, full=args.full_scale)
        rows.extend(scenario(quick=args.quick))
        console.print(f"  done in {time.monotonic() - started:.1f} s")
    speed["end"] = machine.speed_ms()
    console.print(report(rows))
    console.print(
        f"machine speed: reference work {min(speed.values()):.0f}-{max(speed.values()):.0f} ms "
        "over the run (lower is faster; bench/machine.py)"
    )
    for row in rows:
        if not row.met:
            console.print(
                f"[red]goal missed[/red]: {row.scenario} — {row.metric}: "
                f"{row.ratio:.2f}x, goal {row.goal}"
            )
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "quick": args.quick,
                "full_scale": args.full_scale,
                "machine": {**versions, "speed_reference_work_ms": speed},
                "rows": [asdict(r) for r in rows],
            },
            indent=2,
        )
    )
    chart = draw(rows, args.out.with_suffix(".png"))
    console.print(f"results: {args.out}  chart: {chart}")
    return 0


def report(rows: list[Row]) -> Table:
    table = Table(title="kontext-queue benchmarks (ours vs a baseline measured in the same run)")
    for name in ("scenario", "metric", "ours", "baseline", "unit", "ratio", "goal", "met"):
        table.add_column(name, justify="right" if name in ("ours", "baseline", "ratio") else "left")
    for r in rows:
        table.add_row(
            r.scenario,
            r.metric,
            f"{r.ours:,.1f}",
            f"{r.baseline:,.1f}",
            r.unit,
            f"{r.ratio:.2f}x",
            r.goal,
            "[green]yes[/green]" if r.met else "[red]NO[/red]",
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
