"""Webhook signatures (WaveSpeed's v3 scheme) and our per-job URL tokens. Pure.

WaveSpeed signs `webhook-id + "." + webhook-timestamp + "." + raw body` with
HMAC-SHA256, keyed by the secret minus its `whsec_` prefix used as ASCII bytes
(not base64-decoded, unlike Standard Webhooks), and sends `v3,<64 hex>`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import urlencode

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SIGNATURE_VERSION = "v3"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")
WEBHOOK_PATH = "/webhooks/wavespeed"


def _key(secret: str) -> bytes:
    return secret.removeprefix(SECRET_PREFIX).encode("ascii")


def _v3_digest(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    signed = b"%s.%s.%s" % (webhook_id.encode(), timestamp.encode(), body)
    # hmac.digest: the one-shot C HMAC (no HMAC object per delivery), same bytes.
    return hmac.digest(_key(secret), signed, hashlib.sha256).hex()


def sign_v3(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` header value WaveSpeed sends for this delivery."""
    return f"{SIGNATURE_VERSION},{_v3_digest(secret, webhook_id, timestamp, body)}"


@dataclass(frozen=True)
class SignatureCheck:
    """The verdict on one delivery's headers; `problem` says why it was refused."""

    ok: bool
    problem: str = ""


def verify_v3(
    secret: str,
    *,
    webhook_id: str | None,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: float,
    tolerance_s: int = 300,
) -> SignatureCheck:
    """Check a delivery's signature and time window, over the raw body, in constant time."""
    if not webhook_id or not timestamp or not signature:
        return SignatureCheck(False, "missing webhook-id, webhook-timestamp or webhook-signature")
    if len(webhook_id) > 200:
        return SignatureCheck(False, "webhook-id too long")
    if not _TIMESTAMP.match(timestamp):
        return SignatureCheck(False, "webhook-timestamp is not Unix seconds")
    version, _, digest = signature.partition(",")
    if version != SIGNATURE_VERSION or not _HEX64.match(digest):
        return SignatureCheck(False, "webhook-signature is not of the form v3,<64 hex>")
    expected = _v3_digest(secret, webhook_id, timestamp, body)
    if not hmac.compare_digest(expected.encode(), digest.encode()):
        return SignatureCheck(False, "signature does not match")
    if abs(now - int(timestamp)) > tolerance_s:
        return SignatureCheck(False, f"timestamp outside the ±{tolerance_s} s window")
    return SignatureCheck(True)


def job_token(secret_key: str, job_id: str) -> str:
    """The token in our webhook URL that proves the URL was minted for this job."""
    mac = hmac.digest(secret_key.encode(), b"kq-webhook:" + job_id.encode(), hashlib.sha256)
    return mac.hex()[:32]


def token_matches(secret_key: str, job_id: str, token: str | None) -> bool:
    if not token:
        return False
    return hmac.compare_digest(job_token(secret_key, job_id).encode(), token.encode())


def webhook_url(public_base: str, secret_key: str, job_id: str) -> str:
    """Our receiver's URL for one job; WaveSpeed gets it URL-encoded in `?webhook=`."""
    query = urlencode({"job": job_id, "t": job_token(secret_key, job_id)})
    return f"{public_base.rstrip('/')}{WEBHOOK_PATH}?{query}"
