"""A tiny run of the benchmark harness, so `make bench` keeps working (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_quick_smoke(tmp_path: Path) -> None:
    """`python -m bench --quick` runs every scenario and writes results and a chart."""
    out = tmp_path / "results.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["rows"]
    for row in data["rows"]:
        assert row["ours"] > 0 and row["baseline"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
