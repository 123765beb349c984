"""docs/openapi.yaml is the truth about `kq api`: schemathesis runs against the real
`kq api` process (gunicorn, a private Redis) and must find no server error, no response
that violates the schema, no schema-valid request refused and no schema-invalid request
accepted (but for a chain's body: see CONFIG, and the test_chain* cases at the end).
Bounded and derandomized, so a run is repeatable and takes well under a minute.

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
#
# createChain alone runs without the two data checks: what makes a chain valid joins fields
# of different levels, which OpenAPI 3.0 cannot say (docs/openapi.yaml, ChainRequest): the
# chain's defaults merge into each step and variant and must then suit that step's model
# (a chain `seed` with a [pro] step is refused); step 1's model decides whether the source is
# `image` or `images`; at most 16 branches, the product of the steps' variant counts; and a
# value overridden at a lower level is never used, so never checked. A schema-valid chain
# may be refused and a schema-invalid one accepted; test_chains_* below post both kinds.
# Every other check (no server error, documented statuses and bodies, links) still runs.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "414", "415",
                     "422", "428", "429", "431"]

[[operations]]
include-operation-id = "createChain"
checks.positive_data_acceptance.enabled = false
checks.negative_data_rejection.enabled = false
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
    # Every check runs (schemathesis' default); not `--checks all`, which would override
    # CONFIG's per-operation settings.
    command = [
        str(Path(sys.executable).parent / "st"), "--config-file", str(config), "run", str(SPEC),
        "--url", live_api,
        "--header", f"Authorization: Bearer {TOKEN}",
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


# POST /v1/chains runs in schemathesis without its two data checks (CONFIG says why): what
# the schema cannot say is checked here, against the same live `kq api`.
IMG = "https://example.com/source.jpg"
MAX_MULTI = "wavespeed-ai/flux-kontext-max/multi"
PRO = "wavespeed-ai/flux-kontext-pro"
PRO_MULTI = "wavespeed-ai/flux-kontext-pro/multi"
FAN_4 = {"prompt": "four ways", "variants": [{"seed": n} for n in range(4)]}
FAN_5 = {"prompt": "five ways", "variants": [{"seed": n} for n in range(5)]}
VALID_CHAINS: dict[str, tuple[dict[str, object], int, float]] = {
    # name: (chain, step-1 jobs, price if completed)
    "one step": ({"image": IMG, "steps": [{"prompt": "make it night"}]}, 1, 0.08),
    "defaults, a fan-out, a [pro] step clearing the seed": (
        {
            "image": IMG,
            "seed": 7,
            "guidance_scale": 4.0,
            "aspect_ratio": "1:1",
            "steps": [
                {"prompt": "make it night"},
                {"prompt": "add snow", "variants": [{"seed": 1}, {"seed": 2}]},
                {"prompt": "oil painting", "model": PRO, "seed": None, "aspect_ratio": None},
            ],
            "priority": 5,
            "metadata": {"order": 1},
            "batch_id": "chain-tests",
        },
        1,
        0.08 + 2 * 0.08 + 2 * 0.04,
    ),
    "a /multi source, a later /multi step adding images": (
        {
            "images": [IMG, "https://example.com/two.jpg"],
            "model": MAX_MULTI,
            "steps": [
                {"prompt": "side by side"},
                {"prompt": "add this hat", "model": PRO_MULTI, "images": [IMG]},
                {"prompt": "one more", "images": []},
            ],
        },
        1,
        0.08 + 0.04 + 0.08,
    ),
    "step 1 fans out by prompt, nulls as absent": (
        {
            "image": IMG,
            "steps": [
                {"variants": [{"prompt": "a beach"}, {"prompt": "a forest", "model": PRO}]},
                {"prompt": "at dusk", "variants": None, "model": None},
            ],
            "idempotency_key": None,
            "priority": None,
            "metadata": None,
            "batch_id": None,
        },
        2,
        0.08 + 0.04 + 2 * 0.08,
    ),
    "16 branches (the limit)": ({"image": IMG, "steps": [FAN_4, FAN_4]}, 4, 20 * 0.08),
}
INVALID_CHAINS: dict[str, tuple[object, set[str]]] = {
    # name: (body, fields the 422 names)
    "no source": ({"steps": [{"prompt": "a"}]}, {"image"}),
    "no steps": ({"image": IMG, "steps": []}, {"steps"}),
    "11 steps": ({"image": IMG, "steps": [{"prompt": "a"}] * 11}, {"steps"}),
    "one variant": (
        {"image": IMG, "steps": [{"prompt": "a", "variants": [{"seed": 1}]}]},
        {"steps[0].variants"},
    ),
    "25 branches": ({"image": IMG, "steps": [FAN_5, FAN_5]}, {"steps"}),
    "a chain seed on a [pro] step": (
        {"image": IMG, "seed": 1, "steps": [{"prompt": "a", "model": PRO}]},
        {"steps[0].seed"},
    ),
    "[pro] guidance over 10": (
        {"image": IMG, "steps": [{"prompt": "a", "model": PRO, "guidance_scale": 15}]},
        {"steps[0].guidance_scale"},
    ),
    "`image` for a /multi step 1": (
        {"image": IMG, "model": MAX_MULTI, "steps": [{"prompt": "a"}]},
        {"steps[0].image", "steps[0].images"},
    ),
    "`images` on a later single-image step": (
        {"image": IMG, "steps": [{"prompt": "a"}, {"prompt": "b", "images": [IMG]}]},
        {"steps[1].images"},
    ),
    "5 more images on a later /multi step": (
        {
            "image": IMG,
            "steps": [{"prompt": "a"}, {"prompt": "b", "model": PRO_MULTI, "images": [IMG] * 5}],
        },
        {"steps[1].images"},
    ),
    "a number as a later step's images (was a 500)": (
        {
            "image": IMG,
            "steps": [{"prompt": "a"}, {"prompt": "b", "model": PRO_MULTI, "images": 5}],
        },
        {"steps[1].images"},
    ),
    "an object as a variant's images": (
        {
            "image": IMG,
            "steps": [
                {"prompt": "a"},
                {"prompt": "b", "model": PRO_MULTI, "variants": [{"images": {}}, {"seed": 1}]},
            ],
        },
        {"steps[1].variants[0].images"},
    ),
    "a chain prompt": ({"image": IMG, "prompt": "a", "steps": [{"prompt": "a"}]}, {"prompt"}),
    "a step's image": (
        {"image": IMG, "steps": [{"prompt": "a", "image": IMG}]},
        {"steps[0].image"},
    ),
    "a step without a prompt": ({"image": IMG, "steps": [{"seed": 1}]}, {"steps[0].prompt"}),
    "several problems, all named": (
        {"batch_id": "", "image": "ftp://x", "steps": [{"prompt": ""}], "priority": 5000},
        {"batch_id", "steps[0].image", "steps[0].prompt", "priority"},
    ),
    "not an object": ([{"image": IMG, "steps": [{"prompt": "a"}]}], {"body"}),
}


@pytest.fixture
def api(live_api: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=10) as client:
        yield client


@pytest.mark.parametrize("name", list(VALID_CHAINS))
def test_chains_valid_are_accepted(api: httpx.Client, name: str) -> None:
    chain, first_jobs, price = VALID_CHAINS[name]
    created = api.post("/v1/chains", json=chain)
    assert created.status_code == 201, created.text
    receipt = created.json()
    chain_id = receipt["chain_id"]
    assert created.headers["location"] == f"/v1/chains/{chain_id}"
    assert receipt["created"] is True and receipt["state"] == "running"
    assert len(receipt["job_ids"]) == first_jobs
    assert receipt["price_usd_if_completed"] == pytest.approx(price)
    view = api.get(f"/v1/chains/{chain_id}").json()
    steps = chain["steps"]
    assert isinstance(steps, list)
    assert view["state"] == "running" and view["steps"] == len(steps)
    assert [j["job_id"] for j in view["jobs"]] == receipt["job_ids"]
    for job_id in receipt["job_ids"]:
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert (job["chain_id"], job["step"]) == (chain_id, 1)
        assert job["branch"] in ("1", *(f"1.{n}" for n in range(1, first_jobs + 1)))


def test_chain_reposted_with_its_key_is_the_same_chain(api: httpx.Client) -> None:
    chain = {"image": IMG, "steps": [{"prompt": "a"}], "idempotency_key": "chain-tests-key-1"}
    first = api.post("/v1/chains", json=chain)
    again = api.post("/v1/chains", json=chain)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["created"] is False
    assert again.json()["chain_id"] == first.json()["chain_id"]
    assert again.json()["job_ids"] == first.json()["job_ids"]


@pytest.mark.parametrize("name", list(INVALID_CHAINS))
def test_chains_invalid_are_refused(api: httpx.Client, name: str) -> None:
    body, fields = INVALID_CHAINS[name]
    response = api.post("/v1/chains", json=body)
    assert response.status_code == 422, response.text
    named = {f["field"] for f in response.json()["error"]["fields"]}
    assert fields <= named, named


def test_chain_get_and_cancel(api: httpx.Client) -> None:
    """A chain's view and step jobs; cancel once (200), twice (409); unknown ids are 404;
    a plain job carries empty chain fields."""
    chain = {"image": IMG, "steps": [{"prompt": "a", "variants": [{"seed": 1}, {"seed": 2}]}]}
    receipt = api.post("/v1/chains", json=chain).json()
    chain_id = receipt["chain_id"]
    view = api.get(f"/v1/chains/{chain_id}").json()
    assert view["variants_per_step"] == [2] and view["open_branches"] == 2
    assert sorted(j["branch"] for j in view["jobs"]) == ["1.1", "1.2"]
    cancelled = api.post(f"/v1/chains/{chain_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json() == {"chain_id": chain_id, "cancelled_jobs": 2}
    again = api.post(f"/v1/chains/{chain_id}/cancel")
    assert again.status_code == 409
    assert_error_shape(again.headers["content-type"], again.content, "conflict")
    view = api.get(f"/v1/chains/{chain_id}").json()
    assert view["state"] == "cancelled" and view["finished_at"] is not None
    assert {b["state"] for b in view["branches"]} == {"cancelled"}
    for unknown in ("0" * 32, "not-a-chain-id", receipt["job_ids"][0]):
        for response in (
            api.get(f"/v1/chains/{unknown}"),
            api.post(f"/v1/chains/{unknown}/cancel"),
        ):
            assert response.status_code == 404, (unknown, response.text)
            assert_error_shape(response.headers["content-type"], response.content, "not_found")
    plain = api.post("/v1/jobs", json=REQ).json()
    job = api.get(f"/v1/jobs/{plain['job_id']}").json()
    assert (job["chain_id"], job["step"], job["branch"]) == ("", 0, "")
