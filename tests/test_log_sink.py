"""worker.log_sink over a real pipe: a write never waits for a stalled reader; what is
queued comes out whole and in order once the reader is back; past the bound, lines are
dropped whole and counted, and the count is written; a write from inside a write (a
signal handler) goes through; a process leaving writes what it queued; a forked child
writes its own lines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.log_sink import NonBlockingStderr

# A pipe holds 64 KiB on Linux: the lines below are well past it.
LINE = "x" * 95 + " {:04d}\n"  # 101 bytes


# new_sink(**options) -> (the pipe's read end, a sink on its write end)
NewSink = Callable[..., tuple[int, NonBlockingStderr]]


@pytest.fixture
def new_sink() -> Iterator[NewSink]:
    """Sinks on pipes of their own, closed after the test (their writer threads end)."""
    made: list[tuple[int, int, NonBlockingStderr]] = []

    def make(**options: Any) -> tuple[int, NonBlockingStderr]:
        read_end, write_end = os.pipe()
        sink = NonBlockingStderr(write_end, **options)
        made.append((read_end, write_end, sink))
        return read_end, sink

    yield make
    for read_end, write_end, sink in made:
        sink.close()
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


def test_lines_queued_for_a_stalled_reader_come_out_whole_and_in_order(new_sink: NewSink) -> None:
    read_end, sink = new_sink()
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


NOTICE_PREFIX = "[warning  ] log.dropped"


def console_notice(line: str) -> int | None:
    if not line.startswith(NOTICE_PREFIX):
        return None
    assert line.endswith(
        " detail='lines dropped while standard error was not being read fast enough'"
    )
    return int(line.removeprefix(NOTICE_PREFIX).split()[0].removeprefix("lines="))


def test_past_the_bound_lines_are_dropped_and_the_count_written(new_sink: NewSink) -> None:
    read_end, sink = new_sink(json_lines=True, max_pending_bytes=20_000)
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


def test_the_console_notice_names_the_count(new_sink: NewSink) -> None:
    read_end, sink = new_sink(max_pending_bytes=1000)
    write_lines(sink, 2000)
    kept, notices = read_accounted(read_end, 2000, console_notice)
    assert notices and len(kept) + sum(notices) == 2000


def test_a_line_written_in_pieces_is_dropped_whole(new_sink: NewSink) -> None:
    """print() writes a line and its newline apart: the two are kept or dropped together."""
    read_end, sink = new_sink(max_pending_bytes=5_000)
    with contextlib.redirect_stderr(sink):
        for i in range(3000):
            print(LINE.format(i).rstrip("\n"), file=sys.stderr)
    kept, notices = read_accounted(read_end, 3000, console_notice)
    numbers = [int(line.rsplit(" ", 1)[1]) for line in kept]
    assert kept == [LINE.format(n).rstrip("\n") for n in numbers]
    assert notices and len(kept) + sum(notices) == 3000


def fill(write_end: int) -> None:
    """Fill the pipe, so that the sink's writer blocks on its first write."""
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"." * 4096)
    os.set_blocking(write_end, True)


def test_a_line_is_never_cut_at_the_bound(new_sink: NewSink) -> None:
    """The newline of a line whose text fit is kept even past the bound (by its few
    bytes): a line is dropped at its start or not at all."""
    read_end, sink = new_sink(max_pending_bytes=250)
    fill(sink.fileno())
    for piece in ("x" * 100 + "\n", "y" * 149, "\n", "z" * 10 + "\n", "w\n"):
        sink.write(piece)  # 101 + 149 = 250: the newline goes past; z and w are dropped
    got = read_until(read_end, b"being read fast enough'\n").decode()
    assert got.lstrip(".").splitlines() == [
        "x" * 100,
        "y" * 149,
        NOTICE_PREFIX + "                    lines=2 detail='lines dropped while standard error "
        "was not being read fast enough'",
    ]


def test_many_threads_each_get_every_line_out_in_order(new_sink: NewSink) -> None:
    read_end, sink = new_sink()
    threads = [
        threading.Thread(target=lambda t=t: [sink.write(f"t{t} {i}\n") for i in range(2000)])
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    got = b""
    while got.count(b"\n") < 8 * 2000:
        got += read_some(read_end)
    for thread in threads:
        thread.join()
    by_thread: dict[str, list[int]] = {}
    for line in got.decode().splitlines():
        name, number = line.split()
        by_thread.setdefault(name, []).append(int(number))
    assert by_thread == {f"t{t}": list(range(2000)) for t in range(8)}


def run_child(code: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`code` in a new interpreter, its standard error made a NonBlockingStderr first."""
    setup = "from worker import log_sink\nlog_sink.install(json_lines=False)\nimport sys\n"
    return subprocess.run(
        [sys.executable, "-c", setup + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_a_write_from_a_signal_handler_inside_a_write_goes_through() -> None:
    """A signal handler runs between two bytecodes of the interrupted write, which may
    hold the sink's lock: it must not wait for itself (a lock that is not re-entrant
    hung here within a second)."""
    done = run_child(
        """
        import signal, time
        handled = 0
        def handler(*_):
            global handled
            handled += 1
            sys.stderr.write("from the handler\\n")
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        for i in range(100_000):
            sys.stderr.write(f"main {i}\\n")
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(handled)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    handled = int(done.stdout)
    assert handled > 0
    # Every write is accounted for: written whole, or counted by a notice.
    dropped = sum(int(n) for n in re.findall(r"log\.dropped +lines=(\d+)", done.stderr))
    written = done.stderr.count("\nmain ") + done.stderr.startswith("main ")
    written += done.stderr.count("from the handler\n")
    assert written + dropped == 100_000 + handled


def test_a_process_leaving_writes_what_it_queued() -> None:
    done = run_child(
        """
        for i in range(5000):
            sys.stderr.write(f"line {i}\\n")
        """
    )
    assert done.returncode == 0
    assert done.stderr.splitlines() == [f"line {i}" for i in range(5000)]


def test_a_forked_child_writes_its_own_lines_once(new_sink: NewSink) -> None:
    read_end, sink = new_sink()
    writer = threading.Thread(target=lambda: [sink.write(f"parent {i}\n") for i in range(3000)])
    writer.start()
    with warnings.catch_warnings():
        # Python 3.12+ warns of any fork of a process with threads: this one is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()  # while the parent's threads write (and may hold the lock)
    if pid == 0:
        for i in range(1000):
            sink.write(f"child {i}\n")
        os._exit(0 if sink.drain(timeout_s=10) else 1)
    writer.join()
    got = b""
    while got.count(b"\n") < 4000 or not got.endswith(b"\n"):
        got += read_some(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lines = got.decode().splitlines()
    assert [line for line in lines if line.startswith("child")] == [
        f"child {i}" for i in range(1000)
    ]
    assert [line for line in lines if line.startswith("parent")] == [
        f"parent {i}" for i in range(3000)
    ]
