"""Device/dtype resolution and local model-directory checks shared by all engines.

Models are only ever loaded from a local directory (``local_files_only``): robots have
no reliable network, and a silent hub download would hide a misconfigured path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import torch

from sam_gap_ros.engines.types import ModelLoadError

_DTYPES = {
    'float32': torch.float32, 'fp32': torch.float32,
    'float16': torch.float16, 'fp16': torch.float16, 'half': torch.float16,
    'bfloat16': torch.bfloat16, 'bf16': torch.bfloat16,
}


def resolve_device(device: Union[str, torch.device] = 'auto') -> torch.device:
    """Turn ``'auto' | 'cpu' | 'cuda' | 'cuda:N'`` into a torch device, checking it exists."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name in ('', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' requested but only "
                             f'{torch.cuda.device_count()} CUDA device(s) exist')
    elif resolved.type != 'cpu':
        raise ValueError(f"unsupported device '{device}': use auto, cpu, cuda or cuda:N")
    return resolved


def resolve_dtype(dtype: Union[str, torch.dtype], device: torch.device) -> torch.dtype:
    """Map a dtype name to torch; half precision on CPU falls back to float32.

    CPU kernels for fp16/bf16 are slow or missing, so a robot config written for a GPU
    still runs when pointed at the CPU.
    """
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).strip().lower()
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype '{dtype}': use one of {sorted(set(_DTYPES))}")
        resolved = _DTYPES[key]
    if device.type == 'cpu' and resolved != torch.float32:
        return torch.float32
    return resolved


def check_model_dir(model_dir: Union[str, Path], model_types: Iterable[str]) -> Path:
    """Validate a local transformers model directory before ``from_pretrained``.

    Raises ModelLoadError naming exactly what is wrong: missing directory, no config,
    a config of another model type, or no weights file.
    """
    path = Path(model_dir).expanduser()
    allowed = sorted(set(model_types))
    if not str(model_dir).strip():
        raise ModelLoadError('model_dir is empty: set it to a local transformers model directory')
    if not path.is_dir():
        raise ModelLoadError(f"model directory '{path}' does not exist or is not a directory")
    config_file = path / 'config.json'
    if not config_file.is_file():
        raise ModelLoadError(f"'{path}' has no config.json: not a transformers model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"'{config_file}' is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"'{config_file}' holds a JSON {type(config).__name__}, not an "
                             'object: not a transformers model config')
    model_type = config.get('model_type')
    if model_type is None:
        raise ModelLoadError(f"'{config_file}' has no model_type; expected one of {allowed}")
    if model_type not in allowed:
        raise ModelLoadError(f"'{path}' holds a '{model_type}' model; expected one of {allowed}")
    weights = list(path.glob('*.safetensors')) + list(path.glob('*.safetensors.index.json'))
    if not weights:
        raise ModelLoadError(
            f"'{path}' has no *.safetensors weights (only safetensors are loaded)")
    return path


# How many key names a weights error lists; a model of the wrong kind misses hundreds.
_KEYS_SHOWN = 5


def check_loading_info(path: Path, info: Mapping[str, Any], what: str) -> None:
    """Raise ModelLoadError if ``from_pretrained`` left parameters without weights.

    ``info`` is the ``output_loading_info`` dict. transformers only logs missing keys and
    initialises those tensors at random, so a partial or foreign checkpoint would run and
    produce garbage. No key may be missing: the non-persistent buffers (rotary
    frequencies, position ids) are not in the state dict, and the models tie no weights,
    so a complete checkpoint (the hub's conversion scripts load with ``strict=True``)
    misses none. Unexpected keys alone are tolerated (e.g. ``tracker_model.*`` of a
    ``sam3_video`` checkpoint) but are named to help when keys are missing too.
    """
    missing = sorted(info.get('missing_keys') or ())
    if not missing:
        return
    unexpected = sorted(info.get('unexpected_keys') or ())
    message = (f"'{path}' does not hold complete {what} weights: {len(missing)} tensor(s) "
               f'missing from its safetensors (e.g. {missing[:_KEYS_SHOWN]})')
    if unexpected:
        message += (f' and {len(unexpected)} unknown tensor(s) present (e.g. '
                    f'{unexpected[:_KEYS_SHOWN]}), as in a checkpoint of another model')
    raise ModelLoadError(message + '; re-download or re-export the checkpoint (a partial '
                         'copy would run with random weights)')
