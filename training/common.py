"""Infrastructure shared by the SAM2 and SAM3 fine-tuning scripts.

Config loading with ``--set key=value`` overrides, seeding, selective freezing by parameter
name (with named presets), AdamW with per-group learning rates, warm-up + cosine/constant
schedules, AMP, gradient accumulation and clipping, safetensors checkpoints with exact
resume, and logging (tqdm, TensorBoard, predicted-vs-true mask PNGs).

Checkpoint layout (one directory each for ``last/`` and ``best/``)::

    model.safetensors, config.json   model.save_pretrained (loads with the engines)
    training_state.pt                optimizer / scheduler / scaler / torch RNG tensors,
                                     read back with torch.load(weights_only=True)
    trainer_state.json               step, metrics, python + numpy RNG, caller extras
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import fnmatch
import json
import math
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from safetensors.torch import load_file, save_file
import torch
import yaml

from sam_gap_ros.engines.loading import resolve_device

PathLike = Union[str, Path]

MODEL_WEIGHTS = 'model.safetensors'
TRAINING_STATE = 'training_state.pt'
TRAINER_STATE = 'trainer_state.json'

# ----------------------------------------------------------------------------- config


class ConfigKeyError(KeyError):
    """A config key that the trainer does not know (a typo would otherwise do nothing)."""

    def __str__(self) -> str:
        """Return the message without the quotes KeyError adds."""
        return str(self.args[0]) if self.args else ''


OPEN = object()
"""Schema marker: a mapping whose keys are not checked here (e.g. model constructor kwargs)."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` / ``5e-1`` as floats.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``), so ``lr: 1e-4`` or
    ``--set prompts.probabilities.box=5e-1`` would otherwise arrive as strings.
    """


_ConfigLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$'),
    list('-+0123456789.'))


def _parse_override_value(text: str) -> Any:
    # YAML parsing gives '3' -> 3, 'true' -> True, '[1, 2]' -> list, 'null' -> None,
    # '5e-1' -> 0.5.
    return yaml.load(text, Loader=_ConfigLoader) if text.strip() else ''


def did_you_mean(name: str, known: Iterable[str], prefix: str = '') -> str:
    """Return `` (did you mean 'x'?)`` for the closest known name, or '' when none is close.

    Close means similar spelling (case ignored) or one name starting with the other
    (``f1_score`` -> ``f1``).
    """
    by_lower = {str(k).lower(): str(k) for k in known}
    wanted = name.lower()
    close = difflib.get_close_matches(wanted, list(by_lower), n=1, cutoff=0.6) or sorted(
        (k for k in by_lower if k and (wanted.startswith(k) or k.startswith(wanted))),
        key=len, reverse=True)[:1]
    return f" (did you mean '{prefix}{by_lower[close[0]]}'?)" if close else ''


def check_key_path(parts: Sequence[str], schema: Mapping[str, Any], where: str) -> Any:
    """Raise ConfigKeyError unless the dotted key ``parts`` exists in ``schema``.

    ``schema`` is a nested mapping of the known keys; a non-mapping value is a leaf, and
    :data:`OPEN` accepts any keys below it. Returns the schema node at ``parts``.
    """
    node: Any = schema
    for depth, part in enumerate(parts):
        if node is OPEN:
            return OPEN
        parent = '.'.join(parts[:depth])
        path = f'{parent}.{part}' if parent else part
        if not isinstance(node, Mapping):
            raise ConfigKeyError(f"{where}: '{parent}' is a value, not a section, so "
                                 f"'{path}' does not exist")
        if part not in node:
            raise ConfigKeyError(
                f"{where}: unknown config key '{path}'"
                f"{did_you_mean(part, node, f'{parent}.' if parent else '')}; known keys "
                f"{f'in {parent!r}' if parent else 'at the top level'}: {sorted(node)}")
        node = node[part]
    return node


def check_config(cfg: Mapping[str, Any], schema: Mapping[str, Any], where: str = 'config',
                 _prefix: Tuple[str, ...] = ()) -> None:
    """Raise ConfigKeyError for the first key of ``cfg`` (at any depth) not in ``schema``.

    A section given as something other than a mapping raises ValueError; ``null`` is
    accepted anywhere (it means "use the default").
    """
    for key, value in cfg.items():
        parts = _prefix + (str(key),)
        sub = check_key_path(parts, schema, where)
        if sub is OPEN or not isinstance(sub, Mapping) or value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: '{'.'.join(parts)}' must be a mapping of "
                             f'{sorted(sub)}, got {value!r}')
        check_config(value, schema, where, parts)


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str],
                    schema: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a config in place.

    With ``schema`` (the trainer's known keys) every key path must exist in it; without,
    only the top-level key is checked and new nested keys below a mapping are allowed.
    Either way a typo raises ConfigKeyError instead of silently doing nothing.
    """
    for item in overrides:
        if '=' not in item:
            raise ValueError(f"override '{item}' is not of the form key=value")
        key, value = item.split('=', 1)
        parts = [p for p in key.strip().split('.') if p]
        if not parts:
            raise ValueError(f"override '{item}' has an empty key")
        if schema is not None:
            check_key_path(parts, schema, f"--set '{item}'")
        elif parts[0] not in cfg:
            raise ConfigKeyError(f"override '{item}': unknown config key '{parts[0]}'"
                                 f'{did_you_mean(parts[0], cfg)} (known: {sorted(cfg)})')
        node = cfg
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override '{item}': '{part}' is not a mapping")
            node = child
        node[parts[-1]] = _parse_override_value(value)
    return cfg


def load_config(path: PathLike, overrides: Optional[Iterable[str]] = None,
                schema: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load a YAML training config (a mapping) and apply ``key=value`` overrides.

    With ``schema`` every key of the file and of the overrides is checked against it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    with path.open() as handle:
        cfg = yaml.load(handle, Loader=_ConfigLoader)
    if not isinstance(cfg, dict):
        raise ValueError(f"config '{path}' must be a YAML mapping, got {type(cfg).__name__}")
    if schema is not None:
        check_config(cfg, schema, f"config '{path}'")
    apply_overrides(cfg, overrides or [], schema)
    if schema is not None:
        check_config(cfg, schema, f"config '{path}' with --set overrides")
    return _without_nulls(cfg)


def train_steps(cfg: Mapping[str, Any], default: Optional[int] = None) -> int:
    """Return ``train.steps`` (``default`` when unset), a whole number of optimizer steps >= 1.

    Checked where a trainer starts, before anything is written: 0 wrote no checkpoint but
    reported one, and a fraction or text failed mid-setup.
    """
    steps = (cfg.get('train') or {}).get('steps', default)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"config 'train.steps' must be a whole number of optimizer steps "
                         f'>= 1, got {steps!r}')
    return steps


def _without_nulls(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Return ``cfg`` without its ``null`` values, at any depth of mappings.

    ``null`` means "use the default", and the trainers read ``cfg.get(key, default)``: a
    key left in with None gave them None instead (``--set train.steps=null`` failed with
    ``int(None)``).
    """
    return {key: _without_nulls(value) if isinstance(value, Mapping) else value
            for key, value in cfg.items() if value is not None}


OPTIM_SCHEMA: Dict[str, Any] = {'lr': None, 'weight_decay': 0.01, 'betas': [0.9, 0.999],
                                'eps': 1e-8, 'param_groups': []}
"""Keys :func:`build_optimizer` reads (schema for both trainers' ``optim:`` section)."""

SCHEDULE_SCHEMA: Dict[str, Any] = {'warmup_steps': 0, 'schedule': 'cosine', 'min_lr_ratio': 0.0}
"""Keys :func:`build_scheduler` reads besides ``total_steps``."""


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """Return the command-line parser both trainers share."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--config', required=True, help='YAML training config')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='override a config value (repeatable)')
    start = parser.add_mutually_exclusive_group()
    start.add_argument('--resume', default=None, metavar='DIR',
                       help='checkpoint directory (e.g. OUTPUT/last) to resume exactly from')
    start.add_argument('--overwrite', action='store_true',
                       help="delete an earlier run's checkpoints, eval PNGs and TensorBoard "
                            'logs in the output directory and start afresh')
    parser.add_argument('--output-dir', default=None, help='override output_dir of the config')
    return parser


RUN_ARTEFACTS = ('last', 'best', 'last.tmp', 'last.old', 'best.tmp', 'eval', 'tensorboard',
                 'summary.json', 'config.json')
"""What a training run writes into its output directory (and ``--overwrite`` deletes)."""


RESUME_MAY_CHANGE = ('output_dir', 'device', 'num_threads', 'tensorboard', 'cpu_kernels',
                     'train.stop_at_step', 'train.eval_every', 'train.checkpoint_every',
                     'train.log_every', 'train.loss_window', 'train.eval_at_start')
"""Config keys a resumed run may change: where and how it runs, not what it trains."""

RUN_ID = 'run_id'
"""``trainer_state.json`` extra: the identity of the run a checkpoint belongs to."""

RUN_CONFIG = 'config'
"""``trainer_state.json`` extra: the training config of the run (as JSON)."""


def new_run_id() -> str:
    """Return a fresh run identity (saved with every checkpoint of the run)."""
    return uuid.uuid4().hex


def run_identity(run_id: str, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Return the ``extra`` entries :func:`check_resume` reads: run id and config (as JSON)."""
    return {RUN_ID: run_id, RUN_CONFIG: json.loads(json.dumps(dict(cfg), default=str))}


def _checkpoint_extra(directory: Path) -> Optional[Dict[str, Any]]:
    state = directory / TRAINER_STATE
    if not state.is_file():
        return None
    return dict(json.loads(state.read_text()).get('extra') or {})


def _flatten(value: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: Dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(_flatten(sub, f'{prefix}.{key}' if prefix else str(key)))
        return flat
    return {prefix: value}


def config_changes(saved: Mapping[str, Any], cfg: Mapping[str, Any],
                   may_change: Sequence[str] = RESUME_MAY_CHANGE) -> List[str]:
    """Return ``'key: saved -> now'`` for every config value that differs, bar ``may_change``."""
    # Compared as JSON, the form the config is saved in.
    before = _flatten(json.loads(json.dumps(dict(saved), default=str)))
    now = _flatten(json.loads(json.dumps(dict(cfg), default=str)))
    allowed = tuple(may_change)
    return [f'{key}: {before.get(key)!r} -> {now.get(key)!r}'
            for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)
            and not any(key == a or key.startswith(a + '.') for a in allowed)]


def check_resume(resume: PathLike, output_dir: PathLike,
                 config: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse a resume that would not continue the checkpoint's run as it was configured.

    ``output_dir`` must not hold the checkpoints of another run (they would be replaced,
    best/ would compete with that run's and TensorBoard would mix both); and ``config`` may
    differ from the one the run started with only in :data:`RESUME_MAY_CHANGE`: the
    optimizer state brings back the saved lr and the schedule would silently bend, so a
    changed lr, step count, batch or model would otherwise be ignored or mixed. A directory
    that is no training checkpoint is refused (FileNotFoundError); checkpoints without a
    run id or config (older ones) skip those checks.
    """
    resume = Path(resume)
    # Now, before anything is written: a model directory passed by mistake used to leave
    # config.json and tensorboard/ behind, and the next fresh run was refused.
    _require_checkpoint(resume, f' (to train from a model directory, start a new run with '
                                f'--set model.pretrained_dir={resume})')
    extra = _checkpoint_extra(resume) or {}
    run_id = extra.get(RUN_ID)
    for name in ('last', 'best'):
        other = _checkpoint_extra(Path(output_dir) / name)
        other_id = (other or {}).get(RUN_ID)
        if run_id and other_id and other_id != run_id:
            raise FileExistsError(
                f"output directory '{output_dir}' holds another training run ({name}/ is not "
                f"from the run of '{resume}'): resuming there would replace its checkpoints; "
                'pass the --output-dir of that run, or a new one')
    if config is not None and extra.get(RUN_CONFIG) is not None:
        changes = config_changes(extra[RUN_CONFIG], config)
        if changes:
            raise ValueError(
                f"the config differs from the one the run of '{resume}' started with: "
                f"{'; '.join(changes)}. A resumed run restores the saved optimizer and "
                'schedule, so these would be ignored or mixed; resume with the original '
                'values, or start a new run from these weights with '
                f'--set model.pretrained_dir={resume}')


def claim_output_dir(output_dir: PathLike, resume: Optional[PathLike] = None,
                     overwrite: bool = False,
                     artefacts: Sequence[str] = RUN_ARTEFACTS,
                     config: Optional[Mapping[str, Any]] = None) -> Path:
    """Make ``output_dir`` ready for a run; refuse to mix a fresh run with an earlier one.

    A fresh run (no ``resume``) into a directory holding an earlier run's ``artefacts``
    raises FileExistsError, unless ``overwrite``, which deletes exactly those artefacts
    (other files, e.g. a cached synthetic dataset, stay). A resumed run is checked with
    :func:`check_resume` (``config``: the run's training config). Returns the directory.
    """
    if resume and overwrite:
        raise ValueError('resume and overwrite exclude each other: resuming continues the '
                         'run that overwrite would delete')
    output_dir = Path(output_dir)
    if resume:
        check_resume(resume, output_dir, config)
    found = [name for name in artefacts if (output_dir / name).exists()]
    if found and not resume:
        if not overwrite:
            raise FileExistsError(
                f"output directory '{output_dir}' already holds a training run "
                f"({', '.join(found)}): pass --resume {output_dir / 'last'} to continue it, "
                '--overwrite to delete it and start afresh, or choose another --output-dir')
        for name in found:
            target = output_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        print(f"--overwrite: deleted {', '.join(found)} of the earlier run in '{output_dir}'",
              flush=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def training_device(cfg: Mapping[str, Any]) -> torch.device:
    """Return the torch device named by ``cfg['device']`` (default ``auto``)."""
    return resolve_device(cfg.get('device', 'auto'))


# The environment that makes PyTorch, MKL and oneDNN run their AVX2 kernels on any x86 CPU.
CPU_KERNEL_ENV = {'AVX2': 'ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 '
                          'ONEDNN_MAX_CPU_ISA=AVX2'}


def check_cpu_kernels(cfg: Mapping[str, Any], device: torch.device) -> Optional[str]:
    """Return a warning when a CPU run cannot reproduce the config's recorded weights.

    ``cfg['cpu_kernels']`` names the PyTorch CPU capability (``AVX2``) the shipped weights
    were trained with. Float results differ between AVX2 and AVX-512 kernels, and over
    thousands of steps a seeded run then ends at different weights (see
    docs/tiny_models.md); the same seed gives the same weights only with the same kernels.
    The capability is fixed when torch starts, hence a warning with the environment to set
    instead of a switch here.
    """
    wanted = cfg.get('cpu_kernels')
    if not wanted or device.type != 'cpu':
        return None
    wanted = str(wanted).upper()
    running = torch.backends.cpu.get_cpu_capability()
    if running == wanted:
        return None
    how = CPU_KERNEL_ENV.get(wanted)
    hint = f'; run with {how} to reproduce them' if how else ''
    return (f'PyTorch runs {running} CPU kernels but this config\'s weights were trained with '
            f'{wanted}: the run will not reproduce them bit for bit{hint}')


# ----------------------------------------------------------------------------- seeding + RNG


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def capture_rng_state() -> Dict[str, Any]:
    """Return the python/numpy/torch RNG states (torch part as tensors, rest JSON-able)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        'python': [py_version, list(py_state), py_gauss],
        'numpy': [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`."""
    version, py_state, gauss = state['python']
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        # One state per GPU visible when saved; a resume may see fewer (CUDA_VISIBLE_DEVICES),
        # and setting a state on a device that is not there fails.
        for index, cuda_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


# ----------------------------------------------------------------------------- freezing

# Named lists of parameter-name patterns; a freeze list may say 'preset:<name>'.
FREEZE_PRESETS: Dict[str, List[str]] = {
    'sam2_image_encoder': ['vision_encoder.*'],
    'sam2_prompt_encoder': ['prompt_encoder.*', 'shared_image_embedding.*'],
    'sam2_memory': ['memory_attention.*', 'memory_encoder.*',
                    'memory_temporal_positional_encoding', 'no_memory_embedding',
                    'no_memory_positional_encoding', 'mask_downsample.*',
                    'object_pointer_proj.*', 'no_object_pointer',
                    'temporal_positional_encoding_projection_layer.*',
                    'occlusion_spatial_embedding_parameter'],
    'sam2_mask_decoder': ['mask_decoder.*'],
}


def register_freeze_preset(name: str, patterns: Sequence[str]) -> None:
    """Add (or replace) a named freeze preset, e.g. from the SAM3 trainer."""
    if not patterns:
        raise ValueError(f"freeze preset '{name}' needs at least one pattern")
    FREEZE_PRESETS[name] = list(patterns)


def expand_freeze_patterns(patterns: Iterable[str]) -> List[str]:
    """Replace every ``preset:<name>`` entry by that preset's patterns."""
    expanded: List[str] = []
    for pattern in patterns:
        if pattern.startswith('preset:'):
            name = pattern[len('preset:'):]
            if name not in FREEZE_PRESETS:
                raise KeyError(f"unknown freeze preset '{name}' (known: {sorted(FREEZE_PRESETS)})")
            expanded.extend(FREEZE_PRESETS[name])
        else:
            expanded.append(pattern)
    return expanded


def _compile_pattern(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith('re:'):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    # A bare module name ('vision_encoder') means that whole module.
    return lambda name: (fnmatch.fnmatchcase(name, pattern)
                         or name.startswith(pattern.rstrip('.') + '.'))


def apply_freezing(model: torch.nn.Module, patterns: Iterable[str]) -> Tuple[int, int]:
    """Freeze parameters whose names match any pattern; return ``(n_frozen, n_trainable)``.

    Patterns are fnmatch globs on the full parameter name (``mask_decoder.*``), a bare
    module prefix (``vision_encoder``), ``re:<regex>`` (searched), or ``preset:<name>``.
    Counts are numbers of parameter elements. An entry that matches nothing raises
    ValueError: a misspelt pattern would otherwise silently train the wrong weights.
    """
    entries = [(entry, [_compile_pattern(p) for p in expand_freeze_patterns([entry])])
               for entry in patterns]
    used = set()
    for name, param in model.named_parameters():
        for entry, matchers in entries:
            if any(match(name) for match in matchers):
                param.requires_grad_(False)
                used.add(entry)
    unused = [entry for entry, _ in entries if entry not in used]
    if unused:
        raise ValueError(f'freeze patterns matched no parameter: {unused}')
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return n_frozen, n_trainable


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Return AdamW over the trainable parameters with per-group learning rates.

    ``cfg`` keys: ``lr``, ``weight_decay`` (default 0.01), ``betas``, ``eps`` and
    ``param_groups``: a list of ``{patterns: [...], lr: float, weight_decay: float}``
    (first matching group wins, e.g. a lower lr for the vision encoder). Biases, norms and
    other 1-D parameters never get weight decay.
    """
    if 'lr' not in cfg:
        raise KeyError("optimizer config needs 'lr'")
    base_lr = float(cfg['lr'])
    base_wd = float(cfg.get('weight_decay', 0.01))
    group_specs = []
    for spec in cfg.get('param_groups', []) or []:
        pats = spec.get('patterns')
        if not pats:
            raise ValueError(f"param group {spec} needs a non-empty 'patterns' list")
        group_specs.append((spec, [_compile_pattern(p) for p in expand_freeze_patterns(pats)]))
    buckets: Dict[Tuple[int, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group_index = -1
        for index, (_, matchers) in enumerate(group_specs):
            if any(m(name) for m in matchers):
                group_index = index
                break
        no_decay = param.ndim <= 1 or name.endswith('.bias')
        buckets.setdefault((group_index, no_decay), []).append(param)
    if not buckets:
        raise ValueError('no trainable parameters: everything is frozen')
    groups = []
    for (group_index, no_decay), params in sorted(buckets.items()):
        spec = group_specs[group_index][0] if group_index >= 0 else {}
        lr = float(spec.get('lr', base_lr))
        wd = 0.0 if no_decay else float(spec.get('weight_decay', base_wd))
        groups.append({'params': params, 'lr': lr, 'weight_decay': wd,
                       'group_name': spec.get('name', f'group{group_index}')})
    betas = tuple(cfg.get('betas', (0.9, 0.999)))
    return torch.optim.AdamW(groups, lr=base_lr, betas=betas, eps=float(cfg.get('eps', 1e-8)))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = 'cosine',
              min_lr_ratio: float = 0.0) -> float:
    """Return the lr multiplier at ``step``: linear warm-up, then cosine/linear/constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == 'constant':
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == 'cosine':
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == 'linear':
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule '{schedule}': use cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a LambdaLR for ``warmup_steps``, ``total_steps``, ``schedule``, ``min_lr_ratio``."""
    warmup = int(cfg.get('warmup_steps', 0))
    total = int(cfg['total_steps'])
    schedule = str(cfg.get('schedule', 'cosine'))
    min_ratio = float(cfg.get('min_lr_ratio', 0.0))
    lr_factor(0, warmup, total, schedule, min_ratio)  # validate the schedule name now

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, schedule, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """Return the autocast dtype for ``precision`` (fp32|bf16|fp16) or None (AMP off).

    AMP is off on CPU: CPU autocast is slow for these convolution/attention shapes and
    the smoke runs must be bit-reproducible for resume tests.
    """
    precision = str(precision).lower()
    if precision in ('fp32', 'float32', 'none', 'off'):
        return None
    if precision not in ('bf16', 'bfloat16', 'fp16', 'float16'):
        raise ValueError(f"unknown precision '{precision}': use fp32, bf16 or fp16")
    if device.type != 'cuda':
        return None
    return torch.bfloat16 if precision.startswith('bf') else torch.float16


def amp_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return an autocast context for ``precision`` on CUDA, a no-op elsewhere."""
    dtype = amp_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class GradientStepper:
    """Backward with AMP loss scaling, gradient accumulation, clipping and lr stepping.

    Call :meth:`backward` once per micro-batch; it returns True when that call completed
    an optimizer step (every ``accumulation_steps`` micro-batches).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 accumulation_steps: int = 1, clip_grad_norm: Optional[float] = None,
                 device: Optional[torch.device] = None, precision: str = 'fp32') -> None:
        if accumulation_steps < 1:
            raise ValueError(f'accumulation_steps must be >= 1, got {accumulation_steps}')
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accumulation_steps = int(accumulation_steps)
        self.clip_grad_norm = clip_grad_norm
        device = device or torch.device('cpu')
        # Only fp16 needs loss scaling; bf16 has the fp32 exponent range.
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=amp_dtype(device, precision) == torch.float16)
        self.micro_step = 0
        self.last_grad_norm: Optional[float] = None

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate ``loss``'s gradient; step the optimizer when a full batch is done."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f'non-finite training loss {float(loss)}')
        self.scaler.scale(loss / self.accumulation_steps).backward()
        self.micro_step += 1
        if self.micro_step % self.accumulation_steps:
            return False
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad_norm))
        else:
            norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params])) if params else None
        self.last_grad_norm = None if norm is None else float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return True

    def state_dict(self) -> Dict[str, Any]:
        """Return the scaler state and micro-step counter for checkpoints."""
        return {'scaler': self.scaler.state_dict(), 'micro_step': self.micro_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.micro_step = int(state.get('micro_step', 0))


# ----------------------------------------------------------------------------- checkpoints


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def save_checkpoint(directory: PathLike, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None, step: int = 0,
                    rng_state: Optional[Mapping[str, Any]] = None,
                    metrics: Optional[Mapping[str, float]] = None,
                    extra: Optional[Mapping[str, Any]] = None,
                    stepper: Optional[GradientStepper] = None,
                    processor: Optional[Any] = None) -> Path:
    """Write a complete, resumable checkpoint to ``directory`` and return its path.

    Written into a temporary sibling first and renamed, so an interruption mid-save never
    leaves a half-written ``last/``. ``extra`` must be JSON-serialisable (e.g. the data
    generator's RNG state). With ``processor`` (a transformers processor) the directory is
    also a complete model directory the engines can load.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + '.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if hasattr(model, 'save_pretrained'):
        model.save_pretrained(tmp, safe_serialization=True)
    else:  # plain nn.Module (tests, small heads): weights only, still safetensors
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / MODEL_WEIGHTS))
    if processor is not None:
        processor.save_pretrained(tmp)
    rng_state = rng_state if rng_state is not None else capture_rng_state()
    tensor_state = {
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'scheduler': scheduler.state_dict() if scheduler is not None else None,
        'stepper': stepper.state_dict() if stepper is not None else None,
        'torch_rng': rng_state['torch'],
        'cuda_rng': rng_state.get('cuda'),
    }
    torch.save(tensor_state, tmp / TRAINING_STATE)
    json_state = {
        'step': int(step),
        'metrics': _json_safe(dict(metrics or {})),
        'rng': {'python': rng_state['python'], 'numpy': rng_state['numpy']},
        'extra': _json_safe(dict(extra or {})),
    }
    (tmp / TRAINER_STATE).write_text(json.dumps(json_state))
    _replace_directory(tmp, directory)
    return directory


def _replace_directory(tmp: Path, directory: Path) -> None:
    """Put the complete ``tmp`` in ``directory``'s place, keeping one whole copy throughout.

    ``directory`` is renamed to ``<name>.old`` first and removed only after ``tmp`` took its
    place: a crash in between leaves that complete copy, which
    :func:`_restore_interrupted_replace` puts back.
    """
    # On disk before the renames publish it: after a power cut a renamed directory of
    # unwritten (empty) files would look like a whole checkpoint.
    _sync_tree(tmp)
    old = directory.with_name(directory.name + '.old')
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    _sync_directory(directory.parent)  # the renames themselves
    if old.exists():
        shutil.rmtree(old)


def _sync_tree(directory: Path) -> None:
    """Flush every file below ``directory``, and the directories, to disk."""
    for path in sorted(directory.rglob('*')):
        if path.is_file():
            with open(path, 'rb') as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _sync_directory(path)
    _sync_directory(directory)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _require_checkpoint(directory: Path, hint: str = '') -> None:
    """Raise FileNotFoundError unless ``directory`` holds a training checkpoint.

    A crash between the renames of its replacement is repaired first (see above).
    """
    _restore_interrupted_replace(directory)
    for name in (TRAINING_STATE, TRAINER_STATE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"'{directory}' is not a training checkpoint: no "
                                    f'{name}{hint}')


def _restore_interrupted_replace(directory: Path) -> None:
    """Put back ``<name>.old`` when a crash left it without ``directory`` (see above)."""
    old = directory.with_name(directory.name + '.old')
    if not directory.exists() and old.is_dir():
        os.replace(old, directory)


def load_model_weights(directory: PathLike, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` from a checkpoint into ``model`` (strict)."""
    path = Path(directory) / MODEL_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{directory}' has no {MODEL_WEIGHTS}")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers that are not persisted (e.g. rotary tables) are rebuilt by the model itself.
    persistent = set(model.state_dict().keys())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{directory}' does not match the model: "
                           f'missing={missing[:8]} unexpected={unexpected[:8]}')


def load_checkpoint(directory: PathLike, model: Optional[torch.nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Optional[Any] = None,
                    stepper: Optional[GradientStepper] = None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; return step/metrics/extra.

    Only safetensors and ``torch.load(weights_only=True)`` are used, so a checkpoint
    cannot execute code when loaded.
    """
    directory = Path(directory)
    _require_checkpoint(directory)
    if model is not None:
        load_model_weights(directory, model)
    tensor_state = torch.load(directory / TRAINING_STATE, map_location='cpu', weights_only=True)
    json_state = json.loads((directory / TRAINER_STATE).read_text())
    if optimizer is not None:
        if tensor_state['optimizer'] is None:
            raise RuntimeError(f"checkpoint '{directory}' has no optimizer state")
        optimizer.load_state_dict(tensor_state['optimizer'])
    if scheduler is not None and tensor_state['scheduler'] is not None:
        scheduler.load_state_dict(tensor_state['scheduler'])
    if stepper is not None and tensor_state.get('stepper') is not None:
        stepper.load_state_dict(tensor_state['stepper'])
    if restore_rng:
        rng = dict(json_state['rng'])
        rng['torch'] = tensor_state['torch_rng']
        if tensor_state.get('cuda_rng') is not None:
            rng['cuda'] = tensor_state['cuda_rng']
        restore_rng_state(rng)
    return {'step': int(json_state['step']), 'metrics': json_state.get('metrics', {}),
            'extra': json_state.get('extra', {})}


class CheckpointManager:
    """Keep ``<output>/last`` (every save) and ``<output>/best`` (best validation metric)."""

    def __init__(self, output_dir: PathLike, metric: str, mode: str = 'max') -> None:
        if mode not in ('max', 'min'):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        self.output_dir = Path(output_dir)
        self.metric = metric
        self.mode = mode
        self.best_value: Optional[float] = None
        for directory in (self.last_dir, self.best_dir):
            _restore_interrupted_replace(directory)
        best_state = self.best_dir / TRAINER_STATE
        if best_state.is_file():
            value = json.loads(best_state.read_text()).get('metrics', {}).get(metric)
            self.best_value = None if value is None else float(value)

    @property
    def last_dir(self) -> Path:
        """Return the directory of the latest checkpoint."""
        return self.output_dir / 'last'

    @property
    def best_dir(self) -> Path:
        """Return the directory of the best checkpoint."""
        return self.output_dir / 'best'

    def is_better(self, value: float) -> bool:
        """Return True if ``value`` beats the best metric seen so far.

        NaN (a diverged model, an evaluation with nothing to score) only fills an empty
        best/, and any number beats a NaN best: every comparison with NaN is False, so a
        NaN best would otherwise block best/ for the rest of the run.
        """
        if self.best_value is None:
            return True
        if math.isnan(value):
            return False
        if math.isnan(self.best_value):
            return True
        return value > self.best_value if self.mode == 'max' else value < self.best_value

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             step: int, metrics: Optional[Mapping[str, float]] = None,
             extra: Optional[Mapping[str, Any]] = None,
             stepper: Optional[GradientStepper] = None,
             processor: Optional[Any] = None) -> Dict[str, Path]:
        """Save ``last/``; also ``best/`` when ``metrics[metric]`` improved. Return paths."""
        rng = capture_rng_state()
        saved = {'last': save_checkpoint(self.last_dir, model, optimizer, scheduler, step, rng,
                                         metrics, extra, stepper, processor)}
        value = (metrics or {}).get(self.metric)
        if value is not None and self.is_better(float(value)):
            self.best_value = float(value)
            tmp = self.best_dir.with_name('best.tmp')
            if tmp.exists():
                shutil.rmtree(tmp)
            shutil.copytree(self.last_dir, tmp)
            # Not rmtree + rename: a crash in between lost best/ and its score.
            _replace_directory(tmp, self.best_dir)
            saved['best'] = self.best_dir
        return saved


# ----------------------------------------------------------------------------- logging


class ScalarLogger:
    """TensorBoard scalar logging (a no-op when ``log_dir`` is None)."""

    def __init__(self, log_dir: Optional[PathLike]) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: Mapping[str, float], step: int, prefix: str = '') -> None:
        """Write each scalar under ``prefix/name`` at ``step``."""
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f'{prefix}/{name}' if prefix else name, float(value), step)

    def close(self) -> None:
        """Flush and close the writer."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def progress_bar(total: int, desc: str, initial: int = 0, disable: Optional[bool] = None):
    """Return a tqdm bar (on stderr, so stdout keeps the machine-readable summary lines)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True,
                leave=False)


def _overlay(image: np.ndarray, mask: np.ndarray, color: Tuple[int, int, int]) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = 0.5 * out[mask] + 0.5 * np.asarray(color, dtype=np.float32)
    return out.astype(np.uint8)


def save_mask_comparison(path: PathLike, images: Sequence[np.ndarray],
                         pred_masks: Sequence[np.ndarray], true_masks: Sequence[np.ndarray],
                         titles: Optional[Sequence[str]] = None, max_rows: int = 8) -> Path:
    """Write a PNG grid: one row per sample with image | ground truth | prediction.

    ``images`` are RGB uint8 ``(H, W, 3)``; masks boolean ``(H, W)`` (or ``(K, H, W)``
    stacks, drawn merged).
    """
    if not (len(images) == len(pred_masks) == len(true_masks)):
        raise ValueError('save_mask_comparison needs as many predictions and targets as images')
    if not images:
        raise ValueError('save_mask_comparison got no images')
    rows = []
    # Small training frames are enlarged (nearest neighbour) so masks stay readable.
    cell_h = max(160, max(img.shape[0] for img in images[:max_rows]))
    for index in range(min(len(images), max_rows)):
        image = images[index]
        true = np.asarray(true_masks[index], dtype=bool)
        pred = np.asarray(pred_masks[index], dtype=bool)
        true = true.any(0) if true.ndim == 3 else true
        pred = pred.any(0) if pred.ndim == 3 else pred
        if true.shape != image.shape[:2] or pred.shape != image.shape[:2]:
            raise ValueError(f'row {index}: mask shapes {true.shape}/{pred.shape} do not match '
                             f'image {image.shape[:2]}')
        cells = [image, _overlay(image, true, (0, 255, 0)), _overlay(image, pred, (255, 0, 255))]
        row = np.concatenate(cells, axis=1)
        if row.shape[0] != cell_h:
            scale = cell_h / row.shape[0]
            row = cv2.resize(row, (int(round(row.shape[1] * scale)), cell_h),
                             interpolation=cv2.INTER_NEAREST)
        label = titles[index] if titles is not None else f'#{index}'
        header = np.full((18, row.shape[1], 3), 255, dtype=np.uint8)
        cv2.putText(header, f'{label}: image | truth (green) | prediction (magenta)', (4, 13),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([header, row], axis=0))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
            for r in rows]
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write '{path}'")
    return path


def loss_drop_pct(losses: Sequence[float], window: int) -> float:
    """Return the % drop from the mean of the first to the mean of the last ``window`` losses."""
    if len(losses) < 2:
        raise ValueError('loss_drop_pct needs at least two losses')
    window = max(1, min(int(window), len(losses) // 2))
    first = float(np.mean(losses[:window]))
    last = float(np.mean(losses[-window:]))
    if first <= 0:
        raise ValueError(f'first-window mean loss is {first}: cannot express a relative drop')
    return 100.0 * (first - last) / first


def deep_copy_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Return an independent copy of a config (safe to mutate per run)."""
    return copy.deepcopy(dict(cfg))
