"""Lending a few costly objects (Redis connections) to many callers, one caller each.

A gevent server serves every client connection in a greenlet of its own: an object per
greenlet (what `threading.local` gives under gevent) grows with the clients, while the
work needs only as many as call Redis at once. `Lender` makes at most `size`, each when
a caller finds none free, and makes a caller wait (its greenlet, or its thread) while
all are lent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Lender(Generic[T]):
    """At most `size` objects made by `make`, each lent to one caller at a time; what a
    caller used goes back for the next. Build it where it is used: under gevent, after
    the patch (a server builds its app in each worker process), so a wait is a greenlet's.
    """

    def __init__(self, make: Callable[[], T], size: int) -> None:
        if size < 1:
            raise ValueError(f"size: expected at least 1, got {size}")
        self._make = make
        self._idle: list[T] = []
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def lend(self) -> Iterator[T]:
        with self._slots:
            # Holders never outnumber `size`, and each gives its object back before its
            # slot: one is idle whenever `size` are made, so at most `size` ever are.
            try:
                item = self._idle.pop()
            except IndexError:
                item = self._make()
            try:
                yield item
            finally:
                self._idle.append(item)
