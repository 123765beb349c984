"""structlog set-up, once per process: JSON in production, readable in a terminal.

A redaction processor replaces every known secret (API key, webhook secret, the
token key) and anything shaped like our URL token with `[redacted]`, so a secret
cannot reach a log line even through an exception message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
# `t=<token>` in a URL, also URL-encoded (`%26t%3D...`) as it is inside the `webhook=`
# query parameter of a submit that httpx logs ("HTTP Request: POST ...").
_TOKEN_IN_URL = re.compile(r"((?:[?&]|%(?:25)?26|%(?:25)?3F)t(?:=|%(?:25)?3D))[0-9a-f]{8,}", re.I)
_BEARER = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)


class Redactor:
    """A structlog processor that scrubs secrets from every string value."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Short values would redact ordinary words; real secrets are long.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 8}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        # The patterns only run on text that could hold them (most values are ids and
        # words): a token needs `t=` or a %-escape, a bearer header the word "bearer".
        if "t=" in text or "%" in text:
            text = _TOKEN_IN_URL.sub(rf"\1{REDACTED}", text)
        if "bearer" in text.lower():
            text = _BEARER.sub(rf"\1{REDACTED}", text)
        return text

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            if isinstance(value, str):
                event_dict[key] = self.scrub(value)
            elif isinstance(value, BaseException):
                event_dict[key] = self.scrub(repr(value))
        return event_dict


def configure_logging(
    fmt: str = "console", level: str = "INFO", secrets: Iterable[str] = ()
) -> None:
    """Configure structlog (and route stdlib logging, e.g. Celery's, through the same filter)."""
    redactor = Redactor(secrets)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

    class _StdlibRedactor(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = redactor.scrub(record.getMessage())
            record.args = ()
            return True

    root = logging.getLogger()
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: POST ..."): a line per submit and
    # per poll (formatted and scrubbed, a measurable share of a worker's CPU per job) that
    # tells what the job's record and events already hold. Shown when the level is DEBUG.
    quiet = level.upper() != "DEBUG"
    logging.getLogger("httpx").setLevel(logging.WARNING if quiet else logging.NOTSET)
    for handler in root.handlers or [logging.StreamHandler(sys.stderr)]:
        handler.addFilter(_StdlibRedactor())
        if handler not in root.handlers:
            root.addHandler(handler)
