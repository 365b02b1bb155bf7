"""JSON sidecars that tie an exported ONNX file / TensorRT engine to the weights it was made from.

A sidecar lives next to its artifact as ``<artifact>.json`` (``vision.onnx.json``,
``vision.engine.json``). It records what the runtime must check before trusting the artifact:
model family and part, input size, dtype, opset, a hash of the exported weights and of the
artifact file itself, and for engines the TensorRT version, GPU and precision.
"""

from __future__ import annotations

from datetime import datetime, timezone
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

SIDECAR_FORMAT = 'sam_gap_ros.export_sidecar'
SIDECAR_VERSION = 1
# One hash per dtype the robot may load the checkpoint in, each over the exported weights cast
# to that dtype. Rounding everything to one common precision cannot work: float16 and
# bfloat16 round differently, and fp32 -> fp16 -> bf16 double rounding changes ~6% of the
# weights, so no single rounded hash recognises all three loads. Casting the export's float32
# weights reproduces exactly what transformers does when it loads the checkpoint in that dtype,
# so the same checkpoint matches bit for bit and any other checkpoint does not.
WEIGHTS_HASH_SCHEME = 'sha256-state-dict-per-dtype-v2'
# v1 sidecars (one hash of bfloat16-rounded weights) stay accepted where v1 was right.
LEGACY_WEIGHTS_HASH_SCHEME = 'sha256-state-dict-bf16-v1'
HASH_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20


class SidecarError(RuntimeError):
    """A sidecar file is missing, unreadable or not a sam_gap_ros sidecar."""


def sidecar_path(artifact: Union[str, Path]) -> Path:
    """Return the sidecar path of an ONNX file or engine (``<artifact>.json``)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + '.json')


def file_sha256(path: Union[str, Path]) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def weights_hash(module: nn.Module, dtype: torch.dtype = torch.float32,
                 scheme: str = WEIGHTS_HASH_SCHEME) -> str:
    """Return a hash of a module's state dict (names, shapes, values cast to ``dtype``).

    Only the exported part is hashed (e.g. the vision encoder), so an engine stays valid when
    other parts of the model change, and is rejected when the part it replaces does.
    """
    digest = hashlib.sha256(scheme.encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach()
            if tensor.is_floating_point():
                # Cast on the tensor's own device (fewer bytes copied off the GPU); numpy has
                # no bfloat16, so the raw bits are read as integers of the same width.
                tensor = tensor.to(dtype)
                tensor = tensor.view(_INT_VIEW[tensor.element_size()])
            data = tensor.contiguous().cpu().numpy().tobytes()
            digest.update(f'{name}|{list(tensor.shape)}|{tensor.dtype}|'.encode())
            digest.update(data)
    return digest.hexdigest()


def weights_hashes(module: nn.Module) -> Dict[str, str]:
    """Return the sidecar's ``weights_sha256``: one hash per load dtype of ``HASH_DTYPES``."""
    return {name: weights_hash(module, dtype) for name, dtype in HASH_DTYPES.items()}


def load_dtype(module: nn.Module) -> torch.dtype:
    """Return the dtype a module was loaded in: its narrowest floating-point dtype."""
    # Narrowest, not first: transformers may keep some modules in float32 in a float16 model,
    # and casting those to float16 for the hash is what the export side does too.
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=torch.float32)


def weights_problem(sidecar: Dict[str, Any], module: nn.Module) -> Optional[str]:
    """Return why the sidecar's weights hash does not fit ``module``; None when it matches."""
    dtype = load_dtype(module)
    dtype_name = str(dtype).split('.')[-1]
    scheme = sidecar.get('weights_hash_scheme')
    want = sidecar.get('weights_sha256')
    if scheme == LEGACY_WEIGHTS_HASH_SCHEME:
        # v1 hashed bfloat16-rounded weights: exact for float32 and bfloat16 loads, so engines
        # built before v2 keep working there. A float16 load cannot be matched (double rounding).
        if dtype == torch.float16:
            return ('weights_sha256: the sidecar has the old bfloat16-rounded weights hash '
                    f'({scheme}), which cannot recognise a float16 model: re-export the ONNX '
                    '(and rebuild the engine) with this version, or load the model in float32 '
                    'or bfloat16')
        if weights_hash(module, torch.bfloat16, scheme) != want:
            return _weights_mismatch('bfloat16-rounded')
        return None
    if scheme != WEIGHTS_HASH_SCHEME or not isinstance(want, dict):
        return (f'weights_hash_scheme: artifact has {scheme!r}, this version reads '
                f'{WEIGHTS_HASH_SCHEME!r}: re-export the ONNX (and rebuild the engine)')
    if dtype_name not in want:
        return (f'weights_sha256: no hash for a {dtype_name} model (artifact has '
                f'{sorted(want)}): load the model in one of those dtypes')
    if weights_hash(module, dtype) != want[dtype_name]:
        return _weights_mismatch(dtype_name)
    return None


def _weights_mismatch(dtype_name: str) -> str:
    return (f'weights_sha256 ({dtype_name}): the loaded vision encoder has other weights than '
            'the exported one (another checkpoint or fine-tune): re-export from this checkpoint')


def utc_now() -> str:
    """Return the current UTC time as an ISO-8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


def write_sidecar(artifact: Union[str, Path], data: Dict[str, Any]) -> Path:
    """Write ``data`` as the sidecar of ``artifact`` and return the sidecar path."""
    payload = {'format': SIDECAR_FORMAT, 'format_version': SIDECAR_VERSION, **data}
    path = sidecar_path(artifact)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + '\n')
    return path


def read_sidecar(artifact: Union[str, Path]) -> Dict[str, Any]:
    """Read and sanity-check the sidecar of ``artifact``; raise SidecarError when unusable."""
    path = sidecar_path(artifact)
    if not path.is_file():
        raise SidecarError(f"no sidecar '{path}' next to '{artifact}': re-export or rebuild it "
                           'with sam-gap-export-onnx / sam-gap-build-engine')
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SidecarError(f"sidecar '{path}' is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get('format') != SIDECAR_FORMAT:
        raise SidecarError(f"'{path}' is not a sam_gap_ros sidecar (format != {SIDECAR_FORMAT})")
    if data.get('format_version') != SIDECAR_VERSION:
        raise SidecarError(f"sidecar '{path}' has format_version {data.get('format_version')}, "
                           f'this code reads version {SIDECAR_VERSION}')
    return data


def check_sidecar(sidecar: Dict[str, Any], expected: Dict[str, Any]) -> List[str]:
    """Return one human-readable line per field of ``expected`` that the sidecar contradicts.

    Values are compared after JSON normalisation (tuples become lists). An empty list means
    the sidecar matches.
    """
    problems = []
    for key, want in expected.items():
        have = sidecar.get(key)
        if _normalise(have) != _normalise(want):
            problems.append(f'{key}: artifact has {have!r}, loaded model/runtime needs {want!r}')
    return problems


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))


def model_id(model: nn.Module, fallback: Optional[str] = None) -> str:
    """Return a readable id of a transformers model (its source path or hub name)."""
    name = getattr(getattr(model, 'config', None), '_name_or_path', '') or ''
    return str(name or fallback or type(model).__name__)
