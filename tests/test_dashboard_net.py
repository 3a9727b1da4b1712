"""The operator's page in headless Chromium (Debian's chromium + chromium-driver, through selenium) against a
real fleet: a Mosquitto, a ddnn-server, 5 open-loop simulated devices. The page lists the devices and the
server's load; setting a device's threshold in the page moves that device's exit rate to what the evaluation
(`ddnngen eval`'s metrics_at) predicts at that threshold."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import require_tool
from net_harness import ServerProcess, expectations, wait_for

from ddnn_gen.bench.load_ramp import PacedFleet
from ddnn_gen.device.simulated import precomputed
from ddnn_gen.fold.exits import compute_outputs
from ddnn_gen.model import datasets
from ddnn_gen.model.evaluate import metrics_at
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.ops.dashboard import Dashboard
from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import Broker, free_port

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


def _field(driver: object, device_id: str, name: str) -> str:
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.ID, f"device-{device_id}")  # type: ignore[attr-defined]
    return row.find_element(By.CSS_SELECTOR, f'td[data-field="{name}"]').text


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

    def post(body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/threshold", data=body, method="POST",
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
            state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10).read())
            assert state["devices"] == [] and state["servers"] == []
        finally:
            view.stop()
