"""TensorRT engine build + run on tiny models: needs CUDA and the tensorrt package.

Skipped with the reason on machines without them (CI is CPU-only); run on the robot or a
GPU workstation to check a TensorRT installation end to end.
"""

import copy
import time

import pytest
import torch

from sam_gap_ros.engines.tiny_sam2 import build_tiny_sam2
from sam_gap_ros.tensorrt import export_onnx, sidecar, vision_io
from sam_gap_ros.tensorrt.build_engine import (build_engine, BuildError, main as build_main,
                                               precision_problem)
from sam_gap_ros.tensorrt.runtime import (BACKEND_TENSORRT, install_vision_engine,
                                          installed_backend)

# TensorRT fp16 vs PyTorch fp32, relative to each output's max magnitude (tiny random models).
FP16_REL_TOL = 2e-2


def _tensorrt_or_reason():
    if not torch.cuda.is_available():
        return 'no CUDA device'
    try:
        import tensorrt
    except ImportError:
        return 'the tensorrt Python package is not installed'
    # JetPack 5 and 6.0 ship TensorRT 8.x, which build_engine refuses.
    return precision_problem(tensorrt.__version__, 'fp32')


def _fp16_reason():
    if REASON is not None:
        return REASON
    import tensorrt
    return precision_problem(tensorrt.__version__, 'fp16')


REASON = _tensorrt_or_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f'TensorRT test: {REASON}')
# TensorRT >= 11 builds fp16 engines only with ModelOpt installed.
FP16_REASON = _fp16_reason()
needs_fp16 = pytest.mark.skipif(FP16_REASON is not None,
                                reason=f'TensorRT fp16 test: {FP16_REASON}')


def _model(family):
    if family == 'sam2':
        return build_tiny_sam2(seed=0).cuda()
    from sam_gap_ros.engines.tiny_sam3 import build_tiny_sam3
    return build_tiny_sam3(seed=0).cuda()


@pytest.mark.skipif(REASON is None, reason='tensorrt and CUDA are present')
def test_build_without_tensorrt_fails_clearly(tmp_path, capsys):
    onnx_path = export_onnx.export_vision_onnx(build_tiny_sam2(seed=0), 'sam2', tmp_path,
                                               verify=False)
    with pytest.raises(BuildError, match='(?i)tensorrt|CUDA'):
        build_engine(onnx_path, tmp_path / 'v.engine')
    assert build_main(['--onnx', str(onnx_path), '--out', str(tmp_path / 'v.engine'),
                       '--fp16']) == 1
    assert 'error:' in capsys.readouterr().err


@needs_fp16
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
    # fp32: the version check is the subject, not the precision (no ModelOpt needed).
    engine = build_engine(onnx_path, tmp_path / 'v.engine', 'fp32', workspace_gb=1,
                          verify=False)
    meta = sidecar.read_sidecar(engine)
    meta['tensorrt_version'] = '8.6.1'
    sidecar.write_sidecar(engine, {k: v for k, v in meta.items() if k != 'format'})
    choice = install_vision_engine(model, engine, 'sam2')
    assert choice.backend == 'pytorch' and 'tensorrt_version' in choice.reason


def _max_rel(got, want):
    pairs = [(got.last_hidden_state, want.last_hidden_state)]
    pairs += list(zip(got.fpn_hidden_states, want.fpn_hidden_states, strict=True))
    return max(float((a.float() - b.float()).abs().max()) / max(float(b.abs().max()), 1e-6)
               for a, b in pairs)


@needs_fp16
def test_fp16_engine_serves_a_bf16_model_called_on_a_side_stream(tmp_path):
    """Outputs come back in the model's bf16; the engine waits for the caller's stream."""
    model = _model('sam2')
    reference = copy.deepcopy(vision_io.vision_owner(model).vision_encoder)
    onnx_path = export_onnx.export_vision_onnx(model, 'sam2', tmp_path, verify=False)
    engine = build_engine(onnx_path, tmp_path / 'v.engine', 'fp16', workspace_gb=1,
                          verify=False)
    model = model.to(torch.bfloat16)
    choice = install_vision_engine(model, engine, 'sam2')
    assert choice.backend == BACKEND_TENSORRT, choice
    height, width = sidecar.read_sidecar(engine)['image_size']
    side = torch.cuda.Stream()
    with torch.no_grad():
        x = torch.randn(1, 3, height, width, device='cuda').to(torch.bfloat16)
        want = reference(x.float())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            got = vision_io.vision_owner(model).vision_encoder(x)
        torch.cuda.current_stream().wait_stream(side)
    assert got.last_hidden_state.dtype == torch.bfloat16
    assert installed_backend(model) == BACKEND_TENSORRT
    assert _max_rel(got, want) < FP16_REL_TOL


@needs_trt
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA devices')
def test_engine_on_the_second_gpu_runs_while_the_first_is_current(tmp_path):
    with torch.cuda.device(1):
        # The builder and the sidecar's gpu_name both use the current device.
        model = build_tiny_sam2(seed=0).to('cuda:1')
        onnx_path = export_onnx.export_vision_onnx(model, 'sam2', tmp_path, verify=False)
        engine = build_engine(onnx_path, tmp_path / 'v.engine', 'fp32', workspace_gb=1)
    reference = copy.deepcopy(vision_io.vision_owner(model).vision_encoder)
    choice = install_vision_engine(model, engine, 'sam2')
    assert choice.backend == BACKEND_TENSORRT, choice
    assert torch.cuda.current_device() == 0
    height, width = sidecar.read_sidecar(engine)['image_size']
    with torch.no_grad():
        x = torch.randn(1, 3, height, width, device='cuda:1')
        want = reference(x)
        got = vision_io.vision_owner(model).vision_encoder(x)
    assert got.last_hidden_state.device == x.device
    assert installed_backend(model) == BACKEND_TENSORRT
    # fp32 engine, but TensorRT (like cuDNN) may use TF32 on Ampere and newer.
    assert _max_rel(got, want) < FP16_REL_TOL
