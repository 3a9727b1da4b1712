"""`ddnngen plan` against `ddnngen bench --plan` (issue 14's acceptance): for two link profiles the planner
chooses different cuts, and each chosen plan, deployed for real (generated C device, Mosquitto, ddnn-servers
started with --plan, slow links emulated on loopback), measures a mean latency and bytes per sample on every
hop within 25 % of the prediction, and answers every sample with the exit and class `ddnngen eval` gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import require_tool

from ddnn_gen.cli import cli

MODEL = Path(__file__).resolve().parents[1] / "models" / "fmnist3_32.npz"
SAMPLES = "1000"
# A gateway close to the device and a far, thin cloud link; then a slow local radio and a fast cloud.
NEAR_EDGE = ("device-edge=40:2", "edge-cloud=200:0.5", "device-cloud=200:0.5")
NEAR_CLOUD = ("device-edge=250:0.1", "edge-cloud=2:1000", "device-cloud=60:5")


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("mosquitto")
    path = tmp_path_factory.mktemp("plan") / "profile.json"
    result = CliRunner().invoke(cli, ["plan", str(MODEL), "--link", "device-cloud=1:100", "--count", SAMPLES,
                                      "--save-profile", str(path)])
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["hop_overhead_us"] > 0  # measured through a real ddnn-server
    return path


def _plan(profile: Path, links: tuple[str, ...], out: Path) -> dict:
    args = ["plan", str(MODEL), "--count", SAMPLES, "--profile", str(profile), "--min-accuracy", "0.90", "-o", str(out)]
    for link in links:
        args += ["--link", link]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def _bench(plan: Path, out_dir: Path) -> dict:
    result = CliRunner().invoke(cli, ["bench", str(MODEL), "--plan", str(plan), "--samples", SAMPLES,
                                      "--out", str(out_dir)])
    assert result.exit_code == 0, result.output
    assert "Mbit/s" in result.output and "ratio" in result.output
    return json.loads((out_dir / "bench_plan.json").read_text())


def test_plans_for_two_link_profiles_differ_and_their_predictions_hold(profile: Path, tmp_path: Path) -> None:
    chosen = {}
    for name, links in (("near-edge", NEAR_EDGE), ("near-cloud", NEAR_CLOUD)):
        plan = _plan(profile, links, tmp_path / f"{name}.json")
        chosen[name] = plan["locations"]
        run = _bench(tmp_path / f"{name}.json", tmp_path / name)
        assert run["samples"] == int(SAMPLES)
        assert run["rates"]["fallback"] == 0 and run["rates"]["error"] == 0
        # Every sample answered by the exit and with the class the Python evaluation gives at these thresholds.
        assert run["same_exit_share"] == 1.0 and run["accuracy"] == run["expected_accuracy"]
        assert run["predicted_mean_ms"] > 1.0  # the links, not the compute, dominate: a real test of the model
        assert run["mean_ms"] == pytest.approx(run["predicted_mean_ms"], rel=0.25), name
        assert set(run["hop_bytes"]) == set(run["predicted_hop_bytes"]) and run["hop_bytes"]
        for hop, predicted in run["predicted_hop_bytes"].items():
            assert run["hop_bytes"][hop] == pytest.approx(predicted, rel=0.25), (name, hop)
        assert run["within_tolerance"]
    assert chosen["near-edge"] != chosen["near-cloud"]
    assert chosen["near-cloud"][1] == "cloud" and "edge" in chosen["near-edge"]


def test_servers_and_compile_take_the_plan(profile: Path, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    plan = _plan(profile, NEAR_EDGE, plan_path)
    project = tmp_path / "device"
    result = CliRunner().invoke(cli, ["compile", str(MODEL), "--plan", str(plan_path), "-o", str(project)])
    assert result.exit_code == 0, result.output
    metadata = json.loads((project / "metadata.json").read_text())
    assert metadata["threshold"] == plan["thresholds"][0]
    both = CliRunner().invoke(cli, ["compile", str(MODEL), "--plan", str(plan_path), "--threshold", "0.5", "-o",
                                    str(tmp_path / "x")])
    assert both.exit_code != 0 and "not both" in both.output
    other = Path(__file__).resolve().parents[1] / "models" / "fmnist_32.npz"
    wrong = CliRunner().invoke(cli, ["compile", str(other), "--plan", str(plan_path), "-o", str(tmp_path / "y")])
    assert wrong.exit_code != 0 and "the plan is for model" in wrong.output

