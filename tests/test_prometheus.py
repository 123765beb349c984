"""deploy/: the Prometheus rules and the Grafana dashboard, checked against what we export.

- `promtool check rules` / `check config` and the rules' unit tests (`promtool test rules`).
- Every alarm `kq status` knows has an alert rule with its severity; the dashboard and the
  rules name only metrics the exporters serve.
- A real Prometheus (Debian's `prometheus`) scrapes `kq metrics` (a real process) and the
  receiver's /metrics (served over HTTP) on a private Redis: the series are there, every
  rule and dashboard query evaluates, and a provoked condition (the worker's heartbeat
  gone) fires its alert.

Locally each part that needs the Prometheus binaries is skipped without them; under CI
(`CI` set) it fails instead, since .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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
import yaml

from tests.conftest import free_port, wait_for
from tests.support import make_submitted_job, prediction_body, serve_in_thread
from tests.test_receiver import deliver
from webhook_receiver.app import create_app
from worker import keys, telemetry
from worker.admission import Admission
from worker.alarms import SEVERITY
from worker.forward.health import read_forwarding
from worker.histograms import read_latency
from worker.metrics import ForwardCollector, ReceiverCollector, StatusCollector
from worker.settings import Settings
from worker.snapshot import ROLES, AlarmName
from worker.status import collect
from worker.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "kq-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "kq-alerts.test.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kq-dashboard.json"
# Alarms with a rule before they exist (none now: every rule's alarm is an AlarmName).
PENDING_ALARMS: frozenset[str] = frozenset()
METRIC = re.compile(r"\b(kq_[a-z0-9_]+|up)\b")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs Debian's prometheus)")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    doc = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries() -> list[str]:
    """Every dashboard expression, as Prometheus would get it from Grafana."""
    return [
        target["expr"].replace("$__rate_interval", "1m")
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


# --- files only --------------------------------------------------------------------------


def test_rules_pass_promtool() -> None:
    """The rules load, their unit tests pass, and the example scrape config is valid."""
    promtool = tool("promtool")
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULE_TESTS)],
        ["check", "config", str(SCRAPE_CONFIG)],
    ):
        out = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr


def test_every_alarm_has_an_alert_rule_with_its_severity() -> None:
    """One rule per AlarmName, labelled with the alarm and `kq status`'s severity; a rule
    for an alarm that does not exist is only allowed for the documented pending one."""
    by_alarm = {r["labels"]["kq_alarm"]: r for r in alert_rules() if "kq_alarm" in r["labels"]}
    for name in AlarmName:
        rule = by_alarm.get(name.value)
        assert rule is not None, f"no alert rule for the alarm {name.value}"
        assert rule["labels"]["severity"] == SEVERITY[name].value, name
    assert set(by_alarm) - {a.value for a in AlarmName} <= PENDING_ALARMS
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_panels_have_readable_titles() -> None:
    """Every panel has a title in words (not a metric name), a description and a query,
    and a place of its own on the 24-column grid."""
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] == "kontext-queue" and doc["uid"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard_panels():
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    for panel in dashboard_panels():
        title = panel.get("title", "")
        assert title[:1].isupper(), panel  # words, capitalised
        assert not METRIC.fullmatch(title), title
        if panel["type"] != "row":
            assert panel["targets"] and panel.get("description"), title


def test_rules_and_dashboard_name_only_exported_metrics(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """Each metric named in the rules or the dashboard is served by one of our exporters
    (`kq metrics`, the receiver, `kq forward`), with its exposition suffixes."""
    status = StatusCollector(
        lambda: collect(
            redis_client,
            deadline_s=3600,
            webhooks_enabled=True,
            admission=Admission(redis_client, settings),
        ),
        lambda: telemetry.totals(redis_client),
        lambda: read_latency(redis_client),
    )
    forward = ForwardCollector(lambda: read_forwarding(redis_client))
    exported = {"up"}  # Prometheus' own, per target
    for collector in (status, ReceiverCollector(redis_client), forward):
        for family in collector.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            exported.update(family.name + s for s in suffixes.get(family.type, ("",)))
    rule_exprs = [r["expr"] for r in alert_rules()]
    for expr in rule_exprs + dashboard_queries():
        for name in METRIC.findall(expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"


# --- a real Prometheus -------------------------------------------------------------------


@contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def fast_rules(path: Path) -> Path:
    """deploy's rules with every `for:` at 1 s, so an alert fires within the test."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class PromAPI:
    def __init__(self, base: str, proc: Any, log: Path) -> None:
        self.base = base
        self.proc = proc
        self.log = log

    def get(self, path: str, **params: str) -> Any:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        r = httpx.get(f"{self.base}{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self, name: str) -> set[str]:
        """States ("pending", "firing") of the alert's current instances."""
        return {
            a["state"]
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name
        }

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.base}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


def test_prometheus_scrapes_kq_and_fires_an_alert(
    redis_url: str,
    redis_client: redis.Redis,
    settings: Settings,
    store: JobStore,
    tmp_path: Path,
) -> None:
    """`kq metrics` and the receiver under a real Prometheus: the series (histograms
    included) are scraped, every rule and dashboard query evaluates, and removing the
    worker's heartbeat fires KqWorkerDown, and nothing else of the kind."""
    prometheus = tool("prometheus")
    now = time.time()
    # Every role alive (their heartbeats): no process alarm to begin with.
    redis_client.zadd(
        keys.HEARTBEATS,
        {keys.heartbeat(role, "host-a", 40_000 + i): now + 600 for i, role in enumerate(ROLES)},
    )
    metrics_port, prom_port = free_port(), free_port()
    env = {**os.environ, "KQ_REDIS_URL": redis_url, "KQ_VAR_DIR": str(tmp_path)}
    env.pop("KQ_WEBHOOK_PUBLIC_URL", None)
    kq_metrics = [sys.executable, "-m", "kq.cli", "metrics", "--port", str(metrics_port)]
    with (
        serve_in_thread(create_app(settings, store=store)) as receiver,
        running(kq_metrics, tmp_path / "kq-metrics.log", env=env),
    ):
        # One job finished by a webhook: counts in all three latency histograms.
        make_submitted_job(store)
        assert deliver(receiver, settings, prediction_body()).json()["result"] == "applied"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(fast_rules(tmp_path / "rules.yml"))],
            "scrape_configs": [
                {"job_name": "kq", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                {
                    "job_name": "kq-receiver",
                    "static_configs": [{"targets": [receiver[len("http://") :]]}],
                },
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        args = [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ]
        log = tmp_path / "prometheus.log"
        with running(args, log) as proc:
            api = PromAPI(f"http://127.0.0.1:{prom_port}", proc, log)
            wait_for(api.ready, timeout_s=30, interval_s=0.2)

            wait_for(lambda: len(api.query("up == 1")) == 2, timeout_s=20, interval_s=0.3)
            names = set(api.get("/api/v1/label/__name__/values"))
            for name in (
                "kq_up",
                "kq_jobs",
                "kq_alarm",
                "kq_process_heartbeats",
                "kq_webhook_requests_total",
                "kq_enqueue_to_result_seconds_bucket",
                "kq_enqueue_to_result_seconds_sum",
                "kq_enqueue_to_result_seconds_count",
                "kq_submit_to_result_seconds_bucket",
                "kq_webhook_receive_to_applied_seconds_bucket",
            ):
                assert name in names, name
            (done,) = api.query('kq_enqueue_to_result_seconds_count{state="completed"}')
            assert done["metric"]["job"] == "kq" and done["value"][1] == "1"
            applied = api.query("kq_webhook_receive_to_applied_seconds_count")
            assert sorted(r["metric"]["job"] for r in applied) == ["kq", "kq-receiver"]
            assert {r["value"][1] for r in applied} == {"1"}
            buckets = api.query('kq_submit_to_result_seconds_bucket{state="completed"}')
            bounds = {float(r["metric"]["le"]) for r in buckets}  # "1.0" or "1", "+Inf"
            assert len(buckets) == 20 and {1.0, 86_400.0, float("inf")} <= bounds
            for expr in dashboard_queries():
                api.query(expr)  # each evaluates (a syntax error answers 400)

            def rules_evaluated() -> bool:
                rules = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
                assert all(r["health"] != "err" for r in rules), rules
                return all(r["health"] == "ok" for r in rules)

            wait_for(rules_evaluated, timeout_s=10, interval_s=0.3)
            time.sleep(2.5)  # a few evaluations with every process alive
            for alert in ("KqWorkerDown", "KqBeatDown", "KqReceiverDown"):
                assert api.alerts(alert) == set(), alert

            # The provoked condition: the worker's heartbeat is gone.
            redis_client.zrem(keys.HEARTBEATS, keys.heartbeat("worker", "host-a", 40_000))
            wait_for(lambda: api.alerts("KqWorkerDown") == {"firing"}, timeout_s=20, interval_s=0.3)
            (alert,) = [
                a
                for a in api.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "KqWorkerDown"
            ]
            assert alert["labels"]["severity"] == "critical"
            assert alert["labels"]["kq_alarm"] == "worker_down"
            assert api.alerts("KqBeatDown") == set()
            (alarm,) = api.query('kq_alarm{name="worker_down"}')
            assert alarm["value"][1] == "1"
