"""Plan files: what a server at each location runs, and every field checked before anything runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.placement import PlacementError, check_placement, read_plan, why_not_runnable
from ddnn_server.store import ModelStore

MODEL = Path(__file__).resolve().parents[1] / "models" / "fmnist3_32.npz"


@pytest.fixture(scope="module")
def loaded() -> Any:
    return load_model(MODEL)


def _write(path: Path, loaded: Any, **changes: Any) -> Path:
    raw = {"format": "ddnn-plan", "version": 1, "model": loaded.spec.name, "content_hash": loaded.content_hash,
           "locations": ["device", "edge", "cloud"], "thresholds": [0.4, 0.25], "links": {},
           "profile": {"device_us": 10.0, "server_us": [1.0, 2.0, 3.0], "hop_overhead_us": 500.0}}
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return path


def test_each_location_runs_its_part_of_the_plan(loaded: Any, tmp_path: Path) -> None:
    plan = _write(tmp_path / "plan.json", loaded)
    (edge,) = ModelStore(plan=plan, location="edge").load_dir(MODEL)
    assert edge.role == "edge" and edge.entry_tier == 1 and edge.edge_program is not None
    assert edge.edge_program.threshold == 0.25
    (cloud,) = ModelStore(plan=plan, location="cloud").load_dir(MODEL)
    assert cloud.role == "cloud" and cloud.entry_tier == 2
    rest_at_edge = _write(tmp_path / "edge-only.json", loaded, locations=["device", "edge", "edge"],
                          thresholds=[0.4, None])
    (served,) = ModelStore(plan=rest_at_edge, location="edge").load_dir(MODEL)
    assert served.role == "cloud" and served.entry_tier == 1
    with pytest.raises(PlacementError, match="runs no server at 'cloud'"):
        ModelStore(plan=rest_at_edge, location="cloud").load_dir(MODEL)
    raw_upload = _write(tmp_path / "raw.json", loaded, locations=["cloud"] * 3, thresholds=[None, None])
    (served,) = ModelStore(plan=raw_upload, location="cloud").load_dir(MODEL)
    assert served.entry_tier == 1 and served.topic_tier == 1  # where a device's raw upload arrives
    plan_file = read_plan(raw_upload, loaded.spec, loaded.content_hash)
    assert plan_file.placement.server_only and plan_file.placement.device_threshold is None
    assert plan_file.placement.hops() == ["device-cloud"] and plan_file.hop_overhead_us == 500.0


def test_a_plan_for_another_model_is_refused_by_name(loaded: Any, tmp_path: Path) -> None:
    other = load_model(MODEL.parent / "fmnist_32.npz")
    plan = _write(tmp_path / "plan.json", loaded)
    with pytest.raises(PlacementError, match="the plan is for model 'fmnist3_32'"):
        read_plan(plan, other.spec, other.content_hash)
    with pytest.raises(Exception, match="not among the served ones"):
        ModelStore(plan=plan, location="edge").load_dir(MODEL.parent / "fmnist_32.npz")


@pytest.mark.parametrize(("changes", "message"), [
    ({"format": "something"}, "not a ddnn-plan file"),
    ({"version": 9}, "plan version 9"),
    ({"content_hash": "../../etc/passwd"}, "64 lowercase hex"),
    ({"locations": ["cloud", "edge", "device"]}, "runs below the one before it"),
    ({"locations": ["device", "moon", "cloud"]}, "unknown location 'moon'"),
    ({"locations": ["device", "cloud"]}, "2 locations for 3 tiers"),
    ({"locations": "device"}, "locations must be a list"),
    ({"locations": ["edge", "cloud", "cloud"]}, "raw-input upload goes to one server"),
    ({"thresholds": [0.4]}, "thresholds must be a list of 2"),
    ({"thresholds": [1.5, 0.2]}, "not in \\[0, 1\\]"),
    ({"thresholds": [float("nan"), 0.2]}, "not in \\[0, 1\\]"),
    ({"thresholds": ["0.4", 0.2]}, "exit 0 threshold must be"),
    ({"thresholds": [None, 0.2]}, "exit 0 is at a cut"),
    ({"links": {"device-moon": {"rtt_ms": 1, "mbps": 1}}}, "link 'device-moon'"),
    ({"links": {"device-edge": {"rtt_ms": -1, "mbps": 1}}}, "rtt_ms must be >= 0"),
    ({"profile": {"device_us": "fast", "server_us": [1, 2, 3]}}, "profile must give"),
    ({"profile": {"device_us": 1, "server_us": [1, 2, 3], "hop_overhead_us": -5}}, "hop_overhead_us"),
])
def test_hostile_plan_fields_get_a_clear_error(loaded: Any, tmp_path: Path, changes: dict, message: str) -> None:
    plan = _write(tmp_path / "plan.json", loaded, **changes)
    with pytest.raises(PlacementError, match=message):
        read_plan(plan, loaded.spec, loaded.content_hash)


def test_unreadable_or_oversized_plan_files(loaded: Any, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\xfe{not json")
    with pytest.raises(PlacementError, match="not a readable plan file"):
        read_plan(garbage, loaded.spec, loaded.content_hash)
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (2 << 20))
    with pytest.raises(PlacementError, match="too large"):
        read_plan(huge, loaded.spec, loaded.content_hash)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(PlacementError, match="not a ddnn-plan file"):
        read_plan(listed, loaded.spec, loaded.content_hash)


def test_runnable_placements(loaded: Any) -> None:
    spec = loaded.spec
    assert why_not_runnable(spec, ("device", "edge", "cloud")) is None
    assert why_not_runnable(spec, ("device", "cloud", "cloud")) is None
    assert "only the device tier" in why_not_runnable(spec, ("device", "device", "cloud"))
    placement = check_placement(spec, ["device", "edge", "cloud"], [0.3, 0.2])
    assert placement.hops() == ["device-edge", "edge-cloud"] and placement.server("edge").role == "edge"
