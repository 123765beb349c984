"""Rate-bound: 1,000 jobs against a provider limit of 600 submits a minute.

The simulator refuses (429, no task) any submit beyond 600 in a sliding minute; ours
runs with `KQ_MAX_SUBMITS_PER_MINUTE` at the same value and the in-flight cap out of
the way. Everything is read from the simulator's request log:

- the achieved rate: submits accepted in the first minute (from the first accepted
  one), against the most the limit allowed in it, min(limit, jobs). Idle capacity
  shows as a shortfall; going over is impossible (the provider refuses) and shows as
  429s instead. The average over the whole run is in the note: under a sliding-window
  limit, 600 at once and the rest a minute later is as legal as 10 a second;
- 429s after the first minute: by then a client that learns the limit (or is told
  it) should get none. The row's value is the share of submit attempts after the
  first minute that were accepted (100 % when none was refused); the raw count is in
  the metric's name.
"""

from __future__ import annotations

from bench.common import Row, bench_stack, timed_batch

SCENARIO = "rate-bound"
TOLERANCE = 0.05
WINDOW_S = 60.0  # the simulator's rate window (wavespeed_sim.state.RATE_WINDOW_S)


def run(*, quick: bool) -> list[Row]:
    n, limit = (12, 120) if quick else (1_000, 600)
    timeout_s = 60.0 if quick else 400.0
    sim_args = (
        "--rate-limit-per-minute", str(limit), "--inference-time", "0.5",
        "--queue-delay", "0", "--webhook-workers", "32", "--seed", "9",
    )  # fmt: skip
    env = {"KQ_MAX_SUBMITS_PER_MINUTE": str(limit), "KQ_MAX_IN_FLIGHT": "1000000"}
    with (
        bench_stack(sim_args=sim_args, extra_env=env, start_beat=not quick) as stack,
        timed_batch(stack, n, "rate-bound", timeout_s) as (seconds, sim),
    ):
        submits = sim.requests(kind="submit")
    accepted = sorted(float(r["time"]) for r in submits if r["status"] == 200)
    if not accepted:
        raise RuntimeError(f"the provider accepted none of the submits for {n} jobs")
    first_accepted = accepted[0]
    in_first_minute = sum(1 for t in accepted if t < first_accepted + WINDOW_S)
    allowed = min(limit, n)
    span = accepted[-1] - first_accepted
    average = (len(accepted) - 1) / span * 60 if span > 0 else float("inf")
    first_attempt = min(float(r["time"]) for r in submits)
    late = [r for r in submits if float(r["time"]) >= first_attempt + WINDOW_S]
    late_429 = sum(1 for r in late if r["status"] == 429)
    early_429 = sum(1 for r in submits if r["status"] == 429) - late_429
    late_ok_share = 100.0 * (len(late) - late_429) / len(late) if late else 100.0
    return [
        Row.within(
            SCENARIO,
            f"submits accepted in the first minute vs the limit ({n:,} jobs)",
            in_first_minute,
            allowed,
            "/min",
            TOLERANCE,
            note=f"{len(accepted):,} submits accepted for {n:,} jobs; whole-run average "
            f"{average:,.0f}/min; last accepted {span:.1f} s after the first; "
            f"all done {seconds:.1f} s after enqueue",
        ),
        Row.higher_is_better(
            SCENARIO,
            f"429s after the first minute: {late_429} of {len(late)} attempts",
            late_ok_share,
            100.0,
            "% ok",
            1.0,
            note=f"{early_429} 429s in the first minute",
        ),
    ]
