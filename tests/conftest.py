"""Shared fixtures: a private redis-server per test session, flushed around each test;
an in-process simulator per module that asks for one.

Nothing here touches a shared Redis: the server runs on a free port in a temp dir
and is shut down at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from wavespeed_sim.config import SimConfig
from wavespeed_sim.server import SimServer
from worker.settings import Settings
from worker.store import JobStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with private_redis_server(tmp_path_factory.mktemp("redis")) as (url, _proc):
        yield url


@contextmanager
def private_redis_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free port (its URL and process), stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI needs it)")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--maxmemory-policy", "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout_s=10)
        yield url, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        wavespeed_api_key="test-key-not-secret",
        wavespeed_base_url="http://127.0.0.1:9",
        webhook_public_url="http://127.0.0.1:9",
        webhook_secret="whsec_dGVzdC1zZWNyZXQtZm9yLXNpbXVsYXRvci0xMjM0NTY=",
        secret_key="test-secret-key-0123456789",
        poll_after_s=5,
        var_dir=tmp_path,
    )


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, result_ttl_s=3600, events_maxlen=10_000)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """The simulator in this process: instant inference, a fixed seed (a module that needs
    other settings defines its own `sim`)."""
    server = SimServer(SimConfig(port=0, seed=5, inference_time_s=0.0, queue_delay_s=0.0))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def control(sim: SimServer) -> Iterator[httpx.Client]:
    """A client of `sim`, which is reset (tasks, faults, config) before and after the test."""
    with httpx.Client(base_url=sim.url, timeout=10) as client:
        client.post("/_sim/reset").raise_for_status()
        yield client
        client.post("/_sim/reset").raise_for_status()
