"""`worker.lender.Lender`: at most `size` objects, each lent to one caller at a time."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.lender import Lender


def test_objects_are_made_when_needed_and_reused() -> None:
    made = itertools.count()
    lender = Lender(lambda: next(made), size=3)
    with lender.lend() as first, lender.lend() as second:
        assert (first, second) == (0, 1)
    with lender.lend() as again:
        assert again in (0, 1)  # given back, lent again: nothing new made
    assert next(made) == 2


def test_never_more_than_size_lent_at_once() -> None:
    made = itertools.count()
    lender = Lender(lambda: next(made), size=4)
    lock = threading.Lock()
    holding: set[int] = set()
    most = 0

    def use(_: int) -> None:
        nonlocal most
        with lender.lend() as item:
            with lock:
                assert item not in holding  # one caller at a time
                holding.add(item)
                most = max(most, len(holding))
            time.sleep(0.002)
            with lock:
                holding.discard(item)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(use, range(400)))
    assert most == 4
    assert next(made) == 4  # at most `size` ever made


def test_a_caller_waits_while_all_are_lent() -> None:
    lender = Lender(object, size=1)
    got = threading.Event()

    def second() -> None:
        with lender.lend():
            got.set()

    with lender.lend():
        waiter = threading.Thread(target=second)
        waiter.start()
        assert not got.wait(0.2)  # the only one is lent
    assert got.wait(5)
    waiter.join()


def test_an_object_comes_back_when_its_caller_raises() -> None:
    lender = Lender(object, size=1)
    with pytest.raises(RuntimeError), lender.lend() as item:
        raise RuntimeError("boom")
    with lender.lend() as again:
        assert again is item


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size: expected at least 1, got 0"):
        Lender(object, size=0)
