"""A three-tier multi-view model on the server side, without a network: which role serves which tier of it
(the aggregator tier 1 as an edge, a cloud tier 2, nothing the raw image), and the aggregator's answers of
gathered events: the events whose tier-1 exit is unsure carry tier 1's output on to the cloud, exactly where
the evaluation says the cloud answers."""

from __future__ import annotations

import numpy as np
import pytest
from test_views3_net import MODEL, expected

from ddnn_gen.errors import ModelFileError
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model import datasets
from ddnn_gen.model.modelfile import LoadedModel, load_model
from ddnn_gen.model.spec import parse_spec
from ddnn_gen.model.train import TrainConfig, train
from ddnn_gen.model.zoo import build
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader
from ddnn_server.aggregator import Event, ViewRequest, answer_events
from ddnn_server.store import serve

N_EVENTS = 500


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(MODEL)


def test_each_role_serves_its_tiers_of_a_three_tier_multi_view_model(loaded: LoadedModel) -> None:
    aggregating = serve(loaded, "aggregator")
    assert aggregating.views is not None and aggregating.views.onward and aggregating.topic_tier == 1
    cloud = serve(loaded, "cloud")
    assert cloud.entry_tier == 2 and cloud.topic_tier == 2 and cloud.program is not None
    assert cloud.split_chw == tuple(loaded.spec.tier_output_shape(1))
    raw = RequestHeader(loaded.hash_bytes, 0, 1, 28, 28, 1, 0, Packing.RAW_U8)
    with pytest.raises(ProtocolError, match="multi-view"):
        cloud.check(raw)
    with pytest.raises(ModelFileError, match="binary edge tier|--role aggregator"):
        serve(loaded, "edge")


def _untrained(raw: dict) -> LoadedModel:
    """A model file of ``raw`` after one training step (its weights do not matter to what serve() refuses)."""
    import tempfile
    from pathlib import Path

    from ddnn_gen.model.modelfile import save_model

    result = train(parse_spec(raw), datasets.load("fashion-mnist", "train").subset(20),
                   TrainConfig(epochs=1, batch_size=10, progress=False, max_steps=1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{raw['name']}.npz"
        save_model(path, result.model)
        return load_model(path)


def test_the_aggregator_refuses_what_it_cannot_pass_on() -> None:
    """A float tier 1 with tiers above it (its output would go on as float activations) and a second edge
    behind the aggregator have no server role: refused at load, naming the tiers."""
    float_middle = build("fashion-mnist-views")
    float_middle["tiers"].insert(1, {"name": "mid", "kind": "edge", "exit": {"name": "mid", "type": "linear"},
                                     "layers": [{"name": "mconv", "type": "conv", "out_channels": 16, "ksize": 3,
                                                 "stride": 1, "pad": 1}]})
    float_middle["thresholds"], float_middle["loss_weights"] = [0.5, 0.5], [1.0, 1.0, 1.0]
    with pytest.raises(ModelFileError, match="tier 1 is binary"):
        serve(_untrained(float_middle), "aggregator")
    two_edges = build("fashion-mnist-views-3tier")
    two_edges["tiers"].insert(2, {**two_edges["tiers"][1], "name": "edge2",
                                  "exit": {"name": "edge2", "type": "bexit"},
                                  "layers": [{**two_edges["tiers"][1]["layers"][0], "name": "e2conv"}]})
    two_edges["thresholds"], two_edges["loss_weights"] = [0.5, 0.5, 0.5], [1.0] * 4
    with pytest.raises(ModelFileError, match="device, edge, edge, cloud"):
        serve(_untrained(two_edges), "aggregator")


def _events(runs: object, count: int, model_hash: bytes, split_chw: tuple[int, int, int]) -> list[Event]:
    events = []
    channels, height, width = split_chw
    for index in range(count):
        event = Event((model_hash, index + 1), 4, 0.0)
        for view in range(4):
            header = RequestHeader(model_hash, 2, channels, height, width, 1, 0, Packing.BITS_U64, index + 1, view, 4)
            event.views[view] = ViewRequest(header, runs.splits[view, index], None)  # type: ignore[attr-defined]
        events.append(event)
    return events


def test_unsure_events_go_on_to_the_cloud_where_the_evaluation_says(loaded: LoadedModel,
                                                                    fmnist_test: datasets.Dataset) -> None:
    aggregator = ViewAggregator(loaded)
    images, labels = fmnist_test.images[:N_EVENTS], fmnist_test.labels[:N_EVENTS]
    runs = aggregator.run_devices(images)
    outputs = aggregator.outputs(runs, labels)
    events = _events(runs, N_EVENTS, loaded.hash_bytes, serve(loaded, "aggregator").split_chw)
    for edge_threshold in (None, 0.0, 1.0):
        answers = answer_events(aggregator, events, edge_threshold=edge_threshold)
        classes, exits = expected(aggregator, outputs, edge_threshold)
        onward = np.array([answer.onward is not None for answer in answers])
        assert np.array_equal(onward, exits == 2), edge_threshold
        here = exits < 2
        assert np.array_equal(np.array([a.answered_by for a in answers])[here], exits[here])
        assert np.array_equal(np.array([a.class_id for a in answers])[here], classes[here])
        # What goes on is tier 1's output as the evaluation computes it for the cloud: the edge's split.
        edge = aggregator.next_tier_batch(runs.splits, np.ones((N_EVENTS, 4), dtype=bool))
        assert edge.output is not None
        for index in np.flatnonzero(onward):
            onward_words = answers[index].onward
            assert onward_words is not None and np.array_equal(onward_words, edge.output[index])
    assert 0 < int(np.sum(expected(aggregator, outputs)[1] == 2)) < N_EVENTS
