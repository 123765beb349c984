"""The ops dashboard against a running stack: the token, the API, and a real browser.

`kq dashboard` runs as a child of a real `Stack` (simulator, receiver, worker, beat);
a few jobs run through it, then headless Chromium (Debian's `chromium`) loads the page
and the test checks what the page shows after its script ran. A screenshot is kept
under tests/artifacts/ (gitignored). Without chromium the browser test skips locally
and fails under CI.

The actions (cancel a job or a batch, redrive failed jobs) are driven like an operator
would: `Browser` speaks the DevTools protocol to the same chromium over a pipe
(`--remote-debugging-pipe`, no extra package), clicks the buttons with real mouse
events, answers the confirmation dialog, and the test then reads Redis.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from kq.procs import Proc
from kq.stack import Stack
from ops_dashboard.app import create_app
from ops_dashboard.security import CSRF_TTL_S, SESSION_TTL_S, Signer
from tests.conftest import free_port, wait_for
from tests.support import fast_stack, is_terminal
from worker import keys, runtime
from worker.celery_app import configure
from worker.domain import JobState, job_id_for_key
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
        # Writes jobs without sending them to the workers: they stay `queued` (until the
        # poller's queued-check, QUEUED_CHECK_S later), long enough to cancel one.
        self.parked = Producer(store=self.store, send=lambda ids: None)
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
        # The simulator keeps connections alive: close them here, not in the GC.
        o.sim.close()


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


# --- actions: CSRF, cancel, redrive, batches, filters ----------------------------------------

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EDIT = {"prompt": "edit", "image": IMAGE}


@contextmanager
def _session(ops: Ops) -> Iterator[httpx.Client]:
    """A client logged in like a browser (the session cookie)."""
    with httpx.Client(base_url=ops.url, timeout=30) as client:
        assert client.post("/login", data={"token": TOKEN}).status_code == 303
        yield client


def _csrf(client: httpx.Client, headers: dict[str, str] | None = None) -> str:
    answer = client.get("/api/session", headers=headers)
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["csrf"]
    return token


def _state(ops: Ops, job_id: str) -> JobState | None:
    job = ops.store.get(job_id)
    return None if job is None else job.state


def test_actions_refuse_a_post_without_a_valid_csrf_token(ops: Ops) -> None:
    """403 without a CSRF token (or with a forged, foreign or cross-site one), and the job,
    the batch and the dead letter are exactly as before; with the token: 200, then 409."""
    job_id = ops.parked.enqueue(EDIT, batch_id="csrf")
    batch = ops.parked.enqueue_batch([EDIT, EDIT], batch_id="csrf-batch", keep_job_ids=True)
    dead = ops.failed[0]
    assert ops.store.redis.zscore(keys.DLQ, dead) is not None
    posts = [
        (f"/api/jobs/{job_id}/cancel", None),
        ("/api/batches/csrf-batch/cancel", None),
        (f"/api/jobs/{dead}/redrive", None),
        ("/api/dead-letters/redrive", {"job_ids": [dead]}),
    ]
    with _session(ops) as client, _session(ops) as other:
        good = _csrf(client)
        foreign = _csrf(other)  # valid, but for another session
        bearer_token = _csrf(client, AUTH)
        refusals: list[tuple[dict[str, str], bool]] = [
            ({}, True),
            ({"X-CSRF-Token": ""}, True),
            ({"X-CSRF-Token": "nope"}, True),
            ({"X-CSRF-Token": good[:-1] + ("0" if good[-1] != "0" else "1")}, True),
            ({"X-CSRF-Token": foreign}, True),
            ({"X-CSRF-Token": bearer_token}, True),  # a bearer's token is no session's
            ({"X-CSRF-Token": good, "Sec-Fetch-Site": "cross-site"}, True),
            (AUTH, False),  # a script with the bearer token still needs one
            ({**AUTH, "X-CSRF-Token": good}, False),
        ]
        for path, body in posts:
            for headers, with_cookie in refusals:
                if with_cookie:
                    r = client.post(path, json=body, headers=headers)
                else:
                    r = httpx.post(ops.url + path, json=body, headers=headers, timeout=30)
                assert r.status_code == 403, (path, headers, r.status_code, r.text)
                assert r.headers["content-type"] == "application/json"
                assert "error" in r.json(), r.text
        # Not logged in at all: 401 (the CSRF check never runs).
        assert httpx.post(ops.url + posts[0][0]).status_code == 401
        # A GET on an action is not allowed, in JSON too.
        r = client.get(f"/api/jobs/{job_id}/cancel")
        assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]

        # Nothing changed.
        assert _state(ops, job_id) is JobState.QUEUED
        assert batch.job_ids is not None
        assert {_state(ops, j) for j in batch.job_ids} == {JobState.QUEUED}
        assert ops.store.redis.zscore(keys.DLQ, dead) is not None
        assert not ops.store.redis.exists(keys.job(job_id_for_key(f"redrive:{dead}")))

        # With the token: done once, then 409; unknown ids 404.
        csrf = {"X-CSRF-Token": good}
        r = client.post(f"/api/jobs/{job_id}/cancel", headers=csrf)
        assert r.status_code == 200 and r.json() == {"job_id": job_id, "state": "cancelled"}
        assert _state(ops, job_id) is JobState.CANCELLED
        r = client.post(f"/api/jobs/{job_id}/cancel", headers=csrf)
        assert r.status_code == 409 and r.json()["state"] == "cancelled"
        assert client.post(f"/api/jobs/{'0' * 32}/cancel", headers=csrf).status_code == 404
        r = client.post("/api/batches/csrf-batch/cancel", headers=csrf)
        assert r.status_code == 200 and r.json()["cancelled"] == 2, r.text
        assert r.json()["progress"]["done"] is True
        assert {_state(ops, j) for j in batch.job_ids} == {JobState.CANCELLED}
        assert client.post("/api/batches/csrf-batch/cancel", headers=csrf).status_code == 409
        assert client.post("/api/batches/no-such-batch/cancel", headers=csrf).status_code == 404
        r = client.post(f"/api/jobs/{ops.completed[0]}/redrive", headers=csrf)
        assert r.status_code == 409 and r.json()["state"] == "completed"
        assert client.post(f"/api/jobs/{'0' * 32}/redrive", headers=csrf).status_code == 404
        r = client.post("/api/dead-letters/redrive", json={"job_ids": "x"}, headers=csrf)
        assert r.status_code == 400
        # A bearer script, with a token of its own.
        r = httpx.post(
            f"{ops.url}/api/jobs/{'0' * 32}/cancel", headers={**AUTH, "X-CSRF-Token": bearer_token}
        )
        assert r.status_code == 404


def test_csrf_tokens_expire_and_belong_to_one_session() -> None:
    """The signer alone, on a controlled clock: tokens are bound and time-limited."""
    now = [1_800_000_000.0]
    signer = Signer(TOKEN, lambda: now[0])
    session = signer.session_id(signer.new_session())
    assert session is not None and signer.session_id("forged.cookie.value") is None
    token, expires_at = signer.new_csrf(session)
    assert expires_at == int(now[0]) + CSRF_TTL_S
    assert signer.csrf_ok(session, token) and not signer.csrf_ok("another-session", token)
    assert not Signer(TOKEN + "x", lambda: now[0]).csrf_ok(session, token)  # token rotated
    now[0] += CSRF_TTL_S + 1
    assert not signer.csrf_ok(session, token)
    cookie = signer.new_session()
    now[0] += SESSION_TTL_S + 1
    assert signer.session_id(cookie) is None


def test_actions_without_a_producer_answer_503_after_the_csrf_check() -> None:
    """An app built without a producer (no Redis needed): 403 first, then a clear 503."""
    app = create_app(client=redis.Redis(port=1), token=TOKEN, deadline_s=60, webhooks_enabled=True)
    with app.test_client() as client:
        assert client.post("/login", data={"token": TOKEN}).status_code == 303
        path = f"/api/jobs/{'0' * 32}/cancel"
        refused = client.post(path)
        assert refused.status_code == 403 and refused.json and "CSRF" in refused.json["error"]
        csrf = client.get("/api/session").json["csrf"]  # type: ignore[index]
        answer = client.post(path, headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 503 and answer.json and "producer" in answer.json["error"]
        assert client.get("/api/dead-letters").status_code == 503
        missing = client.get("/api/no-such-thing")
        assert missing.status_code == 404 and missing.json and missing.json["error"]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe.

    `--remote-debugging-pipe` makes chromium read commands on fd 3 and write answers on
    fd 4, as JSON messages ended by a NUL byte; a tiny launcher puts our pipe ends there.
    """

    LAUNCHER = (
        "import fcntl, os, sys\n"
        "a = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD, 10)\n"
        "b = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD, 10)\n"
        "os.dup2(a, 3); os.dup2(b, 4)\n"
        "os.execv(sys.argv[3], sys.argv[3:])\n"
    )

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 1500) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        chrome_in, self._to = os.pipe()
        self._from, chrome_out = os.pipe()
        self._log = open(profile / "chromium.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [
                sys.executable, "-c", self.LAUNCHER, str(chrome_in), str(chrome_out),
                binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank",
            ],
            pass_fds=(chrome_in, chrome_out),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )  # fmt: skip
        os.close(chrome_in)
        os.close(chrome_out)
        self._id = 0
        self._buffer = b""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session: str = attached["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout_s=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._to)
        os.close(self._from)
        self._log.close()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout_s: float = 30,
    ) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:  # events (no id) are not needed here
                    assert "error" not in answer, (method, answer["error"])
                    result: dict[str, Any] = answer["result"]
                    return result
            left = deadline - time.monotonic()
            assert left > 0, f"chromium did not answer {method} within {timeout_s} s"
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                assert chunk, "chromium closed the pipe"
                self._buffer += chunk

    def page(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.call(method, params, session=self.session)

    def js(self, expression: str) -> Any:
        answer = self.page(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def goto(self, url: str) -> None:
        self.page("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && !!document.getElementById('updated')")

    def wait(self, expression: str, timeout_s: float = 20) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() >= deadline:
                notice = self.js("document.getElementById('notice')?.textContent")
                raise AssertionError(f"not true within {timeout_s} s: {expression} ({notice})")
            time.sleep(0.1)

    def text(self, selector: str) -> str:
        value = self.js(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")
        assert value is not None, f"{selector} not in the page"
        return str(value).strip()

    def click(self, selector: str) -> None:
        """A real left click (mouse events at the element's centre, scrolled into view)."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
        )
        assert box, f"{selector} not in the page"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.page(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    def confirm(self, opener: str, answer: str) -> str:
        """Click `opener`, wait for the confirmation dialog, click `answer`; the question."""
        for _ in range(3):  # a refresh may redraw a row between press and release
            self.click(opener)
            try:
                self.wait("document.getElementById('confirm').open", timeout_s=3)
                break
            except AssertionError:
                continue
        question = self.text("#confirm-text")
        self.click(answer)
        self.wait("!document.getElementById('confirm').open", timeout_s=5)
        return question

    def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select>, as a user's choice does (value, then `change`)."""
        self.js(
            f"(() => {{ const s = document.querySelector({json.dumps(selector)});"
            f" s.value = {json.dumps(value)}; s.dispatchEvent(new Event('change')); }})()"
        )

    def screenshot(self, path: Path) -> None:
        shot = self.page("Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))


def _dead_letters(ops: Ops, **params: str) -> Any:
    answer = httpx.get(ops.url + "/api/dead-letters", params=params, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _logged_in(ops: Ops, fragment: str = "") -> str:
    return f"{ops.url}/login?token={TOKEN}{fragment}"


def test_failed_jobs_filter_by_reason_and_batch(ops: Ops, tmp_path: Path) -> None:
    """Two reasons in the dead-letter list; the API and the page's filters narrow to one."""
    receipt = ops.producer.enqueue_batch(
        [EDIT, EDIT], batch_id="tight", budget_usd=0, keep_job_ids=True
    )
    assert receipt.job_ids is not None
    tight = set(receipt.job_ids)
    for job_id in tight:
        wait_for(lambda j=job_id: is_terminal(ops.store, j), timeout_s=30, interval_s=0.1)
    budget = _dead_letters(ops, reason="budget")
    assert {j["job_id"] for j in budget["jobs"]} == tight
    assert {j["reason"] for j in budget["jobs"]} == {"budget"} and budget["matching"] == 2
    reasons = {f["value"]: f["count"] for f in budget["reasons"]}
    assert reasons["budget"] == 2 and reasons["provider_failed"] >= 1
    provider = _dead_letters(ops, reason="provider_failed")
    assert provider["jobs"] and {j["reason"] for j in provider["jobs"]} == {"provider_failed"}
    assert {j["job_id"] for j in _dead_letters(ops, batch="tight")["jobs"]} == tight
    none = _dead_letters(ops, batch="tight", reason="nsfw")
    assert none["jobs"] == [] and none["matching"] == 0

    rows = "[...document.querySelectorAll('#failures tbody tr[data-job]')]"
    with Browser(_chromium(), tmp_path / "profile") as browser:
        browser.goto(_logged_in(ops))
        browser.wait("[...document.querySelectorAll('#filter-reason option')]"
                     ".some(o => o.value === 'budget')")  # fmt: skip
        assert browser.js(f"{rows}.length") >= 3  # all reasons to start with
        browser.choose("#filter-reason", "budget")
        browser.wait(f"{rows}.length === 2 && {rows}.every(r => r.dataset.reason === 'budget')")
        assert set(browser.js(f"{rows}.map(r => r.dataset.job)")) == tight
        assert "2 of" in browser.text("#failures-count")
        browser.choose("#filter-reason", "provider_failed")
        browser.wait(
            f"{rows}.length >= 1 && {rows}.every(r => r.dataset.reason === 'provider_failed')"
        )
        browser.choose("#filter-reason", "")
        browser.choose("#filter-batch", "tight")
        browser.wait(f"{rows}.length === 2 && {rows}.every(r => r.dataset.reason === 'budget')")


def test_batch_row_shows_rate_eta_queue_budget_and_cancels(ops: Ops, tmp_path: Path) -> None:
    """A running batch (1 done, 2 in flight, 1 queued, $5 budget) in the API and as a row;
    "Cancel batch" with its confirmation cancels what is left, in Redis."""
    batch = "ui-batch"
    first = ops.producer.enqueue_batch([EDIT], batch_id=batch, budget_usd=5, keep_job_ids=True)
    assert first.job_ids is not None
    wait_for(lambda: _state(ops, first.job_ids[0]) is JobState.COMPLETED, timeout_s=30)
    ops.sim.post("/_sim/config", json={"inference_time_s": 300}).raise_for_status()
    try:
        slow = ops.producer.enqueue_batch([EDIT, EDIT], batch_id=batch, keep_job_ids=True)
        assert slow.job_ids is not None
        for job_id in slow.job_ids:
            wait_for(lambda j=job_id: _state(ops, j) is JobState.SUBMITTED, timeout_s=30)
        queued = ops.parked.enqueue_batch([EDIT], batch_id=batch, keep_job_ids=True)
        assert queued.job_ids is not None

        snap = httpx.get(ops.url + "/api/status", headers=AUTH, timeout=30).json()
        row = next(b for b in snap["batches"] if b["batch_id"] == batch)
        assert (row["total"], row["completed"], row["in_flight"], row["queued"]) == (4, 1, 2, 1)
        assert row["budget_usd"] == 5.0 and row["cost_usd"] == 0.24
        assert row["rate_per_s"] > 0 and row["eta_s"] is not None and row["eta_s"] > 0

        tr = f"#batches tr[data-batch='{batch}']"
        with Browser(_chromium(), tmp_path / "profile") as browser:
            browser.goto(_logged_in(ops, f"#job={ops.failed[0]}"))
            browser.wait(f'!!document.querySelector("{tr} .b-queued")')
            assert browser.text(f"{tr} .b-done") == "1 of 4"
            assert browser.text(f"{tr} .b-queued") == "1"
            assert browser.text(f"{tr} .b-in-flight") == "2"
            assert browser.text(f"{tr} .b-completed") == "1"
            assert re.fullmatch(r"[0-9.]+ jobs/min", browser.text(f"{tr} .b-rate"))
            assert re.fullmatch(
                r"≈ [0-9]+ (s|min( [0-9]+ s)?|h( [0-9]+ min)?)", browser.text(f"{tr} .b-eta")
            )
            assert browser.text(f"{tr} .b-budget") == "$0.24 of $5.00 (5 %)"
            # Readable labels, not "W1 B1 R2".
            processes = browser.text("#processes")
            assert re.fullmatch(r"1 worker · 1 beat · [0-9]+ receivers?", processes), processes
            ARTIFACTS.mkdir(exist_ok=True)
            browser.screenshot(ARTIFACTS / "dashboard-batch.png")

            question = browser.confirm(f"{tr} button.b-cancel", "#confirm-no")
            assert batch in question and "1 queued, 2 in flight" in question
            assert ops.producer.batch_progress(batch).terminal == 1  # type: ignore[union-attr]
            browser.click(f"{tr} button.b-cancel")
            browser.wait("document.getElementById('confirm').open")
            browser.screenshot(ARTIFACTS / "dashboard-confirm.png")
            browser.click("#confirm-yes")
            wait_for(lambda: ops.producer.batch_progress(batch).done, timeout_s=20)  # type: ignore[union-attr]
            browser.wait(
                "document.getElementById('notice').textContent.includes('3 jobs cancelled')"
            )
        progress = ops.producer.batch_progress(batch)
        assert progress is not None and (progress.completed, progress.cancelled) == (1, 3)
        for job_id in (*slow.job_ids, *queued.job_ids):
            job = ops.store.get(job_id)
            assert job is not None and job.state is JobState.CANCELLED
            assert job.resolved_by == "user" and job.reason == "cancelled_by_user"
    finally:
        ops.sim.post("/_sim/config", json={"inference_time_s": 0.2}).raise_for_status()


def test_cancel_a_queued_job_in_the_browser(ops: Ops, tmp_path: Path) -> None:
    """Job lookup -> "Cancel job" -> "No" changes nothing; again -> "Yes": cancelled in Redis."""
    job_id = ops.parked.enqueue(EDIT, batch_id="ui")
    with Browser(_chromium(), tmp_path / "profile") as browser:
        browser.goto(_logged_in(ops, f"#job={job_id}"))
        browser.wait("document.getElementById('job-state')?.dataset.state === 'queued'")
        timeline = browser.text("#job-result ol.timeline")
        assert "enqueued" in timeline and "polled 0 times" in timeline
        assert "looks at the job next at" in timeline  # the poller's queued-check

        question = browser.confirm("#job-cancel", "#confirm-no")
        assert job_id in question and "queued" in question
        time.sleep(0.5)
        assert _state(ops, job_id) is JobState.QUEUED

        browser.confirm("#job-cancel", "#confirm-yes")
        wait_for(lambda: _state(ops, job_id) is JobState.CANCELLED, timeout_s=10)
        browser.wait("document.getElementById('job-state')?.dataset.state === 'cancelled'")
        assert browser.text("#notice") == f"Job {job_id} cancelled."
        assert not browser.js("!!document.getElementById('job-cancel')")
    job = ops.store.get(job_id)
    assert job is not None and job.resolved_by == "user" and job.reason == "cancelled_by_user"


def test_redrive_a_dead_letter_in_the_browser(ops: Ops, tmp_path: Path) -> None:
    """The failed job's "Redrive" button, confirmed: a new job runs, the old one leaves the DLQ."""
    dead = ops.failed[0]
    new_id = job_id_for_key(f"redrive:{dead}")
    row = f"#failures tr[data-job='{dead}']"
    with Browser(_chromium(), tmp_path / "profile") as browser:
        browser.goto(_logged_in(ops))
        browser.wait(f'!!document.querySelector("{row} button.redrive")')
        question = browser.confirm(f"{row} button.redrive", "#confirm-yes")
        assert dead in question and "provider_failed" in question
        wait_for(lambda: ops.store.redis.zscore(keys.DLQ, dead) is None, timeout_s=10)
        wait_for(lambda: _state(ops, new_id) is JobState.COMPLETED, timeout_s=30)
        browser.wait(
            f"document.getElementById('notice').textContent.includes('redriven as job {new_id}')"
        )
        browser.wait(f'!document.querySelector("{row}")')  # gone from the failed list
        # The new job is looked up, and its timeline says how its result came.
        browser.wait("document.getElementById('job-state')?.dataset.state === 'completed'")
        assert new_id in browser.text("#job-state")
        assert "polled" in browser.text("#job-result ol.timeline")
    old = ops.store.get(dead)
    assert old is not None and old.state is JobState.FAILED  # history stays
