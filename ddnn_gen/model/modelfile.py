"""Self-describing model files: ``model.npz`` = Chainer parameters + embedded spec JSON + content hash.

Layout of the npz:
  __format__   "ddnn-model"           __version__  1
  __spec__     the spec JSON (utf-8)  __hash__     sha256 hex of identity (see content_hash)
  param/<path> every Chainer parameter and persistent value (BN statistics)

The content hash covers the spec minus its operating threshold plus every parameter
array, so recalibrating the threshold keeps the model's identity on the wire.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import chainer
import numpy as np

from ddnn_gen.errors import ModelFileError, SpecError
from ddnn_gen.model.network import DDNN
from ddnn_gen.model.spec import ModelSpec, load_spec_file, parse_spec

MODEL_FORMAT = "ddnn-model"
MODEL_VERSION = 1
PARAM_PREFIX = "param/"
HASH_BYTES_ON_WIRE = 16


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: DDNN
    content_hash: str
    path: str

    @property
    def hash_bytes(self) -> bytes:
        """The model's identity as sent in wire headers."""
        return bytes.fromhex(self.content_hash)[:HASH_BYTES_ON_WIRE]


def model_params(model: DDNN) -> dict[str, np.ndarray]:
    serializer = chainer.serializers.DictionarySerializer()
    serializer.save(model)
    return {key.lstrip("/"): np.asarray(value) for key, value in serializer.target.items()}


def content_hash(spec: ModelSpec, params: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(spec.identity_json().encode())
    for key in sorted(params):
        value = np.ascontiguousarray(params[key])
        digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_model(path: str | Path, model: DDNN, spec: ModelSpec | None = None) -> str:
    """Write the self-describing model file; returns its content hash."""
    spec = spec or model.spec
    params = model_params(model)
    digest = content_hash(spec, params)
    arrays = {PARAM_PREFIX + key: value for key, value in params.items()}
    arrays["__format__"] = np.array(MODEL_FORMAT)
    arrays["__version__"] = np.array(MODEL_VERSION)
    arrays["__spec__"] = np.array(json.dumps(spec.to_dict(), indent=1, sort_keys=True))
    arrays["__hash__"] = np.array(digest)
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"{path}: cannot write the model file ({exc.strerror})") from exc
    return digest


def _read_npz(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: no such model file") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelFileError(f"{path}: not a readable .npz model file ({exc})") from exc


def load_model(path: str | Path, arch: str | None = None) -> LoadedModel:
    """Load a model file. ``arch`` (a spec JSON path) supplies the spec of a bare Chainer npz."""
    arrays = _read_npz(path)
    if arch is not None:
        spec = load_spec_file(arch)
    elif "__spec__" in arrays:
        if str(arrays.get("__format__", "")) != MODEL_FORMAT:
            raise ModelFileError(f"{path}: unknown model format {arrays.get('__format__')!r}")
        version = int(arrays["__version__"]) if "__version__" in arrays else -1
        if version != MODEL_VERSION:
            raise ModelFileError(f"{path}: model file version {version} is not supported "
                                 f"(this ddnngen reads version {MODEL_VERSION})")
        try:
            spec = parse_spec(json.loads(str(arrays["__spec__"])))
        except (json.JSONDecodeError, SpecError) as exc:
            raise ModelFileError(f"{path}: embedded spec is invalid ({exc})") from exc
    else:
        raise ModelFileError(f"{path}: this npz has no embedded model spec; pass --arch spec.json to supply one")
    params = {key[len(PARAM_PREFIX):]: value for key, value in arrays.items() if key.startswith(PARAM_PREFIX)}
    if not params:
        # A plain Chainer snapshot stores parameters without our prefix.
        params = {key: value for key, value in arrays.items() if not key.startswith("__")}
    model = DDNN(spec)
    expected = model_params(model)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ModelFileError(f"{path}: parameters do not match the spec; missing {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
    unexpected = sorted(set(params) - set(expected))
    if unexpected:
        # Say so rather than ignore them: a spec with fewer views than the file's would drop devices silently.
        raise ModelFileError(f"{path}: parameters do not match the spec; the file also has {', '.join(unexpected[:5])}"
                             + (" ..." if len(unexpected) > 5 else ""))
    for key, value in expected.items():
        if params[key].shape != value.shape:
            raise ModelFileError(f"{path}: parameter {key} has shape {params[key].shape}, "
                                 f"the spec needs {value.shape}")
    chainer.serializers.NpzDeserializer(params, path="", strict=True).load(model)
    digest = content_hash(spec, model_params(model))
    stored = str(arrays["__hash__"]) if "__hash__" in arrays else None
    if arch is None and stored != digest:
        raise ModelFileError(f"{path}: content hash mismatch (file says {stored}, contents give {digest}); "
                             "the file is corrupt or was edited")
    return LoadedModel(spec, model, digest, str(path))


def spec_bytes(spec: ModelSpec) -> bytes:
    buffer = io.StringIO()
    json.dump(spec.to_dict(), buffer, sort_keys=True)
    return buffer.getvalue().encode()
