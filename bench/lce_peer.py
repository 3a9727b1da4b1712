"""Larq Compute Engine as the peer of bench_c.py: the same shapes converted with LCE and timed by its
interpreter, one thread, in rounds that bench_c.py interleaves with its own.

Runs in its own virtual environment (TensorFlow and LCE are no dependency of ddnngen, nor of its tests):

    python3 -m venv ~/.cache/ddnngen/lce-venv
    ~/.cache/ddnngen/lce-venv/bin/pip install -r bench/requirements-lce.txt

bench_c.py starts ``lce-venv/bin/python bench/lce_peer.py CASES.json`` (``$DDNN_LCE_PYTHON`` names another
interpreter) and reads one JSON object per line on stdout: first ``{"ready": ...}`` with the converted
models' operators, then one ``{"round": i, "us": {case: least us of a call}, "mean_us": {...}}`` per
``round i`` line it writes on stdin; ``quit`` ends it. Nothing here is imported by ddnngen.

CASES.json: ``{"cases": [case, ...], "calls": {name: n}}``, a case being ``{"name", "input": [h, w, c],
"layers": [...], "n_classes"}``, its layers ddnngen's device layers (``type`` fconv / bconv / blinear,
``out_channels``, ``ksize``, ``stride``, ``pad``, ``pool``: ``[k, s, p]`` or null); ``n_classes`` adds the
binary local exit (its logits are the output; the entropy is left to the caller, as cheap in any
framework). ``"images"`` (a .npy of uint8 NCHW) and ``"scale"`` give real inputs, as ddnngen scales them. A
case with no layers and no exit is one float Dense on the flattened input: the cost of a call itself.
bench_c times one BConv layer as the difference of a 3- and a 2-layer BConv stack, whose middle layer
takes and gives packed bits as ddnngen's does.

Mapping (larq layers, as LCE's converter expects them): FConv = ``QuantConv2D`` with a sign kernel and
float input (LCE runs it as a float convolution); BConv = ``QuantConv2D`` with sign input and kernel,
``pad_values=1`` (LCE's fast configuration: with ddnngen's zero padding, where a padded tap contributes 0,
LCE writes float output and quantizes it again before the next layer, slower here; the work is the same,
only border sums differ); BN follows the max-pool as in ddnngen; BLinear and the exit = ``QuantDense``
with sign input and kernel. Weights are random: LCE's time does not depend on their values. The
interpreter runs with LCE's indirect BGEMM kernels and XNNPACK, its fastest options on x86 (measured
here: the default im2col BGEMM is 4-6x slower on the BConv layer).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq builds on tf.keras (Keras 2)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq as lq  # noqa: E402
import larq_compute_engine as lce  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BINARY = {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign", "kernel_constraint": "weight_clip",
          "use_bias": False}
INTERPRETER_OPTIONS = {"num_threads": 1, "use_indirect_bgemm": True, "use_xnnpack": True}


def padding(layer: dict[str, Any]) -> str:
    if layer["pad"] == 0:
        return "valid"
    if layer["stride"] == 1 and layer["pad"] == layer["ksize"] // 2:
        return "same"
    raise ValueError(f"layer {layer['name']}: pad {layer['pad']} has no Keras padding")


def pool_padding(pool: list[int]) -> str:
    if pool[2] == 0:
        return "valid"
    raise ValueError(f"pool {pool}: padding other than 0 has no Keras equivalent")


def build(case: dict[str, Any]) -> tf.keras.Model:
    rng = np.random.default_rng(0)
    x = inputs = tf.keras.Input(tuple(case["input"]), batch_size=1)
    for layer in case["layers"]:
        kind = layer["type"]
        if kind == "blinear":
            x = tf.keras.layers.Flatten()(x)
            x = lq.layers.QuantDense(layer["out_channels"], **BINARY)(x)
        elif kind == "fconv":
            x = lq.layers.QuantConv2D(layer["out_channels"], layer["ksize"], strides=layer["stride"],
                                      padding=padding(layer), kernel_quantizer="ste_sign",
                                      kernel_constraint="weight_clip", use_bias=False)(x)
        elif kind == "bconv":
            x = lq.layers.QuantConv2D(layer["out_channels"], layer["ksize"], strides=layer["stride"],
                                      padding=padding(layer), pad_values=1.0, **BINARY)(x)
        else:
            raise ValueError(f"layer type {kind}")
        if layer.get("pool"):
            k, s, _ = layer["pool"]
            x = tf.keras.layers.MaxPool2D(k, s, padding=pool_padding(layer["pool"]))(x)
        x = tf.keras.layers.BatchNormalization()(x)
    if not case["layers"] and not case.get("n_classes"):
        x = tf.keras.layers.Dense(10)(tf.keras.layers.Flatten()(x))
    if case.get("n_classes"):
        x = tf.keras.layers.Flatten()(x)
        x = lq.layers.QuantDense(case["n_classes"], **BINARY)(x)
        x = tf.keras.layers.BatchNormalization()(x)  # logits = scale * S + offset
    model = tf.keras.Model(inputs, x)
    for weight in model.weights:  # random weights and BN statistics (not the identity: nothing folds away)
        if "moving_variance" in weight.name:
            weight.assign(rng.uniform(0.5, 2.0, weight.shape).astype(np.float32))
        else:
            weight.assign(rng.normal(0.0, 1.0, weight.shape).astype(np.float32))
    return model


def operators(flatbuffer: bytes) -> list[str]:
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    return [op["op_name"] for op in interpreter._get_ops_details()]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    models, ops = {}, {}
    for case in spec["cases"]:
        flatbuffer = lce.convert_keras_model(build(case))
        ops[case["name"]] = operators(flatbuffer)
        interpreter = lce.testing.Interpreter(flatbuffer, **INTERPRETER_OPTIONS)
        data = np.random.default_rng(1).normal(0.0, 1.0, (1, *case["input"])).astype(np.float32)
        if "images" in case:  # real inputs, scaled as ddnngen's input (uint8 * scale), HWC
            data = (np.load(case["images"])[:1].astype(np.float32) * case["scale"]).transpose(0, 2, 3, 1)
        for _ in range(5):  # warm-up
            interpreter.predict(data)
        models[case["name"]] = (interpreter, data)
    print(json.dumps({"ready": True, "lce": lce.__version__, "tensorflow": tf.__version__, "ops": ops,
                      "options": INTERPRETER_OPTIONS}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        least, mean = {}, {}
        for name, (interpreter, data) in models.items():
            took = []
            for _ in range(spec["calls"][name]):
                start = time.perf_counter()
                interpreter.predict(data)
                took.append(time.perf_counter() - start)
            least[name], mean[name] = min(took) * 1e6, sum(took) / len(took) * 1e6
        print(json.dumps({"round": int(command[1]), "us": least, "mean_us": mean}), flush=True)


if __name__ == "__main__":
    main()
