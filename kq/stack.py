"""The local stack: a private Redis, the WaveSpeed simulator, the receiver, a worker, beat.

`kq up`, `kq run`, the integration tests and the benchmark and chaos harnesses all start
their processes through `Stack`, so they all run the same thing the same way::

    with Stack(StackConfig(var_dir=Path("var"))) as stack:
        settings = stack.child_settings()   # what every child reads
        ...                                 # enqueue, wait for results

Start order is redis -> sim -> receiver -> worker -> beat: each child needs the ones
before it (the worker needs the receiver's URL for its webhooks, everything needs Redis),
and each must be *ready* before the next starts. Stop runs in reverse, so a worker can
still ack its messages while Redis is up. A start that fails stops what it started and
raises `StackError` with the failing child's log tail.

Children see the parent's environment plus `Stack.env` (the KQ_* variables and the API
key the stack decided on) plus `StackConfig.extra_env`, which wins over both so a test
can point, say, KQ_WEBHOOK_PUBLIC_URL at a fault-injecting proxy. The stack passes that
environment on but reads it only through `Settings` (what the user chose, what a child
will see).

Process mechanics (sessions, logs, readiness polling, SIGTERM->SIGKILL) live in
`kq.procs`; the config, secret key and simulator defaults in `kq.stack_config`; the
private redis-server in `kq.redis_server`.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

import httpx
import redis

from kq.procs import (
    Proc,
    ReadyCheck,
    StackError,
    free_port,
    signals_as_keyboard_interrupt,
    wait_until,
)
from kq.redis_server import (
    PROBE_TIMEOUT_S,
    find_redis_server,
    local_redis_url,
    redact_url,
    redis_answers,
    redis_server_argv,
)
from kq.stack_config import (
    SIM_API_KEY,
    StackConfig,
    load_or_create_secret_key,
    outputs_default,
    sim_admission_defaults,
)
from kq.supervisor import Supervisor
from worker import keys
from worker.settings import Settings

__all__ = [
    "SIM_API_KEY",
    "Proc",
    "Stack",
    "StackConfig",
    "StackError",
    "find_redis_server",
    "load_or_create_secret_key",
    "redact_url",
    "signals_as_keyboard_interrupt",
]

# The port is picked before the child binds it; if another process wins that race, retry.
_PORT_ATTEMPTS = 3
_PORT_IN_USE = ("address already in use", "connection in use")


class Stack(Supervisor):
    """Starts the configured children, tracks them, and stops all of them (only them).

    Use as a context manager, or call `start()` and `stop()`; `stop()` is idempotent and
    also registered with atexit while the stack runs, so a crashing parent leaves no orphans.
    Restarting, killing, watching and stopping children is `Supervisor`'s part; the
    private redis-server, if the stack started one, is started again (same port, same
    AOF) when it dies while `wait_forever` watches, and the other children carry on.
    """

    def __init__(self, config: StackConfig, announce: Callable[[str], None] = print) -> None:
        super().__init__(config, announce)
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

    def child_settings(self) -> Settings:
        """The Settings every child reads: its environment, as `Settings.from_env` sees it."""
        return Settings.from_env(self._child_env())

    def start(self) -> None:
        """Start every configured child and wait until each is ready."""
        if any(proc.alive for proc in self._procs.values()):
            raise RuntimeError("the stack is already running")
        self._procs.clear()
        self._checks.clear()
        self._revive_on_exit.clear()
        self._revived_at.clear()
        self._stopping.clear()
        self._redis_url = self._sim_url = self._receiver_url = None
        atexit.register(self.stop)
        try:
            self._start_all()
        except BaseException:
            # Includes KeyboardInterrupt: Ctrl-C during a slow start must not leak children.
            self.stop()
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
        # What the user chose (their environment, then extra_env), as Settings reads it.
        given = {**self._base_env, **cfg.extra_env}
        user = Settings.from_env(given, local_stack=True)
        if user.redis_sentinels and cfg.redis_url is None:
            # The children would follow the Sentinels while the stack's own readiness
            # checks looked at a private Redis of its own: they would never see a heartbeat.
            raise StackError(
                "KQ_REDIS_SENTINELS is set without KQ_REDIS_URL: `kq up` and `kq run` would "
                "start a private Redis the Sentinels know nothing of. Set KQ_REDIS_URL to "
                "the current primary too (the stack checks it at start; its processes follow "
                "the Sentinels), unset KQ_REDIS_SENTINELS, or start `kq worker`, `kq beat` "
                'and `kq receiver` on their own (README, "Running on several machines")'
            )
        self._start_redis()
        if user.broker_url:
            # Celery's broker (RabbitMQ) is the user's; the job store stays on our Redis.
            # In `env` too, so `kq enqueue` beside `kq up` (var/stack.env) sends there.
            self._env["KQ_BROKER_URL"] = user.broker_url
            self._announce(f"Celery broker at {redact_url(user.broker_url)}")
        self._env["KQ_SECRET_KEY"] = load_or_create_secret_key(cfg.var_dir, given)
        self._env.update(outputs_default(cfg, user))
        self._start_provider(user)
        if cfg.start_receiver:
            url = self._start_listener(
                "receiver",
                lambda port: [
                    *_kq("receiver"),
                    "--host",
                    cfg.host,
                    "--port",
                    str(port),
                    *cfg.receiver_args,
                ],
                "/healthz",
                port=cfg.receiver_port,
            )
            self._receiver_url = url
            if cfg.webhooks:
                self._env["KQ_WEBHOOK_PUBLIC_URL"] = url
            self._announce(f"receiver ready at {url}")
        public = self.child_settings().webhook_public_url
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
        outputs = self.child_settings().outputs_url
        if outputs:
            self._announce(f"outputs of completed jobs are copied to {redact_url(outputs)}")
        self._announce(f"logs in {cfg.var_dir / 'logs'}")

    def _start_redis(self) -> None:
        cfg = self.config
        if cfg.redis_url is not None:
            self._redis_url = cfg.redis_url
            shown = redact_url(cfg.redis_url)
            if not wait_until(lambda: redis_answers(cfg.redis_url or ""), cfg.ready_timeout_s):
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
            return redis_server_argv(binary, port, data_dir)

        def check_for(port: int) -> ReadyCheck:
            return lambda _proc: redis_answers(local_redis_url(port))

        proc, port = self._launch_on_free_port("redis", argv, check_for, "127.0.0.1")
        self._redis_url = local_redis_url(port)
        self._env["KQ_REDIS_URL"] = self._redis_url
        # Ours to keep alive: if it dies (`redis-cli shutdown`, a crash, the OOM killer),
        # `wait_forever` starts it again on this port with this AOF, and the children,
        # which all reconnect by themselves, carry on.
        self._revive_on_exit.add("redis")
        self._announce(
            f"redis-server started on 127.0.0.1:{port} (AOF in {data_dir}), log {proc.log_path}"
        )

    def _start_provider(self, user: Settings) -> None:
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
            self._env.update(sim_admission_defaults(user))
            self._announce(
                f"WAVESPEED_API_KEY is not set: using the local WaveSpeed simulator at {url} "
                "(no real API calls, nothing is billed)"
            )
            return
        self._env["WAVESPEED_API_KEY"] = cfg.wavespeed_api_key
        if cfg.wavespeed_base_url:
            self._env["KQ_WAVESPEED_BASE_URL"] = cfg.wavespeed_base_url
        base = self.child_settings().wavespeed_base_url
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

    def _child_env(self) -> dict[str, str]:
        return {**self._base_env, **self._env, **self.config.extra_env}

    # -- readiness probes -----------------------------------------------------------------

    def _heartbeat_ready(self, role: str) -> ReadyCheck:
        """Ready when the child has set kq:heartbeat:<role>:<host>:<its pid> (it does so once
        ready)."""
        host = socket.gethostname()

        def check(proc: Proc) -> bool:
            try:
                return bool(self._redis_client().exists(keys.heartbeat(role, host, proc.pid)))
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
                socket_connect_timeout=PROBE_TIMEOUT_S,
                socket_timeout=PROBE_TIMEOUT_S,
            )
        return self._redis

    def _http_client(self) -> httpx.Client:
        if self._http is None:
            # trust_env=False: an HTTP(S)_PROXY in the shell must not intercept loopback probes.
            self._http = httpx.Client(timeout=PROBE_TIMEOUT_S, trust_env=False)
        return self._http

    def _release(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._http is not None:
            self._http.close()
            self._http = None


# -- helpers ------------------------------------------------------------------------------


def _kq(command: str) -> list[str]:
    # The interpreter running us, not whatever `kq` is first on PATH: same venv, same code.
    return [sys.executable, "-m", "kq.cli", command]


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")
