"""The WaveSpeed client on httpx. Every HTTP and transport failure is mapped to our
error tree in one place (`_call`), so callers only ever see `worker.errors`.

Mapping (see errors.py for what each family means to a caller):

    connect error / connect or pool timeout   -> TransientError (nothing was sent)
    429                                       -> RateLimited (no task was created)
    5xx                                       -> TransientError
    400 401 402 403 404 and other 4xx         -> PermanentError, with the provider's message
    submit: read timeout, dropped connection,
            504, or a 2xx we cannot parse     -> AmbiguousError (a task may exist: never resend)
    other calls: the same                     -> TransientError / ProviderResponseError

Messages name the call and status, never the headers or the webhook URL (it
carries a token), so they are safe to log.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from urllib.request import getproxies

import httpx

from worker.domain import MODEL, EditRequest, Prediction
from worker.errors import (
    AmbiguousError,
    PermanentError,
    ProviderError,
    ProviderResponseError,
    RateLimited,
    TransientError,
    ValidationError,
)

SUBMIT_PATH = f"/api/v3/{MODEL}"  # the default model's; see submit_path()
MAX_MESSAGE_CHARS = 300
# Connection pools the submits are spread over (see WaveSpeedClient.__init__).
SUBMIT_POOLS = 8
# httpx's own logger: the direct submit path writes the line the client would.
_httpx_log = logging.getLogger("httpx")


class WaveSpeedClient:
    """Thin, typed calls to the WaveSpeed REST API; thread-safe (one pooled httpx.Client,
    and a few pooled transports for submits)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 50,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "kontext-queue/0.1"},
            timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        # Submits go straight to a transport (see `_send`), one of a few small keep-alive
        # pools, each thread keeping to one: httpcore's pool scans every connection it
        # holds (twice per request, quadratically in places) under one lock that all
        # submit threads contend for (a few % of a worker's CPU per job with one pool).
        per_shard = max(1, -(-max_connections // SUBMIT_POOLS))
        shard_limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        self._submit_pools: list[httpx.BaseTransport] = (
            [transport]
            if transport is not None
            else [httpx.HTTPTransport(limits=shard_limits) for _ in range(SUBMIT_POOLS)]
        )
        self._own_pools = transport is None
        self._next_pool = itertools.count()
        self._thread = threading.local()
        self._base_url = str(self._http.base_url).rstrip("/")
        # The client's own headers (auth, user agent, httpx's defaults), as `request` sends.
        self._json_headers = httpx.Headers(self._http.headers)
        self._json_headers["Content-Type"] = "application/json"
        self._timeout = self._http.timeout.as_dict()
        # With a proxy from the environment the client routes through it: keep the client.
        self._direct = not getproxies()

    def close(self) -> None:
        self._http.close()
        if self._own_pools:
            for pool in self._submit_pools:
                pool.close()

    def _submit_pool(self) -> httpx.BaseTransport:
        """This thread's submit transport (threads are spread over them round-robin)."""
        pool: httpx.BaseTransport | None = getattr(self._thread, "pool", None)
        if pool is None:
            pool = self._submit_pools[next(self._next_pool) % len(self._submit_pools)]
            self._thread.pool = pool
        return pool

    def __enter__(self) -> WaveSpeedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls -----------------------------------------------------------------

    def submit(self, request: EditRequest, *, webhook_url: str | None) -> Prediction:
        """Create a task at the request's model path, sending only the parameters that
        model takes; with `webhook_url`, WaveSpeed POSTs the result there."""
        # Built here, whole, rather than by `Client.request`, which parses the URL (long:
        # it carries the webhook URL) three times to merge path and query into the base.
        url = self._base_url + submit_path(request.model)
        if webhook_url:
            url += "?" + urlencode({"webhook": webhook_url})
        body = json.dumps(
            request.submit_body(), ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
        prepared = httpx.Request(
            "POST",
            url,
            content=body.encode("utf-8"),
            headers=self._json_headers,
            extensions={"timeout": self._timeout},
        )
        data = self._call("submit", "POST", url, ambiguous=True, request=prepared)
        return self._prediction("submit", data, ambiguous=True)

    def get_result(self, prediction_id: str) -> Prediction:
        """The prediction as it is now (the canonical status call)."""
        data = self._call("result", "GET", f"/api/v3/predictions/{prediction_id}/result")
        return self._prediction("result", data)

    def list_predictions(
        self,
        *,
        model: str | None = MODEL,
        created_after: str | None = None,
        created_before: str | None = None,
        status: str | None = None,
        page: int = 1,
        page_size: int = 100,
    ) -> list[Mapping[str, Any]]:
        """One page of the last 7 days' predictions of `model` (None: of every model; raw
        items, whose `model` field says which)."""
        body: dict[str, Any] = {"page": page, "page_size": page_size}
        if model is not None:
            body["model"] = model
        if created_after:
            body["created_after"] = created_after
        if created_before:
            body["created_before"] = created_before
        if status:
            body["status"] = status
        data = self._call("list", "POST", "/api/v3/predictions", json=body)
        items = data.get("items") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise ProviderResponseError("list: answer has no data.items array")
        return [i for i in items if isinstance(i, Mapping)]

    def delete(self, prediction_ids: Sequence[str]) -> int:
        """Ask the provider to drop tasks (best-effort cancel); returns the count deleted."""
        data = self._call(
            "delete", "POST", "/api/v3/predictions/delete", json={"ids": list(prediction_ids)}
        )
        count = data.get("deleted_count") if isinstance(data, Mapping) else None
        return count if isinstance(count, int) else 0

    def webhook_secret(self) -> str:
        """The `whsec_...` secret WaveSpeed signs webhooks with."""
        data = self._call("webhook_secret", "GET", "/api/v3/webhook/secret", bare_ok=True)
        secret = data.get("secret") if isinstance(data, Mapping) else None
        if not isinstance(secret, str) or not secret:
            raise ProviderResponseError("webhook_secret: answer has no secret")
        return secret

    def upload(self, path: Path) -> str:
        """Upload a local image; returns the URL to pass as `image`."""
        with path.open("rb") as fh:
            data = self._call(
                "upload", "POST", "/api/v3/media/upload/binary", files={"file": (path.name, fh)}
            )
        url = data.get("download_url") if isinstance(data, Mapping) else None
        if not isinstance(url, str) or not url:
            raise ProviderResponseError("upload: answer has no data.download_url")
        return url

    def balance(self) -> float:
        data = self._call("balance", "GET", "/api/v3/balance")
        value = data.get("balance") if isinstance(data, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProviderResponseError("balance: answer has no numeric data.balance")
        return float(value)

    # --- the one place failures are mapped --------------------------------------

    def _call(
        self,
        name: str,
        method: str,
        path: str,
        *,
        ambiguous: bool = False,
        bare_ok: bool = False,
        request: httpx.Request | None = None,
        **kwargs: Any,
    ) -> Any:
        """Send one request and return the envelope's `data`, or raise a mapped error.

        `ambiguous`: the call creates something billable, so an answer lost after the
        request left us must not look retryable. `request`: sent as it is (with the
        client's timeout) instead of one built from `method`, `path` and `kwargs`.
        """
        try:
            if request is None:
                response = self._http.request(method, path, **kwargs)
            else:
                response = self._send(request)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransientError(f"{name}: could not connect ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            # Read timeouts, dropped connections, protocol errors: the request may have
            # been received and acted on.
            message = f"{name}: no answer ({type(exc).__name__})"
            if ambiguous:
                raise AmbiguousError(message) from None
            raise TransientError(message) from None

        status = response.status_code
        if status >= 300:
            # Only a failure needs the provider's message: a success's body is decoded
            # once, below (with the message read first, each submit decoded it twice).
            message = _provider_message(response)
            if status == 429:
                raise RateLimited(f"{name}: HTTP 429 rate limited: {message}", status_code=status)
            if status == 504 and ambiguous:
                raise AmbiguousError(
                    f"{name}: HTTP 504 gateway timeout: {message}", status_code=504
                )
            if status >= 500:
                raise TransientError(f"{name}: HTTP {status}: {message}", status_code=status)
            if status >= 400:
                raise PermanentError(f"{name}: HTTP {status}: {message}", status_code=status)
            raise ProviderResponseError(f"{name}: unexpected HTTP {status}", status_code=status)

        error_cls: type[ProviderError] = AmbiguousError if ambiguous else ProviderResponseError
        try:
            body = response.json()
        except ValueError:
            snippet = response.text[:80].replace("\n", " ")
            raise error_cls(
                f"{name}: HTTP {status} but the body is not JSON: {snippet!r}"
            ) from None
        if not isinstance(body, Mapping):
            raise error_cls(f"{name}: HTTP {status} but the body is not a JSON object")
        if "data" not in body:
            if bare_ok:
                return body
            raise error_cls(f"{name}: HTTP {status} but the envelope has no `data`")
        code = body.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and code >= 400 and code != 5004:
            # An error carried inside a 200 envelope: map it like the HTTP status it names.
            text = _trim(str(body.get("message", "")))
            if code == 429:
                raise RateLimited(f"{name}: code 429: {text}", status_code=code)
            if code >= 500:
                raise (AmbiguousError if ambiguous else TransientError)(
                    f"{name}: code {code}: {text}", status_code=code
                )
            raise PermanentError(f"{name}: code {code}: {text}", status_code=code)
        return body["data"]

    def _send(self, request: httpx.Request) -> httpx.Response:
        """Send a whole request (our URL, headers and timeout) and read its answer.

        Straight to the transport, past the client's cookie jar, auth and redirect steps,
        which a submit does not use (with the URL built once, ~15 % of the CPU of a
        submit); the transport maps its failures to httpx's errors, as under the client.
        With an environment proxy, through the client, which routes by it."""
        if not self._direct:
            return self._http.send(request)
        response = self._submit_pool().handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        if _httpx_log.isEnabledFor(logging.INFO):  # the line the client writes (logs.py)
            _httpx_log.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        return response

    @staticmethod
    def _prediction(name: str, data: Any, *, ambiguous: bool = False) -> Prediction:
        try:
            return Prediction.from_json(data)
        except ValidationError as exc:
            cls: type[ProviderError] = AmbiguousError if ambiguous else ProviderResponseError
            raise cls(f"{name}: malformed prediction in answer: {exc}") from None


def submit_path(model: str) -> str:
    """The submit call's path for a model (a `worker.models` path)."""
    return f"/api/v3/{model}"


def _provider_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return _trim(response.text.replace("\n", " ")) or response.reason_phrase
    if isinstance(body, Mapping):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str) and body[key]:
                return _trim(body[key])
    return response.reason_phrase


def _trim(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"
