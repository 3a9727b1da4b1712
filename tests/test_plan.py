"""`ddnngen plan`: placements and thresholds predicted from a real evaluation, measured compute times and
link profiles; different links give different cuts; the plan file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ddnn_gen.cli import cli
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.plan import candidates, profiles


@pytest.fixture(scope="module")
def planned(small_three_tier: Any, fmnist_test: datasets.Dataset) -> Any:
    data = fmnist_test.subset(1000)
    return small_three_tier, compute_outputs(small_three_tier, data), profiles.measure(small_three_tier,
                                                                                       data.images[:100])


def test_every_runnable_placement_is_a_candidate(planned: Any) -> None:
    loaded, _, _ = planned
    assert candidates.assignments(loaded.spec) == [
        ("device", "edge", "edge"), ("device", "edge", "cloud"), ("device", "cloud", "cloud"),
        ("edge", "edge", "edge"), ("cloud", "cloud", "cloud")]


def test_predictions_follow_the_evaluation_and_the_links(planned: Any) -> None:
    loaded, outputs, times = planned
    links = {"device-edge": profiles.Link(2.0, 10.0), "edge-cloud": profiles.Link(20.0, 1.0)}
    full = candidates.predict(loaded.spec, outputs, times, links, ("device", "edge", "cloud"), (0.3, 0.4))
    rates = full.exit_rates
    request0 = candidates.REQUEST_HEADER_BYTES + outputs.split_bytes + candidates.MQTT_OVERHEAD_BYTES
    request1 = candidates.REQUEST_HEADER_BYTES + outputs.edges[0].split_bytes + candidates.MQTT_OVERHEAD_BYTES
    assert full.hop_bytes["device-edge"] == pytest.approx((1 - rates[0]) * (request0 + candidates.REPLY_BYTES))
    assert full.hop_bytes["edge-cloud"] == pytest.approx(rates[2] * (request1 + candidates.REPLY_BYTES))
    overhead = times.hop_overhead_us
    assert overhead > 0  # measured through a real broker
    mean_us = (times.device_us + (1 - rates[0]) * (links["device-edge"].transfer_us(request0, candidates.REPLY_BYTES)
                                                   + overhead + times.server_us[1])
               + rates[2] * (links["edge-cloud"].transfer_us(request1, candidates.REPLY_BYTES) + overhead
                             + times.server_us[2]))
    assert full.mean_ms == pytest.approx(mean_us / 1e3)
    assert full.device_flash_bytes > 0 and full.device_ram_bytes > 0


def test_different_links_choose_different_cuts(planned: Any) -> None:
    loaded, outputs, times = planned
    floor = 0.9 * max(candidates.candidates(loaded.spec, outputs, times, {
        "device-edge": profiles.Link(1, 100), "edge-cloud": profiles.Link(1, 100),
        "device-cloud": profiles.Link(1, 100)}), key=lambda p: p.accuracy).accuracy
    # A gateway next to the device and a far, thin cloud link: keep the work at the edge.
    near_edge = {"device-edge": profiles.Link(0.5, 100.0), "edge-cloud": profiles.Link(150.0, 0.5),
                 "device-cloud": profiles.Link(150.0, 0.5)}
    # A slow local radio and a fast cloud: skip the edge.
    near_cloud = {"device-edge": profiles.Link(60.0, 0.2), "edge-cloud": profiles.Link(1.0, 1000.0),
                  "device-cloud": profiles.Link(3.0, 50.0)}
    first = candidates.choose(candidates.candidates(loaded.spec, outputs, times, near_edge), min_accuracy=floor)
    second = candidates.choose(candidates.candidates(loaded.spec, outputs, times, near_cloud), min_accuracy=floor)
    assert "cloud" not in first.locations[1:] or first.locations[0] == "device"
    assert first.locations != second.locations
    assert second.locations[1] == "cloud"
    with pytest.raises(profiles.PlanError, match="no plan meets"):
        candidates.choose(candidates.candidates(loaded.spec, outputs, times, near_cloud), min_accuracy=1.01)


def test_plan_command_writes_a_plan(fmnist_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    profile = tmp_path / "profile.json"
    result = CliRunner().invoke(cli, ["plan", str(fmnist_model_path), "--link", "device-cloud=5:20", "--count", "500",
                                      "--save-profile", str(profile), "-o", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["format"] == "ddnn-plan" and plan["locations"][0] in ("device", "cloud")
    again = CliRunner().invoke(cli, ["plan", str(fmnist_model_path), "--link", "device-cloud=5:20", "--count", "500",
                                     "--profile", str(profile), "--max-latency-ms", "0.001"])
    assert again.exit_code != 0 and "no plan meets mean latency <= 0.001 ms" in again.output
    bad = CliRunner().invoke(cli, ["plan", str(fmnist_model_path), "--link", "device-moon=5:20"])
    assert bad.exit_code != 0 and "device-edge, device-cloud or edge-cloud" in bad.output
