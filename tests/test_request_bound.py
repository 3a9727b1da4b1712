"""Issue 18's wire bound on every shipped model: a request costs at most its bits plus the 64-byte header,
ceil(H*W*C / 8) + 64, measured from the encoders themselves (Python codec and the C device's
ddnn_request_encode_dense through cffi), for every sender of bit-packed splits (devices, each view, edges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from ddnn_gen.bench.report import request_size_table
from ddnn_gen.bench.wire_sizes import request_sizes, split_requests
from ddnn_gen.device.c_binding import CRuntime
from ddnn_gen.model.modelfile import load_model
from ddnn_gen.wire import codec

MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = sorted(MODELS.glob("*.npz")) + sorted((MODELS / "views").glob("*.npz"))


@pytest.fixture(scope="module")
def runtime() -> CRuntime:
    require_tool("cc")
    return CRuntime()


def test_every_shipped_model_is_covered() -> None:
    assert len(SHIPPED) >= 5 and any(path.parent.name == "views" for path in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_requests_within_bits_plus_header(path: Path, runtime: CRuntime) -> None:
    loaded = load_model(path)
    requests = split_requests(loaded)
    assert requests[0].sender.startswith("device")
    for request in requests:
        header, split = request.header, request.split
        height, width, channels = request.program.split_hwc
        bound = -(-height * width * channels // 8) + 64
        python = codec.encode_request(header, split)
        c = runtime.request_encode(header.model_hash, header.split_layer, channels, height, width,
                                   header.request_id, header.device_time_us, split,
                                   (header.event_id, header.view_index, header.view_count), dense=True)
        assert c == python, request.sender
        assert len(python) <= bound, (request.sender, len(python), bound)
        decoded = codec.decode_request(python)
        assert decoded.header.packing == codec.Packing.BITS_DENSE
        np.testing.assert_array_equal(decoded.payload, split)  # the server gets the words the tier held
    rows = request_sizes(loaded)
    assert [row["sender"] for row in rows] == [request.sender for request in requests]
    assert all(row["request_bytes"] <= row["bound_bytes"] <= row["words_request_bytes"] for row in rows)
    table = request_size_table({"request_sizes": rows})
    assert table.count("| yes |") == len(rows) and "| NO |" not in table
