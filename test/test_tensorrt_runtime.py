"""Runtime engine switch: sidecar validation, PyTorch fallback, whole-engine equivalence.

The swap is exercised with ONNX Runtime on CPU (same code path as TensorRT except the runner).
"""

import json

import numpy as np
import pytest
import torch

from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
from sam_gap_ros.engines.tiny_sam2 import build_tiny_sam2, tiny_sam2_video_config
from sam_gap_ros.tensorrt import export_onnx, sidecar
from sam_gap_ros.tensorrt.runtime import (aligned_input, BACKEND_ORT, BACKEND_PYTORCH,
                                          EngineVisionEncoder, install, install_vision_engine,
                                          installed_backend, runtime_fallback, TRT_IO_ALIGNMENT,
                                          uninstall_vision_engine)

H, W = 96, 160


class ListLogger:
    """Collect log lines like an rclpy logger (info/warning/error methods)."""

    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(('info', msg))

    def warning(self, msg):
        self.lines.append(('warning', msg))

    def error(self, msg):
        self.lines.append(('error', msg))

    def text(self, level):
        return '\n'.join(m for lvl, m in self.lines if lvl == level)


@pytest.fixture(scope='module')
def sam2_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('onnx')
    return export_onnx.export_vision_onnx(build_tiny_sam2(seed=0), 'sam2', out, verify=False)


@pytest.fixture
def onnx_copy(sam2_onnx, tmp_path):
    """Return a private copy of the exported file + sidecar that a test may corrupt."""
    path = tmp_path / sam2_onnx.name
    path.write_bytes(sam2_onnx.read_bytes())
    sidecar.sidecar_path(path).write_text(sidecar.sidecar_path(sam2_onnx).read_text())
    return path


def frames(count, seed=0):
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, (H, W, 3), np.uint8)
    out = []
    for i in range(count):
        frame = base.copy()
        frame[30:60, 20 + 3 * i:50 + 3 * i] = 250
        out.append(frame)
    return out


def make_tracker():
    tracker = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=0)
    with torch.no_grad():
        # Judge every object present so the masks are non-trivial (random weights).
        head = tracker.model.mask_decoder.pred_obj_score_head.proj_out
        head.weight.zero_()
        head.bias.fill_(3.0)
    return tracker


def track(tracker, video):
    results = []
    for i, frame in enumerate(video):
        results.append(tracker.track(frame))
        if i == 0:
            tracker.add_objects(boxes=[[10, 10, 60, 50], [70, 20, 150, 90]])
            results[-1] = tracker.last_result
    return results


def test_tracker_with_ort_vision_encoder_gives_same_masks(sam2_onnx):
    video = frames(4)
    reference = track(make_tracker(), video)
    tracker = make_tracker()
    logger = ListLogger()
    choice = install(tracker, sam2_onnx, logger=logger)
    assert choice.backend == BACKEND_ORT and choice.accelerated, choice
    assert isinstance(tracker.model.vision_encoder, EngineVisionEncoder)
    assert 'onnxruntime' in logger.text('info')
    accelerated = track(tracker, video)
    assert installed_backend(tracker.model) == BACKEND_ORT  # no silent fallback happened
    assert len(reference) == len(accelerated) == len(video)
    total = 0
    for ref, got in zip(reference, accelerated, strict=True):
        assert [o.object_id for o in ref.objects] == [o.object_id for o in got.objects]
        for a, b in zip(ref.objects, got.objects, strict=True):
            total += int(a.mask.sum())
            # ORT differs from PyTorch by ~1e-7: identical masks up to pixels at logit 0.
            assert np.count_nonzero(a.mask != b.mask) <= 2
            assert a.score == pytest.approx(b.score, abs=1e-3)
            assert a.present == b.present
    assert total > 0


def test_concept_engine_with_ort_vision_encoder_gives_same_instances(tmp_path):
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
    engine = Sam3ConceptEngine.from_config(seed=0, score_threshold=0.0)
    engine.set_concepts(['red apple', 'leaf'])
    image = np.random.RandomState(0).randint(0, 255, (90, 140, 3), np.uint8)
    reference = engine.segment(image)
    path = export_onnx.export_vision_onnx(engine.model, 'sam3', tmp_path, verify=False)
    choice = install(engine, path)
    assert choice.backend == BACKEND_ORT, choice
    got = engine.segment(image)
    assert installed_backend(engine.model) == BACKEND_ORT
    assert len(reference) == len(got) > 0
    for ref, new in zip(reference, got, strict=True):
        assert ref.concept == new.concept
        assert new.score == pytest.approx(ref.score, abs=1e-4)
        assert np.array_equal(ref.mask, new.mask)


def test_no_engine_path_keeps_pytorch():
    model = build_tiny_sam2(seed=0)
    encoder = model.vision_encoder
    for path in ('', None, '  '):
        choice = install_vision_engine(model, path, 'sam2')
        assert choice.backend == BACKEND_PYTORCH and choice.reason == 'no engine_path set'
    assert model.vision_encoder is encoder


def _assert_fallback(model, path, expected_text, image_size=None, family='sam2'):
    encoder = model.vision_encoder
    logger = ListLogger()
    choice = install_vision_engine(model, path, family, image_size=image_size, logger=logger)
    assert choice.backend == BACKEND_PYTORCH and not choice.accelerated
    assert expected_text in choice.reason, choice.reason
    assert expected_text in logger.text('error')
    assert 'Falling back to the PyTorch vision encoder' in logger.text('error')
    assert model.vision_encoder is encoder
    return choice


def test_weights_hash_mismatch_falls_back(onnx_copy):
    other = build_tiny_sam2(seed=1)
    _assert_fallback(other, onnx_copy, 'weights_sha256')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_same_checkpoint_in_any_load_dtype_gets_the_engine(sam2_onnx, dtype):
    """The robot may load the exported checkpoint in float32, bfloat16 or float16."""
    model = build_tiny_sam2(seed=0).to(dtype)
    choice = install_vision_engine(model, sam2_onnx, 'sam2')
    assert choice.backend == BACKEND_ORT, choice.reason
    other = build_tiny_sam2(seed=1).to(dtype)
    _assert_fallback(other, sam2_onnx, f'weights_sha256 ({str(dtype)[6:]})')


def _rewrite_sidecar(path, **changes):
    meta = json.loads(sidecar.sidecar_path(path).read_text())
    meta.update(changes)
    sidecar.sidecar_path(path).write_text(json.dumps(meta))


def test_old_bf16_hash_sidecar_still_works_where_it_was_right(onnx_copy):
    """v1 sidecars (bfloat16-rounded hash): float32/bfloat16 accepted, float16 must re-export."""
    legacy = sidecar.LEGACY_WEIGHTS_HASH_SCHEME
    encoder = build_tiny_sam2(seed=0).vision_encoder
    _rewrite_sidecar(onnx_copy, weights_hash_scheme=legacy,
                     weights_sha256=sidecar.weights_hash(encoder, torch.bfloat16, legacy))
    for dtype in (torch.float32, torch.bfloat16):
        assert install_vision_engine(build_tiny_sam2(seed=0).to(dtype), onnx_copy,
                                     'sam2').backend == BACKEND_ORT
    _assert_fallback(build_tiny_sam2(seed=1), onnx_copy, 'weights_sha256 (bfloat16-rounded)')
    _assert_fallback(build_tiny_sam2(seed=0).half(), onnx_copy, 're-export the ONNX')
    _rewrite_sidecar(onnx_copy, weights_hash_scheme='sha256-from-the-future-v9')
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, 'weights_hash_scheme')


def test_input_size_mismatch_falls_back(onnx_copy):
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, 'image_size', image_size=(256, 256))


def test_family_mismatch_falls_back(onnx_copy):
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, "family 'sam3' expects", family='sam3')


def test_corrupted_file_falls_back(onnx_copy):
    data = bytearray(onnx_copy.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b'\x00' * 64
    onnx_copy.write_bytes(bytes(data))
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, 'file is corrupted')


def test_unloadable_file_with_matching_hash_falls_back(onnx_copy):
    """Deserialisation failure: even a consistent sidecar cannot make a broken file load."""
    onnx_copy.write_bytes(b'not an onnx graph')
    meta = json.loads(sidecar.sidecar_path(onnx_copy).read_text())
    meta['onnx_sha256'] = sidecar.file_sha256(onnx_copy)
    sidecar.sidecar_path(onnx_copy).write_text(json.dumps(meta))
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, 'could not load the onnxruntime')


@pytest.mark.parametrize('content, text', [
    (None, 'no sidecar'),
    ('{not json', 'not readable JSON'),
    ('{"format": "other"}', 'not a sam_gap_ros sidecar'),
])
def test_missing_or_bad_sidecar_falls_back(onnx_copy, content, text):
    side = sidecar.sidecar_path(onnx_copy)
    if content is None:
        side.unlink()
    else:
        side.write_text(content)
    _assert_fallback(build_tiny_sam2(seed=0), onnx_copy, text)


def test_unresolvable_home_directory_falls_back():
    """'~user' of an unknown user: expanduser raises, the API still must not."""
    path = '~no_such_user_sam_gap/vision.engine'
    _assert_fallback(build_tiny_sam2(seed=0), path, 'home directory')
    choice = install(make_tracker(), path)
    assert choice.backend == BACKEND_PYTORCH and 'home directory' in choice.reason


def test_missing_file_and_unknown_suffix_fall_back(onnx_copy, tmp_path):
    model = build_tiny_sam2(seed=0)
    _assert_fallback(model, tmp_path / 'nope.engine', 'does not exist')
    odd = tmp_path / 'vision.bin'
    odd.write_bytes(b'x')
    _assert_fallback(model, odd, 'unknown artifact type')


def test_tensorrt_engine_needs_cuda_and_tensorrt(onnx_copy, tmp_path):
    """A TensorRT engine on a CPU model (or without tensorrt) falls back instead of crashing."""
    engine = tmp_path / 'vision.engine'
    engine.write_bytes(b'serialized engine bytes')
    meta = json.loads(sidecar.sidecar_path(onnx_copy).read_text())
    meta.update(engine_sha256=sidecar.file_sha256(engine), tensorrt_version='10.0.0',
                gpu_name='NVIDIA Jetson Orin', precision='fp16')
    sidecar.write_sidecar(engine, {k: v for k, v in meta.items() if k != 'format'})
    model = build_tiny_sam2(seed=0)
    _assert_fallback(model, engine, 'need the model on CUDA')


def test_tensorrt_version_and_gpu_are_checked():
    meta = {'family': 'sam2', 'tensorrt_version': '10.3.0', 'gpu_name': 'Orin'}
    problems = sidecar.check_sidecar(meta, {'family': 'sam2', 'tensorrt_version': '10.8.0',
                                            'gpu_name': 'NVIDIA GeForce RTX 4090'})
    assert len(problems) == 2
    assert 'tensorrt_version' in problems[0] and '10.3.0' in problems[0]
    assert 'gpu_name' in problems[1] and 'RTX 4090' in problems[1]
    assert sidecar.check_sidecar(meta, {'family': 'sam2', 'gpu_name': 'Orin'}) == []


def test_install_dispatches_on_sidecar_family(onnx_copy):
    tracker = make_tracker()
    meta = json.loads(sidecar.sidecar_path(onnx_copy).read_text())
    meta['family'] = 'sam3'
    sidecar.sidecar_path(onnx_copy).write_text(json.dumps(meta))
    logger = ListLogger()
    choice = install(tracker, onnx_copy, logger=logger)
    assert choice.backend == BACKEND_PYTORCH
    assert "family 'sam3'" in choice.reason and 'Sam2Tracker' in choice.reason


def test_wrong_input_size_and_runtime_error_use_pytorch(sam2_onnx):
    model = build_tiny_sam2(seed=0)
    torch_encoder = model.vision_encoder
    logger = ListLogger()
    assert install_vision_engine(model, sam2_onnx, 'sam2', logger=logger).accelerated
    wrapper = model.vision_encoder
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch_encoder(x).fpn_hidden_states[0]
        torch.testing.assert_close(model.vision_encoder(x).fpn_hidden_states[0], want,
                                   atol=1e-4, rtol=0)
        assert installed_backend(model) == BACKEND_ORT and runtime_fallback(model) is None
        # Another input size: the engine cannot take it, PyTorch answers (and it is logged).
        small = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(model.vision_encoder(small).fpn_hidden_states[0],
                                   torch_encoder(small).fpn_hidden_states[0])
        assert 'does not match the engine input' in logger.text('warning')
        # ... and the live backend says so until a frame of the engine's size comes again.
        assert installed_backend(model) == BACKEND_PYTORCH
        assert 'does not match the engine input' in runtime_fallback(model)
        model.vision_encoder(x)
        assert installed_backend(model) == BACKEND_ORT and runtime_fallback(model) is None

        def broken(_):
            raise RuntimeError('CUDA error: an illegal memory access was encountered')

        wrapper.runner = broken
        torch.testing.assert_close(model.vision_encoder(x).fpn_hidden_states[0], want)
    assert 'illegal memory access' in logger.text('error')
    assert installed_backend(model) == BACKEND_PYTORCH
    assert 'illegal memory access' in runtime_fallback(model)
    assert uninstall_vision_engine(model)
    assert model.vision_encoder is torch_encoder
    assert not uninstall_vision_engine(model)


def test_without_kept_fallback_runtime_errors_are_clear(sam2_onnx):
    model = build_tiny_sam2(seed=0)
    weights_before = set(model.state_dict())
    choice = install_vision_engine(model, sam2_onnx, 'sam2', keep_pytorch_fallback=False)
    assert choice.accelerated
    # The PyTorch encoder is released: its weights no longer live in the model.
    assert not any(k.startswith('vision_encoder.') for k in model.state_dict())
    assert weights_before - set(model.state_dict())
    with pytest.raises(RuntimeError, match='PyTorch encoder was released'):
        model.vision_encoder(torch.zeros(1, 3, 64, 64))
    with torch.no_grad():
        assert model.vision_encoder(torch.zeros(1, 3, 128, 128)).fpn_hidden_states[0].shape == (
            1, 128, 32, 32)


def test_reinstall_replaces_engine_and_verify_atol(sam2_onnx):
    model = build_tiny_sam2(seed=0)
    torch_encoder = model.vision_encoder
    assert install_vision_engine(model, sam2_onnx, 'sam2').accelerated
    # Installing again validates against the original PyTorch weights, not the wrapper.
    choice = install_vision_engine(model, sam2_onnx, 'sam2', verify_atol=1e-4)
    assert choice.backend == BACKEND_ORT
    assert model.vision_encoder.pytorch_encoder is torch_encoder
    # A tolerance nothing can meet: the engine is rejected and, as reported, PyTorch runs.
    rejected = install_vision_engine(model, sam2_onnx, 'sam2', verify_atol=-1.0)
    assert rejected.backend == BACKEND_PYTORCH and 'verify_atol' in rejected.reason
    assert model.vision_encoder is torch_encoder


@pytest.mark.parametrize('second', ['missing file', 'other weights', 'bad sidecar', 'no path'])
def test_refused_reinstall_removes_the_previous_engine(onnx_copy, tmp_path, second):
    """What a refused install reports ('pytorch') is what runs afterwards."""
    tracker = make_tracker()
    torch_encoder = tracker.model.vision_encoder
    assert install(tracker, onnx_copy).backend == BACKEND_ORT
    if second == 'missing file':
        path = tmp_path / 'nope.onnx'
    elif second == 'no path':
        path = ''
    else:
        path = onnx_copy
        if second == 'other weights':
            _rewrite_sidecar(path, weights_sha256=sidecar.weights_hashes(
                build_tiny_sam2(seed=1).vision_encoder))
        else:
            sidecar.sidecar_path(path).write_text('{not json')
    logger = ListLogger()
    choice = install(tracker, path, logger=logger)
    assert choice.backend == BACKEND_PYTORCH, choice
    assert tracker.model.vision_encoder is torch_encoder
    assert installed_backend(tracker.model) == BACKEND_PYTORCH
    if path:
        assert 'Falling back to the PyTorch vision encoder' in logger.text('error')


def test_refused_reinstall_names_the_engine_that_keeps_running(sam2_onnx, tmp_path):
    """Without a kept PyTorch encoder the earlier engine cannot be removed: say so."""
    model = build_tiny_sam2(seed=0)
    first = install_vision_engine(model, sam2_onnx, 'sam2', keep_pytorch_fallback=False)
    assert first.accelerated
    logger = ListLogger()
    choice = install_vision_engine(model, tmp_path / 'nope.onnx', 'sam2', logger=logger)
    assert choice.backend == BACKEND_ORT == installed_backend(model)
    assert choice.engine_path == str(sam2_onnx)
    assert 'released' in choice.reason and 'keeps running' in choice.reason
    assert 'keeps running' in logger.text('error')
    assert 'Falling back to the PyTorch' not in logger.text('error')


@pytest.mark.parametrize('seed, status', [(0, 'onnxruntime: '), (1, 'pytorch: sidecar mismatch')])
def test_pipeline_engine_path_reports_backend(sam2_onnx, tmp_path, seed, status):
    from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
    from sam_gap_ros.pipeline import PipelineConfig, SegmentationPipeline
    model_dir = save_tiny_sam2(tmp_path / 'model', seed=seed)
    pipeline = SegmentationPipeline(PipelineConfig(mode='sam2', model_dir=str(model_dir),
                                                   device='cpu', engine_path=str(sam2_onnx)))
    pipeline.load()
    assert pipeline.tensorrt_status.startswith(status), pipeline.tensorrt_status


def test_pipeline_status_follows_a_fallback_after_load(sam2_onnx, tmp_path):
    """/diagnostics shows the live backend, not the one chosen at load."""
    from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
    from sam_gap_ros.pipeline import PipelineConfig, SegmentationPipeline
    model_dir = save_tiny_sam2(tmp_path / 'model', seed=0)
    pipeline = SegmentationPipeline(PipelineConfig(mode='sam2', model_dir=str(model_dir),
                                                   device='cpu', engine_path=str(sam2_onnx)))
    pipeline.load()
    video = frames(3)
    pipeline.add_box([10, 10, 60, 50])
    pipeline.process(video[0])
    assert pipeline.tensorrt_status.startswith('onnxruntime: '), pipeline.tensorrt_status

    def broken(_):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    # The engine fails at run time (reached through the pipeline's tracker: no public hook).
    pipeline._tracker.model.vision_encoder.runner = broken
    pipeline.process(video[1])
    status = pipeline.tensorrt_status
    assert status.startswith('pytorch: ') and 'illegal memory access' in status, status


def test_hybrid_engine_gets_the_artifact_of_each_family(sam2_onnx, tmp_path):
    from sam_gap_ros.engines.hybrid import HybridTracker
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
    concepts = Sam3ConceptEngine.from_config(seed=0)
    hybrid = HybridTracker(concepts, make_tracker())
    sam3_onnx = export_onnx.export_vision_onnx(concepts.model, 'sam3', tmp_path, verify=False)
    assert install(hybrid, sam2_onnx).backend == BACKEND_ORT
    assert installed_backend(hybrid.tracker.model) == BACKEND_ORT
    assert installed_backend(concepts.model) == BACKEND_PYTORCH
    assert install(hybrid, sam3_onnx).backend == BACKEND_ORT
    assert installed_backend(concepts.model) == BACKEND_ORT


def test_engine_input_is_copied_only_when_not_contiguous_or_misaligned():
    """Engine I/O addresses must be 256-byte aligned; a view into a batch may start anywhere."""
    size = 3 * 8 * 8
    buffer = torch.randn(size + TRT_IO_ALIGNMENT)
    # CPU allocations are only 64-byte aligned: pick the aligned start by hand.
    start = next(i for i in range(TRT_IO_ALIGNMENT)
                 if buffer[i:].data_ptr() % TRT_IO_ALIGNMENT == 0)
    frame = buffer[start:start + size].view(1, 3, 8, 8)
    assert aligned_input(frame) is frame
    shifted = buffer[start + 1:start + 1 + size].view(1, 3, 8, 8)  # contiguous, 4 bytes off
    assert shifted.is_contiguous() and shifted.data_ptr() % TRT_IO_ALIGNMENT
    moved = aligned_input(shifted)
    assert moved.data_ptr() != shifted.data_ptr() and torch.equal(moved, shifted)
    transposed = frame.transpose(2, 3)
    assert aligned_input(transposed).is_contiguous()
    assert torch.equal(aligned_input(transposed), transposed)
