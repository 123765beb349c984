"""LuaScript on a real (private) redis-server: the pinned client's own call path."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from worker.runtime import close_redis, make_redis, pinned_client
from worker.scripts import LuaScript, packed_evalsha
from worker.settings import Settings

# Counts its runs, so a test sees that a call ran exactly once.
COUNTING = "redis.call('INCR', KEYS[1]); return {ARGV[1], tonumber(ARGV[2]) * 2}"


@pytest.fixture
def pinned(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    client = pinned_client(redis_client)
    yield client
    client.close()


def test_a_pinned_call_answers_as_redis_py_does(
    pinned: redis.Redis, redis_client: redis.Redis
) -> None:
    ours = LuaScript(pinned, COUNTING)
    theirs = redis_client.register_script(COUNTING)
    assert ours(keys=["runs"], args=["é", 21]) == theirs(keys=["runs"], args=["é", 21])
    assert ours(keys=["runs"], args=["x", 1.5]) == ["x", 3]
    assert redis_client.get("runs") == "3"


def test_a_redis_without_the_script_gets_it_loaded_and_run_once(
    pinned: redis.Redis, redis_client: redis.Redis
) -> None:
    script = LuaScript(pinned, COUNTING)
    assert script(keys=["runs"], args=["a", 1]) == ["a", 2]
    redis_client.script_flush()
    assert script(keys=["runs"], args=["b", 1]) == ["b", 2]
    assert redis_client.get("runs") == "2"


def test_a_dropped_connection_is_reconnected_by_the_clients_retry(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """The receiver's client (one retry, for a connection found broken): its pinned
    connection is killed between calls, and the next call reconnects and runs once."""
    base = make_redis(settings, fail_fast=True)
    client = pinned_client(base)
    try:
        script = LuaScript(client, COUNTING)
        script(keys=["runs"], args=["a", 1])
        assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
        assert script(keys=["runs"], args=["b", 1]) == ["b", 2]
        assert redis_client.get("runs") == "2"
    finally:
        client.close()  # gives the pinned connection back to the pool
        close_redis(base)


def test_without_a_retry_a_dropped_connection_is_the_callers_error_once(
    pinned: redis.Redis, redis_client: redis.Redis
) -> None:
    """As redis-py's own call: a client without retries raises, and reconnects next time."""
    script = LuaScript(pinned, COUNTING)
    script(keys=["runs"], args=["a", 1])
    redis_client.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(redis.ConnectionError):
        script(keys=["runs"], args=["b", 1])
    assert script(keys=["runs"], args=["c", 1]) == ["c", 2]
    assert redis_client.get("runs") == "2"


def test_a_script_error_is_raised_and_the_connection_stays_usable(pinned: redis.Redis) -> None:
    script = LuaScript(pinned, "return redis.error_reply('no such thing')")
    with pytest.raises(redis.ResponseError, match="no such thing"):
        script(keys=[], args=[])
    assert LuaScript(pinned, COUNTING)(keys=["runs"], args=["c", 2]) == ["c", 4]


def test_a_pooled_client_takes_redis_pys_path(redis_client: redis.Redis) -> None:
    assert redis_client.connection is None
    assert LuaScript(redis_client, COUNTING)(keys=["runs"], args=["d", 0]) == ["d", 0]


def test_an_argument_redis_cannot_take_is_refused_as_redis_py_refuses_it(
    pinned: redis.Redis, redis_client: redis.Redis
) -> None:
    script = LuaScript(pinned, COUNTING)
    with pytest.raises(redis.DataError):
        script(keys=["runs"], args=[None, 1])  # type: ignore[list-item]
    assert redis_client.get("runs") is None
    assert script(keys=["runs"], args=[b"raw", 2]) == ["raw", 4]


def test_a_packed_call_is_the_bytes_redis_py_would_send(redis_client: redis.Redis) -> None:
    """packed_evalsha (hiredis in one C call) sends what redis-py's encoder would: UTF-8
    text, repr of numbers, bytes as they are; a type redis-py refuses is refused alike."""
    conn: Any = redis_client.connection_pool.get_connection()
    try:
        keys = ["kq:job:é", "kq:stats"]
        args: list[Any] = ["", 1733329384.123, 1733329444.5, "id", '["p é", "u"]', "", 0, b"\x00m"]
        ours = b"".join(packed_evalsha(conn, "a" * 40, keys, args))
        theirs = b"".join(conn.pack_command("EVALSHA", "a" * 40, len(keys), *keys, *args))
        assert ours == theirs
        with pytest.raises(redis.DataError):
            packed_evalsha(conn, "a" * 40, keys, [object()])
    finally:
        redis_client.connection_pool.release(conn)
