"""The WaveSpeed client's one failure map, driven by httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from worker.domain import EditRequest
from worker.errors import (
    AmbiguousError,
    PermanentError,
    ProviderError,
    ProviderResponseError,
    RateLimited,
    TransientError,
)
from worker.wavespeed import WaveSpeedClient

PID = "45b392b22c3b449fa935bd4dc2219dfe"
PREDICTION = {
    "id": PID,
    "model": "wavespeed-ai/flux-kontext-max",
    "outputs": [],
    "status": "created",
    "created_at": "2025-09-25T09:12:48.239112031Z",
    "error": "",
}
REQUEST = EditRequest(prompt="p", image="https://example.com/i.jpg")
API_KEY = "sk-test-1234567890-secret"


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> WaveSpeedClient:
    return WaveSpeedClient("https://api.test", API_KEY, transport=httpx.MockTransport(handler))


def envelope(data: object, code: int = 200) -> httpx.Response:
    return httpx.Response(200, json={"code": code, "message": "success", "data": data})


def test_submit_sends_payload_key_and_encoded_webhook() -> None:
    """The submit carries the bearer key, the JSON payload and the URL-encoded webhook."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return envelope(PREDICTION)

    hook = "https://hooks.example.com/webhooks/wavespeed?job=abc&t=123"
    with client_for(handler) as client:
        prediction = client.submit(REQUEST, webhook_url=hook)
    assert prediction.id == PID and prediction.status == "created"
    (request,) = seen
    assert request.url.path == "/api/v3/wavespeed-ai/flux-kontext-max"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(request.content) == REQUEST.to_payload()
    assert "job%3Dabc%26t%3D123" in str(request.url)
    assert parse_qs(urlsplit(str(request.url)).query)["webhook"] == [hook]


def test_submit_without_webhook_has_no_query() -> None:
    """Poll-only mode submits with no webhook parameter at all."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return envelope(PREDICTION)

    with client_for(handler) as client:
        client.submit(REQUEST, webhook_url=None)
    assert seen[0].url.query == b""


STATUS_MAP: list[tuple[int, type[ProviderError]]] = [
    (400, PermanentError),
    (401, PermanentError),
    (402, PermanentError),
    (403, PermanentError),
    (404, PermanentError),
    (422, PermanentError),
    (429, RateLimited),
    (500, TransientError),
    (502, TransientError),
    (503, TransientError),
]


@pytest.mark.parametrize(("status", "error"), STATUS_MAP)
def test_http_statuses_map_to_families(status: int, error: type[ProviderError]) -> None:
    """Each HTTP status lands in its family, with the provider's message and no secret."""
    for raised in errors_of_every_call(status, f"nope {status}", error):
        assert f"nope {status}" in str(raised)
        assert raised.status_code == status
        assert API_KEY not in str(raised)


def errors_of_every_call(
    status: int, message: str, error: type[ProviderError]
) -> list[ProviderError]:
    """What a submit and a result read raise when the provider answers `status` with
    `message` (each checked to be an `error`)."""
    answer = {"code": status, "message": message}
    raised: list[ProviderError] = []
    with client_for(lambda request: httpx.Response(status, json=answer)) as client:
        for call in (
            lambda: client.submit(REQUEST, webhook_url=None),
            lambda: client.get_result(PID),
        ):
            with pytest.raises(error) as exc:
                call()
            raised.append(exc.value)
    return raised


def test_504_on_submit_is_ambiguous_but_transient_on_reads() -> None:
    """A gateway timeout may hide a created task: never retry that submit blindly."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(504, text="<html>Gateway Timeout</html>")

    with client_for(handler) as client:
        with pytest.raises(AmbiguousError):
            client.submit(REQUEST, webhook_url=None)
        with pytest.raises(TransientError):
            client.get_result(PID)


@pytest.mark.parametrize(
    ("exc", "submit_error", "read_error"),
    [
        (httpx.ConnectError("refused"), TransientError, TransientError),
        (httpx.ConnectTimeout("slow"), TransientError, TransientError),
        (httpx.PoolTimeout("busy"), TransientError, TransientError),
        (httpx.ReadTimeout("lost"), AmbiguousError, TransientError),
        (httpx.WriteTimeout("half"), AmbiguousError, TransientError),
        (httpx.RemoteProtocolError("closed"), AmbiguousError, TransientError),
        (httpx.ReadError("reset"), AmbiguousError, TransientError),
    ],
)
def test_transport_errors(
    exc: Exception, submit_error: type[ProviderError], read_error: type[ProviderError]
) -> None:
    """Nothing sent -> transient; sent but unanswered -> ambiguous for a submit."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with client_for(handler) as client:
        with pytest.raises(submit_error) as caught:
            client.submit(REQUEST, webhook_url=None)
        assert type(caught.value) is submit_error
        with pytest.raises(read_error) as caught_read:
            client.get_result(PID)
        assert type(caught_read.value) is read_error


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>oops</html>"),
        httpx.Response(200, text='{"code": 200, "data": {"id": "45b3'),
        httpx.Response(200, json=[1, 2]),
        httpx.Response(200, json={"code": 200, "message": "ok"}),
        httpx.Response(200, json={"code": 200, "data": {"status": "created"}}),
        httpx.Response(200, json={"code": 200, "data": {**PREDICTION, "id": "not-hex"}}),
    ],
)
def test_malformed_answers(response: httpx.Response) -> None:
    """A 2xx we cannot read: ambiguous for a submit, a response error for reads."""
    with client_for(lambda request: response) as client:
        with pytest.raises(AmbiguousError):
            client.submit(REQUEST, webhook_url=None)
        with pytest.raises(ProviderResponseError):
            client.get_result(PID)


def test_error_code_inside_a_200_envelope() -> None:
    """An envelope whose code is an error status is mapped like that status."""
    with client_for(lambda r: envelope(None, code=429)) as client, pytest.raises(RateLimited):
        client.get_result(PID)
    with client_for(lambda r: envelope(None, code=400)) as client, pytest.raises(PermanentError):
        client.get_result(PID)


def test_failed_prediction_is_data_not_an_error() -> None:
    """A failed task is HTTP 200 with the failure inside; the client returns it."""
    failed = {**PREDICTION, "status": "failed", "error": "flagged", "code": 1200}
    with client_for(lambda r: envelope(failed)) as client:
        prediction = client.get_result(PID)
    assert prediction.status == "failed" and prediction.task_code == 1200


def test_webhook_secret_envelope_or_bare() -> None:
    """The secret is read from data.secret, or from a bare {"secret": ...}."""
    with client_for(lambda r: envelope({"secret": "whsec_a"})) as client:
        assert client.webhook_secret() == "whsec_a"
    with client_for(lambda r: httpx.Response(200, json={"secret": "whsec_b"})) as client:
        assert client.webhook_secret() == "whsec_b"
    with client_for(lambda r: envelope({})) as client, pytest.raises(ProviderResponseError):
        client.webhook_secret()


def test_list_and_delete() -> None:
    """The list call sends its filters; delete returns the provider's count."""
    bodies: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if request.url.path.endswith("/delete"):
            return envelope({"deleted_count": 2})
        return envelope({"items": [PREDICTION], "page": 1, "page_size": 100, "total": 1})

    with client_for(handler) as client:
        items = client.list_predictions(created_after="2025-01-01T00:00:00Z")
        assert items[0]["id"] == PID
        assert client.delete([PID, PID]) == 2
    assert bodies[0]["model"] == "wavespeed-ai/flux-kontext-max"
    assert bodies[0]["created_after"] == "2025-01-01T00:00:00Z"
    assert bodies[1] == {"ids": [PID, PID]}


@pytest.mark.parametrize("status", [301, 304, 307])
def test_a_3xx_answer_is_a_response_error_on_every_call(status: int) -> None:
    """A redirect-class status is not followed nor read as data: a response error, named
    by its status (the provider's message is only read for failures)."""
    for raised in errors_of_every_call(status, "moved", ProviderResponseError):
        assert type(raised) is ProviderResponseError
        assert raised.status_code == status
        assert f"unexpected HTTP {status}" in str(raised)


def test_a_2xx_with_a_message_field_is_read_as_data() -> None:
    """A success's body is decoded once, as data; its `message` is not an error."""
    answer = httpx.Response(200, json={"code": 200, "message": "nope", "data": PREDICTION})
    with client_for(lambda request: answer) as client:
        assert client.submit(REQUEST, webhook_url=None).id == PID
