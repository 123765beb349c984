"""worker.log_sink over a real pipe: a write never waits for a stalled reader; what is
queued comes out whole and in order once the reader is back; past the bound, lines are
dropped and counted, and the count is written."""

from __future__ import annotations

import json
import os
import select
import threading
from collections.abc import Callable, Iterator

import pytest

from worker.log_sink import NonBlockingStderr

# A pipe holds 64 KiB on Linux: the lines below are well past it.
LINE = "x" * 95 + " {:04d}\n"  # 101 bytes


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def write_lines(sink: NonBlockingStderr, count: int) -> None:
    """Write `count` numbered lines from another thread; fail if any write blocks (it
    would hang on the full pipe for ever: the join's timeout is a liveness check)."""
    writer = threading.Thread(target=lambda: [sink.write(LINE.format(i)) for i in range(count)])
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive(), "a write waited for the stalled reader"


def read_some(read_end: int) -> bytes:
    readable, _, _ = select.select([read_end], [], [], 10)
    assert readable, "nothing more was written in 10 s"
    chunk = os.read(read_end, 1 << 16)
    assert chunk, "the pipe closed early"
    return chunk


def read_until(read_end: int, ending: bytes) -> bytes:
    got = b""
    while not got.endswith(ending):
        got += read_some(read_end)
    return got


def test_lines_queued_for_a_stalled_reader_come_out_whole_and_in_order(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    sink = NonBlockingStderr(write_end)
    write_lines(sink, 3000)  # ~300 KB: nobody reads yet
    got = read_until(read_end, LINE.format(2999).encode())
    assert got.decode().splitlines(keepends=True) == [LINE.format(i) for i in range(3000)]
    assert sink.drain(timeout_s=10)


def read_accounted(
    read_end: int, count: int, is_notice: Callable[[str], int | None]
) -> tuple[list[str], list[int]]:
    """Read until `count` lines are accounted for, written or named by a drop notice:
    (the lines written, each notice's count)."""
    kept: list[str] = []
    notices: list[int] = []
    buffered = ""
    while len(kept) + sum(notices) < count:
        *lines, buffered = (buffered + read_some(read_end).decode()).split("\n")
        for line in lines:
            dropped = is_notice(line)
            if dropped is None:
                kept.append(line)
            else:
                notices.append(dropped)
    assert buffered == ""
    return kept, notices


def json_notice(line: str) -> int | None:
    if not line.startswith("{"):
        return None
    notice = json.loads(line)
    assert notice["event"] == "log.dropped" and notice["level"] == "warning"
    return int(notice["lines"])


def test_past_the_bound_lines_are_dropped_and_the_count_written(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = NonBlockingStderr(write_end, json_lines=True, max_pending_bytes=20_000)
    write_lines(sink, 3000)
    kept, notices = read_accounted(read_end, 3000, json_notice)
    # What was kept is whole and in order; with what the notices name, every line.
    numbers = [int(line.rsplit(" ", 1)[1]) for line in kept]
    assert kept == [LINE.format(n).rstrip("\n") for n in numbers]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    assert len(kept) + sum(notices) == 3000 == len(kept) + sink.dropped
    assert notices and all(n > 0 for n in notices)
    # Once the reader is back, nothing more is dropped.
    sink.write("after\n")
    assert read_until(read_end, b"after\n") == b"after\n"
    assert sink.dropped == sum(notices)
    assert sink.drain(timeout_s=10)


def test_the_console_notice_names_the_count(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = NonBlockingStderr(write_end, max_pending_bytes=1000)
    write_lines(sink, 2000)
    prefix = "[warning  ] log.dropped"

    def console_notice(line: str) -> int | None:
        if not line.startswith(prefix):
            return None
        assert line.endswith(" detail='lines dropped while standard error was not being read'")
        return int(line.removeprefix(prefix).split()[0].removeprefix("lines="))

    kept, notices = read_accounted(read_end, 2000, console_notice)
    assert notices and len(kept) + sum(notices) == 2000
