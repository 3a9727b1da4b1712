"""The networked device program's CSV (one row per sample) turned into per-tier and per-hop times.

Columns (c_runtime/ddnn_runner_net.c): t_device_us (device compute), t_server_us (the first server's compute
for the sample, from its reply), t_upstream_us (an edge's wait for the tier above, as the edge measured it),
t_upstream_server_us (the tier above's compute), t_total_us (as the device saw it). Communication of a hop is
what its round trip took beyond the compute it waited for.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@dataclass(frozen=True)
class HopTimes:
    """Means in microseconds; each over the samples that reached that tier or crossed that hop."""

    t_device_us: float
    t_first_server_us: float  # the server the device talks to (an edge, or the cloud)
    t_upstream_server_us: float  # the cloud behind an edge
    t_comm_first_us: float  # device <-> first server
    t_comm_upstream_us: float  # edge <-> cloud
    t_total_us: float
    p99_total_us: float

    @classmethod
    def from_rows(cls, rows: list[dict[str, str]]) -> HopTimes:
        served = [r for r in rows if r["source"] == "server"]
        upstream = [r for r in served if int(r["t_upstream_us"]) > 0 and r["upstream_fallback"] == "0"]
        total = [float(r["t_total_us"]) for r in rows]
        return cls(
            t_device_us=mean([float(r["t_device_us"]) for r in rows]),
            t_first_server_us=mean([float(r["t_server_us"]) for r in served]),
            t_upstream_server_us=mean([float(r["t_upstream_server_us"]) for r in upstream]),
            t_comm_first_us=mean([float(r["t_total_us"]) - float(r["t_device_us"]) - float(r["t_server_us"])
                                  - float(r["t_upstream_us"]) for r in served]),
            t_comm_upstream_us=mean([float(r["t_upstream_us"]) - float(r["t_upstream_server_us"]) for r in upstream]),
            t_total_us=mean(total),
            p99_total_us=float(np.percentile(total, 99)) if total else math.nan,
        )
