"""Server-only requests (packing RAW_U8, split layer 0): the device sends its raw input and ddnn-server runs
the whole model. Real Mosquitto, real ddnn-server, the generated C runner with --server-only and real
Fashion-MNIST samples; answers must equal Chainer's full-model prediction."""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from net_harness import SAN_ENV, ServerProcess

from ddnn_gen.codegen import toolchain
from ddnn_gen.codegen.c_target import compile_c
from ddnn_gen.device.samples import write_samples
from ddnn_gen.device.simulated import SimDevice
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.model.network import predict
from ddnn_gen.wire import codec
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader, Status

N_SAMPLES = 300
HASH = bytes(range(16))


def _raw_header(channels: int = 1, height: int = 28, width: int = 28, split_layer: int = 0,
                request_id: int = 7) -> RequestHeader:
    return RequestHeader(HASH, split_layer, channels, height, width, request_id, 0, Packing.RAW_U8)


def test_raw_request_round_trip_and_layout() -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    data = codec.encode_request(_raw_header(), image)
    assert len(data) == codec.REQUEST_HEADER_BYTES + 784
    assert data[5] == Packing.RAW_U8 == 3 and data[24:26] == b"\0\0"
    assert int.from_bytes(data[48:52], "little") == 784
    assert data[codec.REQUEST_HEADER_BYTES:] == image.tobytes()  # HWC, no conversion
    decoded = codec.decode_request(data)
    assert decoded.header == _raw_header()
    assert decoded.payload.dtype == np.uint8 and np.array_equal(decoded.payload, image)


def test_raw_request_must_start_at_layer_zero_and_match_its_length() -> None:
    image = np.zeros((28, 28, 1), dtype=np.uint8)
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(codec.encode_request(_raw_header(split_layer=2), image))
    assert error.value.status == Status.SHAPE_MISMATCH and error.value.request_id == 7
    with pytest.raises(ProtocolError) as error:
        codec.decode_request(codec.encode_request(_raw_header(), image)[:-1])
    assert error.value.status == Status.MALFORMED


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    require_tool("mosquitto")
    with Broker() as running:
        yield running


@pytest.fixture(scope="module")
def server(broker: Broker, fmnist_model_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(broker.address, fmnist_model_path).start()
    yield process
    process.terminate()


def test_c_runner_server_only_equals_chainer_full_model(tmp_path: Path, broker: Broker, server: ServerProcess,
                                                        fmnist_test: object, fmnist_model_path: Path) -> None:
    require_tool("gcc")
    if not Path("/usr/include/MQTTClient.h").exists():
        pytest.skip("Paho C (libpaho-mqtt-dev) not installed")
    images = fmnist_test.images[:N_SAMPLES]  # type: ignore[attr-defined]
    labels = fmnist_test.labels[:N_SAMPLES]  # type: ignore[attr-defined]
    compile_c(fmnist_model_path, tmp_path / "proj")
    binary = toolchain.build_project(tmp_path / "proj", target="net", sanitize=True)
    samples = tmp_path / "s.ddns"
    write_samples(samples, images, labels)
    out = tmp_path / "r.csv"
    run = subprocess.run([str(binary), str(samples), "--device-id", "raw-dev", "--broker", broker.address,
                          "--server-only", "--timeout-ms", "10000", "-o", str(out)],
                         capture_output=True, text=True, env=SAN_ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == N_SAMPLES
    assert {row["source"] for row in rows} == {"server"}
    assert all(row["local_class"] == "-1" and row["exit_local"] == "0" for row in rows)
    _, final_logits = predict(load_model(fmnist_model_path).model, images)
    expected = final_logits.argmax(axis=1)
    got = np.array([int(row["final_class"]) for row in rows])
    assert np.array_equal(got, expected)
    assert [int(row["label"]) for row in rows] == labels.tolist()
    assert all(int(row["t_server_us"]) > 0 for row in rows)


def test_raw_requests_with_the_wrong_shape_get_error_replies(broker: Broker, server: ServerProcess,
                                                             fmnist_model_path: Path, fmnist_test: object) -> None:
    loaded = load_model(fmnist_model_path)
    device = SimDevice("raw-sim", broker.connection(), loaded.hash_bytes, timeout_s=10).start()
    try:
        image = fmnist_test.images[0].transpose(1, 2, 0)  # type: ignore[attr-defined]
        good = RequestHeader(loaded.hash_bytes, 0, 1, 28, 28, device.next_request_id(), 0, Packing.RAW_U8)
        reply, _ = device.request(good, image)
        _, final_logits = predict(loaded.model, image.transpose(2, 0, 1)[None])
        assert reply is not None and reply.status == Status.OK and reply.class_id == int(final_logits.argmax())
        wrong = RequestHeader(loaded.hash_bytes, 0, 1, 27, 28, device.next_request_id(), 0,
                              Packing.RAW_U8)
        reply, _ = device.request(wrong, image[:27])
        assert reply is not None and reply.status == Status.SHAPE_MISMATCH and "raw input" in reply.message
        # split layer 0 with bit packing is a split the model does not have
        program_words = np.zeros((28, 28, 1), dtype=np.uint64)
        bits = RequestHeader(loaded.hash_bytes, 0, 1, 28, 28, device.next_request_id(), 0,
                             Packing.BITS_U64)
        reply, _ = device.request(bits, program_words)
        assert reply is not None and reply.status == Status.SHAPE_MISMATCH
    finally:
        device.stop()
