"""The ops dashboard against a running stack: the token, the API, and a real browser.

`kq dashboard` runs as a child of a real `Stack` (simulator, receiver, worker, beat);
a few jobs run through it, then headless Chromium (Debian's `chromium`) loads the page
and the test checks what the page shows after its script ran. A screenshot is kept
under tests/artifacts/ (gitignored). Without chromium the browser test skips locally
and fails under CI.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kq.procs import Proc
from kq.stack import Stack
from tests.conftest import free_port, wait_for
from tests.support import fast_stack, is_terminal
from worker import runtime
from worker.celery_app import configure
from worker.producer import Producer
from worker.settings import Settings
from worker.store import JobStore
from worker.tasks import enqueue_submits

pytestmark = pytest.mark.integration

TOKEN = "ops-token-for-tests-0123456789abcdef"
ARTIFACTS = Path(__file__).parent / "artifacts"
IMAGE = "https://example.com/source.jpg"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


class Ops:
    def __init__(self, stack: Stack, url: str) -> None:
        self.stack = stack
        self.url = url
        self.settings = Settings.from_env({**os.environ, **stack.env})
        configure(self.settings)
        self.store: JobStore = runtime.make_store(self.settings)
        self.producer = Producer(store=self.store, send=enqueue_submits)
        assert stack.sim_url is not None
        self.sim = httpx.Client(base_url=stack.sim_url, timeout=10)
        self.completed: list[str] = []
        self.failed: list[str] = []

    def run(self, n: int, **knobs: Any) -> list[str]:
        self.sim.post("/_sim/config", json=knobs).raise_for_status()
        ids = [
            self.producer.enqueue({"prompt": f"edit {i}", "image": IMAGE}, batch_id="dash")
            for i in range(n)
        ]
        for job_id in ids:
            wait_for(lambda j=job_id: is_terminal(self.store, j), timeout_s=40, interval_s=0.1)
        quiet = {k: 0.0 for k in knobs if k.endswith(("_rate", "_s"))}
        self.sim.post("/_sim/config", json=quiet).raise_for_status()
        return ids


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    stack_dir = tmp_path_factory.mktemp("stack")
    with fast_stack(stack_dir, seed=3, extra_env={"KQ_OPS_TOKEN": TOKEN}) as stack:
        port = free_port()
        url = f"http://127.0.0.1:{port}"

        def ready(_proc: Proc) -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        stack._spawn(
            "dashboard",
            [sys.executable, "-m", "kq.cli", "dashboard", "--port", str(port)],
            ready,
        )
        o = Ops(stack, url)
        o.completed = o.run(3)
        o.failed = o.run(1, fail_rate=1.0, fail_codes=[1402])
        yield o


def test_token_is_required_everywhere(ops: Ops) -> None:
    """Without the token: a log-in form and 401s, no data; a wrong token is refused."""
    page = httpx.get(ops.url + "/")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert "completed" not in page.text
    for path in ("/api/status", f"/api/jobs/{ops.completed[0]}", "/static/dashboard.js"):
        assert httpx.get(ops.url + path).status_code == 401, path
        wrong = httpx.get(ops.url + path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
    assert httpx.post(ops.url + "/login", data={"token": "nope"}).status_code == 401
    assert httpx.get(ops.url + "/login", params={"token": "x" * len(TOKEN)}).status_code == 401


def test_login_sets_a_session_cookie_not_the_token(ops: Ops) -> None:
    """Logging in sets an HttpOnly, SameSite cookie that is not the token itself."""
    with httpx.Client(base_url=ops.url) as client:
        r = client.post("/login", data={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        page = client.get("/")
        assert page.status_code == 200 and "kontext-queue ops" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/api/status").status_code == 200
        assert TOKEN not in page.text


def test_api_with_bearer_token(ops: Ops) -> None:
    """The JSON API: counts, failures with reasons, and a job's timeline."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    snap = httpx.get(ops.url + "/api/status", headers=auth).json()
    assert snap["jobs"]["completed"] == 3 and snap["jobs"]["failed"] == 1
    assert snap["failures"][0]["reason"] == "provider_failed"
    job = httpx.get(f"{ops.url}/api/jobs/{ops.completed[0]}", headers=auth).json()
    assert job["job"]["state"] == "completed" and job["event"]["job_id"] == ops.completed[0]
    steps = [s["step"] for s in job["timeline"]]
    assert steps == ["enqueued", "submit started", "accepted by WaveSpeed", "completed"]
    assert httpx.get(f"{ops.url}/api/jobs/nothex", headers=auth).status_code == 400
    assert httpx.get(f"{ops.url}/api/jobs/{'0' * 32}", headers=auth).status_code == 404
    for body in (str(snap), str(job)):
        assert TOKEN not in body and ops.settings.secret_key not in body


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI needs it: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return binary


def _browse(binary: str, profile: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on `url` until the page's script settled; return stdout."""
    done = subprocess.run(
        [
            binary,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--virtual-time-budget=6000",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>(.*?)</', dom, re.S)
    assert match, f"#{element_id} not in the page"
    return html.unescape(match.group(1)).strip()


def test_dashboard_in_headless_chromium(ops: Ops, tmp_path: Path) -> None:
    """The page, logged in by link, shows the live counts, failures, chart and a job timeline."""
    binary = _chromium()
    job_id = ops.completed[0]
    url = f"{ops.url}/login?token={TOKEN}#job={job_id}"
    dom = _browse(binary, tmp_path / "profile", url, "--dump-dom")
    assert _text_of(dom, "count-completed") == "3"
    assert _text_of(dom, "count-failed") == "1"
    assert _text_of(dom, "count-queued") == "0"
    assert "provider_failed" in dom and ops.failed[0] in dom
    assert 'data-state="completed"' in dom  # the looked-up job, from the URL fragment
    assert "accepted by WaveSpeed" in dom and "enqueued" in dom
    assert re.search(r'id="chart-svg"[^>]*data-bars="[1-9]', dom), "no bars in the chart"
    assert "updated " in _text_of(dom, "updated")
    assert TOKEN not in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    _browse(
        binary,
        tmp_path / "profile2",
        url,
        f"--screenshot={shot}",
        "--window-size=1280,1500",
    )
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
