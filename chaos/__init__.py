"""Chaos runs: a full local stack under provider and process faults, then invariants.

`python -m chaos` (and `make chaos`) pushes jobs through a stack on private ports while
the simulator injects seeded provider faults and the harness kills and restarts its
processes, then checks that every job ended exactly once, with the simulator's own
result, paid for once. See `chaos.runner` for the timeline, `chaos.invariants` for what
is checked, `chaos.soak` for the long variant.
"""

from chaos.runner import ChaosConfig, ChaosResult, run

__all__ = ["ChaosConfig", "ChaosResult", "run"]
