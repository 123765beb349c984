"""`kq` commands on chains of edits: chain-status (one chain, its branches and step
jobs) and cancel-chain. Chains are enqueued like edits: a JSONL line with `steps`
(`kq batch`, `kq run`), `Producer.enqueue_chain`, or `POST /v1/chains`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.table import Table

from kq.producer_views import print_json
from kq.ui import make_console
from worker.runtime import make_producer
from worker.settings import Settings

_STATE_STYLE = {"completed": "green", "failed": "red", "cancelled": "yellow"}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("chain-status", help="show a chain of edits: its steps and branches")
    p.add_argument("chain_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_chain_status)

    p = sub.add_parser(
        "cancel-chain", help="cancel a chain: no further step, unfinished steps cancelled"
    )
    p.add_argument("chain_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cancel_chain)


def cmd_chain_status(args: argparse.Namespace) -> int:
    data = make_producer(Settings.from_env()).chain_json(args.chain_id)
    if data is None:
        print(f"kq: no chain {args.chain_id!r} (unknown, or expired)", file=sys.stderr)
        return 1
    if args.json:
        print_json(data)
        return 0
    console = make_console()
    took = ""
    if data["finished_at"] and data["created_at"]:
        took = f" in {data['finished_at'] - data['created_at']:.1f} s"
    style = _STATE_STYLE.get(data["state"], "cyan")
    console.print(
        f"chain [bold]{data['chain_id']}[/]: [{style}]{data['state']}[/]{took}, "
        f"{data['steps']} steps, run {data['run']}"
        + (f", batch {data['batch_id']}" if data["batch_id"] else "")
        + (", cancel requested" if data["cancel_requested"] and data["state"] == "running" else "")
    )
    table = Table(title="step jobs", title_justify="left")
    for column in ("step", "branch", "job", "state", "output / reason"):
        table.add_column(column, overflow="fold")
    for job in data["jobs"]:
        detail = job["outputs"][0] if job["outputs"] else job["reason"]
        state_style = _STATE_STYLE.get(job["state"], "cyan")
        table.add_row(
            str(job["step"] or "-"),
            job["branch"] or "-",
            job["job_id"],
            f"[{state_style}]{job['state']}[/]",
            detail or "",
        )
    console.print(table)
    for end in data["branches"]:
        what = ", ".join(end["outputs"]) if end["outputs"] else f"{end['reason']} {end['error']}"
        console.print(f"branch {end['branch']}: {end['state']} at step {end['step']}: {what}")
    if data["finished_at"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data["finished_at"]))
        console.print(f"ended {when}")
    return 0


def cmd_cancel_chain(args: argparse.Namespace) -> int:
    producer = make_producer(Settings.from_env())
    chain = producer.get_chain(args.chain_id)
    if chain is None:
        print(f"kq: no chain {args.chain_id!r}", file=sys.stderr)
        return 1
    if chain.terminal:
        message = f"not cancelled: the chain is already {chain.state}"
        print_json({"chain_id": args.chain_id, "cancelled": 0}) if args.json else print(message)
        return 1
    n = producer.cancel_chain(args.chain_id)
    if args.json:
        print_json({"chain_id": args.chain_id, "cancelled": n})
    else:
        print(f"chain {args.chain_id}: cancel requested, {n} unfinished step job(s) cancelled")
    return 0
