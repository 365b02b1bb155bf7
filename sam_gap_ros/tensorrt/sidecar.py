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
# Weights are hashed after rounding to bfloat16 so that the same checkpoint hashes the same
# whether it was loaded in float32 (export workstation) or bfloat16 (robot).
WEIGHTS_HASH_SCHEME = 'sha256-state-dict-bf16-v1'
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


def weights_hash(module: nn.Module) -> str:
    """Return a hash of a module's state dict (names, shapes, values rounded to bfloat16).

    Only the exported part is hashed (e.g. the vision encoder), so an engine stays valid when
    other parts of the model change, and is rejected when the part it replaces does.
    """
    digest = hashlib.sha256(WEIGHTS_HASH_SCHEME.encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach()
            if tensor.is_floating_point():
                # Round on the tensor's own device: halves the bytes copied off the GPU.
                tensor = tensor.to(torch.bfloat16).view(torch.int16)
            data = tensor.contiguous().cpu().numpy().tobytes()
            digest.update(f'{name}|{list(tensor.shape)}|{tensor.dtype}|'.encode())
            digest.update(data)
    return digest.hexdigest()


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
