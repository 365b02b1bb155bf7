"""Build a TensorRT engine from an exported ONNX file, on the GPU that will run it.

Usage (``ros2 run`` with ROS; ``python -m sam_gap_ros.tensorrt.build_engine`` anywhere)::

    ros2 run sam_gap_ros sam-gap-build-engine --onnx sam2_vision_1024x1024.onnx
        --out sam2_vision.engine [--fp16 | --bf16] [--workspace-gb 4] [--no-fp32-norm]
        [--no-verify]

Engines are specific to the GPU model and TensorRT version: build on the robot itself (Jetson
Orin / RTX). The engine's sidecar copies the ONNX sidecar and adds TensorRT version, GPU name,
compute capability, precision and the engine file's hash; the runtime refuses the engine when
any of them differs from the machine it runs on. Uses the ``tensorrt`` Python API (>= 10), no
trtexec. TensorRT >= 11 builds fp16/bf16 only from a mixed-precision graph, made here with
NVIDIA ModelOpt AutoCast when it is installed.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
import sys
from typing import Any, Dict, Optional, Sequence, Union

from sam_gap_ros.tensorrt import sidecar as sc

PRECISIONS = ('fp32', 'fp16', 'bf16')
# Same as sam_gap_ros.tensorrt.runtime.ENGINE_SUFFIXES: the runtime refuses anything else.
ENGINE_SUFFIXES = ('.engine', '.plan', '.trt')


class BuildError(RuntimeError):
    """The engine could not be built (no tensorrt/CUDA, bad ONNX, builder failure)."""


def import_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module; raise BuildError with install hints."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError('the tensorrt Python package is not installed: on Jetson it comes '
                         'with JetPack (python3-libnvinfer), on x86 `pip install tensorrt` '
                         f'matching the CUDA version ({exc})') from exc
    problem = precision_problem(trt.__version__, 'fp32')  # the version alone
    if problem:
        raise BuildError(problem)
    return trt


def _major(version: str) -> int:
    return int(version.split('.')[0])


_NO_AUTOCAST = ('TensorRT >= 11 has no fp16/bf16 builder flags: install NVIDIA ModelOpt '
                '(pip install nvidia-modelopt[onnx]) to convert the graph to mixed precision, '
                'or use TensorRT 10.x')


def precision_problem(trt_version: str, precision: str) -> Optional[str]:
    """Return why TensorRT ``trt_version`` cannot build a ``precision`` engine here, or None.

    TensorRT >= 11 builds fp16/bf16 only with NVIDIA ModelOpt AutoCast installed; tests and
    benchmarks ask first instead of failing minutes into a build.
    """
    major = _major(trt_version)
    if major < 10:
        return f'TensorRT {trt_version} found, >= 10 required'
    if major >= 11 and precision != 'fp32' and not _have_autocast():
        return f'TensorRT {trt_version} found. {_NO_AUTOCAST}'
    return None


def _have_autocast() -> bool:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision  # noqa: F401
    except ImportError:
        return False
    return True


def check_build_args(onnx_path: Union[str, Path], engine_path: Union[str, Path],
                     workspace_gb: float) -> None:
    """Raise BuildError for an output path or workspace size that would break the build."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if _same_file(onnx_path, engine_path):
        raise BuildError(f"--out '{engine_path}' is the --onnx file: the engine would overwrite "
                         'it and its sidecar')
    if engine_path.suffix.lower() not in ENGINE_SUFFIXES:
        raise BuildError(f"--out '{engine_path}' must end in one of {list(ENGINE_SUFFIXES)}: the "
                         'runtime picks the backend by suffix and refuses other files')
    if not (math.isfinite(workspace_gb) and workspace_gb > 0):
        raise BuildError(f'--workspace-gb must be a finite number > 0, got {workspace_gb}')


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # also catches hard links
        return a.resolve() == b.resolve()  # symlinks, '..', relative vs absolute
    except OSError:  # unreadable directory: compare the spelled-out paths
        return os.path.abspath(a) == os.path.abspath(b)


def build_engine(onnx_path: Union[str, Path], engine_path: Union[str, Path],
                 precision: str = 'fp16', workspace_gb: float = 4.0,
                 fp32_norm: bool = True, verify: bool = True) -> Path:
    """Build ``engine_path`` from ``onnx_path``, write its sidecar and return the engine path.

    With ``fp32_norm`` the normalisation layers stay in float32 when building fp16/bf16
    engines (a known fp16 accuracy trap of transformer encoders). TensorRT 10 uses builder
    precision flags; TensorRT >= 11 (strong typing only) needs NVIDIA ModelOpt AutoCast to
    write a mixed-precision copy of the graph (``<engine>.<precision>.onnx``) first. With
    ``verify`` the engine and ONNX Runtime (CPU) encode one random input and the differences
    go to the sidecar.
    """
    import torch

    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision '{precision}': use one of {list(PRECISIONS)}")
    check_build_args(onnx_path, engine_path, workspace_gb)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    try:
        meta = sc.read_sidecar(onnx_path)
    except sc.SidecarError as exc:
        raise BuildError(str(exc)) from exc
    if sc.file_sha256(onnx_path) != meta.get('onnx_sha256'):
        raise BuildError(f"'{onnx_path}' does not match its sidecar hash: re-export it")
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BuildError('no CUDA device: TensorRT engines must be built on the target GPU')
    problem = precision_problem(trt.__version__, precision)
    if problem:
        raise BuildError(problem)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # TensorRT >= 11 only builds strongly typed networks (no fp16/bf16 builder flags): the
    # precision has to be in the ONNX graph itself, converted with ModelOpt AutoCast.
    strongly_typed = _major(trt.__version__) >= 11
    parse_path = onnx_path
    if precision != 'fp32' and strongly_typed:
        parse_path = _autocast(onnx_path, engine_path, precision, fp32_norm)
    if not parser.parse_from_file(str(parse_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse '{parse_path}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision != 'fp32' and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16 if precision == 'fp16' else trt.BuilderFlag.BF16)
        if fp32_norm:
            _pin_normalisation_fp32(trt, network, config)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError('TensorRT builder failed (see the TensorRT log above)')
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    major, minor = torch.cuda.get_device_capability()
    data: Dict[str, Any] = {k: v for k, v in meta.items()
                            if k not in ('format', 'format_version', 'created_utc')}
    data.update({
        'engine_file': engine_path.name,
        'engine_sha256': sc.file_sha256(engine_path),
        'tensorrt_version': trt.__version__,
        'gpu_name': torch.cuda.get_device_name(),
        'compute_capability': f'{major}.{minor}',
        'precision': precision,
        'fp32_normalisation': bool(fp32_norm and precision != 'fp32'),
        'workspace_gb': workspace_gb,
        'built_utc': sc.utc_now(),
    })
    if verify:
        data.update(verify_against_onnx(engine_path, onnx_path))
    sc.write_sidecar(engine_path, data)
    return engine_path


def _autocast(onnx_path: Path, engine_path: Path, precision: str, fp32_norm: bool) -> Path:
    """Write a mixed-precision copy of the ONNX graph (TensorRT >= 11) and return its path."""
    out = engine_path.with_name(f'{engine_path.stem}.{precision}.onnx')
    if _same_file(out, onnx_path):
        raise BuildError(f"the mixed-precision copy '{out}' would overwrite --onnx: rename --out")
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise BuildError(f'{_NO_AUTOCAST} ({exc})') from exc
    import onnx

    model = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type=precision, keep_io_types=True,
        op_types_to_exclude=['LayerNormalization'] if fp32_norm else None)
    onnx.save(model, str(out))
    return out


def _pin_normalisation_fp32(trt: Any, network: Any, config: Any) -> None:
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)


def verify_against_onnx(engine_path: Path, onnx_path: Path) -> Dict[str, float]:
    """Encode one random input with the engine and ONNX Runtime (CPU); return the differences."""
    import torch

    from sam_gap_ros.tensorrt.runtime import ort_session, TrtRunner

    runner = TrtRunner(engine_path, torch.device('cuda'))
    x = torch.randn(runner.input_shape, generator=torch.Generator().manual_seed(0))
    session = ort_session(onnx_path)
    ref = session.run(runner.output_names, {runner.input_name: x.numpy()})
    got = runner(x.cuda())
    torch.cuda.synchronize()
    abs_diff, rel_diff = 0.0, 0.0
    for name, want in zip(runner.output_names, ref, strict=True):
        want_t = torch.from_numpy(want).float()
        diff = float((got[name].float().cpu() - want_t).abs().max())
        abs_diff = max(abs_diff, diff)
        rel_diff = max(rel_diff, diff / max(float(want_t.abs().max()), 1e-6))
    return {'verify_max_abs_diff_vs_onnx': abs_diff, 'verify_max_rel_diff_vs_onnx': rel_diff}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``sam-gap-build-engine``."""
    parser = argparse.ArgumentParser(prog='sam-gap-build-engine',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--onnx', required=True, help='ONNX file from sam-gap-export-onnx')
    parser.add_argument('--out', required=True, help='engine file to write (e.g. vision.engine)')
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--fp16', action='store_true', help='allow float16 kernels')
    group.add_argument('--bf16', action='store_true', help='allow bfloat16 kernels')
    parser.add_argument('--workspace-gb', type=float, default=4.0)
    parser.add_argument('--no-fp32-norm', action='store_true',
                        help='let TensorRT run normalisation layers in fp16/bf16 too')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the engine vs ONNX Runtime comparison')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``sam-gap-build-engine`` command line tool."""
    args = build_parser().parse_args(argv)
    precision = 'fp16' if args.fp16 else 'bf16' if args.bf16 else 'fp32'
    try:
        # Before the (minutes long) build, and before anything is written.
        check_build_args(args.onnx, args.out, args.workspace_gb)
    except BuildError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    try:
        path = build_engine(args.onnx, args.out, precision, args.workspace_gb,
                            fp32_norm=not args.no_fp32_norm, verify=not args.no_verify)
    except (BuildError, OSError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    data = sc.read_sidecar(path)
    print(f"built {path} ({precision}, TensorRT {data['tensorrt_version']}, {data['gpu_name']}); "
          f"max rel diff vs ONNX {data.get('verify_max_rel_diff_vs_onnx')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
