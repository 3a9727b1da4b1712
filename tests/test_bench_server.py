"""Smoke test of bench/bench_server.py: a short run against a real Mosquitto must print both comparisons
with every request answered, by the tier that should, with the reference's class (the numbers themselves
are for the bench, not for a test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import MODELS, require_tool

from ddnn_gen.model import datasets

REPO = Path(__file__).resolve().parent.parent
SHORT = ["--requests", "400", "--seconds", "0.1", "--latency-count", "40", "--devices", "4", "--echo-load", "200"]


def _run(*args: str) -> str:
    require_tool("mosquitto")
    run = subprocess.run([sys.executable, str(REPO / "bench" / "bench_server.py"), *SHORT, *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "WRONG" not in run.stdout, run.stdout
    return run.stdout


def _rows(stdout: str, name: str, request_bytes: int) -> list[re.Match[str]]:
    rows = list(re.finditer(rf"^{re.escape(name)}\s+{request_bytes}\s+\d+ \|\s+(\d+)\s+(\d+)\s+([\d.]+)\s+>= 0.8 \|"
                            r"\s+(\d+)\s+(\d+)\s+([\d.]+)", stdout, re.M))
    for row in rows:
        mqtt_rate, raw_rate, ratio = int(row[1]), int(row[2]), float(row[3])
        assert mqtt_rate > 0 and raw_rate > 0 and abs(ratio - mqtt_rate / raw_rate) < 0.01
    return rows


def _all_answered(stdout: str, runs: int) -> None:
    # How many requests the bench sends depends on this machine's speed (enough for --seconds of work,
    # at least 50 per device, at most --requests); what must hold is that every one was answered once, right.
    answered = re.findall(r"(\d+)/(\d+) answered by the server; lost 0, duplicates 0, misrouted 0, wrong 0", stdout)
    assert len(answered) == runs, stdout
    for got, sent in answered:
        assert got == sent and 200 <= int(sent) <= 400, (got, sent)


def test_bench_server_short_run(fmnist_model_path: Path) -> None:
    stdout = _run("--model", str(fmnist_model_path))
    assert len(_rows(stdout, "fmnist_32", 456)) == 6, stdout  # 2 forwards x 3 transports
    _all_answered(stdout, 6)
    # Each transport's row is set against a bare echo on that transport: its floor per request.
    for transport in ("paho-mqtt", "paho-c", "c-mqtt"):
        assert len(re.findall(rf"bare {transport} echo responder spends \d+ us of CPU", stdout)) == 2, stdout
    batches = [float(b) for b in re.findall(r"([\d.]+) requests per forward pass", stdout)]
    assert len(batches) == 6 and all(1.0 <= b <= 32 for b in batches), stdout
    # The side-by-side table names all three.
    assert "transports side by side (paho-mqtt, paho-c, c-mqtt)" in stdout, stdout


def test_bench_server_three_tiers() -> None:
    """The edge (its exit answering all, device splits in) and the cloud behind it (the edge's splits in, as an
    edge sends them on) are benched each in a row of their own."""
    stdout = _run("--model", str(MODELS / "fmnist3_32.npz"), "--forward", "numpy", "--transport", "paho-mqtt",
                  "--transport", "c-mqtt")
    assert len(_rows(stdout, "fmnist3_32/edge", 456)) == 2, stdout
    # The edge tier's 128-channel 3x3 split, dense (144 B), plus the 64-byte header.
    assert len(_rows(stdout, "fmnist3_32/cloud", 208)) == 2, stdout
    _all_answered(stdout, 4)


def test_bench_server_big_little(mnist_test: datasets.Dataset) -> None:
    """A Big-Little model's requests carry the raw 28x28 image (784 bytes + the header); its big net answers."""
    stdout = _run("--model", str(MODELS / "mnist_bl8_8.npz"), "--forward", "numpy", "--transport", "paho-c")
    assert len(_rows(stdout, "mnist_bl8_8", 64 + 784)) == 1, stdout
    _all_answered(stdout, 1)
