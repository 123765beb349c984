"""docs/openapi.yaml is the truth about `kq api`: schemathesis runs against the real
`kq api` process (gunicorn, a private Redis) and must find no server error, no response
that violates the schema, no schema-valid request refused and no schema-invalid request
accepted. Bounded and derandomized, so a run is repeatable and takes well under a minute.

Also here, on the same live process: the errors answered before our code runs (gunicorn's
414/431/400, werkzeug's 404/405) come in the documented JSON error shape.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import free_port, wait_for

TOKEN = "api-token-for-schema-tests-0123456789"
SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
REQ = {"prompt": "make it blue", "image": "https://example.com/a.jpg"}

# Loaded by the schemathesis CLI (SCHEMATHESIS_HOOKS): a JSONL body is documented as the
# array of its lines, so it is sent as one JSON value per line.
HOOKS = """
import json
import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(item) + "\\n" for item in items).encode()
"""


# A schema-invalid request refused before our code runs (a request line too long for the
# HTTP server: 414; too many or too large headers: 431; a body over the limit: 413) is
# refused all the same: those count as rejections too.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415",
                     "422", "428", "429", "431"]
"""


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`kq api` as a user starts it, on a free port; yields its base URL."""
    redis.Redis.from_url(redis_url).flushdb()
    var = tmp_path_factory.mktemp("api")
    port = free_port()
    env = {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "KQ_API_TOKEN": TOKEN,
        "KQ_VAR_DIR": str(var),
        "WAVESPEED_API_KEY": "unused-here",
        "KQ_WAVESPEED_BASE_URL": "http://127.0.0.1:9",
        "KQ_LOG_FORMAT": "json",
    }
    log = (var / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kq.cli", "api", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--threads", "4"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (var / "api.log").read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout_s=30, interval_s=0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        redis.Redis.from_url(redis_url).flushdb()


def test_schemathesis_finds_nothing(live_api: str, tmp_path: Path) -> None:
    """Every operation of docs/openapi.yaml, positive and negative cases, every check."""
    hooks = tmp_path / "kq_schemathesis_hooks.py"
    hooks.write_text(HOOKS)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        str(Path(sys.executable).parent / "st"), "--config-file", str(config), "run", str(SPEC),
        "--url", live_api,
        "--header", f"Authorization: Bearer {TOKEN}",
        "--checks", "all",
        "--mode", "all",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", "25",
        "--generation-deterministic",
        "--seed", "1",
        "--workers", "1",
        "--request-timeout", "10",
        "--no-color",
        "--warnings", "off",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)},
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    report = result.stdout[-20_000:] + result.stderr[-5_000:]
    assert result.returncode == 0, report
    assert "No issues found" in result.stdout or "passed" in result.stdout, report
    print(f"schemathesis: {time.monotonic() - started:.1f} s")


def raw_http(base: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side checks); the status, headers and body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_error_shape(content_type: str, body: bytes, code: str | None = None) -> None:
    assert content_type.startswith("application/json"), (content_type, body)
    error = json.loads(body)["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    if code is not None:
        assert error["code"] == code, error


def test_errors_before_our_code_are_json(live_api: str) -> None:
    """414 (request line too long), 431 (header too large), 400 (not HTTP) from gunicorn,
    404 and 405 (with Allow) from werkzeug: all in the documented JSON error shape."""
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    long_path = "/v1/batches/" + "x" * 5000
    status, headers, body = raw_http(
        live_api, f"GET {long_path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    )
    assert status == 414
    assert_error_shape(headers["content-type"], body, "uri_too_long")

    status, headers, body = raw_http(
        live_api, f"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {'y' * 9000}\r\n\r\n".encode()
    )
    assert status == 431
    assert_error_shape(headers["content-type"], body)

    status, headers, body = raw_http(live_api, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400
    assert_error_shape(headers["content-type"], body)

    with httpx.Client(base_url=live_api, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        missing = api.get("/v1/nothing-here")
        assert missing.status_code == 404
        assert_error_shape(missing.headers["content-type"], missing.content, "not_found")
        wrong = api.delete("/v1/jobs")
        assert wrong.status_code == 405
        assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"POST"}
        assert_error_shape(wrong.headers["content-type"], wrong.content, "method_not_allowed")
        doubled = api.get("/v1//jobs/" + "0" * 32)
        assert doubled.status_code == 404  # not a redirect to another path
        assert_error_shape(doubled.headers["content-type"], doubled.content)
        bad_json = api.post(
            "/v1/jobs", content=b'{"prompt": NaN}', headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 422
        assert bad_json.json()["error"]["fields"][0]["field"] == "body"


def test_huge_budget_is_a_field_error_not_a_500(live_api: str) -> None:
    """The known finding: `budget_usd=1e308` overflowed into a 500; now 422 naming it."""
    with httpx.Client(base_url=live_api, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        for value in ("1e308", "inf", "nan", "-1", "1_000", ""):
            response = api.post("/v1/batches", params={"budget_usd": value}, json=[REQ], timeout=10)
            assert response.status_code == 422, (value, response.text)
            fields = {f["field"] for f in response.json()["error"]["fields"]}
            assert fields == {"budget_usd"}, (value, fields)
