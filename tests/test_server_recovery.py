"""Nothing is lost when a server dies (SIGKILL, restarted under its --server-id: persistent session and
manual QoS 1 acks) or is stopped (SIGTERM while another server shares the load: in-flight work finished).
The paho-c transport acks on arrival, so its SIGKILL case differs: tests/test_server_pahoc.py."""

from __future__ import annotations

import os
import threading
import time

import pytest
from net_harness import Expected, ServerProcess

from ddnn_gen.device.simulated import run_devices
from ddnn_gen.wire.broker import Broker


def _run(broker: Broker, expected: Expected, n_devices: int, per_device: int, **kwargs: object):  # noqa: ANN202
    return run_devices(broker.connection(), expected.program, expected.loaded.hash_bytes,
                       expected.device.split_words, expected.device.entropy, expected.device.local_class,
                       n_devices, per_device, all_to_server=True, **kwargs)  # type: ignore[arg-type]


def test_killed_server_restarted_under_its_id_loses_nothing(broker: Broker, fmnist_expected: Expected,
                                                            fmnist_model_path: object) -> None:
    server = ServerProcess(broker.address, fmnist_model_path, workers=2, server_id="ddnn-test-recover").start()
    restarted: list[ServerProcess] = []
    answered = threading.Semaphore(0)

    def crash_and_restart() -> None:
        for _ in range(300):  # mid-run, whatever the machine's speed: 300 of the 1500 answered
            answered.acquire()
        server.kill()  # SIGKILL: no clean shutdown, requests in flight and unacked
        time.sleep(0.5)
        restarted.append(ServerProcess(broker.address, fmnist_model_path, workers=2,
                                       server_id="ddnn-test-recover").start())

    chaos = threading.Thread(target=crash_and_restart)
    chaos.start()
    try:
        report = _run(broker, fmnist_expected, 6, 250, timeout_s=60.0, window=4,
                      on_outcome=lambda _: answered.release())
    finally:
        chaos.join()
        for process in restarted:
            process.terminate()
        server.kill()
    assert len(restarted) == 1
    assert restarted[0].replies_sent() > 0, "the run ended before the crash; it tests nothing"
    assert report.count("server") == 1500, {s: report.count(s) for s in ("fallback", "error")}
    assert report.misrouted == 0  # duplicates are allowed: QoS 1 is at-least-once across a crash
    got = [o.final_class for o in report.outcomes]
    assert got == [int(fmnist_expected.server_class[o.index]) for o in report.outcomes]


@pytest.mark.parametrize("transport", ["paho-mqtt", "paho-c", "c-mqtt"])
def test_sigterm_finishes_in_flight_work_while_another_server_takes_over(broker: Broker, fmnist_expected: Expected,
                                                                         fmnist_model_path: object,
                                                                         transport: str) -> None:
    """Every transport: a clean stop answers everything it took (paho-c acked it on arrival, c-mqtt when it was
    taken, so they must)."""
    if transport == "paho-c" and not os.path.exists("/usr/include/MQTTAsync.h"):
        pytest.skip("the Paho C transport needs libpaho-mqtt-dev")
    if transport == "c-mqtt" and not os.path.exists("/usr/include/openssl/ssl.h"):
        pytest.skip("--transport c-mqtt needs libssl-dev")
    args = ["--transport", transport]
    leaving = ServerProcess(broker.address, fmnist_model_path, workers=1, extra=args).start()
    staying = ServerProcess(broker.address, fmnist_model_path, workers=1, extra=args).start()
    codes: list[int] = []
    answered = threading.Semaphore(0)

    def stop_one_mid_run() -> None:
        for _ in range(300):  # 300 of the 1200 answered
            answered.acquire()
        codes.append(leaving.terminate())

    stopper = threading.Thread(target=stop_one_mid_run)
    stopper.start()
    try:
        report = _run(broker, fmnist_expected, 6, 200, timeout_s=30.0, window=4,
                      on_outcome=lambda _: answered.release())
    finally:
        stopper.join()
        staying.terminate()
        leaving.kill()
    assert codes == [0], leaving.output
    assert report.count("server") == 1200 and report.duplicates == 0 and report.misrouted == 0
    assert leaving.replies_sent() > 0 and staying.replies_sent() > 0
    assert leaving.replies_sent() + staying.replies_sent() == 1200
