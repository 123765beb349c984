"""`kq` subcommands for producers: enqueue, batch, api, job, batch-status, wait, cancel,
retry, dlq, chain-status, cancel-chain. Read commands take `--json` for scripts; human
output uses rich.

The commands live by family: `cli_enqueue` (enqueue, batch, api) puts edits in,
`cli_jobs` (job, batch-status, wait, cancel, retry, dlq) works on jobs already enqueued,
`cli_chains` (chain-status, cancel-chain) on chains, and `producer_views` holds the
terminal output they share.
"""

from __future__ import annotations

import argparse
from typing import Any

from kq import cli_chains, cli_enqueue, cli_jobs


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the producer subcommands to the `kq` parser."""
    cli_enqueue.register(sub)
    cli_jobs.register(sub)
    cli_chains.register(sub)
