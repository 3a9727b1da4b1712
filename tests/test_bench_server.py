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
    row = re.search(r"^fmnist_32\s+456\s+\d+ \|\s+(\d+)\s+(\d+)\s+([\d.]+)\s+>= 0.8 \|\s+(\d+)\s+(\d+)\s+([\d.]+)",
                    run.stdout, re.M)
    assert row, run.stdout
    mqtt_rate, raw_rate, ratio = int(row[1]), int(row[2]), float(row[3])
    assert mqtt_rate > 0 and raw_rate > 0 and abs(ratio - mqtt_rate / raw_rate) < 0.01
    # How many requests the bench sends depends on this machine's speed (enough for --seconds of work,
    # at least 50 per device, at most --requests); what must hold is that every one was answered once.
    answered = re.search(r"(\d+)/(\d+) answered by the server; lost 0, duplicates 0, misrouted 0", run.stdout)
    assert answered, run.stdout
    assert answered[1] == answered[2] and 200 <= int(answered[2]) <= 400, answered[0]
    assert re.search(r"bare paho echo responder spends \d+ us of CPU", run.stdout), run.stdout
