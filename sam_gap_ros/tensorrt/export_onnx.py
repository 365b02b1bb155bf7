"""Export the vision encoders of SAM2 / SAM3 to ONNX with a JSON sidecar.

Usage (``ros2 run`` with ROS; ``python -m sam_gap_ros.tensorrt.export_onnx`` anywhere)::

    ros2 run sam_gap_ros sam-gap-export-onnx --model-dir DIR --family sam2|sam3 --parts vision
        [--height H --width W] --out OUT_DIR [--fp16] [--opset 17] [--no-verify]

Only the vision encoder is exported: it is the per-frame cost that dominates (SAM2.1-tiny
Hiera, SAM3 ~450M ViT). The SAM3 text encoder runs once per concept set and needs no engine;
SAM2 mask decoder / memory attention are not exported yet (their dynamic memory length needs a
fixed-size memory queue first). The graph uses the legacy TorchScript exporter at opset 17
(LayerNormalization op, which TensorRT maps to its normalisation layer).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
import warnings

import torch
from torch import nn

from sam_gap_ros.engines.loading import check_model_dir
from sam_gap_ros.engines.types import ModelLoadError
from sam_gap_ros.tensorrt import sidecar as sc
from sam_gap_ros.tensorrt import vision_io

DEFAULT_OPSET = 17
# Max abs difference tolerated between ONNX Runtime (CPU, fp32) and PyTorch fp32 outputs.
ORT_FP32_TOLERANCE = 1e-3
# Same with --fp16 (weights rounded to float16, relative error ~1e-3 per weight).
ORT_FP16_WEIGHTS_TOLERANCE = 5e-2
_NOT_EXPORTED = {
    'text': 'the SAM3 text encoder runs once per concept set; it needs no engine',
    'mask_decoder': 'not exported yet (runs per object on small tensors; vision dominates)',
    'memory_attention': 'not exported yet (needs a fixed-size memory queue for a static graph)',
}
_LOG = logging.getLogger(__name__)


def artifact_name(family: str, part: str, image_size: Tuple[int, int], fp16: bool) -> str:
    """Return the ONNX file name used for one exported part."""
    suffix = '_fp16' if fp16 else ''
    return f'{family}_{part}_{image_size[0]}x{image_size[1]}{suffix}.onnx'


def export_vision_onnx(model: nn.Module, family: str, out_dir: Union[str, Path],
                       image_size: Optional[Tuple[int, int]] = None, fp16: bool = False,
                       opset: int = DEFAULT_OPSET, verify: bool = True,
                       model_name: Optional[str] = None) -> Path:
    """Export the model's vision encoder to ONNX, write its sidecar and return the ONNX path.

    ``image_size`` defaults to the model's native processor size. With ``verify`` the graph is
    run once in ONNX Runtime (CPU) on a random input and the max abs difference to PyTorch is
    recorded in the sidecar (``verify_max_abs_diff``).
    """
    vision_io.check_family(model, family)
    encoder = vision_io.vision_owner(model).vision_encoder
    size = tuple(int(v) for v in (image_size or vision_io.native_image_size(model, family)))
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f'image_size must be (height, width) > 0, got {image_size}')
    problem = vision_io.input_size_problem(model, family, size)
    if problem:
        raise ValueError(problem)
    native = vision_io.native_image_size(model, family)
    if size != native:
        _LOG.warning('exporting at %s but the model/processor feed %s: the runtime will only '
                     'use this artifact for frames of exactly %s', size, native, size)
    levels = vision_io.num_levels(encoder, family)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / artifact_name(family, 'vision', size, fp16)

    weights_sha = sc.weights_hashes(encoder)
    device = next(encoder.parameters()).device
    export_module = encoder
    if next(encoder.parameters()).dtype != torch.float32:
        # Graphs are traced in float32: TensorRT picks reduced precision at build time.
        export_module = copy.deepcopy(encoder).float()
    wrapper = vision_io.VisionExportWrapper(export_module).eval()
    example = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    names = vision_io.output_names(levels)
    with torch.no_grad():
        reference = wrapper(example)
    with warnings.catch_warnings():
        # The tracer warns about python bools taken from shapes; shapes are static here.
        warnings.simplefilter('ignore')
        torch.onnx.export(wrapper, (example,), str(onnx_path), dynamo=False,
                          opset_version=opset, input_names=[vision_io.INPUT_NAME],
                          output_names=names, do_constant_folding=True)
    if fp16:
        store_weights_fp16(onnx_path)
    _check_graph_io(onnx_path, names)
    data: Dict[str, Any] = {
        'family': family,
        'part': 'vision',
        'model_id': model_name or sc.model_id(model),
        'model_type': model.config.model_type,
        'image_size': list(size),
        'dtype': 'float32',
        'weights_storage': 'float16' if fp16 else 'float32',
        'opset': opset,
        'weights_sha256': weights_sha,
        'weights_hash_scheme': sc.WEIGHTS_HASH_SCHEME,
        'inputs': [_io_entry(vision_io.INPUT_NAME, example)],
        'outputs': [_io_entry(name, t) for name, t in zip(names, reference, strict=True)],
        'onnx_file': onnx_path.name,
        'onnx_sha256': sc.file_sha256(onnx_path),
        'exporter': _versions(),
        'created_utc': sc.utc_now(),
    }
    if verify:
        data['verify_max_abs_diff'] = ort_max_abs_diff(onnx_path, example, reference, names)
    sc.write_sidecar(onnx_path, data)
    return onnx_path


def store_weights_fp16(onnx_path: Union[str, Path]) -> None:
    """Rewrite an fp32 ONNX file so its weights are stored in float16 (half the file size).

    Each float32 initializer becomes a float16 initializer followed by a Cast back to float32,
    so inputs, outputs and compute stay float32 (ONNX has no float16 Range, which the
    position encodings need); TensorRT folds the casts and picks precision at build time.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        if array.size and float(np.abs(array).max()) > float(np.finfo(np.float16).max):
            raise ValueError(f"weight '{init.name}' exceeds the float16 range: export in fp32")
        half_name = f'{init.name}__fp16'
        kept.append(numpy_helper.from_array(array.astype(np.float16), half_name))
        casts.append(onnx.helper.make_node('Cast', [half_name], [init.name],
                                           to=onnx.TensorProto.FLOAT,
                                           name=f'{init.name}__to_fp32'))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(onnx_path))


def ort_max_abs_diff(onnx_path: Union[str, Path], example: torch.Tensor,
                     reference: Sequence[torch.Tensor], names: List[str]) -> float:
    """Run the ONNX file in ONNX Runtime (CPU) and return its max abs diff to ``reference``."""
    from sam_gap_ros.tensorrt.runtime import ort_session

    session = ort_session(onnx_path)
    got = session.run(names, {vision_io.INPUT_NAME: example.detach().cpu().numpy()})
    return max(float((torch.from_numpy(g).float() - r.detach().cpu().float()).abs().max())
               for g, r in zip(got, reference, strict=True))


def _check_graph_io(onnx_path: Path, names: List[str]) -> None:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    got_in = [i.name for i in graph.input]
    got_out = [o.name for o in graph.output]
    if got_in != [vision_io.INPUT_NAME] or got_out != names:
        raise RuntimeError(f"exported graph '{onnx_path}' has inputs {got_in} / outputs "
                           f'{got_out}, expected [{vision_io.INPUT_NAME}] / {names}')


def _io_entry(name: str, tensor: torch.Tensor) -> Dict[str, Any]:
    return {'name': name, 'shape': list(tensor.shape), 'dtype': str(tensor.dtype).split('.')[-1]}


def _versions() -> Dict[str, str]:
    import onnx
    import transformers

    return {'torch': torch.__version__, 'transformers': transformers.__version__,
            'onnx': onnx.__version__, 'exporter': 'torch.onnx legacy (TorchScript)'}


def load_model(model_dir: Union[str, Path], family: str, device: str = 'cpu') -> nn.Module:
    """Load the transformers model of ``family`` from a local directory (safetensors only)."""
    if family == 'sam2':
        from transformers import Sam2VideoModel as model_cls
        types = ('sam2_video',)
    elif family == 'sam3':
        from transformers import Sam3Model as model_cls
        types = ('sam3', 'sam3_video')
    else:
        raise ValueError(f"unknown family '{family}': use one of {list(vision_io.FAMILIES)}")
    path = check_model_dir(model_dir, types)
    try:
        # float32: the sidecar's per-dtype weight hashes are exact casts of these values.
        model = model_cls.from_pretrained(str(path), local_files_only=True,
                                          use_safetensors=True, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - truncated safetensors, bad config fields, ...
        # Some of these messages span lines; the CLI prints one `error:` line.
        detail = ' '.join(str(exc).split())
        raise ModelLoadError(f"cannot load a {family} model from '{path}': "
                             f'{type(exc).__name__}: {detail}') from exc
    try:
        return model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:
        # torch raises AssertionError for CUDA on a build without it.
        raise ModelLoadError(f"cannot move the model to device '{device}': {exc}") from exc


def parse_parts(text: str) -> List[str]:
    """Split ``--parts`` and reject parts that are unknown or not exportable."""
    parts = [p.strip() for p in text.split(',') if p.strip()]
    if not parts:
        raise ValueError('--parts is empty: use --parts vision')
    for part in parts:
        if part in _NOT_EXPORTED:
            raise ValueError(f"part '{part}' is not exported: {_NOT_EXPORTED[part]}")
        if part not in vision_io.PARTS:
            raise ValueError(f"unknown part '{part}': exportable parts are "
                             f'{list(vision_io.PARTS)}')
    return parts


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``sam-gap-export-onnx``."""
    parser = argparse.ArgumentParser(prog='sam-gap-export-onnx',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--model-dir', required=True, help='local transformers model directory')
    parser.add_argument('--family', required=True, choices=vision_io.FAMILIES)
    parser.add_argument('--parts', default='vision', help='comma separated; only "vision" now')
    parser.add_argument('--height', type=int, help='input height (default: model native size)')
    parser.add_argument('--width', type=int, help='input width (default: model native size)')
    parser.add_argument('--out', required=True, help='output directory')
    parser.add_argument('--fp16', action='store_true',
                        help='store weights in float16 (half the file); compute precision is '
                             'chosen by sam-gap-build-engine --fp16')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET)
    parser.add_argument('--device', default='cpu', help='device used for tracing (cpu, cuda)')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the ONNX Runtime vs PyTorch comparison')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``sam-gap-export-onnx`` command line tool."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = build_parser().parse_args(argv)
    if (args.height is None) != (args.width is None):
        print('error: give both --height and --width, or neither', file=sys.stderr)
        return 2
    size = (args.height, args.width) if args.height is not None else None
    try:
        parts = parse_parts(args.parts)
        model = load_model(args.model_dir, args.family, args.device)
        for part in parts:
            path = export_vision_onnx(model, args.family, args.out, size, fp16=args.fp16,
                                      opset=args.opset, verify=not args.no_verify,
                                      model_name=str(args.model_dir))
            data = sc.read_sidecar(path)
            diff = data.get('verify_max_abs_diff')
            print(f'exported {part}: {path} (sidecar {sc.sidecar_path(path).name}, '
                  f'onnxruntime max abs diff {diff})')
            tolerance = ORT_FP16_WEIGHTS_TOLERANCE if args.fp16 else ORT_FP32_TOLERANCE
            if diff is not None and diff > tolerance:
                print(f'warning: max abs diff {diff:.3g} > {tolerance}: do not trust this '
                      'export', file=sys.stderr)
    except (ValueError, ModelLoadError, RuntimeError, OSError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
