"""Every knob of the simulator, in one frozen dataclass.

A knob is declared once, as a dataclass field whose metadata carries its CLI flag, its
kind (which drives validation of CLI values and of runtime patches through
``POST /_sim/config``) and its help text. The parser in ``cli.py`` is generated from the
same metadata, so a knob cannot exist in one place and be missing from another.

Kinds:
    rate      probability in [0, 1]
    seconds   non-negative number of seconds (``days``: of days)
    count     non-negative integer (0 usually means "off" or "unlimited")
    money     non-negative dollars
    codes     tuple of task failure codes, from ``TASK_ERRORS``
    text?     optional string (None = unset)
    int?      optional integer
    host/port/flag   fixed at start, not patchable at runtime
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MODEL = "wavespeed-ai/flux-kontext-max"
MODEL_MULTI = "wavespeed-ai/flux-kontext-max/multi"

# Task failure codes the provider reports inside a failed prediction, with the error text
# the simulator puts beside each (the spec names the codes; the texts are ours).
TASK_ERRORS: dict[int, str] = {
    1200: "content flagged by moderation",
    1402: "failed to download the source image",
    5000: "internal provider error",
    5003: "provider service temporarily unavailable",
    5004: "task timed out on the provider",
}

DEFAULT_PORT = 8765  # an arbitrary free-looking port; `--port 0` picks any free one
SECONDS_PER_DAY = 86_400.0


class ConfigError(ValueError):
    """A knob got a value it cannot take; ``field`` names the knob."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _knob(default: Any, flag: str, kind: str, help_text: str) -> Any:
    """Declare a knob: a dataclass field carrying its CLI flag, kind and help."""
    return field(default=default, metadata={"flag": flag, "kind": kind, "help": help_text})


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes the simulator's behaviour (see the module docstring)."""

    host: str = _knob("127.0.0.1", "--host", "host", "interface to listen on")
    port: int = _knob(DEFAULT_PORT, "--port", "port", "port to listen on (0 = any free port)")
    api_key: str | None = _knob(
        None, "--api-key", "text?", "accept only this API key (default: any non-empty key)"
    )
    webhook_secret: str | None = _knob(
        None, "--webhook-secret", "text?", "whsec_... signing secret (default: random per run)"
    )
    seed: int | None = _knob(
        None, "--seed", "int?", "seed of every random decision (default: random per run)"
    )
    balance: float = _knob(1000.0, "--balance", "money", "starting account balance in dollars")
    price_per_image: float = _knob(
        0.08, "--price", "money", "dollars per Kontext [max] image (others keep their ratio)"
    )
    queue_delay_s: float = _knob(
        0.0, "--queue-delay", "seconds", "seconds a task waits in the queue before processing"
    )
    inference_time_s: float = _knob(1.0, "--inference-time", "seconds", "seconds of processing")
    inference_jitter_s: float = _knob(
        0.0,
        "--inference-jitter",
        "seconds",
        "each task's processing time spreads evenly within +- this of --inference-time",
    )
    concurrency: int = _knob(
        0, "--concurrency", "count", "max tasks processing at once, others queue (0 = unlimited)"
    )
    rate_limit_per_minute: int = _knob(
        0, "--rate-limit-per-minute", "count", "submits accepted per minute, then 429 (0 = off)"
    )
    sync_timeout_s: float = _knob(
        90.0, "--sync-timeout", "seconds", "enable_sync_mode wait before answering code 5004"
    )
    retention_days: float = _knob(
        7.0, "--retention-days", "days", "days before a task's result and outputs expire"
    )
    webhook_timeout_s: float = _knob(
        5.0, "--webhook-timeout", "seconds", "seconds to wait for a webhook receiver's answer"
    )
    webhook_retries: int = _knob(
        3, "--webhook-retries", "count", "retries after a failed webhook delivery"
    )
    webhook_retry_base_s: float = _knob(
        1.0, "--webhook-retry-base", "seconds", "first retry delay; doubles on each retry"
    )
    webhook_workers: int = _knob(
        8, "--webhook-workers", "workers", "threads sending webhooks concurrently"
    )
    fail_rate: float = _knob(0.0, "--fail-rate", "rate", "share of tasks that end failed")
    fail_codes: tuple[int, ...] = _knob(
        (1200, 1402, 5000), "--fail-codes", "codes", "task codes a failed task picks from"
    )
    drop_webhook_rate: float = _knob(
        0.0, "--drop-webhook-rate", "rate", "share of tasks whose webhook is never sent"
    )
    duplicate_webhook_rate: float = _knob(
        0.0, "--duplicate-webhook-rate", "rate", "share of tasks whose webhook is sent twice"
    )
    delay_webhook_rate: float = _knob(
        0.0, "--delay-webhook-rate", "rate", "share of tasks whose webhook is sent late"
    )
    delay_webhook_s: float = _knob(
        5.0, "--delay-webhook-s", "seconds", "how late a delayed webhook is sent"
    )
    late_failed_rate: float = _knob(
        0.0,
        "--late-failed-rate",
        "rate",
        "share of completed tasks that also get a contradictory late 'failed' webhook",
    )
    bad_signature_rate: float = _knob(
        0.0, "--bad-signature-rate", "rate", "share of tasks whose webhooks are mis-signed"
    )
    stale_timestamp_rate: float = _knob(
        0.0, "--stale-timestamp-rate", "rate", "share of tasks whose webhooks carry an old time"
    )
    submit_5xx_rate: float = _knob(
        0.0, "--submit-5xx-rate", "rate", "share of submits answered 500/502/503 (no task)"
    )
    submit_400_rate: float = _knob(
        0.0, "--submit-400-rate", "rate", "share of submits refused 400 (no task, not retryable)"
    )
    submit_429_rate: float = _knob(
        0.0, "--submit-429-rate", "rate", "share of submits answered 429 (no task)"
    )
    ambiguous_submit_rate: float = _knob(
        0.0,
        "--ambiguous-submit-rate",
        "rate",
        "share of submits that create the task but drop the connection unanswered",
    )
    burst_429_s: float = _knob(
        0.0, "--burst-429-s", "seconds", "answer every submit 429 for this long (from start/patch)"
    )
    burst_5xx_s: float = _knob(
        0.0, "--burst-5xx-s", "seconds", "answer every submit 503 for this long (from start/patch)"
    )
    log_requests: bool = _knob(False, "--log-requests", "flag", "print an access log line")

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimConfig:
        """Build a config from parsed CLI arguments (dests are the field names)."""
        values = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)
        }
        return cls().with_patch(values, runtime=False)

    def resolved(self) -> SimConfig:
        """Fill in the values chosen at random when unset: the seed and the secret."""
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        secret = self.webhook_secret or new_webhook_secret()
        return dataclasses.replace(self, seed=seed, webhook_secret=secret)

    def with_patch(self, patch: Mapping[str, object], *, runtime: bool = True) -> SimConfig:
        """A copy with ``patch`` applied, every value checked; raises ConfigError.

        With ``runtime`` true (``POST /_sim/config``) the knobs fixed at start (host, port,
        thread count, logging) are refused.
        """
        known = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, object] = {}
        for name, value in patch.items():
            spec = known.get(name)
            if spec is None:
                raise ConfigError(name, f"unknown knob; known: {', '.join(sorted(known))}")
            kind = str(spec.metadata["kind"])
            if runtime and kind in {"host", "port", "workers", "flag"}:
                raise ConfigError(name, "fixed at start, cannot be changed at runtime")
            changes[name] = _coerce(name, kind, value)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view of the config (tuples become lists)."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def retention_s(self) -> float:
        """Retention in seconds."""
        return self.retention_days * SECONDS_PER_DAY


def new_webhook_secret() -> str:
    """A fresh ``whsec_`` secret shaped like WaveSpeed's (base64 text after the prefix)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode("ascii")


def knob_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The knobs, in declaration order (for building the CLI parser)."""
    return dataclasses.fields(SimConfig)


def parse_codes(text: str) -> tuple[int, ...]:
    """Parse ``"1200,1402"`` into known task codes; raises ConfigError."""
    try:
        codes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            "fail_codes", f"expected comma-separated integers, got {text!r}"
        ) from None
    return _coerce("fail_codes", "codes", list(codes))  # type: ignore[return-value]


def _number(name: str, value: object) -> float:
    # bool is an int in Python but never a number for us: a JSON `true` is a mistake.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"expected a number, got {value!r}")
    return float(value)


def _coerce(name: str, kind: str, value: object) -> object:
    """Check one knob value against its kind; return it in canonical type."""
    if kind == "rate":
        number = _number(name, value)
        if not 0.0 <= number <= 1.0:
            raise ConfigError(name, f"expected a probability between 0 and 1, got {value!r}")
        return number
    if kind in {"seconds", "days", "money"}:
        number = _number(name, value)
        if number < 0:
            raise ConfigError(name, f"expected a non-negative number, got {value!r}")
        return number
    if kind in {"count", "workers", "port", "int?"}:
        if value is None and kind == "int?":
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        if kind != "int?" and value < 0:
            raise ConfigError(name, f"expected a non-negative integer, got {value!r}")
        if kind == "workers" and value < 1:
            raise ConfigError(name, "expected at least 1")
        return value
    if kind == "codes":
        if isinstance(value, str):
            return parse_codes(value)
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(name, f"expected a non-empty list of task codes, got {value!r}")
        for code in value:
            if isinstance(code, bool) or code not in TASK_ERRORS:
                raise ConfigError(name, f"unknown task code {code!r}; known: {sorted(TASK_ERRORS)}")
        return tuple(value)
    if kind in {"text?", "host"}:
        if value is None and kind == "text?":
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(name, f"expected a non-empty string, got {value!r}")
        if name == "webhook_secret" and not value.startswith("whsec_"):
            raise ConfigError(name, "expected a secret starting with 'whsec_'")
        return value
    if kind == "flag":
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    raise AssertionError(f"unhandled knob kind {kind}")  # a declaration mistake, not input
