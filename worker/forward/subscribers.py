"""Who receives which events: subscribers, from Redis (`kq subscribers ...`) or a file.

A subscriber is an id (a short name, used in metric labels and webhook ids), an http(s)
URL, one or more `whsec_` secrets (newest first; during a rotation the older ones carry
an expiry and every request is signed with each unexpired one), an optional filter and
an optional concurrency limit.

Two sources, merged by `SubscriberStore.all`:

- Redis, `kq:fwd:subscribers` (id -> JSON): `kq subscribers add/list/remove/rotate-secret`;
  a running `kq forward` picks changes up within seconds.
- A file named by KQ_FORWARD_SUBSCRIBERS_FILE (TOML, or JSON when it ends in `.json`),
  re-read when it changes; edit the file to change or rotate those::

      [[subscribers]]
      id = "billing"
      url = "https://billing.example.com/hooks/kq"
      secrets = ["whsec_NEW...", "whsec_OLD..."]   # or: secret = "whsec_..."
      batch_prefix = "catalog-"                     # optional
      states = ["completed", "failed"]              # optional
      concurrency = 4                               # optional

An id may live in only one of the two; a clash is a ConfigError naming it.
"""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import redis

from worker import keys
from worker.domain import JobState
from worker.errors import ConfigError, FieldError, ValidationError
from worker.events import Event
from worker.forward.signing import check_secret, generate_secret

ID_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
STATES: Final = tuple(s.value for s in JobState if s.terminal)
MAX_CONCURRENCY: Final = 64
MAX_PREFIX_CHARS: Final = 200
# During a rotation the old secret keeps signing this long by default (as Svix does).
DEFAULT_KEEP_OLD_S: Final = 24 * 3600.0
SOURCE_REDIS: Final = "redis"
SOURCE_FILE: Final = "file"
_FILE_FIELDS: Final = frozenset(
    {"id", "url", "secret", "secrets", "batch_prefix", "states", "concurrency", "description"}
)


@dataclass(frozen=True)
class Secret:
    """One signing secret; `expires_at` is set on the old one during a rotation."""

    value: str = field(repr=False)
    expires_at: float | None = None

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class Subscriber:
    """An endpoint and what it wants; `matches` is its filter."""

    id: str
    url: str
    secrets: tuple[Secret, ...]  # newest first
    batch_prefix: str = ""  # "" = every batch (and jobs without one)
    states: frozenset[str] = frozenset()  # empty = every terminal state
    concurrency: int | None = None  # None = KQ_FORWARD_CONCURRENCY
    description: str = ""
    source: str = SOURCE_REDIS
    created_at: float = 0.0

    def matches(self, event: Event) -> bool:
        """Whether `event` is for this subscriber (batch id prefix and state filter)."""
        if self.batch_prefix and not event.batch_id.startswith(self.batch_prefix):
            return False
        return not self.states or event.state in self.states

    def active_secrets(self, now: float) -> tuple[str, ...]:
        """The secrets every request is signed with now (newest first)."""
        return tuple(s.value for s in self.secrets if s.active(now))

    def to_record(self) -> dict[str, Any]:
        """The JSON stored in Redis (secrets included: the forwarder signs with them)."""
        return {
            "id": self.id,
            "url": self.url,
            "secrets": [{"secret": s.value, "expires_at": s.expires_at} for s in self.secrets],
            "batch_prefix": self.batch_prefix,
            "states": sorted(self.states),
            "concurrency": self.concurrency,
            "description": self.description,
            "created_at": self.created_at,
        }

    def public(self, now: float | None = None) -> dict[str, Any]:
        """For listings: everything but the secrets, which are shown as a short prefix."""
        ts = time.time() if now is None else now
        return {
            "id": self.id,
            "url": self.url,
            "source": self.source,
            "batch_prefix": self.batch_prefix,
            "states": sorted(self.states),
            "concurrency": self.concurrency,
            "description": self.description,
            "created_at": self.created_at,
            "secrets": [
                {"hint": mask(s.value), "expires_at": s.expires_at}
                for s in self.secrets
                if s.active(ts)
            ],
        }


def mask(secret: str) -> str:
    """`whsec_abcd…`: enough to tell secrets apart, too little to use."""
    return secret[: len("whsec_") + 4] + "…"


def make_subscriber(
    data: Mapping[str, Any], *, source: str = SOURCE_REDIS, where: str = ""
) -> Subscriber:
    """A validated Subscriber from a record (Redis JSON, a file entry, CLI arguments).

    Raises ValidationError naming every bad field (prefixed with `where`, e.g. a file
    entry's position).
    """
    errors: list[FieldError] = []
    prefix = f"{where}." if where else ""

    def bad(name: str, message: str) -> None:
        errors.append(FieldError(prefix + name, message))

    sid = data.get("id")
    if not isinstance(sid, str) or not ID_PATTERN.match(sid):
        bad("id", "expected 1-63 of a-z 0-9 _ . - (starting with a letter or digit)")
        sid = ""
    url = data.get("url")
    if not isinstance(url, str) or not _is_http_url(url):
        bad("url", "expected an http:// or https:// URL with a host")
        url = ""
    secrets = _secrets(data, bad)
    prefix_value = data.get("batch_prefix") or ""
    if not isinstance(prefix_value, str) or len(prefix_value) > MAX_PREFIX_CHARS:
        bad("batch_prefix", f"expected a string of at most {MAX_PREFIX_CHARS} characters")
        prefix_value = ""
    states_raw = data.get("states") or []
    if isinstance(states_raw, str):
        states_raw = [states_raw]
    if not isinstance(states_raw, list) or any(s not in STATES for s in states_raw):
        bad("states", f"expected a list of {', '.join(STATES)}")
        states_raw = []
    concurrency = data.get("concurrency")
    if concurrency is not None and (
        not isinstance(concurrency, int)
        or isinstance(concurrency, bool)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        bad("concurrency", f"expected an integer 1..{MAX_CONCURRENCY}")
        concurrency = None
    description = data.get("description") or ""
    if not isinstance(description, str):
        bad("description", "expected a string")
        description = ""
    if errors:
        raise ValidationError(errors)
    created = data.get("created_at")
    return Subscriber(
        id=sid,
        url=url,
        secrets=secrets,
        batch_prefix=prefix_value,
        states=frozenset(states_raw),
        concurrency=concurrency,
        description=description,
        source=source,
        created_at=float(created) if isinstance(created, int | float) else 0.0,
    )


def _secrets(data: Mapping[str, Any], bad: Any) -> tuple[Secret, ...]:
    raw: Any = data.get("secrets")
    if raw is None and data.get("secret") is not None:
        raw = [data["secret"]]
    if not isinstance(raw, list) or not raw:
        bad("secrets", "expected at least one whsec_ secret (`secret` or `secrets`)")
        return ()
    out: list[Secret] = []
    for i, item in enumerate(raw):
        value, expires = (
            (item.get("secret"), item.get("expires_at")) if isinstance(item, dict) else (item, None)
        )
        try:
            checked = check_secret(value, f"secrets[{i}]")
        except ValidationError as exc:
            bad(exc.errors[0].field, exc.errors[0].message)
            continue
        out.append(Secret(checked, float(expires) if isinstance(expires, int | float) else None))
    return tuple(out)


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in url


def load_file(path: Path) -> dict[str, Subscriber]:
    """The subscribers in a TOML (or `.json`) file; ConfigError on anything wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"KQ_FORWARD_SUBSCRIBERS_FILE: cannot read {path} ({exc.strerror})"
        ) from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"KQ_FORWARD_SUBSCRIBERS_FILE: {path} is not valid: {exc}") from None
    entries = data.get("subscribers", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"KQ_FORWARD_SUBSCRIBERS_FILE: {path}: expected [[subscribers]] entries")
    found: dict[str, Subscriber] = {}
    for i, entry in enumerate(entries):
        where = f"subscribers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: {where}: expected a table/object")
        unknown = sorted(set(entry) - _FILE_FIELDS)
        if unknown:
            raise ConfigError(
                f"{path}: {where}: unknown field(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(_FILE_FIELDS))}"
            )
        try:
            sub = make_subscriber(entry, source=SOURCE_FILE, where=where)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if sub.id in found:
            raise ConfigError(f"{path}: {where}: id {sub.id!r} appears twice")
        found[sub.id] = sub
    return found


class SubscriberStore:
    """Subscribers in Redis, plus the file ones (read-only here), merged by `all`."""

    def __init__(self, client: redis.Redis, file: Path | None = None) -> None:
        self.client = client
        self.file = file
        self._file_cache: tuple[float, dict[str, Subscriber]] | None = None

    # --- reading ------------------------------------------------------------------

    def stored(self) -> dict[str, Subscriber]:
        """The Redis ones (records that no longer validate are skipped)."""
        raw: Any = self.client.hgetall(keys.FWD_SUBSCRIBERS)
        found: dict[str, Subscriber] = {}
        for sid, text in (raw or {}).items():
            try:
                found[_s(sid)] = make_subscriber(json.loads(_s(text)))
            except (ValueError, ValidationError):
                continue
        return found

    def from_file(self) -> dict[str, Subscriber]:
        """The file ones, re-parsed only when the file's mtime changed."""
        if self.file is None:
            return {}
        try:
            mtime = self.file.stat().st_mtime
        except OSError:
            mtime = -1.0
        if self._file_cache is None or self._file_cache[0] != mtime:
            self._file_cache = (mtime, load_file(self.file))
        return self._file_cache[1]

    def all(self) -> dict[str, Subscriber]:
        """Every subscriber, by id; ConfigError when an id is in both sources."""
        stored = self.stored()
        listed = self.from_file()
        clash = sorted(set(stored) & set(listed))
        if clash:
            raise ConfigError(
                f"subscriber id(s) {', '.join(clash)} are both in {self.file} and in Redis "
                "(`kq subscribers remove` one of them)"
            )
        return {**listed, **stored}

    def get(self, sid: str) -> Subscriber | None:
        return self.all().get(sid)

    # --- changing the Redis ones ----------------------------------------------------

    def add(
        self,
        sid: str,
        url: str,
        *,
        secret: str | None = None,
        batch_prefix: str = "",
        states: Iterable[str] = (),
        concurrency: int | None = None,
        description: str = "",
        now: float | None = None,
    ) -> Subscriber:
        """Store a new subscriber (a secret is generated when none is given).

        ValidationError for bad fields or an id that is taken (in Redis or the file).
        """
        created = self._now() if now is None else now
        sub = make_subscriber(
            {
                "id": sid,
                "url": url,
                "secrets": [secret or generate_secret()],
                "batch_prefix": batch_prefix,
                "states": list(states),
                "concurrency": concurrency,
                "description": description,
                "created_at": created,
            }
        )
        if sub.id in self.from_file():
            raise ValidationError.single("id", f"{sub.id!r} is already defined in {self.file}")
        if not self.client.hsetnx(keys.FWD_SUBSCRIBERS, sub.id, json.dumps(sub.to_record())):
            raise ValidationError.single("id", f"subscriber {sub.id!r} already exists")
        return sub

    def rotate_secret(
        self,
        sid: str,
        *,
        secret: str | None = None,
        keep_old_s: float = DEFAULT_KEEP_OLD_S,
        now: float | None = None,
    ) -> Subscriber:
        """Make a new secret current; the ones still active keep signing `keep_old_s` more
        seconds (0: stop using them now). Returns the updated subscriber."""
        ts = self._now() if now is None else now
        new = check_secret(secret or generate_secret())
        current = self._stored_one(sid)
        kept = tuple(
            Secret(s.value, min(s.expires_at or float("inf"), ts + keep_old_s))
            for s in current.secrets
            if s.active(ts) and s.value != new and keep_old_s > 0
        )
        updated = replace(current, secrets=(Secret(new), *kept))
        self.client.hset(keys.FWD_SUBSCRIBERS, sid, json.dumps(updated.to_record()))
        return updated

    def remove(self, sid: str) -> tuple[int, int]:
        """Delete a Redis subscriber with its queue, dead list and counters.

        Returns (pending deliveries dropped, dead ones dropped); ValidationError if no such
        subscriber is in Redis (file ones are removed by editing the file).
        """
        self._stored_one(sid)
        pipe = self.client.pipeline(transaction=True)
        pipe.zcard(keys.fwd_due(sid))
        pipe.zcard(keys.fwd_dead(sid))
        pipe.hdel(keys.FWD_SUBSCRIBERS, sid)
        pipe.hdel(keys.FWD_ACTIVE, sid)
        pipe.delete(
            keys.fwd_due(sid),
            keys.fwd_age(sid),
            keys.fwd_body(sid),
            keys.fwd_meta(sid),
            keys.fwd_dead(sid),
            keys.fwd_health(sid),
        )
        pending, dead, *_ = pipe.execute()
        stats: Any = self.client.hkeys(keys.FWD_STATS)
        mine = [k for k in map(_s, stats or []) if k.startswith(f"{sid}|")]
        if mine:
            self.client.hdel(keys.FWD_STATS, *mine)
        return int(pending), int(dead)

    def _stored_one(self, sid: str) -> Subscriber:
        raw: Any = self.client.hget(keys.FWD_SUBSCRIBERS, sid)
        if raw is None:
            where = " (it is in the file: edit the file)" if sid in self.from_file() else ""
            raise ValidationError.single("id", f"no subscriber {sid!r} in Redis{where}")
        return make_subscriber(json.loads(_s(raw)))

    def _now(self) -> float:
        """Redis's clock, so every machine agrees on expiries."""
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1e6


def describe(subscribers: Sequence[Subscriber]) -> dict[str, str]:
    """id -> JSON summary, for `kq:fwd:active` (no secrets, no URL: it may carry a token)."""
    return {
        s.id: json.dumps({"source": s.source, "host": urlsplit(s.url).hostname or ""})
        for s in subscribers
    }


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
