"""`kq` subcommands for operators and downstream consumers (events, status, metrics)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to the `kq` parser."""
