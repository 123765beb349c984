"""`kq batch` as a user runs it (a subprocess) against a private Redis, no workers:
all-or-nothing validation, --skip-invalid, CSV, stdin, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

from tests.conftest import wait_for

LINE = '{{"prompt": "edit number {i}", "image": "https://example.com/{i}.jpg"}}\n'


def kq(args: list[str], env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "kq.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def cli_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "KQ_REDIS_URL": redis_url,
        "KQ_VAR_DIR": str(tmp_path / "var"),
        "WAVESPEED_API_KEY": "unused-here",
        "KQ_WAVESPEED_BASE_URL": "http://127.0.0.1:9",
    }


def write_lines(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    with path.open("w") as fh:
        for i in range(1, n + 1):
            fh.write(bad.get(i, LINE.format(i=i)))
    return path


def test_one_bad_line_in_100k_enqueues_nothing_and_says_where(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """All-or-nothing: a bad line 50,001 of 100,000 is named with its field; no job written."""
    bad = '{"prompt": "ok", "image": "https://e.com/x.jpg", "guidance_scale": 99}\n'
    path = write_lines(tmp_path / "big.jsonl", 100_000, {50_001: bad})
    result = kq(["batch", str(path)], cli_env(redis_url, tmp_path))
    assert result.returncode == 2
    out = " ".join((result.stdout + result.stderr).split())
    assert "line 50001: guidance_scale" in out and "1.0 to 20.0" in out
    assert "nothing was enqueued" in out
    assert redis_client.dbsize() == 0


def test_skip_invalid_enqueues_good_lines_and_writes_rejects(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """--skip-invalid enqueues the valid lines and writes each refused one with reasons."""
    path = write_lines(
        tmp_path / "mixed.jsonl", 10, {3: "not json\n", 7: '{"prompt": "", "image": "ftp://x"}\n'}
    )
    rejects = tmp_path / "rejects.jsonl"
    result = kq(
        ["batch", str(path), "--skip-invalid", "--rejects", str(rejects), "--batch-id", "mix"],
        cli_env(redis_url, tmp_path),
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [x["line"] for x in lines] == [3, 7]
    assert {e["field"] for e in lines[1]["errors"]} == {"prompt", "image"}
    assert redis_client.hget("kq:batch:mix", "total") == "8"


def test_rerun_after_kill_resumes_without_duplicates(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """Kill `kq batch` half-way, run it again: every line is one job, none twice."""
    n = 30_000
    path = write_lines(tmp_path / "resume.jsonl", n)
    env = cli_env(redis_url, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kq.cli", "batch", str(path), "--batch-id", "r1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: int(redis_client.hget("kq:batch:r1", "total") or 0) >= 2000, 60, 0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    written = int(redis_client.hget("kq:batch:r1", "total") or 0)
    assert 0 < written < n, "the kill should land half-way"
    result = kq(["batch", str(path), "--batch-id", "r1", "--json"], env)
    assert result.returncode == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert receipt["existing"] == written and receipt["created"] == n - written
    assert redis_client.hget("kq:batch:r1", "total") == str(n)
    assert redis_client.llen("kq:batchjobs:r1") == n
    again = json.loads(kq(["batch", str(path), "--batch-id", "r1", "--json"], env).stdout)
    assert again["created"] == 0 and again["existing"] == n


def test_csv_and_stdin(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """CSV cells are typed (seed, guidance); stdin works with `-`; bad cells name the field."""
    csv_path = tmp_path / "edits.csv"
    csv_path.write_text(
        "prompt,image,seed,guidance_scale,aspect_ratio\n"
        '"make it, blue",https://e.com/1.jpg,5,4.5,16:9\n'
        "make it red,https://e.com/2.jpg,,,\n"
    )
    env = cli_env(redis_url, tmp_path)
    result = kq(["batch", str(csv_path), "--batch-id", "csv1"], env)
    assert result.returncode == 0, result.stderr
    ids = redis_client.lrange("kq:batchjobs:csv1", 0, -1)
    first = json.loads(redis_client.hget(f"kq:job:{ids[0]}", "request") or "{}")
    assert first == {
        "prompt": "make it, blue",
        "image": "https://e.com/1.jpg",
        "seed": 5,
        "guidance_scale": 4.5,
        "aspect_ratio": "16:9",
    }
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,image,seed\nx,https://e.com/1.jpg,five\n")
    bad = kq(["batch", str(bad_csv)], env)
    assert bad.returncode == 2 and "line 2: seed" in bad.stdout + bad.stderr
    piped = kq(["batch", "-", "--batch-id", "in1"], env, input=LINE.format(i=1) + LINE.format(i=2))
    assert piped.returncode == 0, piped.stderr
    assert redis_client.hget("kq:batch:in1", "total") == "2"
