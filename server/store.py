"""Models the server can resume, keyed by the 16 wire bytes of their content hash."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chainer
import numpy as np

from ddnn_gen.errors import DdnnError, ModelFileError
from ddnn_gen.fold import reference
from ddnn_gen.fold.program import DeviceProgram, fold
from ddnn_gen.fold.reference import split_to_server_input
from ddnn_gen.fold.views import ViewAggregator
from ddnn_gen.model.fast_forward import FastForward
from ddnn_gen.model.modelfile import HASH_BYTES_ON_WIRE, LoadedModel, load_model
from ddnn_gen.model.placement import plan_content_hash, read_plan
from ddnn_gen.wire.codec import Packing, ProtocolError, RequestHeader, Status
from ddnn_gen.wire.topics import model_key

log = logging.getLogger(__name__)


ROLES = ("cloud", "edge", "aggregator")
FORWARDS = ("numpy", "chainer")  # how the float server tiers run on the CPU (Chainer: the reference)


@dataclass
class ServedModel:
    """One loaded model, the tier of it this server starts at, and what requests are checked against.

    A cloud server runs every tier from ``entry_tier`` to the end (the final exit answers). An edge server
    runs its binary tier ``entry_tier`` with the bitwise reference and answers at that tier's early exit when
    it is confident; otherwise the tier's split goes on to the tiers above.
    """

    loaded: LoadedModel
    entry_tier: int
    program: DeviceProgram | None  # the binary tier whose split arrives here (entry_tier - 1); None: float
    edge_program: DeviceProgram | None = None  # an edge's own binary tier (entry_tier)
    xp: Any = np  # numpy, or cupy with --gpu
    views: ViewAggregator | None = None  # an aggregator's: the local aggregator and tier 1 of a multi-view model
    fast: FastForward | None = None  # the NumPy forward of the float tiers (--forward numpy); None: Chainer's

    @property
    def hash_bytes(self) -> bytes:
        return self.loaded.hash_bytes

    @property
    def name(self) -> str:
        return self.loaded.spec.name

    @property
    def role(self) -> str:
        return "aggregator" if self.views is not None else "edge" if self.edge_program is not None else "cloud"

    @property
    def topic_tier(self) -> int:
        """The request topic's tier this server subscribes to (raw input to a cloud-only model: tier 1)."""
        return max(1, self.entry_tier)

    @property
    def split_layer(self) -> int:
        """Index of the first layer this server runs == the split layer requests must name."""
        return self.loaded.spec.split_layer(self.entry_tier)

    @property
    def split_chw(self) -> tuple[int, int, int]:
        shape = self.loaded.spec.tier_output_shape(self.entry_tier - 1) if self.entry_tier else self.input_chw
        return (shape[0], 1, 1) if len(shape) == 1 else (shape[0], shape[1], shape[2])

    @property
    def answering_tier(self) -> int:
        """The tier whose exit answers what this server answers itself (an edge: its own; a cloud: the last)."""
        return self.entry_tier if self.edge_program is not None else len(self.loaded.spec.tiers) - 1

    @property
    def input_chw(self) -> tuple[int, int, int]:
        spec_input = self.loaded.spec.input
        return spec_input.channels, spec_input.height, spec_input.width

    def check(self, header: RequestHeader) -> None:
        """Raise ProtocolError unless the request's split (or raw input) matches this model."""
        if header.packing == Packing.RAW_U8:
            if self.loaded.spec.views is not None:
                raise ProtocolError(Status.SHAPE_MISMATCH, f"model {self.name} is multi-view: no server takes a raw "
                                    "image of it (its cameras each see a view)", header.request_id)
            # decode_request_header already insisted on split layer 0.
            if (header.channels, header.height, header.width) != self.input_chw:
                channels, height, width = self.input_chw
                raise ProtocolError(Status.SHAPE_MISMATCH, f"raw input C/H/W {header.channels}/{header.height}/"
                                    f"{header.width}, model {self.name} takes {channels}/{height}/{width}",
                                    header.request_id)
            return
        if header.packing.scores_first:
            self._check_scores_first(header)
            return
        if self.views is not None and not header.packing.bits:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"model {self.name} is multi-view: its aggregator takes each "
                                "view's bit-packed split (or its exit sums, scores first)", header.request_id)
        if self.entry_tier == 0:
            kind = "Big-Little" if self.loaded.spec.big_little else "cloud-only"
            raise ProtocolError(Status.SHAPE_MISMATCH, f"model {self.name} is {kind}: it takes raw input only",
                                header.request_id)
        channels, height, width = self.split_chw
        if header.split_layer != self.split_layer:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"split layer {header.split_layer}, model {self.name} "
                                f"resumes here at {self.split_layer}", header.request_id)
        if (header.channels, header.height, header.width) != (channels, height, width):
            raise ProtocolError(Status.SHAPE_MISMATCH, f"split C/H/W {header.channels}/{header.height}/"
                                f"{header.width}, model {self.name} sends {channels}/{height}/{width}",
                                header.request_id)
        # Float32 values are taken everywhere (tooling, and float tiers' outputs); bits only where the tier
        # before is binary.
        if header.packing.bits and self.program is None:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"bit-packed payload, but model {self.name}'s tier "
                                f"{self.entry_tier - 1} is float: send FLOAT32", header.request_id)

    def _check_scores_first(self, header: RequestHeader) -> None:
        """Exit sums (and NO_FEATURES answers) go to a multi-view model's aggregator, at its split layer; the
        sums' values are checked against the view's exit when they are admitted (aggregator.check_sums)."""
        if self.views is None:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"model {self.name} is not multi-view: packing "
                                f"{header.packing.name} is for an aggregator", header.request_id)
        if header.split_layer != self.split_layer:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"split layer {header.split_layer}, model {self.name} "
                                f"resumes here at {self.split_layer}", header.request_id)
        classes = self.loaded.spec.n_classes
        if header.packing == Packing.EXIT_SUMS and header.channels != classes:
            raise ProtocolError(Status.SHAPE_MISMATCH, f"{header.channels} exit sums, model {self.name} has "
                                f"{classes} classes", header.request_id)

    def server_input(self, payloads: list[np.ndarray], packing: Packing) -> np.ndarray:
        """Stack one batch of payloads into the entry tier's float32 input (+-1 for a binary split); both bit
        packings arrive as uint64 words."""
        if packing.bits:
            assert self.program is not None  # check() refused bits where the tier before is float
            return split_to_server_input(self.program, np.stack(payloads))
        values = np.stack(payloads).astype(np.float32)  # (N, H, W, C)
        if len(self.loaded.spec.tier_output_shape(self.entry_tier - 1)) == 1:
            return values.reshape(len(values), -1)
        return np.ascontiguousarray(values.transpose(0, 3, 1, 2))

    def logits(self, payloads: list[np.ndarray], packing: Packing) -> np.ndarray:
        """Final-exit logits of one batch of decoded payloads of one packing."""
        if packing == Packing.RAW_U8:
            return self.forward_raw(np.stack(payloads))
        return self.forward(self.server_input(payloads, packing))

    def edge_forward(self, payloads: list[np.ndarray]) -> reference.DeviceResult:
        """An edge's tier on one batch of bit-packed splits: the bitwise reference, exactly what `ddnngen eval`
        computes for this exit (its decision uses the live threshold, applied by the caller)."""
        assert self.edge_program is not None
        return reference.run_device(self.edge_program, np.stack(payloads), threshold=1.0)

    def warm_up(self) -> None:
        """Run every path this server takes once on a blank input, so that the first device's request does not
        pay for first calls (Chainer's function set-up, NumPy's and BLAS's buffers: tens of ms)."""
        channels, height, width = self.input_chw
        image = np.zeros((1, height, width, channels), dtype=np.uint8)  # (N, H, W, C) as the wire carries it
        if self.views is not None:
            runs = self.views.run_devices(image.transpose(0, 3, 1, 2))
            mask = np.ones((1, self.views.count), dtype=bool)
            self.views.local_exit_batch(runs.logits, mask)
            self.views.next_tier_batch(runs.splits, mask)
            return
        if self.loaded.spec.views is None:  # a multi-view model's cloud takes no raw image
            self.forward_raw(image)
        if self.entry_tier == 0:
            return
        if self.program is not None and self.program.tier == 0:
            words = reference.run_device(self.program, image.transpose(0, 3, 1, 2)).split_words
            if self.edge_program is not None:
                self.edge_forward([words[0]])
                return
            self.forward(self.server_input([words[0]], Packing.BITS_U64))
            return
        c, h, w = self.split_chw
        self.forward(self.server_input([np.zeros((h, w, c), dtype=np.float32)], Packing.FLOAT32))

    def forward_raw(self, images_hwc: np.ndarray) -> np.ndarray:
        """Server-only: the whole Chainer model (device tier in test mode, then the rest) on uint8
        (N, H, W, C) images; the float device tier, not the bitwise one, as a server without the C device
        program would run it."""
        images = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2))
        if self.fast is not None:
            return np.asarray(self.fast.images(images), dtype=np.float64)
        with _inference_config():
            logits = self.loaded.model.forward_images(self.xp.asarray(images)).exit_logits[-1].array
        return np.asarray(chainer.backend.CpuDevice().send(logits), dtype=np.float64)

    def forward(self, server_input: np.ndarray) -> np.ndarray:
        """Final-exit logits (N, K) as float64 on the host, in Chainer test mode (or the NumPy forward, bit for
        bit the same), resumed at the entry tier."""
        if self.fast is not None:
            return np.asarray(self.fast.resume(server_input, self.entry_tier), dtype=np.float64)
        with _inference_config():
            logits = self.loaded.model.resume_forward(self.xp.asarray(server_input), self.entry_tier).array
        return np.asarray(chainer.backend.CpuDevice().send(logits), dtype=np.float64)


def serve(loaded: LoadedModel, role: str = "cloud", from_tier: int | None = None,
          edge_threshold: float | None = None) -> ServedModel:
    """What a server of ``role`` runs of ``loaded``. A cloud starts, by default, where requests come from:
    after the device for a two-tier model, after the last edge for a deeper one (``from_tier`` overrides:
    1 when no edge is deployed). An edge runs the first edge tier, which must be binary, and answers at its
    exit below ``edge_threshold`` (default: the model's; retained tier thresholds override it live)."""
    spec = loaded.spec
    last = len(spec.tiers) - 1
    if role not in ROLES:
        raise ModelFileError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if role == "aggregator" and spec.views is None:
        raise ModelFileError(f"{spec.name}: an aggregator serves multi-view models (a spec with 'views')")
    if spec.views is not None and role != "aggregator" and not (role == "cloud" and last == 2):
        raise ModelFileError(f"{spec.name}: a multi-view model is served by --role aggregator (and, with three "
                             "tiers, its last tier by a cloud behind the aggregator)")
    if role == "aggregator":
        if last > 2 or (last == 2 and not spec.tiers[1].binary):
            # Tier 1's output goes on as packed bits on the edge's way up; float activations and a second
            # edge behind the aggregator have no server role yet.
            raise ModelFileError(f"{spec.name}: the aggregator runs the local aggregator and tier 1 of a two-tier "
                                 "multi-view model, or of a three-tier one whose tier 1 is binary (an edge exit, "
                                 f"the cloud behind it); this one's tiers are {', '.join(t.kind for t in spec.tiers)}")
        aggregator = ViewAggregator(loaded)
        return ServedModel(loaded, 1, aggregator.programs[0], views=aggregator)
    if role == "edge":
        if last < 2 or not spec.tiers[1].binary:
            raise ModelFileError(f"{spec.name}: an edge runs a binary edge tier with an early exit; this model's "
                                 f"tiers are {', '.join(t.kind for t in spec.tiers)}")
        return ServedModel(loaded, 1, fold(loaded), fold(loaded, edge_threshold, tier=1))
    if last == 0 or spec.big_little:
        # A cloud-only model, or a Big-Little one (its big net reads the raw input): raw requests only.
        return ServedModel(loaded, 0, None)
    entry = from_tier if from_tier is not None else (1 if last == 1 else last)
    if not 1 <= entry <= last:
        raise ModelFileError(f"{spec.name}: --from-tier {entry} is not one of its server tiers 1..{last}")
    previous = spec.tiers[entry - 1]
    return ServedModel(loaded, entry, fold(loaded, tier=entry - 1) if previous.binary else None)


def use_fast_forward(served: ServedModel) -> ServedModel:
    """Run ``served``'s float tiers with the NumPy forward (bit-identical to Chainer's test mode on the CPU,
    tests/test_fast_forward.py) instead of Chainer's per-call machinery."""
    served.fast = FastForward(served.loaded.model)
    if served.views is not None:
        served.views.fast = served.fast
    return served


@contextlib.contextmanager
def _inference_config() -> Iterator[None]:
    """Test mode, no graph, and no per-call argument type checks: the shapes were checked once per request
    (ServedModel.check) and the model's own forward fixes the rest; the checks cost ~10 % of a batch-1
    forward."""
    with chainer.using_config("train", False), chainer.using_config("type_check", False), \
            chainer.no_backprop_mode():
        yield


class ModelStore:
    """Loads every model file in a directory once; thread-safe lookups by wire hash."""

    def __init__(self, gpu: int | None = None, forward: str = "numpy", role: str = "cloud",
                 from_tier: int | None = None, plan: str | Path | None = None, location: str = "cloud") -> None:
        self._models: dict[bytes, ServedModel] = {}
        self._lock = threading.Lock()
        self._gpu = gpu
        if forward not in FORWARDS:
            raise DdnnError(f"unknown forward {forward!r}; one of {', '.join(FORWARDS)}")
        self._forward = forward
        self._role = role
        self._from_tier = from_tier
        # A plan file (ddnngen plan) places its model's tiers: this server runs what it puts at ``location``.
        self._plan = plan
        self._plan_hash = plan_content_hash(plan) if plan is not None else None
        self._location = location

    def add_file(self, path: str | Path) -> ServedModel:
        loaded = load_model(path)
        if self._plan is not None and loaded.content_hash == self._plan_hash:
            placed = read_plan(self._plan, loaded.spec, loaded.content_hash).placement.server(self._location)
            served = serve(loaded, placed.role, placed.from_tier, placed.edge_threshold)
            log.info("%s: as planned in %s for the %s: %s from tier %d", loaded.spec.name, self._plan,
                     self._location, placed.role, placed.from_tier)
        else:
            served = serve(loaded, self._role, self._from_tier)
        if self._gpu is not None:
            served = _to_gpu(served, self._gpu)
        elif self._forward == "numpy":
            use_fast_forward(served)
        served.warm_up()
        with self._lock:
            existing = self._models.get(loaded.hash_bytes)
            if existing is not None:
                log.info("%s has the same content hash as %s; serving it once", path, existing.loaded.path)
                return existing
            self._models[loaded.hash_bytes] = served
        log.info("serving %s (%s) hash %s as %s from tier %d, split C/H/W %s", served.name, path,
                 model_key(served.hash_bytes), served.role, served.entry_tier, "/".join(map(str, served.split_chw)))
        return served

    def load_dir(self, directory: str | Path) -> list[ServedModel]:
        folder = Path(directory)
        if folder.is_file():
            served = [self.add_file(folder)]
            self.check_plan_found()
            return served
        if not folder.is_dir():
            raise ModelFileError(f"{folder}: no such model directory")
        served = []
        for path in sorted(folder.glob("*.npz")):
            try:
                served.append(self.add_file(path))
            except DdnnError as error:
                # One bad file must not keep the others from being served.
                log.error("skipping %s: %s", path, error)
        if not served:
            raise ModelFileError(f"{folder}: no loadable model files (*.npz)")
        self.check_plan_found()
        return served

    def check_plan_found(self) -> None:
        if self._plan_hash is not None and self.get(bytes.fromhex(self._plan_hash)[:HASH_BYTES_ON_WIRE]) is None:
            raise ModelFileError(f"{self._plan}: its model ({self._plan_hash[:12]}) is not among the served ones")

    def get(self, model_hash: bytes) -> ServedModel | None:
        with self._lock:
            return self._models.get(bytes(model_hash))

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())


def _to_gpu(served: ServedModel, device_id: int) -> ServedModel:
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise DdnnError("--gpu needs CuPy (pip install cupy-cuda12x); it is not installed") from exc
    device = chainer.get_device(f"@cupy:{device_id}")
    served.loaded.model.to_device(device)
    device.use()
    served.xp = device.xp
    return served
