"""The TensorRT/ONNX Runtime benchmark times the node's PyTorch path and prints its last line."""

import re

import pytest
import torch

from bench_script import load_benchmark


@pytest.fixture(scope='module')
def bench():
    return load_benchmark('bench_tensorrt')


def test_sam2_pytorch_side_is_the_trackers_encoder(bench):
    from sam_gap_ros.engines.sam2_tracker import _INFERENCE_SWAPS
    from sam_gap_ros.tensorrt import vision_io

    model = bench.build_model('sam2', 'tiny', '', torch.device('cpu'))
    stock = vision_io.vision_owner(model).vision_encoder
    timed = bench.pytorch_encoder(model, 'sam2')
    # Timed: the modules Sam2Tracker runs; exported: transformers' own, left untouched.
    assert any(type(m) in _INFERENCE_SWAPS.values() for m in timed.modules())
    assert not any(type(m) in _INFERENCE_SWAPS.values() for m in stock.modules())
    x = torch.randn(1, 3, *vision_io.native_image_size(model, 'sam2'))
    with torch.inference_mode():
        assert bench.max_abs_diff(bench.flat_outputs(timed(x)), bench.flat_outputs(stock(x))) == 0


def test_quick_run_prints_the_documented_last_line(bench, capsys):
    assert bench.main(['--quick']) == 0
    out = capsys.readouterr().out
    print(out)
    match = re.fullmatch(r'onnx_max_abs_diff=(\S+) speedup=(\S+) backend=(trt|ort)',
                         out.strip().splitlines()[-1])
    assert match is not None
    # ONNX Runtime runs the graph in fp32; on a GPU the benchmark times an fp16 TensorRT engine,
    # whose outputs (order of magnitude 1 on the tiny models) carry about three digits.
    tolerance = 1e-3 if match.group(3) == 'ort' else 5e-2
    assert float(match.group(1)) < tolerance and float(match.group(2)) > 0
