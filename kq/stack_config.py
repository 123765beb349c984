"""What the local stack starts, and the secrets and defaults it hands its children.

`StackConfig` says what to run; the user's own choices (their Redis, API key, tunables)
arrive as `Settings`, read once by the caller. The stack is also the one place that
creates the per-checkout secret key: `Settings.from_env` only ever reads it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kq.procs import DEFAULT_READY_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S, StackError
from worker.settings import SECRET_KEY_FILE, Settings, read_local_secret_key

# The simulator accepts any bearer token; a fixed one keeps local runs reproducible.
SIM_API_KEY = "sim-local-key"
# The simulator has no account limits unless told to; ours follow it unless the user
# (or a benchmark, or a test of admission control) set them.
SIM_ADMISSION_DEFAULTS = {"KQ_MAX_IN_FLIGHT": "100000", "KQ_MAX_SUBMITS_PER_MINUTE": "1000000"}
# Where `kq up` / `kq run` copy outputs by default (KQ_OUTPUTS unset), under var_dir.
OUTPUTS_DIR = "outputs"
# A warm Celery shutdown lets in-flight submits finish and ack before the worker exits.
DEFAULT_WORKER_STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class StackConfig:
    """What to start and where; every field has a local-development default but var_dir."""

    var_dir: Path  # logs in var_dir/logs/<name>.log, Redis data (AOF) in var_dir/redis
    redis_url: str | None = None  # None: start a private redis-server
    wavespeed_api_key: str | None = None  # None: start the simulator, and say so
    wavespeed_base_url: str | None = None  # with an api key; None: the default or the env's
    sim_args: tuple[str, ...] = ()  # extra CLI args for `kq sim`
    receiver_args: tuple[str, ...] = ()  # extra CLI args for `kq receiver`
    webhooks: bool = True  # False: no KQ_WEBHOOK_PUBLIC_URL, jobs resolve by polling
    worker_concurrency: int = 8
    start_worker: bool = True
    start_beat: bool = True
    start_receiver: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)  # to every child; wins
    # Copy completed jobs' outputs into var_dir/outputs (`kq up`, `kq run`) unless the user
    # set KQ_OUTPUTS (a place of their own, or "off").
    keep_outputs: bool = False
    host: str = "127.0.0.1"  # where the sim and receiver listen (Redis: always loopback)
    receiver_port: int | None = None  # None: a free port (set it when a tunnel points here)
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    worker_stop_timeout_s: float = DEFAULT_WORKER_STOP_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.worker_concurrency < 1:
            raise ValueError(
                f"worker_concurrency: expected an integer >= 1, got {self.worker_concurrency}"
            )
        for name in ("ready_timeout_s", "stop_timeout_s", "worker_stop_timeout_s"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name}: expected a number of seconds >= 0, got {value!r}")


def outputs_default(config: StackConfig, user: Settings) -> dict[str, str]:
    """KQ_OUTPUTS for the children: var_dir/outputs when the stack keeps outputs and the
    user chose nothing (their own KQ_OUTPUTS, "off" included, wins)."""
    if not config.keep_outputs or "KQ_OUTPUTS" in user.set_in_env:
        return {}
    return {"KQ_OUTPUTS": (config.var_dir / OUTPUTS_DIR).resolve().as_uri()}


def sim_admission_defaults(user: Settings) -> dict[str, str]:
    """The simulator's "no account limits", for the limits the user left unset."""
    return {k: v for k, v in SIM_ADMISSION_DEFAULTS.items() if k not in user.set_in_env}


def load_or_create_secret_key(var_dir: Path, environ: Mapping[str, str]) -> str:
    """KQ_SECRET_KEY from `environ`, else the per-checkout key in var_dir/secret_key,
    created (0600) on first use and reused after, so every child of every local stack
    in this checkout signs and checks webhook tokens with the same key."""
    given = Settings.from_env(environ, local_stack=True).secret_key
    key = given or read_local_secret_key(var_dir)
    if key:
        return key
    path = var_dir / SECRET_KEY_FILE
    try:
        var_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        return key
    except FileExistsError:  # another stack created it meanwhile: use theirs
        key = read_local_secret_key(var_dir)
    except OSError:
        key = ""
    if not key:
        raise StackError(f"cannot read or create {path}")
    return key
