"""Offline tests of the server's batcher and model store (no broker)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ddnn_gen.errors import ModelFileError
from ddnn_gen.fold.reference import run_device
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader, Status
from ddnn_server.batching import Batcher, Job
from ddnn_server.store import ModelStore


def test_batches_per_model_up_to_max_size_oldest_first() -> None:
    batcher = Batcher(max_batch=3, max_wait_ms=0)
    for i in range(5):
        batcher.put(Job(b"a", i, None))
    batcher.put(Job(b"b", "x", None))
    assert [job.payload for job in batcher.next_batch() or []] == [0, 1, 2]
    assert [job.payload for job in batcher.next_batch() or []] == [3, 4]
    assert [job.payload for job in batcher.next_batch() or []] == ["x"]
    batcher.close()
    assert batcher.next_batch() is None
    with pytest.raises(RuntimeError):
        batcher.put(Job(b"a", 9, None))


def test_max_wait_lets_stragglers_join_and_close_drains() -> None:
    batcher = Batcher(max_batch=8, max_wait_ms=200)
    batcher.put(Job(b"m", 0, None))
    threading.Timer(0.05, lambda: batcher.put(Job(b"m", 1, None))).start()
    started = time.monotonic()
    batch = batcher.next_batch() or []
    assert [job.payload for job in batch] == [0, 1] and time.monotonic() - started >= 0.15
    batcher.put(Job(b"m", 2, None))
    batcher.close()  # closing releases the queued job at once instead of waiting out max_wait
    assert [job.payload for job in batcher.next_batch() or []] == [2]
    assert batcher.next_batch() is None


def test_store_loads_models_by_hash_and_checks_shapes(fmnist_model_path: object, fmnist_test: object,
                                                      tmp_path: object) -> None:
    store = ModelStore()
    served = store.add_file(fmnist_model_path)  # type: ignore[arg-type]
    assert store.get(served.hash_bytes) is served and store.get(bytes(16)) is None
    assert store.add_file(fmnist_model_path) is served and len(store) == 1  # type: ignore[arg-type]
    channels, height, width = served.split_chw
    good = RequestHeader(served.hash_bytes, served.split_layer, channels, height, width, 1, "d")
    served.check(good)
    with pytest.raises(ProtocolError) as error:
        served.check(RequestHeader(served.hash_bytes, served.split_layer, channels, height, width + 1, 1, "d"))
    assert error.value.status == Status.SHAPE_MISMATCH
    images = fmnist_test.images[:64]  # type: ignore[attr-defined]
    split = run_device(served.program, images).split_words
    whole = served.forward(served.server_input(list(split), Packing.BITS_U64))
    parts = np.concatenate([served.forward(served.server_input(list(split[i:i + 7]), Packing.BITS_U64))
                            for i in range(0, 64, 7)])
    assert np.array_equal(whole.argmax(axis=1), parts.argmax(axis=1))  # batch composition does not matter
    bad = tmp_path / "bad.npz"  # type: ignore[operator]
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError):
        ModelStore().load_dir(tmp_path)  # type: ignore[arg-type]
