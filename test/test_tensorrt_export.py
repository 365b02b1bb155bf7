"""ONNX export of the tiny SAM2 / SAM3 vision encoders, checked with ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest
import torch

from sam_gap_ros.engines.tiny_sam2 import build_tiny_sam2, save_tiny_sam2
from sam_gap_ros.tensorrt import build_engine, export_onnx, sidecar, vision_io
from sam_gap_ros.tensorrt.runtime import ort_session

# ONNX Runtime fp32 vs PyTorch fp32 on the same input; observed ~1e-6 on the tiny models.
FP32_ATOL = 1e-4


@pytest.fixture(scope='module')
def sam2_model():
    torch.set_num_threads(1)
    return build_tiny_sam2(seed=0)


@pytest.fixture(scope='module')
def sam3_model():
    from sam_gap_ros.engines.tiny_sam3 import build_tiny_sam3
    torch.set_num_threads(1)
    return build_tiny_sam3(seed=0)


def _compare_with_ort(model, family, onnx_path, seed=1):
    """Return max abs diff between ORT and PyTorch on a fresh input, per output name."""
    meta = sidecar.read_sidecar(onnx_path)
    height, width = meta['image_size']
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    encoder = vision_io.vision_owner(model).vision_encoder
    with torch.no_grad():
        ref = vision_io.VisionExportWrapper(encoder)(x)
    names = [o['name'] for o in meta['outputs']]
    got = ort_session(onnx_path).run(names, {'pixel_values': x.numpy()})
    return {n: float(np.abs(g - r.numpy()).max()) for n, g, r in zip(names, got, ref, strict=True)}


@pytest.mark.parametrize('family', ['sam2', 'sam3'])
def test_vision_export_matches_pytorch(family, request, tmp_path):
    model = request.getfixturevalue(f'{family}_model')
    path = export_onnx.export_vision_onnx(model, family, tmp_path)
    levels = vision_io.num_levels(vision_io.vision_owner(model).vision_encoder, family)
    assert levels == (3 if family == 'sam2' else 4)

    # Fixed, documented I/O names in graph order.
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ['pixel_values']
    assert [o.name for o in graph.output] == vision_io.output_names(levels)

    diffs = _compare_with_ort(model, family, path)
    assert max(diffs.values()) < FP32_ATOL, diffs

    meta = sidecar.read_sidecar(path)
    size = list(vision_io.native_image_size(model, family))
    assert meta['family'] == family and meta['part'] == 'vision'
    assert meta['image_size'] == size
    assert meta['opset'] == 17 and meta['dtype'] == 'float32'
    encoder = vision_io.vision_owner(model).vision_encoder
    assert meta['weights_sha256'] == sidecar.weights_hashes(encoder)
    assert meta['weights_hash_scheme'] == sidecar.WEIGHTS_HASH_SCHEME
    assert meta['onnx_sha256'] == sidecar.file_sha256(path)
    assert meta['inputs'] == [{'name': 'pixel_values', 'shape': [1, 3, *size],
                               'dtype': 'float32'}]
    assert meta['verify_max_abs_diff'] < FP32_ATOL


def test_sam2_outputs_rebuild_the_transformers_structure(sam2_model, tmp_path):
    """Packed engine outputs must equal what Sam2VideoModel.get_image_features consumes."""
    path = export_onnx.export_vision_onnx(sam2_model, 'sam2', tmp_path, verify=False)
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    names = vision_io.output_names(3)
    arrays = ort_session(path).run(names, {'pixel_values': x.numpy()})
    named = dict(zip(names, map(torch.from_numpy, arrays), strict=True))
    packed = vision_io.pack_outputs('sam2', named, 3)
    with torch.no_grad():
        ref = sam2_model.vision_encoder(x, return_dict=True)
    assert type(packed) is type(ref)
    for got, want in zip(packed.fpn_hidden_states + packed.fpn_position_encoding,
                         ref.fpn_hidden_states + ref.fpn_position_encoding, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)
    # Feature maps are ordered high to low resolution, as the SAM heads expect.
    sizes = [f.shape[-1] for f in packed.fpn_hidden_states]
    assert sizes == sorted(sizes, reverse=True)


def test_fp16_weight_storage_halves_file_and_stays_close(sam2_model, tmp_path):
    fp32 = export_onnx.export_vision_onnx(sam2_model, 'sam2', tmp_path / 'a', verify=False)
    fp16 = export_onnx.export_vision_onnx(sam2_model, 'sam2', tmp_path / 'b', fp16=True)
    assert fp16.name.endswith('_fp16.onnx')
    assert fp16.stat().st_size < 0.75 * fp32.stat().st_size
    meta = sidecar.read_sidecar(fp16)
    assert meta['weights_storage'] == 'float16' and meta['dtype'] == 'float32'
    diffs = _compare_with_ort(sam2_model, 'sam2', fp16)
    assert 0 < max(diffs.values()) < export_onnx.ORT_FP16_WEIGHTS_TOLERANCE, diffs


def test_cli_exports_from_model_directory(tmp_path, capsys):
    model_dir = save_tiny_sam2(tmp_path / 'model', seed=4)
    rc = export_onnx.main(['--model-dir', str(model_dir), '--family', 'sam2',
                           '--parts', 'vision', '--height', '128', '--width', '128',
                           '--out', str(tmp_path / 'out')])
    assert rc == 0, capsys.readouterr().err
    path = tmp_path / 'out' / 'sam2_vision_128x128.onnx'
    data = json.loads(sidecar.sidecar_path(path).read_text())
    assert data['model_id'] == str(model_dir)
    assert data['verify_max_abs_diff'] < FP32_ATOL
    # The hash written by the CLI is the hash of the weights as loaded from the directory.
    loaded = export_onnx.load_model(model_dir, 'sam2')
    assert data['weights_sha256'] == sidecar.weights_hashes(loaded.vision_encoder)
    # The robot may load the same checkpoint in another dtype: transformers' own cast must
    # produce exactly the weights the sidecar hashed for that dtype.
    from transformers import Sam2VideoModel
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        robot = Sam2VideoModel.from_pretrained(str(model_dir), dtype=dtype)
        assert sidecar.weights_problem(data, robot.vision_encoder) is None, dtype


@pytest.mark.parametrize('argv, message', [
    (['--parts', 'text'], 'once per concept set'),
    (['--parts', 'memory_attention'], 'not exported'),
    (['--parts', 'bogus'], 'unknown part'),
    (['--height', '128'], 'both --height and --width'),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    base = ['--model-dir', str(tmp_path / 'missing'), '--family', 'sam2', '--out', str(tmp_path)]
    assert export_onnx.main(base + argv) != 0
    assert message in capsys.readouterr().err


def test_cli_reports_missing_model_dir(tmp_path, capsys):
    rc = export_onnx.main(['--model-dir', str(tmp_path / 'nope'), '--family', 'sam2',
                           '--out', str(tmp_path)])
    assert rc == 1
    assert 'does not exist' in capsys.readouterr().err


def _broken_sam2_dir(tmp_path, damage):
    model_dir = save_tiny_sam2(tmp_path / 'model', seed=0)
    weights = model_dir / 'model.safetensors'
    if damage == 'truncated safetensors':
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == 'garbage safetensors':
        weights.write_bytes(b'not a safetensors file')
    else:
        config = json.loads((model_dir / 'config.json').read_text())
        config['vision_config']['backbone_config']['hidden_size'] = 'x'
        (model_dir / 'config.json').write_text(json.dumps(config))
    return model_dir


@pytest.mark.parametrize('damage', ['truncated safetensors', 'garbage safetensors',
                                    'wrong-typed config field'])
def test_cli_reports_a_broken_model_dir_in_one_line(tmp_path, capsys, damage):
    model_dir = _broken_sam2_dir(tmp_path, damage)
    rc = export_onnx.main(['--model-dir', str(model_dir), '--family', 'sam2',
                           '--out', str(tmp_path / 'out')])
    assert rc == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'cannot load a sam2 model' in errors[0], err
    assert 'Traceback' not in err


@pytest.mark.parametrize('family, size, message', [
    ('sam2', (100, 100), 'multiple of 32'),
    ('sam2', (16, 16), 'multiple of 32'),
    ('sam3', (224, 224), 'native 112x112'),
    ('sam3', (98, 98), 'native 112x112'),
])
def test_export_rejects_sizes_the_encoder_cannot_take(request, tmp_path, family, size,
                                                      message):
    model = request.getfixturevalue(f'{family}_model')
    with pytest.raises(ValueError, match=message):
        export_onnx.export_vision_onnx(model, family, tmp_path, image_size=size, verify=False)
    assert not list(tmp_path.iterdir())  # refused before anything is written
    native = vision_io.native_image_size(model, family)
    assert vision_io.input_size_problem(model, family, native) is None


def test_weights_hashes_recognise_each_load_dtype_but_not_other_values(sam2_model):
    hashes = sidecar.weights_hashes(sam2_model.vision_encoder)
    meta = {'weights_hash_scheme': sidecar.WEIGHTS_HASH_SCHEME, 'weights_sha256': hashes}
    assert set(hashes) == {'float32', 'bfloat16', 'float16'}
    assert len(set(hashes.values())) == 3
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        same = build_tiny_sam2(seed=0).to(dtype).vision_encoder
        assert sidecar.load_dtype(same) == dtype
        assert sidecar.weights_problem(meta, same) is None, dtype
        other = build_tiny_sam2(seed=1).to(dtype).vision_encoder
        assert 'weights_sha256' in sidecar.weights_problem(meta, other), dtype
    # A dtype the sidecar has no hash for is named, not reported as other weights.
    double = build_tiny_sam2(seed=0).double().vision_encoder
    assert 'no hash for a float64 model' in sidecar.weights_problem(meta, double)


def test_build_engine_refuses_out_paths_the_runtime_cannot_use(tmp_path, capsys):
    onnx_path = tmp_path / 'vision.onnx'
    onnx_path.write_bytes(b'onnx graph bytes')
    sidecar.sidecar_path(onnx_path).write_text('{"format": "sam_gap_ros.export_sidecar"}')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out, message in [(onnx_path, 'is the --onnx file'),
                         (tmp_path / 'sub' / '..' / 'vision.onnx', 'is the --onnx file'),
                         (tmp_path / 'vision', 'must end in one of'),
                         (tmp_path / 'vision.bin', 'must end in one of')]:
        assert build_engine.main(['--onnx', str(onnx_path), '--out', str(out)]) == 2
        assert message in capsys.readouterr().err, out
        with pytest.raises(build_engine.BuildError, match=message):
            build_engine.build_engine(onnx_path, out)
    # Nothing was written or overwritten.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    for name in ('v.engine', 'v.plan', 'v.TRT'):
        build_engine.check_build_args(onnx_path, tmp_path / name, 4.0)


@pytest.mark.parametrize('value', ['nan', 'inf', '0', '-1'])
def test_build_engine_rejects_bad_workspace_size(tmp_path, capsys, value):
    onnx_path = tmp_path / 'vision.onnx'
    onnx_path.write_bytes(b'onnx graph bytes')
    rc = build_engine.main(['--onnx', str(onnx_path), '--out', str(tmp_path / 'v.engine'),
                            '--workspace-gb', value])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --workspace-gb must be a finite number > 0'), err


@pytest.mark.parametrize('have_autocast', [True, False])
def test_precision_problem_names_what_blocks_a_build(monkeypatch, have_autocast):
    monkeypatch.setattr(build_engine, '_have_autocast', lambda: have_autocast)
    problem = build_engine.precision_problem
    assert 'TensorRT 8.6.1 found, >= 10 required' in problem('8.6.1', 'fp32')
    # TensorRT 10 has fp16/bf16 builder flags; fp32 builds need nothing extra anywhere.
    for version in ('10.0.1', '10.3.0', '10.16.1.11'):
        assert problem(version, 'fp16') is None and problem(version, 'bf16') is None
    assert problem('11.4.0.106', 'fp32') is None
    for precision in ('fp16', 'bf16'):
        got = problem('11.4.0.106', precision)
        assert (got is None) == have_autocast
        if got:
            assert 'nvidia-modelopt[onnx]' in got and '11.4.0.106' in got
