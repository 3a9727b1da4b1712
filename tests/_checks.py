"""Assertions shared by several test files."""

from __future__ import annotations

import chainer
import numpy as np

from ddnn_gen.fold import reference
from ddnn_gen.fold.program import fold, unpack_bits
from ddnn_gen.model.links import input_to_float
from ddnn_gen.model.modelfile import LoadedModel


def chainer_device_bits(loaded: LoadedModel, images_u8: np.ndarray,
                        view: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Chainer test-mode forward: every device layer's sign bits (N, H, W, C) and the local logits; of view
    ``view``'s device part on ``images_u8`` (that view's crops) in a multi-view model."""
    bits = []
    model = loaded.model
    blocks, exit_link = ((model.device_layers, model.local_exit) if view is None
                         else (model.view_layers(view), model.view_exit(view)))
    with chainer.using_config("train", False), chainer.no_backprop_mode():
        h = input_to_float(images_u8, loaded.spec.input.scale)
        for block in blocks:
            h = block(h).array
            layer_bits = h > 0
            bits.append(layer_bits.transpose(0, 2, 3, 1) if h.ndim == 4 else layer_bits[:, None, None, :])
        logits = exit_link(h).array
    return bits, logits


def assert_reference_matches_chainer(loaded: LoadedModel, images_u8: np.ndarray,
                                     view: int | None = None) -> reference.DeviceResult:
    """The folded device part (of view ``view``, reading its crops ``images_u8``) bit-exact against Chainer."""
    program = fold(loaded, view=view)
    packed = reference.device_activations(program, images_u8)
    expected_bits, chainer_logits = chainer_device_bits(loaded, images_u8, view)
    for layer, ours, theirs in zip(program.layers, packed, expected_bits):
        got = unpack_bits(ours, layer.out_hwc[2])
        mismatches = int((got != theirs).sum())
        assert mismatches == 0, f"layer {layer.name}: {mismatches} activation bits differ from Chainer"
    result = reference.run_device(program, images_u8)
    assert np.array_equal(result.split_words, packed[-1])
    # float32 (Chainer) vs double (reference) logits: same class unless two logits tie within float32 noise.
    top2 = np.sort(chainer_logits, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4
    assert np.array_equal(result.local_class[clear], chainer_logits.argmax(axis=1)[clear])
    assert clear.mean() > 0.99
    np.testing.assert_allclose(result.logits, chainer_logits, rtol=1e-5, atol=1e-4)
    return result
