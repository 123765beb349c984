"""Webhook signatures (the v3 scheme and its test vector) and per-job URL tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import parse_qs, urlsplit

from worker.signing import job_token, sign_v3, token_matches, verify_v3, webhook_url

SECRET = "whsec_dGVzdC1zZWNyZXQtZm9yLXNpbXVsYXRvci0xMjM0NTY="
WID = "0123456789abcdef0123456789abcdef"
TS = "1700000000"
BODY = (
    b'{"id":"0123456789abcdef0123456789abcdef","model":"wavespeed-ai/flux-kontext-max",'
    b'"outputs":["https://example.invalid/o.jpeg"],"urls":{"get":"https://api.wavespeed.ai/api/v3/'
    b'predictions/0123456789abcdef0123456789abcdef/result"},"has_nsfw_contents":[false],'
    b'"status":"completed","created_at":"2023-11-14T22:13:20.000Z","error":"",'
    b'"executionTime":4200,"timings":{"inference":4200}}'
)
VECTOR = "v3,86ff6619aa927042e6a23c8e03bc85c151a7bfd0f9067bb17901ce283a03eaf0"


def check(signature: str | None, body: bytes = BODY, now: float = 1700000000, **kw: str | None):  # type: ignore[no-untyped-def]
    args = {"webhook_id": WID, "timestamp": TS, **kw}
    return verify_v3(SECRET, signature=signature, body=body, now=now, **args)  # type: ignore[arg-type]


def test_published_test_vector() -> None:
    """sign_v3 reproduces the vector in wavespeed-api.md, and verify accepts it."""
    assert sign_v3(SECRET, WID, TS, BODY) == VECTOR
    assert check(VECTOR).ok


def test_tampered_body_or_headers_fail() -> None:
    """Any change to the body, id or timestamp breaks the signature."""
    assert not check(VECTOR, body=BODY.replace(b"completed", b"failed")).ok
    assert not check(VECTOR, webhook_id="f" * 32).ok
    assert not check(VECTOR, timestamp="1700000001", now=1700000001).ok


def test_standard_webhooks_style_signature_is_refused() -> None:
    """A `v1,<base64>` signature with a base64-decoded key (Standard Webhooks) is not ours."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(key, f"{WID}.{TS}.".encode() + BODY, hashlib.sha256).digest()
    v1 = "v1," + base64.b64encode(digest).decode()
    result = check(v1)
    assert not result.ok and "v3" in result.problem
    assert not check(VECTOR.replace("v3,", "v1,")).ok


def test_time_window_both_directions() -> None:
    """Deliveries more than 300 s old or in the future are refused."""
    assert check(VECTOR, now=1700000300).ok
    assert not check(VECTOR, now=1700000301).ok
    assert not check(VECTOR, now=1699999699).ok


def test_missing_and_malformed_headers() -> None:
    """Missing headers, bad timestamps and odd signature shapes are refused, not crashing."""
    assert not check(None).ok
    assert not check(VECTOR, webhook_id=None).ok
    assert not check(VECTOR, timestamp="soon").ok
    assert not check("v3," + "A" * 64).ok
    assert not check("v3").ok
    assert not check("v3,abc").ok


def test_job_token_binds_job_and_key() -> None:
    """The URL token is specific to one job and one secret key."""
    token = job_token("key-1", "job-a")
    assert token_matches("key-1", "job-a", token)
    assert not token_matches("key-1", "job-b", token)
    assert not token_matches("key-2", "job-a", token)
    assert not token_matches("key-1", "job-a", None)
    assert not token_matches("key-1", "job-a", "")


def test_webhook_url_carries_job_and_token() -> None:
    """Our webhook URL has its own query string: job id and token."""
    url = webhook_url("https://hooks.example.com/", "key-1", "abc")
    parts = urlsplit(url)
    assert parts.path == "/webhooks/wavespeed"
    assert parse_qs(parts.query) == {"job": ["abc"], "t": [job_token("key-1", "abc")]}
