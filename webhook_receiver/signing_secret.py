"""Where the webhook signing secret comes from: KQ_WEBHOOK_SECRET, else the provider."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.errors import ProviderError

# After a failed fetch, wait this long before asking the provider again.
REFETCH_AFTER_FAILURE_S = 5.0


class SecretSource:
    """A secret given up front, or fetched once and cached (thread-safe)."""

    def __init__(
        self,
        fixed: str = "",
        fetch: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = fixed
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._failed_at: float | None = None

    def get(self) -> str:
        """The secret; raises ProviderError when it is not known and cannot be fetched now."""
        if self._secret:
            return self._secret
        with self._lock:
            if self._secret:
                return self._secret
            if self._fetch is None:
                raise ProviderError("no webhook secret: set KQ_WEBHOOK_SECRET or WAVESPEED_API_KEY")
            if self._failed_at is not None and self._clock() - self._failed_at < (
                REFETCH_AFTER_FAILURE_S
            ):
                raise ProviderError("webhook secret unavailable (recent fetch failed)")
            try:
                self._secret = self._fetch()
            except ProviderError:
                self._failed_at = self._clock()
                raise
            return self._secret
