"""The operator's page in headless Chromium (Debian's chromium + chromium-driver, through selenium) against a
real fleet: a Mosquitto, a ddnn-server, 5 open-loop simulated devices. The page lists the devices and the
server's load; setting a device's threshold in the page moves that device's exit rate to what the evaluation
(`ddnngen eval`'s metrics_at) predicts at that threshold."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from conftest import require_tool
from net_harness import Expected, ServerProcess, expectations
from net_harness import wait_for as harness_wait_for

from ddnn_gen.bench.load_ramp import PacedFleet, calibrated_copy
from ddnn_gen.device.simulated import precomputed
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import metrics_at
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.controller import Curve
from ddnn_gen.ops.dashboard import Dashboard, model_info
from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import Broker, free_port

T = TypeVar("T")
N_DEVICES = 5
RATE = 1000.0  # samples/s over all devices (the server keeps up: the counts are of answered requests)
NEW_THRESHOLD = 0.6
AT_LEAST = 3000  # samples the device classifies at the new threshold before its rate is read


def _driver() -> object:
    pytest.importorskip("selenium")
    require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(require_tool("chromedriver")), options=options)


def _page(read: Callable[[], T]) -> Callable[[], T]:
    """``read`` of the live page, done again when an element it held was replaced meanwhile: the page
    re-renders its rows as telemetry arrives, so on a busy machine a row found a moment ago may be gone."""
    from selenium.common.exceptions import StaleElementReferenceException

    def fresh() -> T:
        for _ in range(50):
            try:
                return read()
            except StaleElementReferenceException:
                continue
        return read()
    return fresh


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> bool:
    return harness_wait_for(_page(predicate), timeout_s=timeout_s)


def _field(driver: object, device_id: str, name: str) -> str:
    from selenium.webdriver.common.by import By

    def read() -> str:
        row = driver.find_element(By.ID, f"device-{device_id}")  # type: ignore[attr-defined]
        return row.find_element(By.CSS_SELECTOR, f'td[data-field="{name}"]').text
    return _page(read)()


def test_page_lists_the_fleet_and_sets_a_device_threshold(fmnist_test: datasets.Dataset, fmnist_model_path: Path,
                                                          tmp_path: Path) -> None:
    require_tool("mosquitto")
    from selenium.webdriver.common.by import By

    data = fmnist_test
    expected = expectations(fmnist_model_path, data.images)
    loaded = load_model(fmnist_model_path)
    predicted = metrics_at(compute_outputs(loaded, data), NEW_THRESHOLD).local_exit_rate
    old = expected.program.threshold
    assert abs(predicted - metrics_at(compute_outputs(loaded, data), old).local_exit_rate) > 0.1  # it matters
    part = precomputed(expected.device.split_words, expected.device.entropy, expected.device.local_class)
    port = free_port()
    with Broker() as broker:
        server = ServerProcess(broker.address, fmnist_model_path, workers=2,
                               extra=["--telemetry-interval", "0.5"]).start()
        view = Dashboard(broker.connection()).start(port)
        fleet = PacedFleet(broker.connection(), expected.program, loaded.hash_bytes, part, len(data), N_DEVICES,
                           lambda: RATE, telemetry_interval_s=0.5, prefix="cam").start()
        driver = _driver()
        try:
            driver.get(view.url)  # type: ignore[attr-defined]
            ids = [f"cam{d}" for d in range(N_DEVICES)]
            assert wait_for(lambda: all(driver.find_elements(By.ID, f"device-{i}") for i in ids)  # type: ignore
                            and _field(driver, "cam0", "status") == "online", timeout_s=30)
            rps = lambda: driver.find_elements(By.CSS_SELECTOR, "#servers tr td.rps")  # type: ignore # noqa: E731
            assert wait_for(lambda: rps() and float(rps()[0].text) > 0, timeout_s=30)
            screenshot = tmp_path / "dashboard.png"
            driver.save_screenshot(str(screenshot))  # type: ignore[attr-defined]
            assert screenshot.stat().st_size > 10000
            for device_id in ids:
                assert _field(driver, device_id, "threshold") == f"{old:.4f}"
            # The operator sets cam2's threshold in the page.
            driver.find_element(By.ID, "input-cam2").send_keys(str(NEW_THRESHOLD))  # type: ignore[attr-defined]
            driver.find_element(By.ID, "set-cam2").click()  # type: ignore[attr-defined]
            assert wait_for(lambda: _field(driver, "cam2", "threshold") == f"{NEW_THRESHOLD:.4f}", timeout_s=20)
            assert wait_for(lambda: int(_field(driver, "cam2", "samples-at-threshold") or 0) >= AT_LEAST,
                            timeout_s=60)
            shown = float(_field(driver, "cam2", "local-at-threshold")) / 100
            driver.save_screenshot(str(tmp_path / "dashboard-after.png"))  # type: ignore[attr-defined]
            others = [_field(driver, i, "threshold") for i in ids if i != "cam2"]
        finally:
            driver.quit()  # type: ignore[attr-defined]
            fleet.stop()
            view.stop()
            assert server.terminate() == 0, server.output
    assert abs(shown - predicted) <= 0.02, (shown, predicted)
    assert others == [f"{old:.4f}"] * (N_DEVICES - 1)  # only that device's threshold moved
    # And the device itself applied it: what it classified after the change used the new threshold.
    cam2 = [s for s in fleet.samples if s.device_id == "cam2"]
    assert cam2[-1].threshold == NEW_THRESHOLD and cam2[0].threshold == old


def test_threshold_form_refuses_bad_input(fmnist_model_path: Path) -> None:
    require_tool("mosquitto")
    key = topics.model_key(load_model(fmnist_model_path).hash_bytes)
    port = free_port()

    def post(body: bytes, content_type: str = "application/json", path: str = "threshold"
             ) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:  # aiohttp's own 413 is plain text
            body = error.read()
            return error.code, json.loads(body) if error.headers.get_content_type() == "application/json" else {}

    with Broker() as broker:
        view = Dashboard(broker.connection()).start(port)
        try:
            cases = [
                (json.dumps({"model": key, "device": "cam1", "value": 0.4}).encode(), "text/plain", 415),
                (b"{not json", "application/json", 400),
                (json.dumps([1]).encode(), "application/json", 400),
                (json.dumps({"model": "zz", "device": "cam1", "value": 0.4}).encode(), "application/json", 400),
                (json.dumps({"model": key, "device": "a/b", "value": 0.4}).encode(), "application/json", 400),
                (json.dumps({"model": key, "device": "cam1", "value": 1.5}).encode(), "application/json", 400),
                (json.dumps({"model": key, "device": "cam1", "value": True}).encode(), "application/json", 400),
                (b'{"model": "%s", "value": NaN}' % key.encode(), "application/json", 400),
                (b"x" * 10000, "application/json", 413),
            ]
            for body, content_type, status in cases:
                got, _ = post(body, content_type)
                assert got == status, (body[:60], got)
            got, answer = post(json.dumps({"model": key, "device": "cam1", "value": 0.4}).encode())
            assert got == 200 and answer["topic"] == f"ddnn/threshold/{key}/cam1"
            # An edge tier's threshold: tiers 1..7 only.
            for tier in (0, 8, "1", True, 1.5):
                got, _ = post(json.dumps({"model": key, "device": None, "tier": tier, "value": 0.4}).encode())
                assert got == 400, tier
            got, answer = post(json.dumps({"model": key, "device": None, "tier": 1, "value": 0.4}).encode())
            assert got == 200 and answer["topic"] == f"ddnn/tier-threshold/{key}/1"
            # The controller's target: the schema the controller applies (telemetry.TARGET_SCHEMA).
            for target in ({"max_load": 0}, {"max_load": 1.5}, {"max_load": True}, {"max_load": "0.5"},
                           {"target_p99_ms": 0.01}, {"target_p99_ms": 1e9}, {"max_load": 0.5, "target_p99_ms": 5},
                           {}, {"max_load": None}, [0.5], "max_load"):
                got, answer = post(json.dumps({"model": key, "target": target}).encode(), path="target")
                assert got == 400 and "error" in answer, target
            for body in (b'{"model": "%s", "target": {"max_load": NaN}}' % key.encode(),
                         json.dumps({"model": "zz", "target": {"max_load": 0.5}}).encode(),
                         json.dumps({"model": key, "target": {"max_load": 0.5}, "x": 1}).encode()):
                got, _ = post(body, path="target")
                assert got == 400, body
            assert post(json.dumps({"model": key, "target": {"max_load": 0.5}}).encode(), "text/plain",
                        "target")[0] == 415
            got, answer = post(json.dumps({"model": key, "target": {"target_p99_ms": 50}}).encode(), path="target")
            assert got == 200 and answer == {"topic": f"ddnn/control/{key}/target", "target": {"target_p99_ms": 50.0}}
            state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10).read())
            assert state["devices"] == [] and state["servers"] == []
            # No model-wide threshold and no controller state on this broker (a target is not a state): no models.
            assert state["models"] == []
        finally:
            view.stop()


CAPACITY = 40.0  # requests/s the controller is told the server sustains (below what the fleet offers)
CONTROL_RATE = 300.0  # samples/s over the control test's devices
NEW_MAX_LOAD = 0.3


def _log_reader(process: subprocess.Popen[str], lines: list[str]) -> threading.Thread:
    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _text(driver: object, css: str) -> str:
    """The text of the first element ``css`` finds on the live page ("" when none)."""
    from selenium.webdriver.common.by import By

    def read() -> str:
        found = driver.find_elements(By.CSS_SELECTOR, css)  # type: ignore[attr-defined]
        return found[0].text if found else ""
    return _page(read)()


def _set_target_in_page(driver: object, control_id: str, lines: list[str]) -> None:
    """Max load NEW_MAX_LOAD typed into the form of the controller section ``control-<control_id>``; returns once
    the controller logged the new target and the section shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, f"target-kind-{control_id}")).select_by_value("max_load")  # type: ignore
    driver.find_element(By.ID, f"target-input-{control_id}").send_keys(str(NEW_MAX_LOAD))  # type: ignore
    driver.find_element(By.ID, f"target-set-{control_id}").click()  # type: ignore[attr-defined]
    assert wait_for(lambda: any(f"new target load under {NEW_MAX_LOAD:g} of capacity" in line for line in lines),
                    timeout_s=20), "".join(lines)
    assert wait_for(lambda: _text(driver, f"#control-{control_id} p.target").startswith(
        f"target: load under {NEW_MAX_LOAD:g} of capacity"), timeout_s=20)


def _tear_down(driver: object, fleet: PacedFleet, view: Dashboard, control: subprocess.Popen[str],
               reader: threading.Thread) -> None:
    """Browser, devices, page and controller stopped, in that order (the controller's log read to its end)."""
    driver.quit()  # type: ignore[attr-defined]
    fleet.stop()
    view.stop()
    control.send_signal(signal.SIGTERM)
    control.wait(30)
    reader.join(5)


def test_page_shows_the_controller_and_sets_its_target(fmnist_test: datasets.Dataset, fmnist_model_path: Path,
                                                        fmnist_expected: Expected, tmp_path: Path) -> None:
    """`ddnngen control` runs; the page shows its target and decisions and the accuracy the calibration curve
    expects at the thresholds in force; the target set in the page reaches the controller and its next
    decisions use it; hostile targets and states on the broker are ignored."""
    require_tool("mosquitto")
    from paho.mqtt import publish
    from selenium.webdriver.common.by import By

    calibrated = calibrated_copy(fmnist_model_path, fmnist_test.subset(3000), tmp_path / "fmnist_32.npz")
    loaded = load_model(calibrated)
    curve = Curve.from_calibration(loaded.spec.calibration)
    key = topics.model_key(loaded.hash_bytes)
    expected = fmnist_expected
    part = precomputed(expected.device.split_words, expected.device.entropy, expected.device.local_class)
    port = free_port()
    lines: list[str] = []
    with Broker() as broker:
        server = ServerProcess(broker.address, calibrated, workers=1, extra=["--telemetry-interval", "0.5"]).start()
        control = subprocess.Popen([sys.executable, "-m", "ddnn_gen", "control", str(calibrated), "--max-load", "0.8",
                                    "--capacity", str(CAPACITY), "--interval", "0.5", "--duration", "120",
                                    "--broker", broker.address], stderr=subprocess.PIPE, text=True)
        reader = _log_reader(control, lines)
        view = Dashboard(broker.connection(), (model_info(calibrated),)).start(port)
        fleet = PacedFleet(broker.connection(), expected.program, loaded.hash_bytes, part,
                           len(expected.server_class), 3, lambda: CONTROL_RATE, telemetry_interval_s=0.25,
                           prefix="cam").start()
        driver = _driver()

        def hostile(topic: str, payload: bytes, retain: bool) -> None:
            publish.single(topic, payload, qos=1, retain=retain, hostname=broker.host, port=broker.port)

        def text(css: str) -> str:
            return _text(driver, css)

        def decisions() -> list[object]:
            return driver.find_elements(By.CSS_SELECTOR, f"#control-{key} tr.decision")  # type: ignore

        def accuracy_matches() -> bool:
            row = driver.find_element(By.ID, f"model-{key}")  # type: ignore[attr-defined]
            threshold = row.find_element(By.CSS_SELECTOR, 'td[data-field="threshold"]').get_attribute("data-value")
            shown = row.find_element(By.CSS_SELECTOR, 'td[data-field="expected-accuracy"]').text
            return bool(threshold) and shown == f"{100 * curve.accuracy_at(float(threshold)):.2f}"

        try:
            driver.get(view.url)  # type: ignore[attr-defined]
            assert wait_for(lambda: len(decisions()) >= 2, timeout_s=60), "".join(lines)
            assert text(f"#control-{key} p.target").startswith("target: load under 0.8 of capacity")
            assert wait_for(lambda: "over target" in text(f"#control-{key} tr.decision"), timeout_s=30)
            # The threshold in force is the controller's (retained, model-wide); the accuracy shown is the
            # calibration curve's at exactly that value.
            assert wait_for(lambda: text(f"#model-{key} td[data-field=source]") == "retained", timeout_s=30)
            assert wait_for(accuracy_matches, timeout_s=30)
            device_threshold = lambda: next(d["threshold"] for d in view.state.snapshot()["devices"]  # noqa: E731
                                            if d["id"] == "cam0")
            assert wait_for(lambda: _field(driver, "cam0", "expected-accuracy")
                            == f"{100 * curve.accuracy_at(device_threshold()):.2f}", timeout_s=30)
            # Hostile targets (retained, so the controller reads them) and states are ignored.
            for payload in (b'{"max_load": 5}', b'{"max_load": NaN}', b"{", b'{"target_p99_ms": 0}', b"x" * 20000):
                hostile(topics.control_target_topic(loaded.hash_bytes), payload, True)
            rejected = view.state.snapshot()["rejected"]
            hostile(topics.control_state_topic(loaded.hash_bytes), b'{"v": 1, "model": "' + key.encode() + b'"}',
                    False)
            hostile(topics.control_state_topic(loaded.hash_bytes), b"[" * 10000, False)
            assert wait_for(lambda: sum("ignoring the target" in line for line in lines) >= 5, timeout_s=20), lines
            assert wait_for(lambda: view.state.snapshot()["rejected"] >= rejected + 2, timeout_s=20)
            assert text(f"#control-{key} p.target").startswith("target: load under 0.8 of capacity")
            assert "new target" not in "".join(lines)
            # The operator sets a new target in the page.
            _set_target_in_page(driver, key, lines)

            def newest_uses_it() -> bool:
                rows = decisions()
                return bool(rows) and rows[0].text.endswith(  # type: ignore[attr-defined]
                    f"load under {NEW_MAX_LOAD:g} of capacity") and abs(float(
                        rows[0].get_attribute("data-allowed")) - NEW_MAX_LOAD * CAPACITY) < 1e-9  # type: ignore
            assert wait_for(newest_uses_it, timeout_s=20)
            assert wait_for(accuracy_matches, timeout_s=30)
            driver.save_screenshot(str(tmp_path / "dashboard-control.png"))  # type: ignore[attr-defined]
        finally:
            _tear_down(driver, fleet, view, control, reader)
            assert server.terminate() == 0, server.output
    log = "".join(lines)
    assert control.returncode == 0, log
    # The controller's log agrees: decisions after the new target allow 0.3 of the capacity.
    allowed = [float(a) for a in re.findall(r"predicted \d+ req/s of (\d+) allowed.*target load under 0\.3 ", log)]
    assert allowed and all(a == round(NEW_MAX_LOAD * CAPACITY) for a in allowed), log
    assert "Traceback" not in log


def test_page_shows_per_device_thresholds_and_a_dead_controller(fmnist_test: datasets.Dataset,
                                                                fmnist_model_path: Path, fmnist_expected: Expected,
                                                                tmp_path: Path) -> None:
    """`ddnngen control --per-device`: the page lists the threshold it set for each device, the devices' rows
    say their threshold comes from the controller, and once the controller is killed the page says it is
    offline (its last will) and the devices' thresholds are no longer the controller's."""
    require_tool("mosquitto")
    from selenium.webdriver.common.by import By

    calibrated = calibrated_copy(fmnist_model_path, fmnist_test.subset(3000), tmp_path / "fmnist_32.npz")
    loaded = load_model(calibrated)
    key = topics.model_key(loaded.hash_bytes)
    expected = fmnist_expected
    part = precomputed(expected.device.split_words, expected.device.entropy, expected.device.local_class)
    port = free_port()
    lines: list[str] = []
    with Broker() as broker:
        server = ServerProcess(broker.address, calibrated, workers=1, extra=["--telemetry-interval", "0.5"]).start()
        control = subprocess.Popen([sys.executable, "-m", "ddnn_gen", "control", str(calibrated), "--per-device",
                                    "--max-load", "0.8", "--capacity", str(CAPACITY), "--interval", "0.5",
                                    "--broker", broker.address], stderr=subprocess.PIPE, text=True)
        reader = _log_reader(control, lines)
        view = Dashboard(broker.connection(), (model_info(calibrated),)).start(port)
        fleet = PacedFleet(broker.connection(), expected.program, loaded.hash_bytes, part,
                           len(expected.server_class), 3, lambda: CONTROL_RATE, telemetry_interval_s=0.25,
                           prefix="cam").start()
        driver = _driver()

        def controlled() -> dict[str, float]:
            rows = driver.find_elements(By.CSS_SELECTOR, f"#control-{key} tr.controlled")  # type: ignore
            return {row.get_attribute("data-device"): float(row.find_element(By.CSS_SELECTOR, "td[data-value]")
                                                            .get_attribute("data-value")) for row in rows}

        def liveness() -> str:
            found = driver.find_elements(By.CSS_SELECTOR, f"#control-{key} p.liveness")  # type: ignore
            return found[0].get_attribute("data-status") if found else ""

        def device_threshold(device_id: str) -> float | None:
            return next((d["threshold"] for d in view.state.snapshot()["devices"] if d["id"] == device_id), None)

        try:
            driver.get(view.url)  # type: ignore[attr-defined]
            ids = [f"cam{d}" for d in range(3)]
            assert wait_for(lambda: sorted(controlled()) == ids, timeout_s=60), "".join(lines)
            assert wait_for(lambda: liveness() == "online", timeout_s=10)
            # Each device's row: its threshold is its own retained one, the one the controller lists for it.
            assert wait_for(lambda: all(_field(driver, i, "threshold-from") == "controller" for i in ids),
                            timeout_s=30), [_field(driver, i, "threshold-from") for i in ids]
            assert wait_for(lambda: all(abs((device_threshold(i) or -1) - controlled()[i]) < 1e-9 for i in ids),
                            timeout_s=30)
            control.send_signal(signal.SIGKILL)
            control.wait(30)
            assert wait_for(lambda: liveness() == "offline", timeout_s=30)
            assert wait_for(lambda: all(_field(driver, i, "threshold-from") == "device" for i in ids), timeout_s=10)
            assert sorted(controlled()) == ids  # its last state stays on the page
            driver.save_screenshot(str(tmp_path / "dashboard-per-device.png"))  # type: ignore[attr-defined]
        finally:
            driver.quit()  # type: ignore[attr-defined]
            fleet.stop()
            view.stop()
            if control.poll() is None:
                control.kill()
            control.wait(30)
            reader.join(5)
            assert server.terminate() == 0, server.output
    assert "Traceback" not in "".join(lines)


MODEL3 = Path(__file__).resolve().parent.parent / "models" / "fmnist3_32.npz"
EDGE_THRESHOLD = 0.45  # the edge exit's, set in the page (the model file's is 0.2111)
TIER_RATE = 300.0  # samples/s over the tier test's devices
TIER_AFTER_S = 6.0  # seconds classified once the edge reports applying the value


def _tier_cell(driver: object, row_id: str, name: str) -> str:
    """A cell's full-precision value (data-value) in the page's server-tier thresholds table; "" when absent."""
    from selenium.webdriver.common.by import By

    def read() -> str:
        rows = driver.find_elements(By.ID, row_id)  # type: ignore[attr-defined]
        if not rows:
            return ""
        return rows[0].find_element(By.CSS_SELECTOR, f'td[data-field="{name}"]').get_attribute("data-value") or ""
    return _page(read)()


def test_page_sets_an_edge_tiers_threshold_shows_it_back_and_the_edge_applies_it(
        fmnist_test: datasets.Dataset, tmp_path: Path) -> None:
    """Three tiers (devices -> edge -> cloud): the edge tier's threshold set in the page comes back in the page,
    retained (model-wide and one device's) and as the edge server reports applying it, and the share of the
    requests reaching the edge that it answers moves to what the evaluation predicts (+-2 points)."""
    require_tool("mosquitto")
    from selenium.webdriver.common.by import By

    from ddnn_gen.fold.program import fold
    from ddnn_gen.fold.reference import run_device
    from ddnn_gen.model.evaluate import answering_exit

    loaded = load_model(MODEL3)
    data = fmnist_test.subset(4000)
    program = fold(loaded)
    device = run_device(program, data.images)
    outputs = compute_outputs(loaded, data)
    t_device, t_edge = loaded.spec.thresholds
    key = topics.model_key(loaded.hash_bytes)
    port = free_port()
    with Broker() as broker:
        cloud = ServerProcess(broker.address, MODEL3, workers=1, server_id="cloud-1",
                              extra=["--telemetry-interval", "0.5"]).start()
        edge = ServerProcess(broker.address, MODEL3, workers=1, server_id="edge-1",
                             extra=["--role", "edge", "--telemetry-interval", "0.5"]).start()
        view = Dashboard(broker.connection(), (model_info(MODEL3),)).start(port)
        fleet = PacedFleet(broker.connection(), program, loaded.hash_bytes,
                           precomputed(device.split_words, device.entropy, device.local_class), len(data), 3,
                           lambda: TIER_RATE, telemetry_interval_s=0.5, prefix="cam").start()
        driver = _driver()
        model_row = f"tier-{key}-1-model"
        try:
            driver.get(view.url)  # type: ignore[attr-defined]
            # Before anything is retained the edge reports the model file's value.
            assert wait_for(lambda: json.loads(_tier_cell(driver, model_row, "applied") or "{}")
                            == {"edge-1": pytest.approx(t_edge)}, timeout_s=30)
            assert _tier_cell(driver, model_row, "retained") == ""
            driver.find_element(By.ID, f"tier-input-{key}").send_keys(str(EDGE_THRESHOLD))  # type: ignore
            driver.find_element(By.ID, f"tier-set-{key}").click()  # type: ignore[attr-defined]
            assert wait_for(lambda: _tier_cell(driver, model_row, "retained") == str(EDGE_THRESHOLD), timeout_s=20)
            assert wait_for(lambda: json.loads(_tier_cell(driver, model_row, "applied") or "{}")
                            == {"edge-1": EDGE_THRESHOLD}, timeout_s=20)
            applied_at = time.monotonic()
            # One device's own edge threshold (the page's API, as the form posts it): shown back, applied.
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/threshold", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": key, "device": "cam2", "tier": 1, "value": 0.9}).encode())
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
            cam_row = f"tier-{key}-1-cam2"
            assert wait_for(lambda: _tier_cell(driver, cam_row, "retained") == "0.9"
                            and json.loads(_tier_cell(driver, cam_row, "applied") or "{}") == {"edge-1": 0.9},
                            timeout_s=20)
            time.sleep(TIER_AFTER_S)
            driver.save_screenshot(str(tmp_path / "dashboard-tiers.png"))  # type: ignore[attr-defined]
        finally:
            driver.quit()  # type: ignore[attr-defined]
            samples = fleet.stop()
            view.stop()
            assert edge.terminate() == 0, edge.output
            assert cloud.terminate() == 0, cloud.output
    # The edge applied it: of the requests reaching it after it said so (cam2 has a value of its own), the share
    # it answered is the evaluation's at the new threshold, on these samples and on the whole test set.
    reached = [s for s in samples if s.sent >= applied_at + 0.5 and s.answered_by >= 1 and s.device_id != "cam2"]
    assert len(reached) > 200, len(reached)
    got = float(np.mean([s.answered_by == 1 for s in reached]))
    exits = answering_exit(outputs, (t_device, EDGE_THRESHOLD))
    want = float(np.mean([exits[s.index] == 1 for s in reached]))
    before = answering_exit(outputs, (t_device, t_edge))
    assert abs(got - want) <= 0.02, (got, want)
    assert abs(want - float(np.mean([before[s.index] == 1 for s in reached]))) > 0.2  # it did move
    assert all(s.source in ("local", "server") for s in samples)


def test_page_shows_an_edge_tiers_controller_and_sets_its_target(fmnist_test: datasets.Dataset,
                                                                 tmp_path: Path) -> None:
    """`ddnngen control --tier edge` runs against a three-tier fleet: the page shows that controller in a section
    of its own (its target, its decisions) and the target set there reaches it, on its tier's target topic, and
    its next decisions use it; the devices' controller section is not touched and bad tiers are refused."""
    require_tool("mosquitto")
    from selenium.webdriver.common.by import By

    from ddnn_gen.fold.program import fold
    from ddnn_gen.fold.reference import run_device

    loaded = load_model(MODEL3)
    data = fmnist_test.subset(2000)
    program = fold(loaded)
    device = run_device(program, data.images)
    key = topics.model_key(loaded.hash_bytes)
    section = f"control-{key}-t1"
    port = free_port()
    lines: list[str] = []
    with Broker() as broker:
        cloud = ServerProcess(broker.address, MODEL3, workers=1, server_id="cloud-1",
                              extra=["--telemetry-interval", "0.5"]).start()
        edge = ServerProcess(broker.address, MODEL3, workers=1, server_id="edge-1",
                             extra=["--role", "edge", "--telemetry-interval", "0.5"]).start()
        control = subprocess.Popen([sys.executable, "-m", "ddnn_gen", "control", str(MODEL3), "--tier", "edge",
                                    "--max-load", "0.8", "--capacity", str(CAPACITY), "--interval", "0.5",
                                    "--duration", "120", "--broker", broker.address], stderr=subprocess.PIPE,
                                   text=True)
        reader = _log_reader(control, lines)
        view = Dashboard(broker.connection(), (model_info(MODEL3),)).start(port)
        fleet = PacedFleet(broker.connection(), program, loaded.hash_bytes,
                           precomputed(device.split_words, device.entropy, device.local_class), len(data), 3,
                           lambda: TIER_RATE, telemetry_interval_s=0.5, prefix="cam").start()
        driver = _driver()

        def text(css: str) -> str:
            return _text(driver, css)

        def newest_allows(allowed: float) -> bool:
            rows = driver.find_elements(By.CSS_SELECTOR, f"#{section} tr.decision")  # type: ignore[attr-defined]
            return bool(rows) and abs(float(rows[0].get_attribute("data-allowed")) - allowed) < 1e-9  # type: ignore

        def post(body: dict[str, object]) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/target", method="POST",
                                             headers={"Content-Type": "application/json"},
                                             data=json.dumps(body).encode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return int(response.status)
            except urllib.error.HTTPError as error:
                return int(error.code)

        try:
            driver.get(view.url)  # type: ignore[attr-defined]
            assert wait_for(lambda: newest_allows(0.8 * CAPACITY), timeout_s=60), "".join(lines)
            assert "tier 1's exit" in text(f"#{section} h3")
            assert text(f"#{section} p.target").startswith("target: load under 0.8 of capacity")
            assert not driver.find_elements(By.ID, f"control-{key}")  # type: ignore[attr-defined]
            for bad in ({"model": key, "tier": 0, "target": {"max_load": 0.5}},
                        {"model": key, "tier": 99, "target": {"max_load": 0.5}},
                        {"model": key, "tier": True, "target": {"max_load": 0.5}},
                        {"model": key, "tier": 1, "target": {"max_load": 0.5}, "extra": 1}):
                assert post(bad) == 400, bad
            _set_target_in_page(driver, f"{key}-t1", lines)
            assert wait_for(lambda: newest_allows(NEW_MAX_LOAD * CAPACITY), timeout_s=20)
            driver.save_screenshot(str(tmp_path / "dashboard-tier-control.png"))  # type: ignore[attr-defined]
        finally:
            _tear_down(driver, fleet, view, control, reader)
            assert edge.terminate() == 0, edge.output
            assert cloud.terminate() == 0, cloud.output
    log = "".join(lines)
    assert control.returncode == 0, log
    assert "Traceback" not in log
