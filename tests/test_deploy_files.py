"""compose.yaml, compose.sim.yaml, the Dockerfile and .dockerignore, checked offline.

No container engine runs on these machines, so nothing here starts a container: the
compose files are validated and resolved by `docker-compose config` (Debian's
docker-compose, which needs no engine for that), and the resolved environment of every
kq service is read through `Settings.from_env`, exactly as the process would read it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import DEFAULT_BASE_URL, Settings

ROOT = Path(__file__).resolve().parent.parent
KQ_SERVICES = ("receiver", "worker", "beat", "api", "metrics", "dashboard", "forward")


def resolved(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (.ci/run installs it)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    args = [binary, *(a for f in files for a in ("-f", f)), "config"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KQ_", "WAVESPEED_"))}
    out = subprocess.run(
        args, cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def settings_of(config: dict[str, Any], service: str) -> Settings:
    env = {
        k: "" if v is None else str(v)
        for k, v in config["services"][service]["environment"].items()
    }
    return Settings.from_env(env)


def test_real_key_goes_to_the_real_api() -> None:
    """With only WAVESPEED_API_KEY set (poll-only), every kq service talks to WaveSpeed
    itself, not to the simulator."""
    config = resolved("compose.yaml", env={"WAVESPEED_API_KEY": "real-key"})
    assert set(KQ_SERVICES) <= set(config["services"])
    assert "sim" not in config["services"]
    for service in KQ_SERVICES:
        settings = settings_of(config, service)
        assert settings.wavespeed_base_url == DEFAULT_BASE_URL, service
        assert settings.wavespeed_api_key == "real-key"


def test_simulator_variant_needs_no_secret() -> None:
    """compose.sim.yaml runs the whole stack against the simulator with nothing set."""
    config = resolved("compose.yaml", "compose.sim.yaml")
    assert "sim" in config["services"]
    for service in KQ_SERVICES:
        settings = settings_of(config, service)
        assert settings.wavespeed_base_url == "http://sim:8091", service
        assert settings.webhooks_enabled and settings.secret_key, service


def test_the_image_holds_every_package_and_no_local_state() -> None:
    """The Dockerfile copies every package the `kq` entry point needs; the build context
    leaves out the virtualenv, local state and the local secret key."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in (
        "kq",
        "worker",
        "webhook_receiver",
        "wavespeed_sim",
        "producer_api",
        "ops_dashboard",
    ):
        assert f"COPY {package} ./{package}" in dockerfile, package
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "var", ".git", ".env"):
        assert entry in ignored, entry


def test_sentinel_profile_runs_redis_with_sentinels() -> None:
    """`--profile sentinel` adds a replica and three Sentinels, and with
    KQ_REDIS_SENTINELS set every kq service finds Redis through them (and waits for the
    replica before a paid submit); without the profile nothing of it starts."""
    sentinels = "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
    env = {"COMPOSE_PROFILES": "sentinel", "KQ_REDIS_SENTINELS": sentinels}
    config = resolved("compose.yaml", env=env)
    ha = {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert ha <= set(config["services"])
    assert "--replicaof" in config["services"]["redis-replica"]["command"]
    for service in KQ_SERVICES:
        settings = settings_of(config, service)
        assert [port for _, port in settings.redis_sentinels] == [26379] * 3, service
        assert settings.redis_master_name == "kq" and settings.redis_wait_replicas == 1
    plain = resolved("compose.yaml")
    # `config` lists every service; only the profile starts these.
    assert all(plain["services"][name].get("profiles") == ["sentinel"] for name in ha)
    assert settings_of(plain, "worker").redis_sentinels == ()
