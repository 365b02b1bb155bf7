"""TensorRT engine build + run on tiny models: needs CUDA and the tensorrt package.

Skipped with the reason on machines without them (CI is CPU-only); run on the robot or a
GPU workstation to check a TensorRT installation end to end.
"""

import time

import pytest
import torch

from sam_gap_ros.engines.tiny_sam2 import build_tiny_sam2
from sam_gap_ros.tensorrt import export_onnx, sidecar, vision_io
from sam_gap_ros.tensorrt.build_engine import build_engine, BuildError, main as build_main
from sam_gap_ros.tensorrt.runtime import (BACKEND_TENSORRT, install_vision_engine,
                                          installed_backend)

# TensorRT fp16 vs PyTorch fp32, relative to each output's max magnitude (tiny random models).
FP16_REL_TOL = 2e-2


def _tensorrt_or_reason():
    if not torch.cuda.is_available():
        return 'no CUDA device'
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return 'the tensorrt Python package is not installed'
    return None


REASON = _tensorrt_or_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f'TensorRT test: {REASON}')


def _model(family):
    if family == 'sam2':
        return build_tiny_sam2(seed=0).cuda()
    from sam_gap_ros.engines.tiny_sam3 import build_tiny_sam3
    return build_tiny_sam3(seed=0).cuda()


@pytest.mark.skipif(REASON is None, reason='tensorrt and CUDA are present')
def test_build_without_tensorrt_fails_clearly(tmp_path, capsys):
    onnx_path = export_onnx.export_vision_onnx(build_tiny_sam2(seed=0), 'sam2', tmp_path,
                                               verify=False)
    with pytest.raises(BuildError, match='tensorrt|CUDA'):
        build_engine(onnx_path, tmp_path / 'v.engine')
    assert build_main(['--onnx', str(onnx_path), '--out', str(tmp_path / 'v.engine'),
                       '--fp16']) == 1
    assert 'error:' in capsys.readouterr().err


@needs_trt
@pytest.mark.parametrize('family', ['sam2', 'sam3'])
def test_fp16_engine_matches_pytorch_and_is_used(family, tmp_path):
    model = _model(family)
    encoder = vision_io.vision_owner(model).vision_encoder
    onnx_path = export_onnx.export_vision_onnx(model, family, tmp_path)
    engine = build_engine(onnx_path, tmp_path / f'{family}.engine', 'fp16', workspace_gb=1)
    meta = sidecar.read_sidecar(engine)
    assert meta['precision'] == 'fp16' and meta['gpu_name'] == torch.cuda.get_device_name()
    assert meta['verify_max_rel_diff_vs_onnx'] < FP16_REL_TOL

    height, width = meta['image_size']
    x = torch.randn(1, 3, height, width, device='cuda')
    with torch.no_grad():
        want = encoder(x)
        choice = install_vision_engine(model, engine, family)
        assert choice.backend == BACKEND_TENSORRT, choice
        got = vision_io.vision_owner(model).vision_encoder(x)
        torch.cuda.synchronize()
        pairs = list(zip(got.fpn_hidden_states, want.fpn_hidden_states, strict=True))
        pairs.append((got.last_hidden_state, want.last_hidden_state))
        for a, b in pairs:
            assert a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
            rel = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
            assert rel < FP16_REL_TOL
        start = time.perf_counter()
        for _ in range(10):
            vision_io.vision_owner(model).vision_encoder(x)
        torch.cuda.synchronize()
        print(f'{family} tiny TensorRT fp16: {(time.perf_counter() - start) * 100:.2f} ms')
    assert installed_backend(model) == BACKEND_TENSORRT


@needs_trt
def test_engine_from_other_trt_version_falls_back(tmp_path):
    model = _model('sam2')
    onnx_path = export_onnx.export_vision_onnx(model, 'sam2', tmp_path, verify=False)
    engine = build_engine(onnx_path, tmp_path / 'v.engine', 'fp16', workspace_gb=1,
                          verify=False)
    meta = sidecar.read_sidecar(engine)
    meta['tensorrt_version'] = '8.6.1'
    sidecar.write_sidecar(engine, {k: v for k, v in meta.items() if k != 'format'})
    choice = install_vision_engine(model, engine, 'sam2')
    assert choice.backend == 'pytorch' and 'tensorrt_version' in choice.reason
