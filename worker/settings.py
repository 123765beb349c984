"""One frozen Settings, built from the environment in one place (`from_env`).

Entry points call `Settings.from_env()` once and hand the result down; nothing
else reads os.environ or any KQ_* variable. Tests build Settings directly or through
`from_env(env)`. Reading is all it does: the local secret key in var/secret_key is
created by the local stack (`kq up`, `kq run`), never here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from worker.errors import ConfigError

DEFAULT_BASE_URL = "https://api.wavespeed.ai"
# Webhooks usually land seconds after a task ends; a job silent for this long is polled.
DEFAULT_POLL_AFTER_S = 120.0
# The provider asks for at most one poll every 2 s per task; we back off from there.
DEFAULT_POLL_MIN_INTERVAL_S = 2.0
DEFAULT_POLL_MAX_INTERVAL_S = 60.0
# Measured from the submit: queue time at the provider counts, time in our queue does not.
DEFAULT_JOB_DEADLINE_S = 3600.0
# How often beat sweeps for due jobs; each sweep only touches jobs that are due.
DEFAULT_SWEEP_INTERVAL_S = 2.0
DEFAULT_SWEEP_BATCH = 500
# Terminal job records stay readable this long (provider keeps results 7 days too).
DEFAULT_RESULT_TTL_S = 7 * 24 * 3600
DEFAULT_EVENTS_MAXLEN = 1_000_000
DEFAULT_SUBMIT_MAX_RETRIES = 10
DEFAULT_HTTP_TIMEOUT_S = 30.0
DEFAULT_WEBHOOK_MAX_BYTES = 1024 * 1024
DEFAULT_WEBHOOK_TOLERANCE_S = 300
# A webhook body is ~1 KB; a client still sending after this long is cut off (slow-loris).
DEFAULT_WEBHOOK_BODY_TIMEOUT_S = 10.0
# An ambiguous submit (answer lost) is reconciled through the list call; if no task
# shows up there for this long, none was created and resubmitting cannot pay twice.
DEFAULT_AMBIGUOUS_GRACE_S = 120.0
# When tasks that could be an ambiguous submit's are all finished and no webhook has named
# the job this long after, none will (WaveSpeed retries a delivery 3 times with back-off
# within a few minutes): the job fails `submit_ambiguous` instead of waiting for its deadline.
DEFAULT_AMBIGUOUS_SETTLE_S = 300.0
# A submit message a worker took and never acked (it was killed) is delivered again
# after this long: above the longest task, retry countdowns (60 s) included.
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
STACK_ENV_FILE = "stack.env"
# The per-checkout key the local stack creates in var_dir (0600) when KQ_SECRET_KEY is unset.
SECRET_KEY_FILE = "secret_key"  # noqa: S105 (a file name, not a secret)
# WaveSpeed's limits per account tier (2026): (concurrent tasks, images per minute).
TIERS: dict[str, tuple[int, int]] = {
    "bronze": (2, 2),
    "silver": (300, 500),
    "gold": (3000, 3000),
    "ultra": (10_000, 5000),
}
DEFAULT_TIER = "silver"
# Outbound webhooks (`kq forward`): a delivery attempt's timeout, attempts in flight per
# endpoint, the first retry's wait (doubling, capped at an hour, jittered) and how long a
# delivery is retried before it is parked in the subscriber's dead list.
DEFAULT_FORWARD_TIMEOUT_S = 10.0
DEFAULT_FORWARD_CONCURRENCY = 4
DEFAULT_FORWARD_RETRY_BASE_S = 10.0
DEFAULT_FORWARD_RETRY_FOR_S = 24 * 3600.0
# Copy-out of outputs (worker/outputs/): how long one download may wait for bytes (x3 for
# the whole file), the largest image accepted, the first retry's wait (doubling, capped),
# how many failed downloads end it, when to give up altogether (counted from the job's
# end: the provider deletes outputs after 7 days), and when `kq status` starts to warn.
DEFAULT_OUTPUTS_TIMEOUT_S = 30.0
DEFAULT_OUTPUTS_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_OUTPUTS_RETRY_BASE_S = 5.0
DEFAULT_OUTPUTS_MAX_ATTEMPTS = 12
DEFAULT_OUTPUTS_GIVE_UP_S = 6 * 24 * 3600.0
DEFAULT_OUTPUTS_ALERT_AFTER_S = 3 * 3600.0
# KQ_OUTPUTS values that mean "off" even where `kq up` / `kq run` would turn it on.
OUTPUTS_OFF = frozenset({"off", "none", "0", "false"})
# Redis high availability (README "Running on several machines"): the Sentinel master
# name, and how long a submit waits for a replica to confirm its `submitting` record.
DEFAULT_REDIS_MASTER_NAME = "kq"
DEFAULT_REDIS_WAIT_TIMEOUT_MS = 1000
# How long a SIGTERMed worker may finish the submits it started before it leaves anyway.
DEFAULT_DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to know, read once at its entry point."""

    redis_url: str  # "" only in Settings read for a local stack, which starts its own Redis
    # KQ_BROKER_URL: the Celery broker (amqp://… for RabbitMQ); "" = redis_url, as before.
    broker_url: str = field(default="", repr=False)  # may hold a password
    wavespeed_api_key: str = field(default="", repr=False)
    wavespeed_base_url: str = DEFAULT_BASE_URL
    webhook_public_url: str = ""
    webhook_secret: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    api_token: str = field(default="", repr=False)  # the bearer token `kq api` checks
    ops_token: str = field(default="", repr=False)  # the `kq dashboard` login
    poll_after_s: float = DEFAULT_POLL_AFTER_S
    poll_min_interval_s: float = DEFAULT_POLL_MIN_INTERVAL_S
    poll_max_interval_s: float = DEFAULT_POLL_MAX_INTERVAL_S
    job_deadline_s: float = DEFAULT_JOB_DEADLINE_S
    sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S
    sweep_batch: int = DEFAULT_SWEEP_BATCH
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    events_maxlen: int = DEFAULT_EVENTS_MAXLEN
    submit_max_retries: int = DEFAULT_SUBMIT_MAX_RETRIES
    http_timeout_s: float = DEFAULT_HTTP_TIMEOUT_S
    webhook_max_bytes: int = DEFAULT_WEBHOOK_MAX_BYTES
    webhook_tolerance_s: int = DEFAULT_WEBHOOK_TOLERANCE_S
    webhook_body_timeout_s: float = DEFAULT_WEBHOOK_BODY_TIMEOUT_S
    ambiguous_grace_s: float = DEFAULT_AMBIGUOUS_GRACE_S
    ambiguous_settle_s: float = DEFAULT_AMBIGUOUS_SETTLE_S
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    tier: str = DEFAULT_TIER
    max_in_flight: int = TIERS[DEFAULT_TIER][0]
    max_submits_per_minute: int = TIERS[DEFAULT_TIER][1]
    log_format: str = "console"
    log_level: str = "INFO"
    var_dir: Path = Path("var")
    # `kq forward` (worker/forward/): subscribers from a file, beside `kq subscribers add`.
    forward_subscribers_file: Path | None = None
    forward_timeout_s: float = DEFAULT_FORWARD_TIMEOUT_S
    forward_concurrency: int = DEFAULT_FORWARD_CONCURRENCY
    forward_retry_base_s: float = DEFAULT_FORWARD_RETRY_BASE_S
    forward_retry_for_s: float = DEFAULT_FORWARD_RETRY_FOR_S
    # High availability: KQ_REDIS_SENTINELS (host:port,...) and KQ_REDIS_MASTER_NAME make
    # every client find the primary through Sentinel (KQ_REDIS_URL then only gives the
    # database number and password); KQ_REDIS_WAIT_REPLICAS replicas (default: 1 with
    # Sentinel, else 0 = off) must confirm a `submitting` record before its submit is sent.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_master_name: str = DEFAULT_REDIS_MASTER_NAME
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = DEFAULT_REDIS_WAIT_TIMEOUT_MS
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # KQ_DRAIN_TIMEOUT_S
    # Copy-out (worker/outputs/): KQ_OUTPUTS is file:///dir, a directory, or
    # s3://bucket/prefix ("" = off; AWS credentials from the standard AWS_* variables).
    outputs_url: str = ""
    s3_endpoint_url: str = ""  # KQ_S3_ENDPOINT_URL: MinIO, R2, ... ("" = AWS)
    outputs_timeout_s: float = DEFAULT_OUTPUTS_TIMEOUT_S
    outputs_max_bytes: int = DEFAULT_OUTPUTS_MAX_BYTES
    outputs_retry_base_s: float = DEFAULT_OUTPUTS_RETRY_BASE_S
    outputs_max_attempts: int = DEFAULT_OUTPUTS_MAX_ATTEMPTS
    outputs_give_up_s: float = DEFAULT_OUTPUTS_GIVE_UP_S
    outputs_alert_after_s: float = DEFAULT_OUTPUTS_ALERT_AFTER_S
    # Which variables the environment set (non-empty): `kq up` / `kq run` fill in local
    # defaults (shorter polling, no simulated account limits) only where the user did not.
    set_in_env: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_public_url)

    @property
    def keep_outputs(self) -> bool:
        """Whether completed jobs' outputs are copied to KQ_OUTPUTS."""
        return bool(self.outputs_url)

    @property
    def secret_values(self) -> tuple[str, ...]:
        """Every secret this process knows, for the log redactor."""
        values = (
            self.wavespeed_api_key,
            self.webhook_secret,
            self.secret_key,
            self.api_token,
            self.ops_token,
        )
        return tuple(value for value in values if value)

    def with_overrides(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, local_stack: bool = False
    ) -> Settings:
        """Read KQ_* and WAVESPEED_API_KEY; fall back to ./var/stack.env left by `kq up`
        and to the key in ./var/secret_key. Reads, never writes.

        `local_stack=True` is for `kq up` / `kq run`, which start their own Redis and hand
        their children a secret key: KQ_REDIS_URL and KQ_SECRET_KEY may then be unset,
        and nothing under var/ is read (a stale stack.env must not point them elsewhere).
        """
        source = dict(os.environ if env is None else env)
        var_dir = Path(source.get("KQ_VAR_DIR", "var"))
        if not source.get("KQ_REDIS_URL") and not local_stack:
            # `kq up` writes where its private stack lives, so `kq job` etc. find it.
            for key, value in _read_env_file(var_dir / STACK_ENV_FILE).items():
                source.setdefault(key, value)
        redis_url = source.get("KQ_REDIS_URL", "")
        sentinels = parse_sentinels(source.get("KQ_REDIS_SENTINELS", ""))
        if sentinels and not redis_url and not local_stack:
            redis_url = "redis:///0"  # database 0, no password: the primary comes from Sentinel
        if not redis_url and not local_stack:
            raise ConfigError(
                "KQ_REDIS_URL is not set (and no running `kq up` stack was found in "
                f"{var_dir}/{STACK_ENV_FILE}); set it, e.g. redis://127.0.0.1:6379/0"
            )
        public = source.get("KQ_WEBHOOK_PUBLIC_URL", "").rstrip("/")
        if public and not public.startswith(("http://", "https://")):
            raise ConfigError("KQ_WEBHOOK_PUBLIC_URL: expected an http(s) URL")
        base_url = (source.get("KQ_WAVESPEED_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        secret_key = source.get("KQ_SECRET_KEY", "")
        if not secret_key and not local_stack:
            if public and base_url == DEFAULT_BASE_URL:
                # Every worker and receiver must share one key, so a per-checkout one is
                # only safe on a single machine talking to the simulator.
                raise ConfigError(
                    "KQ_SECRET_KEY is required with the real API and a public webhook URL; "
                    "set the same random value (e.g. `openssl rand -hex 32`) on every process"
                )
            secret_key = read_local_secret_key(var_dir)
            if public and not secret_key:
                raise ConfigError(
                    f"KQ_SECRET_KEY is not set and there is no {var_dir / SECRET_KEY_FILE}: "
                    "webhook URLs are signed with it. Set the same random value (e.g. "
                    "`openssl rand -hex 32`) on every process, or start them with `kq up`, "
                    "which creates one"
                )
        log_format = source.get("KQ_LOG_FORMAT", "console")
        if log_format not in ("console", "json"):
            raise ConfigError(f"KQ_LOG_FORMAT: expected console or json, got {log_format!r}")
        tier = source.get("KQ_TIER", "") or DEFAULT_TIER
        if tier not in TIERS:
            raise ConfigError(f"KQ_TIER: expected one of {', '.join(TIERS)}, got {tier!r}")
        tier_in_flight, tier_rate = TIERS[tier]
        return cls(
            redis_url=redis_url,
            broker_url=source.get("KQ_BROKER_URL", "").strip(),
            tier=tier,
            max_in_flight=int(_num(source, "KQ_MAX_IN_FLIGHT", tier_in_flight, minimum=1)),
            max_submits_per_minute=int(
                _num(source, "KQ_MAX_SUBMITS_PER_MINUTE", tier_rate, minimum=1)
            ),
            wavespeed_api_key=source.get("WAVESPEED_API_KEY", ""),
            wavespeed_base_url=base_url,
            webhook_public_url=public,
            webhook_secret=source.get("KQ_WEBHOOK_SECRET", ""),
            secret_key=secret_key,
            poll_after_s=_num(source, "KQ_POLL_AFTER_S", DEFAULT_POLL_AFTER_S, minimum=0),
            poll_min_interval_s=_num(
                source, "KQ_POLL_MIN_INTERVAL_S", DEFAULT_POLL_MIN_INTERVAL_S, minimum=2.0
            ),
            poll_max_interval_s=_num(
                source, "KQ_POLL_MAX_INTERVAL_S", DEFAULT_POLL_MAX_INTERVAL_S, minimum=2.0
            ),
            job_deadline_s=_num(source, "KQ_JOB_DEADLINE_S", DEFAULT_JOB_DEADLINE_S, minimum=1),
            sweep_interval_s=_num(
                source, "KQ_SWEEP_INTERVAL_S", DEFAULT_SWEEP_INTERVAL_S, minimum=0.1
            ),
            sweep_batch=int(_num(source, "KQ_SWEEP_BATCH", DEFAULT_SWEEP_BATCH, minimum=1)),
            result_ttl_s=int(_num(source, "KQ_RESULT_TTL_S", DEFAULT_RESULT_TTL_S, minimum=60)),
            events_maxlen=int(
                _num(source, "KQ_EVENTS_MAXLEN", DEFAULT_EVENTS_MAXLEN, minimum=1000)
            ),
            submit_max_retries=int(
                _num(source, "KQ_SUBMIT_MAX_RETRIES", DEFAULT_SUBMIT_MAX_RETRIES, minimum=0)
            ),
            http_timeout_s=_num(source, "KQ_HTTP_TIMEOUT_S", DEFAULT_HTTP_TIMEOUT_S, minimum=1),
            webhook_body_timeout_s=_num(
                source, "KQ_WEBHOOK_BODY_TIMEOUT_S", DEFAULT_WEBHOOK_BODY_TIMEOUT_S, minimum=0.1
            ),
            visibility_timeout_s=_num(
                source, "KQ_VISIBILITY_TIMEOUT_S", DEFAULT_VISIBILITY_TIMEOUT_S, minimum=1
            ),
            ambiguous_grace_s=_num(
                source, "KQ_AMBIGUOUS_GRACE_S", DEFAULT_AMBIGUOUS_GRACE_S, minimum=0
            ),
            ambiguous_settle_s=_num(
                source, "KQ_AMBIGUOUS_SETTLE_S", DEFAULT_AMBIGUOUS_SETTLE_S, minimum=0
            ),
            log_format=log_format,
            log_level=source.get("KQ_LOG_LEVEL", "INFO").upper(),
            var_dir=var_dir,
            api_token=source.get("KQ_API_TOKEN", ""),
            ops_token=source.get("KQ_OPS_TOKEN", ""),
            forward_subscribers_file=(
                Path(source["KQ_FORWARD_SUBSCRIBERS_FILE"])
                if source.get("KQ_FORWARD_SUBSCRIBERS_FILE")
                else None
            ),
            forward_timeout_s=_num(
                source, "KQ_FORWARD_TIMEOUT_S", DEFAULT_FORWARD_TIMEOUT_S, minimum=0.1
            ),
            forward_concurrency=int(
                _num(source, "KQ_FORWARD_CONCURRENCY", DEFAULT_FORWARD_CONCURRENCY, minimum=1)
            ),
            forward_retry_base_s=_num(
                source, "KQ_FORWARD_RETRY_BASE_S", DEFAULT_FORWARD_RETRY_BASE_S, minimum=0.01
            ),
            forward_retry_for_s=_num(
                source, "KQ_FORWARD_RETRY_FOR_S", DEFAULT_FORWARD_RETRY_FOR_S, minimum=0
            ),
            redis_sentinels=sentinels,
            redis_master_name=(
                source.get("KQ_REDIS_MASTER_NAME", "").strip() or DEFAULT_REDIS_MASTER_NAME
            ),
            redis_wait_replicas=int(
                _num(source, "KQ_REDIS_WAIT_REPLICAS", 1 if sentinels else 0, minimum=0)
            ),
            redis_wait_timeout_ms=int(
                _num(source, "KQ_REDIS_WAIT_TIMEOUT_MS", DEFAULT_REDIS_WAIT_TIMEOUT_MS, minimum=1)
            ),
            drain_timeout_s=_num(source, "KQ_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S, minimum=0),
            outputs_url=_outputs_url(source.get("KQ_OUTPUTS", "")),
            s3_endpoint_url=source.get("KQ_S3_ENDPOINT_URL", "").strip(),
            outputs_timeout_s=_num(
                source, "KQ_OUTPUTS_TIMEOUT_S", DEFAULT_OUTPUTS_TIMEOUT_S, minimum=0.1
            ),
            outputs_max_bytes=int(
                _num(source, "KQ_OUTPUTS_MAX_BYTES", DEFAULT_OUTPUTS_MAX_BYTES, minimum=1)
            ),
            outputs_retry_base_s=_num(
                source, "KQ_OUTPUTS_RETRY_BASE_S", DEFAULT_OUTPUTS_RETRY_BASE_S, minimum=0.01
            ),
            outputs_max_attempts=int(
                _num(source, "KQ_OUTPUTS_MAX_ATTEMPTS", DEFAULT_OUTPUTS_MAX_ATTEMPTS, minimum=1)
            ),
            outputs_give_up_s=_num(
                source, "KQ_OUTPUTS_GIVE_UP_S", DEFAULT_OUTPUTS_GIVE_UP_S, minimum=1
            ),
            outputs_alert_after_s=_num(
                source, "KQ_OUTPUTS_ALERT_AFTER_S", DEFAULT_OUTPUTS_ALERT_AFTER_S, minimum=0
            ),
            set_in_env=frozenset(
                name for name, value in source.items() if value and name.startswith(_OURS)
            ),
        )

    def require_provider(self) -> None:
        """Processes that call WaveSpeed need a key; say so plainly when it is missing."""
        if not self.wavespeed_api_key:
            raise ConfigError(
                "WAVESPEED_API_KEY is not set: export your key, or use `kq up` / `kq run`, "
                "which start the local simulator when it is unset"
            )
        if self.webhooks_enabled:
            self.require_secret_key()

    def require_secret_key(self) -> None:
        """Webhook URLs carry a per-job token signed with it; the receiver checks it."""
        if not self.secret_key:
            raise ConfigError(
                "KQ_SECRET_KEY is not set (it signs the per-job webhook token): set the "
                "value every worker uses, or start the processes with `kq up`"
            )


_OURS = ("KQ_", "WAVESPEED_")


def _num(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not value >= minimum:  # also refuses NaN
        raise ConfigError(f"{name}: expected a number >= {minimum}, got {raw!r}")
    return value


def parse_sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """KQ_REDIS_SENTINELS: `host:port,host:port` (IPv6 as `[::1]:26379`); "" = none."""
    found = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"KQ_REDIS_SENTINELS: expected host:port[,host:port...], got {item!r}"
            )
        found.append((host, int(port)))
    return tuple(found)


def _outputs_url(raw: str) -> str:
    """KQ_OUTPUTS checked: "" (or off/none) = off; file:///dir, a directory, s3://bucket."""
    value = raw.strip()
    if value.lower() in OUTPUTS_OFF:
        return ""
    scheme, _, rest = value.partition("://") if "://" in value else ("", "", value)
    host = rest.split("/", 1)[0]
    if (
        scheme not in ("", "file", "s3")
        or (scheme == "s3" and not host)
        or (scheme == "file" and host not in ("", "localhost"))
    ):
        raise ConfigError(
            f"KQ_OUTPUTS: expected file:///dir, a directory or s3://bucket/prefix, got {raw!r}"
        )
    return value


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.startswith("#")}


def read_local_secret_key(var_dir: Path) -> str:
    """The per-checkout key the local stack keeps in var_dir/secret_key; "" if there is
    none (or it cannot be read). Production sets KQ_SECRET_KEY instead."""
    try:
        return (var_dir / SECRET_KEY_FILE).read_text().strip()
    except OSError:
        return ""
