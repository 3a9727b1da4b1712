"""Request bytes of every bit-packed split a model's tiers send, taken from the wire encoder itself.

Issue 18's bound: a request costs at most its bits plus the 64-byte header, ceil(bits / 8) + 64. Each row
encodes a real split (the device part run by the bitwise reference on a blank input, and each binary edge tier
on that split) as the devices and edges send it (packing 4, dense) and, beside it, as the device holds it
(packing 1, 64-bit channel words): the before/after of docs/performance.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ddnn_gen.device.simulated import split_header
from ddnn_gen.fold import exits, reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.model.modelfile import LoadedModel
from ddnn_gen.wire import codec


@dataclasses.dataclass(frozen=True)
class SplitRequest:
    sender: str  # "device", "device (view i of K)" or "edge (tier t)"
    program: DeviceProgram  # the tier that computed the split
    header: codec.RequestHeader  # as the sender fills it in (packing 4)
    split: np.ndarray  # uint64 (H, W, words): the split as the tier holds it


def split_requests(loaded: LoadedModel) -> list[SplitRequest]:
    """One per sender of bit-packed splits: the device (each view's of a multi-view model), then each binary
    edge tier of a single-view model (server/edge.py forwards its split upstream the same way)."""
    spec = loaded.spec
    if spec.views is not None:
        count = spec.views.count
        out = []
        for view in range(count):
            program = fold(loaded, view=view)
            out.append(SplitRequest(f"device (view {view} of {count})", program,
                                    split_header(program, loaded.hash_bytes, 1, 1, view, count),
                                    _blank_split(program)[0]))
        return out
    program = fold(loaded)
    split = _blank_split(program)
    out = [SplitRequest("device", program, split_header(program, loaded.hash_bytes, 1), split[0])]
    for tier in range(1, len(spec.tiers) - 1):
        if not spec.tiers[tier].binary:
            break  # a float tier forwards FLOAT32 values, not bits: no bound of this kind from here on
        program, result = exits.binary_tier(loaded, tier, split)
        split = result.split_words
        out.append(SplitRequest(f"edge (tier {tier})", program, split_header(program, loaded.hash_bytes, 1),
                                split[0]))
    return out


def request_sizes(loaded: LoadedModel) -> list[dict[str, Any]]:
    """split_requests' rows as numbers: bytes sent (dense), the bound, and the packing-1 bytes beside them."""
    rows = []
    for request in split_requests(loaded):
        dense = codec.encode_request(request.header, request.split)
        words = codec.encode_request(dataclasses.replace(request.header, packing=codec.Packing.BITS_U64),
                                     request.split)
        bits = int(np.prod(request.program.split_hwc))
        rows.append({"model": loaded.spec.name, "sender": request.sender, "split_hwc": list(request.program.split_hwc),
                     "split_bits": bits, "request_bytes": len(dense), "words_request_bytes": len(words),
                     "bound_bytes": (bits + 7) // 8 + codec.REQUEST_HEADER_BYTES})
    return rows


def _blank_split(program: DeviceProgram) -> np.ndarray:
    """The device part's split of one all-zero input image: (1, H, W, words)."""
    height, width, channels = program.input_hwc
    return reference.run_device(program, np.zeros((1, channels, height, width), dtype=np.uint8)).split_words
