"""Per-frame vision-encoder latency: PyTorch vs TensorRT (GPU) or ONNX Runtime (CPU).

GPU (CUDA + tensorrt importable): PyTorch fp32, PyTorch bf16 and fp16, TensorRT fp16 engine
built here from the exported ONNX, same inputs, same run. The PyTorch rows time the encoder
as the package runs it when no engine replaces it: for SAM2 with ``Sam2Tracker``'s inference
modules (``use_inference_modules``: same outputs, less work than transformers' stock
modules), so the speed-ups are over the node's own PyTorch path. ``--arch full`` (default on GPU)
uses randomly initialised full-size architectures at native resolution: SAM2.1-hiera-tiny at
1024 px and the SAM3 ViT backbone at 1008 px (latency does not depend on the weight values;
pass ``--sam2-dir`` / ``--sam3-dir`` for real checkpoints and meaningful accuracy figures).

Without a GPU it prints ``no GPU`` and compares PyTorch fp32 with ONNX Runtime on CPU, by
default on the tiny test architectures. The LAST line is always::

    onnx_max_abs_diff=<float> speedup=<float> backend=<trt|ort>

with the worst (largest) max abs diff of the accelerated backend vs PyTorch fp32 over all
outputs and families, and the smallest speed-up (PyTorch fp32 / accelerated) over families.

    python benchmarks/bench_tensorrt.py --quick          # < 60 s on 2 CPU cores
    python benchmarks/bench_tensorrt.py --arch full      # on the robot / workstation GPU
"""

import argparse
import copy
import math
from pathlib import Path
import statistics
import sys
import tempfile
import time

import torch

try:
    import sam_gap_ros  # noqa: F401
except ImportError:  # run from a source checkout without `colcon build` / sourcing install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam_gap_ros.tensorrt import export_onnx, vision_io  # noqa: E402
from sam_gap_ros.tensorrt.runtime import OrtRunner, TrtRunner  # noqa: E402


def pytorch_encoder(model, family):
    """Return the vision encoder the package runs in PyTorch (a copy for SAM2).

    ``Sam2Tracker`` switches the image encoder to its inference modules; timing the stock
    transformers encoder instead made the SAM2 speed-ups 1.6x too high with the tiny
    model and 1.16x at 256 px (CPU, one thread). The copy leaves the exported model stock,
    as ``export_onnx`` exports it.
    """
    encoder = vision_io.vision_owner(model).vision_encoder
    if family != 'sam2':
        return encoder  # Sam3ConceptEngine runs transformers' modules unchanged
    from sam_gap_ros.engines.sam2_tracker import use_inference_modules
    return use_inference_modules(copy.deepcopy(encoder))


def build_model(family, arch, model_dir, device):
    """Return an eval-mode transformers model of ``family`` on ``device``."""
    if model_dir:
        return export_onnx.load_model(model_dir, family, device)
    if arch == 'full':
        # SAM2.1-hiera-tiny at 1024 px / SAM3 at 1008 px, seeded on the CPU as before.
        from full_size_models import build_full_size
        model = build_full_size(family, 'cpu', seed=0)
    elif family == 'sam2':
        from sam_gap_ros.engines.tiny_sam2 import build_tiny_sam2
        model = build_tiny_sam2(seed=0)
    else:
        from sam_gap_ros.engines.tiny_sam3 import build_tiny_sam3
        model = build_tiny_sam3(seed=0)
    return model.to(device).eval()


def time_call(fn, iters, warmup, cuda):
    """Return the median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def flat_outputs(out):
    """Return an encoder output as the exported tensor list (graph order)."""
    return [out.last_hidden_state, *out.fpn_hidden_states, *out.fpn_position_encoding]


def max_abs_diff(got, want):
    """Return the max abs difference between two tensor lists, in float32."""
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))


def _bench_reduced(name, encoder, x, dtype, reference, args):
    """Time a reduced-precision copy of ``encoder`` (the fp32 original stays untouched)."""
    half = copy.deepcopy(encoder).to(dtype)
    xh = x.to(dtype)
    diff = max_abs_diff(flat_outputs(half(xh)), reference)
    return name, time_call(lambda: half(xh), args.iters, args.warmup, True), diff


def bench_family(family, args, device, use_trt, workdir):
    """Benchmark one family; return (max abs diff, speed-up, printed rows)."""
    model = build_model(family, args.arch, getattr(args, f'{family}_dir'), device)
    encoder = vision_io.vision_owner(model).vision_encoder
    timed_encoder = pytorch_encoder(model, family)
    height, width = vision_io.native_image_size(model, family)
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == 'cuda'
    rows = []
    with torch.inference_mode():
        reference = flat_outputs(encoder(x))
        t_fp32 = time_call(lambda: timed_encoder(x), args.iters, args.warmup, cuda)
        rows.append(('pytorch fp32', t_fp32, max_abs_diff(flat_outputs(timed_encoder(x)),
                                                          reference)))
        if cuda:
            for name, dtype in (('pytorch bf16', torch.bfloat16), ('pytorch fp16', torch.float16)):
                rows.append(_bench_reduced(name, timed_encoder, x, dtype, reference, args))
    onnx_path = export_onnx.export_vision_onnx(model, family, workdir, verify=False)
    if use_trt:
        from sam_gap_ros.tensorrt.build_engine import build_engine
        engine = build_engine(onnx_path, Path(workdir) / f'{family}_vision.engine', 'fp16',
                              args.workspace_gb, verify=False)
        runner, label = TrtRunner(engine, device), 'tensorrt fp16'
    else:
        runner = OrtRunner(onnx_path, device, threads=args.threads)
        label = 'onnxruntime fp32'
    with torch.inference_mode():
        named = runner(x)
        # By name in graph order: TensorRT may list its outputs in another order.
        names = vision_io.output_names(vision_io.num_levels(encoder, family))
        got = [named[n] for n in names]
        diff = max_abs_diff(got, reference)
        t_acc = time_call(lambda: runner(x), args.iters, args.warmup, cuda)
    rows.append((label, t_acc, diff))
    print(f'\n{family} vision encoder {height}x{width} ({args.arch} arch, {device}, '
          f'{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params)')
    print(f'  {"backend":<18} {"median ms":>10} {"vs fp32":>8} {"max abs diff":>13}')
    for name, ms, err in rows:
        print(f'  {name:<18} {ms:>10.2f} {t_fp32 / ms:>7.2f}x {err:>13.3g}')
    return diff, t_fp32 / t_acc


def tensorrt_available():
    """Return True when CUDA and the tensorrt package are both present."""
    if not torch.cuda.is_available():
        return False
    try:
        import tensorrt
    except ImportError:
        print('CUDA found but the tensorrt package is not installed: ONNX Runtime comparison')
        return False
    from sam_gap_ros.tensorrt.build_engine import precision_problem
    # The GPU rows time an fp16 engine: TensorRT >= 11 cannot build one without ModelOpt.
    problem = precision_problem(tensorrt.__version__, 'fp16')
    if problem:
        print(f'CUDA found but {problem}: ONNX Runtime comparison')
        return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='tiny models, few iterations')
    parser.add_argument('--families', default='sam2,sam3')
    parser.add_argument('--arch', choices=('tiny', 'full'), default=None,
                        help='random-weight architecture (default: full on GPU, tiny on CPU)')
    parser.add_argument('--sam2-dir', default='', help='real SAM2 checkpoint directory')
    parser.add_argument('--sam3-dir', default='', help='real SAM3 checkpoint directory')
    parser.add_argument('--iters', type=int, default=None)
    parser.add_argument('--warmup', type=int, default=None)
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (torch and ORT)')
    parser.add_argument('--workspace-gb', type=float, default=4.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_trt = tensorrt_available()
    if not torch.cuda.is_available():
        print('no GPU: comparing PyTorch fp32 with ONNX Runtime on CPU')
    device = torch.device('cuda' if use_trt else 'cpu')
    if args.arch is None:
        args.arch = 'full' if use_trt and not args.quick else 'tiny'
    args.iters = args.iters or (10 if args.quick else 50)
    args.warmup = args.warmup or (2 if args.quick else 10)
    diffs, speedups = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for family in [f.strip() for f in args.families.split(',') if f.strip()]:
            diff, speedup = bench_family(family, args, device, use_trt, workdir)
            diffs.append(diff)
            speedups.append(speedup)
    if not diffs or any(math.isnan(d) for d in diffs):
        print('error: nothing measured or NaN outputs', file=sys.stderr)
        return 1
    backend = 'trt' if use_trt else 'ort'
    print(f'onnx_max_abs_diff={max(diffs):.6g} speedup={min(speedups):.3f} backend={backend}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
