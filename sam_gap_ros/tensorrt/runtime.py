"""Swap a transformers vision encoder for a TensorRT engine or ONNX Runtime session.

``install_vision_engine(model, engine_path, family)`` validates the artifact's sidecar against
the loaded model and this machine, then replaces ``vision_encoder`` with an
:class:`EngineVisionEncoder` that returns the same output dataclass transformers expects. Any
problem (missing/corrupt file or sidecar, other weights, other input size, other TensorRT
version or GPU, tensorrt missing, deserialisation failure) is logged as an error and the model
keeps its PyTorch encoder: the node never crashes and never runs a wrong engine.

``*.engine`` / ``*.plan`` / ``*.trt`` files run in TensorRT (GPU only); ``*.onnx`` files run in
ONNX Runtime (CUDA provider when the model is on CUDA and it is available, else CPU). The ONNX
path exercises the same swap on CPU-only CI.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from sam_gap_ros.tensorrt import sidecar as sc
from sam_gap_ros.tensorrt import vision_io

BACKEND_TENSORRT = 'tensorrt'
BACKEND_ORT = 'onnxruntime'
BACKEND_PYTORCH = 'pytorch'
ENGINE_SUFFIXES = ('.engine', '.plan', '.trt')
_LOG = logging.getLogger(__name__)


@dataclass
class BackendChoice:
    """Which backend runs the vision encoder after ``install_vision_engine``, and why."""

    backend: str
    reason: str
    engine_path: Optional[str] = None

    @property
    def accelerated(self) -> bool:
        """Return True when an engine (TensorRT or ONNX Runtime) replaced PyTorch."""
        return self.backend != BACKEND_PYTORCH


def ort_session(onnx_path: Union[str, Path], providers: Optional[List[str]] = None,
                threads: Optional[int] = None) -> Any:
    """Open an ONNX Runtime session (CPU unless ``providers`` says otherwise), errors-only log."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # ORT warns about benign shape-merge details of the traced graph on every load.
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(onnx_path), sess_options=options,
                                providers=providers or ['CPUExecutionProvider'])


class OrtRunner:
    """Run an exported vision ONNX file in ONNX Runtime; torch tensors in and out."""

    def __init__(self, onnx_path: Union[str, Path], device: torch.device,
                 logger: Any = None, threads: Optional[int] = None) -> None:
        import onnxruntime as ort

        wanted = ['CPUExecutionProvider']
        if device.type == 'cuda' and 'CUDAExecutionProvider' in ort.get_available_providers():
            wanted.insert(0, 'CUDAExecutionProvider')
        self.session = ort_session(onnx_path, wanted, threads)
        active = self.session.get_providers()
        if wanted[0] not in active:
            # ORT silently drops a provider whose CUDA/cuDNN build does not match.
            _log(logger, 'warning', f'onnxruntime did not activate {wanted[0]} (active: '
                 f'{active}); the vision encoder runs on {active[0]}')
        if device.type == 'cuda' and active[0] == 'CPUExecutionProvider':
            _log(logger, 'warning', 'model is on CUDA but ONNX Runtime runs on CPU: expect it to '
                 'be slower than PyTorch; build a TensorRT engine instead')
        self.providers = active
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = [int(d) if isinstance(d, int) else -1 for d in inp.shape]
        self.input_dtype = torch.float16 if 'float16' in inp.type else torch.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the named outputs for one ``(1, 3, H, W)`` input, on the input's device."""
        array = pixel_values.detach().to('cpu', self.input_dtype).contiguous().numpy()
        outs = self.session.run(self.output_names, {self.input_name: array})
        return {name: torch.from_numpy(np.ascontiguousarray(out)).to(pixel_values.device)
                for name, out in zip(self.output_names, outs, strict=True)}


class TrtRunner:
    """Run a serialized TensorRT (>= 10) engine on the model's CUDA device."""

    def __init__(self, engine_path: Union[str, Path], device: torch.device,
                 logger: Any = None) -> None:
        import tensorrt as trt

        self._trt = trt
        # Pinned now: a bare 'cuda' would follow whatever device is current at call time, but
        # the engine and its context stay bound to the device they were created on.
        self.device = _indexed_cuda_device(device)
        device = self.device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialize '{engine_path}' (built with "
                                   'another TensorRT version or for another GPU?)')
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError('TensorRT could not create an execution context for '
                               f"'{engine_path}'")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        if len(inputs) != 1:
            raise RuntimeError(f'engine has inputs {inputs}, expected exactly one')
        self.input_name = inputs[0]
        self.input_shape = list(self.engine.get_tensor_shape(self.input_name))
        self.input_dtype = _trt_to_torch(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_names = [n for n in names if n != self.input_name]
        self._out_specs = [(n, tuple(self.engine.get_tensor_shape(n)),
                            _trt_to_torch(trt, self.engine.get_tensor_dtype(n)))
                           for n in self.output_names]
        # TensorRT adds device-wide synchronisations around enqueues on the legacy default
        # stream, which is torch's current stream unless the caller set another one.
        self._stream = torch.cuda.Stream(device=device)
        self.providers = ['TensorRT']

    def __call__(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Return the named outputs for one ``(1, 3, H, W)`` input, on the engine's device."""
        # The context only runs with its own device current (model on cuda:1, caller's on 0).
        with torch.cuda.device(self.device):
            x = aligned_input(pixel_values.detach().to(self.device, self.input_dtype))
            # Fresh output tensors per call: SAM2 caches per-frame features, so buffers must
            # not be overwritten by the next frame.
            outs = {n: torch.empty(shape, dtype=dtype, device=self.device)
                    for n, shape, dtype in self._out_specs}
            # A refused shape or address leaves the previous call's (freed) pointer bound.
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise RuntimeError(f'TensorRT refused input shape {tuple(x.shape)}')
            for name, tensor in [(self.input_name, x), *outs.items()]:
                if not self.context.set_tensor_address(name, tensor.data_ptr()):
                    raise RuntimeError(f"TensorRT refused the address of '{name}'")
            current = torch.cuda.current_stream(self.device)
            # Input and outputs were made on the current stream and the caller reads the
            # outputs there: order the engine's stream between the two.
            self._stream.wait_stream(current)
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError('TensorRT execute_async_v3 failed')
            current.wait_stream(self._stream)
        return outs


TRT_IO_ALIGNMENT = 256


def aligned_input(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` contiguous at an address TensorRT accepts for I/O (256-byte aligned)."""
    x = x.contiguous()
    if x.data_ptr() % TRT_IO_ALIGNMENT:
        # A view into a larger buffer (a slice of someone else's batch) may start anywhere.
        x = x.clone()
    return x


def _indexed_cuda_device(device: torch.device) -> torch.device:
    """Return ``device`` with the index of the current CUDA device filled in when missing."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:
        return torch.device('cuda', torch.cuda.current_device())
    return device


def _trt_to_torch(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16}
    if hasattr(trt, 'bfloat16'):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise RuntimeError(f'unsupported TensorRT I/O dtype {dtype}')
    return table[dtype]


class EngineVisionEncoder(nn.Module):
    """Drop-in replacement of a transformers vision encoder backed by an engine runner.

    Falls back to the original PyTorch encoder (when kept) for inputs the engine cannot take
    (other size, requested hidden states/attentions) and permanently after a runtime error.
    ``fallback_reason`` says why the latest call ran in PyTorch (None: it ran on the engine).
    """

    def __init__(self, runner: Any, family: str, levels: int, backend: str,
                 fallback: Optional[nn.Module], logger: Any = None,
                 engine_path: Optional[str] = None) -> None:
        super().__init__()
        self.runner = runner
        self.input_shape = list(runner.input_shape)
        self.family = family
        self.levels = levels
        self.backend = backend
        self.logger = logger
        self.engine_path = engine_path
        self.broken = False
        self.fallback_reason: Optional[str] = None
        self._warned: set = set()
        # A plain attribute, not a sub-module: state_dict / save_pretrained keep their keys.
        object.__setattr__(self, 'pytorch_encoder', fallback)

    @property
    def config(self) -> Any:
        """Return the configuration of the original encoder (transformers may read it)."""
        return getattr(self.pytorch_encoder, 'config', None)

    def get_input_embeddings(self) -> nn.Module:
        """Return the original encoder's patch embedding (needs the kept PyTorch encoder)."""
        return self._require_fallback('get_input_embeddings').get_input_embeddings()

    def forward(self, pixel_values: Optional[torch.Tensor] = None, **kwargs: Any) -> Any:
        """Encode ``pixel_values`` with the engine; same outputs as the PyTorch encoder."""
        if pixel_values is None:
            raise ValueError('You have to specify pixel_values')
        return_dict = kwargs.pop('return_dict', True)
        wants_extra = any(kwargs.get(k) for k in ('output_hidden_states', 'output_attentions'))
        expected = self.input_shape[1:]
        if self.broken:
            return self._run_fallback(pixel_values, return_dict, kwargs)
        if wants_extra:
            self._fall_back('extra', 'hidden states/attentions requested: the engine does not '
                            'return them, using PyTorch for this call')
            return self._run_fallback(pixel_values, return_dict, kwargs)
        if pixel_values.dim() != 4 or list(pixel_values.shape[1:]) != expected:
            self._fall_back('shape', f'input {tuple(pixel_values.shape)} does not match the '
                            f'engine input (N, {", ".join(map(str, expected))}): using PyTorch')
            return self._run_fallback(pixel_values, return_dict, kwargs)
        try:
            # Engines are built for batch 1; batch > 1 runs frame by frame.
            per_item = [self.runner(pixel_values[i:i + 1]) for i in range(pixel_values.shape[0])]
        except Exception as exc:  # noqa: BLE001 - any runtime failure must fall back
            self.broken = True
            self.fallback_reason = (f'{self.backend} vision engine failed ({exc}); PyTorch runs '
                                    'for the rest of this run')
            _log(self.logger, 'error', f'{self.backend} vision engine failed ({exc}); switching '
                 'to the PyTorch vision encoder for the rest of this run')
            return self._run_fallback(pixel_values, return_dict, kwargs)
        self.fallback_reason = None
        tensors = {name: torch.cat([item[name] for item in per_item]).to(
            device=pixel_values.device, dtype=pixel_values.dtype) for name in per_item[0]}
        out = vision_io.pack_outputs(self.family, tensors, self.levels)
        return out if return_dict else out.to_tuple()

    def _run_fallback(self, pixel_values: torch.Tensor, return_dict: bool,
                      kwargs: Dict[str, Any]) -> Any:
        encoder = self._require_fallback('this input')
        return encoder(pixel_values, return_dict=return_dict, **kwargs)

    def _require_fallback(self, what: str) -> nn.Module:
        if self.pytorch_encoder is None:
            raise RuntimeError(f'the {self.backend} vision engine cannot handle {what} and the '
                               'PyTorch encoder was released (keep_pytorch_fallback=False)')
        return self.pytorch_encoder

    def _fall_back(self, key: str, message: str) -> None:
        """Record why this call uses PyTorch; log it the first time it happens."""
        self.fallback_reason = message
        if key not in self._warned:
            self._warned.add(key)
            _log(self.logger, 'warning', message)


def install(engine: Any, engine_path: Union[str, Path, None], logger: Any = None,
            image_size: Optional[Tuple[int, int]] = None) -> BackendChoice:
    """Install ``engine_path`` into a ROS-free engine (tracker, concept or hybrid engine).

    The family comes from the artifact's sidecar; the engine's model of that family (e.g. the
    SAM3 detector of a hybrid engine for a ``sam3`` artifact) gets the engine. Never raises for
    a bad artifact; see :func:`install_vision_engine`.
    """
    held = _engine_models(engine)
    if not engine_path or not str(engine_path).strip():
        return _refuse(held, 'no engine_path set', None, None)
    shown = str(engine_path)
    try:
        # Inside the try: expanduser raises for '~nosuchuser/...'.
        path = Path(engine_path).expanduser()
        shown = str(path)
        family = sc.read_sidecar(path).get('family')
    except Exception as exc:  # noqa: BLE001 - a bad path or sidecar must never take the node down
        return _refuse(held, _reason(exc), shown, logger)
    models = [m for m in held if _model_family(m) == family]
    if not models:
        reason = (f"the artifact is for family '{family}' but {type(engine).__name__} holds no "
                  'such model')
        return _refuse(held, reason, shown, logger)
    return install_vision_engine(models[0], path, family, image_size=image_size, logger=logger)


def _model_family(model: nn.Module) -> Optional[str]:
    model_type = getattr(getattr(model, 'config', None), 'model_type', None)
    for family, types in vision_io.MODEL_TYPES.items():
        if model_type in types:
            return family
    return None


def _engine_models(engine: Any) -> List[nn.Module]:
    """Return the transformers models held by an engine object (itself, .model, members')."""
    found: List[nn.Module] = []
    candidates = [engine, getattr(engine, 'model', None)]
    for value in list(getattr(engine, '__dict__', {}).values()):
        candidates += [value, getattr(value, 'model', None)]
    for item in candidates:
        if isinstance(item, nn.Module) and all(item is not m for m in found):
            found.append(item)
    return found


def installed_backend(model: nn.Module) -> str:
    """Return the backend that ran the model's latest vision-encoder call (or will run it)."""
    encoder = vision_io.vision_owner(model).vision_encoder
    if isinstance(encoder, EngineVisionEncoder) and encoder.fallback_reason is None:
        return encoder.backend
    return BACKEND_PYTORCH


def runtime_fallback(engine: Any) -> Optional[str]:
    """Return why an installed engine's latest call ran in PyTorch; None if none fell back.

    ``engine`` is a model or a ROS-free engine holding models (tracker, concept, hybrid). An
    engine that installed fine can fall back later (engine error, input of another size): this
    is the live answer, where the ``BackendChoice`` of the install is the load-time one.
    """
    for model in _engine_models(engine):
        encoder = getattr(_owner_or_none(model), 'vision_encoder', None)
        if isinstance(encoder, EngineVisionEncoder) and encoder.fallback_reason:
            return encoder.fallback_reason
    return None


def _owner_or_none(model: nn.Module) -> Optional[nn.Module]:
    try:
        return vision_io.vision_owner(model)
    except ValueError:
        return None


def uninstall_vision_engine(model: nn.Module) -> bool:
    """Put the original PyTorch vision encoder back; return False if there is none."""
    owner = vision_io.vision_owner(model)
    encoder = owner.vision_encoder
    if not isinstance(encoder, EngineVisionEncoder) or encoder.pytorch_encoder is None:
        return False
    owner.vision_encoder = encoder.pytorch_encoder
    return True


def install_vision_engine(model: nn.Module, engine_path: Union[str, Path, None], family: str,
                          image_size: Optional[Tuple[int, int]] = None, logger: Any = None,
                          keep_pytorch_fallback: bool = True,
                          verify_atol: Optional[float] = None) -> BackendChoice:
    """Validate ``engine_path`` against the loaded model and swap it in; else keep PyTorch.

    ``image_size`` is the (height, width) the engine will be fed (default: the model's native
    processor size). With ``verify_atol`` the engine and PyTorch encode one random input and
    the engine is rejected when any output differs by more than that. Never raises for a bad
    artifact: the returned :class:`BackendChoice` says which backend runs and why.
    """
    if not engine_path or not str(engine_path).strip():
        return _refuse([model], 'no engine_path set', None, None)
    shown = str(engine_path)
    try:
        # Inside the try: expanduser raises for '~nosuchuser/...'.
        path = Path(engine_path).expanduser()
        shown = str(path)
        return _install(model, path, family, image_size, logger, keep_pytorch_fallback,
                        verify_atol)
    except Exception as exc:  # noqa: BLE001 - a bad artifact must never take the node down
        return _refuse([model], _reason(exc), shown, logger)


class _Reject(RuntimeError):
    pass


def _reason(exc: Exception) -> str:
    if isinstance(exc, (_Reject, sc.SidecarError)):
        return str(exc)
    return f'{type(exc).__name__}: {exc}'


def _refuse(models: Sequence[nn.Module], reason: str, path: Optional[str],
            logger: Any) -> BackendChoice:
    """Put the PyTorch encoder back in ``models``, log why and report the backend now running.

    An engine installed earlier is removed rather than kept: the caller asked to replace it,
    and a re-install refused for, say, a weights mismatch after the weights changed must not
    leave that earlier engine running unvalidated. Only an engine whose PyTorch encoder was
    released cannot be removed; the report then names it instead of claiming PyTorch.
    """
    kept = [encoder for encoder in map(_remove_engine, models) if encoder is not None]
    if not kept:
        if path is not None:
            _log(logger, 'error', f"not using vision engine '{path}': {reason}. Falling back to "
                 'the PyTorch vision encoder.')
        return BackendChoice(BACKEND_PYTORCH, reason, path)
    old = kept[0]
    reason += (f"; the previously installed {old.backend} engine '{old.engine_path}' keeps "
               'running (no PyTorch encoder to fall back to)')
    if path is not None:
        _log(logger, 'error', f"not using vision engine '{path}': {reason}.")
    return BackendChoice(old.backend, reason, old.engine_path)


def _remove_engine(model: nn.Module) -> Optional[EngineVisionEncoder]:
    """Uninstall the model's engine; return it when it must stay (no PyTorch encoder kept)."""
    owner = _owner_or_none(model)
    encoder = getattr(owner, 'vision_encoder', None)
    if not isinstance(encoder, EngineVisionEncoder):
        return None
    if encoder.pytorch_encoder is None:
        return encoder
    owner.vision_encoder = encoder.pytorch_encoder
    return None


def _install(model: nn.Module, path: Path, family: str, image_size: Optional[Tuple[int, int]],
             logger: Any, keep_fallback: bool, verify_atol: Optional[float]) -> BackendChoice:
    try:
        vision_io.check_family(model, family)
    except ValueError as exc:
        raise _Reject(str(exc)) from exc
    owner = vision_io.vision_owner(model)
    current = owner.vision_encoder
    wrapped = isinstance(current, EngineVisionEncoder)
    torch_encoder = current.pytorch_encoder if wrapped else current
    if torch_encoder is None:
        raise _Reject('the PyTorch encoder was released by an earlier install '
                      '(keep_pytorch_fallback=False): reload the model to install another engine')
    if not path.is_file():
        raise _Reject('file does not exist')
    suffix = path.suffix.lower()
    if suffix == '.onnx':
        backend, hash_key = BACKEND_ORT, 'onnx_sha256'
    elif suffix in ENGINE_SUFFIXES:
        backend, hash_key = BACKEND_TENSORRT, 'engine_sha256'
    else:
        raise _Reject(f"unknown artifact type '{suffix}': use .onnx or one of {ENGINE_SUFFIXES}")
    try:
        meta = sc.read_sidecar(path)
    except sc.SidecarError as exc:
        raise _Reject(str(exc)) from exc
    if sc.file_sha256(path) != meta.get(hash_key):
        raise _Reject(f'file hash does not match its sidecar {hash_key}: the file is corrupted, '
                      'truncated or was replaced after export/build')
    param = next(torch_encoder.parameters())
    device = param.device
    size = tuple(image_size) if image_size else vision_io.native_image_size(model, family)
    expected = {'family': family, 'part': 'vision', 'image_size': list(size)}
    if backend == BACKEND_TENSORRT:
        if device.type != 'cuda':
            raise _Reject(f'TensorRT engines need the model on CUDA, model is on {device}')
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise _Reject(f'the tensorrt Python package is not installed ({exc})') from exc
        expected['tensorrt_version'] = trt.__version__
        expected['gpu_name'] = torch.cuda.get_device_name(device)
    problems = sc.check_sidecar(meta, expected)
    weights = sc.weights_problem(meta, torch_encoder)
    if weights:
        problems.append(weights)
    if problems:
        raise _Reject('sidecar mismatch: ' + '; '.join(problems))
    runner_cls = TrtRunner if backend == BACKEND_TENSORRT else OrtRunner
    try:
        runner = runner_cls(path, device, logger)
    except Exception as exc:  # noqa: BLE001 - deserialisation errors come in many types
        raise _Reject(f'could not load the {backend} artifact: {exc}') from exc
    levels = vision_io.num_levels(torch_encoder, family)
    _check_runner_io(runner, meta, levels, size)
    wrapper = EngineVisionEncoder(runner, family, levels, backend,
                                  torch_encoder if keep_fallback else None, logger, str(path))
    if verify_atol is not None:
        diff = _max_abs_diff(wrapper, torch_encoder, size, device, param.dtype)
        if not diff <= verify_atol:
            raise _Reject(f'engine output differs from PyTorch by {diff:.3g} > verify_atol '
                          f'{verify_atol}')
    owner.vision_encoder = wrapper
    _log(logger, 'info', f"vision encoder runs on {backend} ({', '.join(runner.providers)}) "
         f"from '{path}'")
    return BackendChoice(backend, 'sidecar, file hash and engine I/O validated', str(path))


def _check_runner_io(runner: Any, meta: Dict[str, Any], levels: int,
                     size: Tuple[int, int]) -> None:
    names = vision_io.output_names(levels)
    # Compared as sets: outputs are consumed by name, and TensorRT may list them in any order.
    if runner.input_name != vision_io.INPUT_NAME or sorted(runner.output_names) != sorted(names):
        raise _Reject(f'artifact I/O names {runner.input_name} -> {runner.output_names} do not '
                      f'match the expected {vision_io.INPUT_NAME} -> {names}')
    if list(runner.input_shape) != [1, 3, *size]:
        raise _Reject(f'artifact input shape {runner.input_shape} != [1, 3, {size[0]}, '
                      f'{size[1]}]')
    declared = [o.get('name') for o in meta.get('outputs', [])]
    if declared != names:
        raise _Reject(f'sidecar lists outputs {declared}, expected {names}')


def _max_abs_diff(wrapper: EngineVisionEncoder, torch_encoder: nn.Module, size: Tuple[int, int],
                  device: torch.device, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, generator=generator).to(device=device, dtype=dtype)
    with torch.no_grad():
        got = wrapper(x)
        ref = torch_encoder(x, return_dict=True)
    pairs: List[Tuple[torch.Tensor, torch.Tensor]] = [(got.last_hidden_state,
                                                       ref.last_hidden_state)]
    pairs += list(zip(got.fpn_hidden_states, ref.fpn_hidden_states, strict=True))
    pairs += list(zip(got.fpn_position_encoding, ref.fpn_position_encoding,
                      strict=True))
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)


def _log(logger: Any, level: str, message: str) -> None:
    """Log through a python or rclpy logger (rclpy names warning ``warn`` in older releases)."""
    target = logger if logger is not None else _LOG
    method = getattr(target, level, None) or getattr(target, 'warn', None) or target.info
    method(message)
