"""What a subscriber receives: the body, its stable id, and the Standard Webhooks headers.

Pure apart from the clock and the random source: no Redis, no HTTP. Signatures come
from the `standardwebhooks` library itself (`Webhook.sign`), so what a receiver checks
with `Webhook.verify` (or any Standard Webhooks implementation) is exactly what we made.

- `webhook_id(subscriber, event id)`: the same for every attempt of one event to one
  subscriber, different between subscribers, so a receiver can dedupe retries.
- `render(event)`: the body, rendered once when the event is queued and stored, so every
  retry sends the same bytes: `{"type": "job.completed", "timestamp": ..., "data": {...}}`
  where `data` is the event as `kq events --json` prints it (docs/events.md).
- `sign_headers(...)`: `webhook-id`, `webhook-timestamp` (now, per attempt: receivers
  refuse timestamps more than 5 minutes off) and `webhook-signature` with one `v1,...`
  signature per active secret, space-separated (several during a secret rotation).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets as _random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from standardwebhooks import Webhook

from worker.errors import ValidationError
from worker.events import Event

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (the spec's prefix, not a secret)
# The spec asks for 24..64 random bytes; we make 32.
SECRET_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
USER_AGENT: Final = "kontext-queue-forward/1"


def generate_secret() -> str:
    """A new `whsec_` secret: base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(SECRET_BYTES)).decode()


def check_secret(value: object, field: str = "secret") -> str:
    """`value` if it is a usable `whsec_` secret; else a ValidationError naming `field`
    (the message never repeats the value)."""
    if not isinstance(value, str) or not value.startswith(SECRET_PREFIX):
        raise ValidationError.single(field, f"expected a secret starting with {SECRET_PREFIX}")
    try:
        key = value[len(SECRET_PREFIX) :]
        raw = base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError.single(field, "expected whsec_ followed by base64") from None
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        raise ValidationError.single(
            field,
            f"expected {MIN_SECRET_BYTES}..{MAX_SECRET_BYTES} bytes of key after whsec_, "
            f"got {len(raw)} (make one with `kq subscribers add` or `rotate-secret`)",
        )
    return value


def webhook_id(subscriber_id: str, event_id: str) -> str:
    """The `webhook-id` of one event for one subscriber: stable across retries."""
    return f"msg_{event_id}_{subscriber_id}"


def event_type(event: Event) -> str:
    """`<type>.<state>`: `job.completed`, `job.failed`, `job.cancelled`,
    `chain.completed`/`failed`/`cancelled`, `outputs.stored`/`failed`."""
    return f"{event.type}.{event.state}"


def render(event: Event) -> str:
    """The webhook body for `event` (compact JSON, ASCII)."""
    body = {
        "type": event_type(event),
        "timestamp": datetime.fromtimestamp(event.time, UTC).isoformat().replace("+00:00", "Z"),
        "data": event.to_dict(),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


def sign_headers(msg_id: str, body: str, secrets: Sequence[str], now: float) -> dict[str, str]:
    """The request headers for one attempt, signed with every secret in `secrets`."""
    if not secrets:
        raise ValueError("no active secret to sign with")
    when = datetime.fromtimestamp(int(now), UTC)
    signatures = " ".join(Webhook(s).sign(msg_id, when, body) for s in secrets)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signatures,
    }
