"""WaveSpeed's v3 webhook signature, as the spec's Signature section defines it.

    signed    = webhook_id + "." + webhook_timestamp + "." + raw_body
    key       = the secret without its "whsec_" prefix, as ASCII bytes (NOT base64-decoded)
    signature = "v3," + hex(HMAC-SHA256(key, signed))

This is deliberately not the Standard Webhooks scheme (base64 ``v1`` signatures over a
decoded key). ``verify`` exists for the simulator's own tests and for anyone who wants a
reference implementation to compare against; the simulator itself only signs.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
SIGNATURE_PREFIX = "v3,"
TOLERANCE_S = 300  # a delivery whose timestamp is further than this from now is stale


def signing_key(secret: str) -> bytes:
    """The HMAC key: the secret's text after ``whsec_``, used as-is."""
    return secret.removeprefix(SECRET_PREFIX).encode("ascii")


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{webhook_id}.{timestamp}.".encode("ascii") + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def verify(
    secret: str,
    webhook_id: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """True when ``signature`` is exactly right for the delivery and the time is fresh."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance_s:
        return False
    expected = sign(secret, webhook_id, timestamp, body)
    return hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))
