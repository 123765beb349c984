"""Command line: ``python -m wavespeed_sim`` (and ``kq sim``, which calls ``main(argv)``).

The flags are generated from ``SimConfig``'s field metadata, so every knob has exactly
one flag, named in ``config.py``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable
from types import FrameType

from wavespeed_sim.config import ConfigError, SimConfig, knob_fields, parse_codes
from wavespeed_sim.server import SimServer

_TYPES = {"seconds": float, "days": float, "money": float, "rate": float}


def _codes(text: str) -> tuple[int, ...]:
    try:
        return parse_codes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_METAVARS = {
    "seconds": "S",
    "days": "DAYS",
    "money": "USD",
    "rate": "P",
    "count": "N",
    "workers": "N",
    "port": "PORT",
    "int?": "N",
    "codes": "CODES",
    "host": "HOST",
    "text?": "TEXT",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each dest is the SimConfig field of the same name."""
    parser = argparse.ArgumentParser(
        prog="wavespeed_sim",
        description="A local simulator of WaveSpeed AI's v3 API for FLUX.1 Kontext [max]: "
        "tasks, signed webhooks with retries, uploads, balance, limits and seeded faults. "
        "Test/control endpoints live under /_sim/.",
        epilog="Webhooks go to the URL each task names, http or https; an https receiver's "
        "certificate is verified against the system's CA certificates (SSL_CERT_FILE or "
        "SSL_CERT_DIR name others, e.g. a private CA's).",
    )
    for knob in knob_fields():
        flag, kind, help_text = (str(knob.metadata[k]) for k in ("flag", "kind", "help"))
        if kind == "flag":
            parser.add_argument(flag, dest=knob.name, action="store_true", help=help_text)
            continue
        default = knob.default
        if default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text = f"{help_text} (default: {shown})"
        if kind == "codes":
            convert: Callable[[str], object] = _codes
        elif kind in _TYPES:
            convert = float
        elif kind in {"count", "workers", "port", "int?"}:
            convert = int
        else:
            convert = str
        parser.add_argument(
            flag,
            dest=knob.name,
            type=convert,
            default=default,
            metavar=_METAVARS[kind],
            help=help_text,
        )
    return parser


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (how `kq up` and process managers stop us) takes the same clean path as Ctrl-C.
    # SIGINT is installed explicitly too: a child started in the background by a shell
    # inherits SIGINT *ignored*, and Python then never turns it into KeyboardInterrupt.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until Ctrl-C or SIGTERM; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = SimConfig.from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        server = SimServer(config)
    except SystemExit:  # werkzeug could not bind and has already said why on stderr
        return 1
    keys = "any non-empty" if config.api_key is None else "only the configured one"
    print(f"WaveSpeed simulator listening on {server.url} (api key: {keys})", flush=True)
    # Signal handlers can only be set from the main thread (kq may call us from another).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS} if in_main_thread else {}
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
