"""Log-in sessions and CSRF tokens for the ops dashboard: stateless, derived from the token.

Nothing is stored on the server: both are HMACs under keys derived from `KQ_OPS_TOKEN`,
so changing the token logs everyone out and voids every CSRF token.

Session cookie `kq_ops`   "<issued>.<nonce>.<mac>": a random 128-bit nonce per log-in,
                          mac = HMAC(session key, "session|issued|nonce"); valid for
                          SESSION_TTL_S after `issued` (HttpOnly, SameSite=Strict).
CSRF token                "<issued>.<nonce>.<mac>": a fresh nonce per token, mac =
                          HMAC(CSRF key, "csrf|binding|issued|nonce") where `binding` is
                          the session's own nonce (a browser) or "bearer" (a script using
                          `Authorization: Bearer`); valid for CSRF_TTL_S.

The page gets a CSRF token from `GET /api/session` (a same-origin read: another site can
neither send the SameSite cookie nor read the answer) and sends it back in the
`X-CSRF-Token` header of every POST. A token from another session, an expired or forged
one, or none at all is refused with 403, before anything is read or written.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Final

SESSION_TTL_S: Final = 12 * 3600
CSRF_TTL_S: Final = 3600
CSRF_HEADER: Final = "X-CSRF-Token"
BEARER: Final = "bearer"
# Tolerated clock difference between two dashboard processes (a token issued "later").
_SKEW_S: Final = 60
_SIGNED = re.compile(r"^([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})$")


class Signer:
    """Issues and checks session cookies and CSRF tokens for one ops token."""

    def __init__(self, token: str, clock: Callable[[], float]) -> None:
        if not token:
            raise ValueError("the dashboard needs a non-empty token")
        secret = token.encode()
        self._session_key = hmac.new(secret, b"kq-ops-session-v2", hashlib.sha256).digest()
        self._csrf_key = hmac.new(secret, b"kq-ops-csrf-v1", hashlib.sha256).digest()
        self._clock = clock

    # --- sessions -------------------------------------------------------------------

    def new_session(self) -> str:
        """A fresh session cookie value."""
        return self._issue(self._session_key, "session")

    def session_id(self, cookie: str) -> str | None:
        """The session's nonce if `cookie` is a valid, unexpired session; else None."""
        return self._check(self._session_key, cookie, SESSION_TTL_S, "session")

    # --- CSRF -----------------------------------------------------------------------

    def new_csrf(self, binding: str) -> tuple[str, float]:
        """A CSRF token bound to `binding` (a session id or BEARER) and when it expires."""
        value = self._issue(self._csrf_key, "csrf", binding)
        return value, int(value.split(".", 1)[0]) + CSRF_TTL_S

    def csrf_ok(self, binding: str, value: str) -> bool:
        return self._check(self._csrf_key, value, CSRF_TTL_S, "csrf", binding) is not None

    # --- the one format ---------------------------------------------------------------

    def _issue(self, key: bytes, *purpose: str) -> str:
        issued = str(int(self._clock()))
        nonce = secrets.token_hex(16)
        return f"{issued}.{nonce}.{_mac(key, *purpose, issued, nonce)}"

    def _check(self, key: bytes, value: str, ttl_s: float, *purpose: str) -> str | None:
        match = _SIGNED.match(value or "")
        if match is None:
            return None
        issued, nonce, mac = match.groups()
        if not hmac.compare_digest(mac, _mac(key, *purpose, issued, nonce)):
            return None
        age = self._clock() - int(issued)
        return nonce if -_SKEW_S <= age <= ttl_s else None


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "|".join(parts).encode(), hashlib.sha256).hexdigest()
