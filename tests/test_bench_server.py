"""Smoke test of bench/bench_server.py: a short run against a real Mosquitto must print both comparisons
with every request answered (the numbers themselves are for the bench, not for a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent


def test_bench_server_short_run(fmnist_model_path: Path) -> None:
    require_tool("mosquitto")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "bench_server.py"), "--model", str(fmnist_model_path),
                          "--requests", "400", "--seconds", "0.1", "--latency-count", "40", "--devices", "4",
                          "--echo-load", "200"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    row = re.search(r"^fmnist_32\s+480\s+\d+ \|\s+(\d+)\s+(\d+)\s+([\d.]+)\s+>= 0.8 \|\s+(\d+)\s+(\d+)\s+([\d.]+)",
                    run.stdout, re.M)
    assert row, run.stdout
    mqtt_rate, raw_rate, ratio = int(row[1]), int(row[2]), float(row[3])
    assert mqtt_rate > 0 and raw_rate > 0 and abs(ratio - mqtt_rate / raw_rate) < 0.01
    assert "400/400 answered by the server; lost 0, duplicates 0, misrouted 0" in run.stdout
    assert re.search(r"bare paho echo responder spends \d+ us of CPU", run.stdout), run.stdout
