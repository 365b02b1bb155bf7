"""The engines and the segmenter on a CUDA device: same results as on the CPU, memory freed.

Skipped without CUDA (CI is CPU-only); run on the robot or a GPU workstation. Uses the
shipped tiny orchard models, so the masks compared are real apples, not random blobs.
"""

import gc

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from std_msgs.msg import String
import torch

from sam_gap_ros import instances_json
from sam_gap_ros.mask_ops import mask_iou
from sam_gap_ros.demo import find_trained_model
from sam_gap_ros.synthetic.config import scene_config_from_text
from sam_gap_ros.synthetic.video import OrchardVideo
from sam_gap_ros.tiny_models import TINY_MODEL_SCENES, TINY_SAM3_THRESHOLDS, TRAINED

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='GPU test: no CUDA device')

MIB = 2**20


def _model_dir(family):
    path = find_trained_model(TRAINED[family])
    if path is None:
        pytest.skip(f'the shipped tiny {family} model is missing')
    return str(path)


def _frames(family, count, width=320, height=240):
    scene = scene_config_from_text(TINY_MODEL_SCENES[family], width=width, height=height)
    video = OrchardVideo(0, scene, n_frames=count)
    return [video[i] for i in range(count)]


def test_sam3_engine_on_cuda_finds_what_it_finds_on_cpu():
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine

    frame = _frames('sam3', 1)[0].image
    found = {}
    for device in ('cpu', 'cuda'):
        engine = Sam3ConceptEngine.load(_model_dir('sam3'), device=device,
                                        mask_threshold=TINY_SAM3_THRESHOLDS['mask_threshold'])
        engine.set_concepts(['apple'])
        found[device] = engine.segment(frame, score_threshold=0.1)
    assert found['cpu'], 'the tiny SAM3 found no apple on its own scene'
    assert len(found['cuda']) == len(found['cpu'])
    for expected in found['cpu']:
        best = max(found['cuda'], key=lambda got: mask_iou(got.mask, expected.mask))
        assert mask_iou(best.mask, expected.mask) > 0.95
        assert best.score == pytest.approx(expected.score, abs=0.01)
        assert best.concept == expected.concept


def test_sam2_tracker_on_cuda_tracks_as_on_cpu():
    from sam_gap_ros.engines.sam2_tracker import Sam2Tracker

    frames = _frames('sam2', 6)
    apple = max(frames[0].instances_of('apple'), key=lambda inst: inst.area)
    masks = {}
    for device in ('cpu', 'cuda'):
        tracker = Sam2Tracker.load(_model_dir('sam2'), device=device)
        tracker.track(frames[0].image)
        tracker.add_objects(boxes=np.array([apple.box], dtype=np.float32))
        masks[device] = [tracker.track(f.image).objects[0].mask for f in frames[1:]]
    assert any(mask.any() for mask in masks['cpu']), 'the tiny SAM2 lost the apple at once'
    for on_cpu, on_cuda in zip(masks['cpu'], masks['cuda'], strict=True):
        # Judged absent on both devices (both empty) agrees as well.
        assert not (on_cpu.any() or on_cuda.any()) or mask_iou(on_cpu, on_cuda) > 0.95


def _diagnostic_values(messages):
    return {kv.key: kv.value for message in messages for status in message.status
            if status.name.endswith('segmenter') for kv in status.values}


def test_segmenter_on_cuda_frees_gpu_memory_on_deactivate_and_cleanup(ros):
    gc.collect()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    node = ros.make_segmenter(mode='sam3', model_dir=_model_dir('sam3'), device='cuda',
                              dtype='bfloat16', input_qos='reliable', concepts=['apple'],
                              **TINY_SAM3_THRESHOLDS)
    assert node.pipeline is not None, node.last_error
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    diagnostics = ros.subscribe(DiagnosticArray, '/diagnostics')
    for index, frame in enumerate(_frames('sam3', 3, width=128, height=96)):
        ros.publish_frame(index, (index + 1) * 10**9, frame=frame.image)
        assert ros.spin_until(lambda count=index + 1: len(docs) >= count)
    doc = instances_json.loads(docs[-1].data)
    assert doc['mode'] == 'sam3' and doc['inference_ms'] > 0
    assert ros.spin_until(lambda: 'cuda_allocated_mib' in _diagnostic_values(diagnostics))
    values = _diagnostic_values(diagnostics)
    assert values['device'].startswith('cuda')
    weights = sum(p.numel() * p.element_size() for p in node.pipeline._engine.model.parameters())
    assert float(values['cuda_allocated_mib']) * MIB >= weights

    # A frame's activations leave blocks in torch's cache; make that cache large and known.
    torch.empty(256 * MIB, dtype=torch.uint8, device='cuda')  # freed into the cache
    assert _cached() >= 256 * MIB
    node.trigger_deactivate()  # pauses and returns the allocator's cache to the driver
    # Only blocks that share a segment with live tensors stay (fragmentation, a few MiB).
    assert _cached() < 32 * MIB
    node.trigger_cleanup()  # unloads: every byte the model held is given back
    gc.collect()
    assert _cached() < 32 * MIB
    # Not the model's: cuBLAS keeps a workspace (32 MiB on Hopper) per thread's handle for
    # the life of the process, and the node's worker thread may have taken a new handle.
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() - baseline < MIB


def _cached():
    """Bytes torch's caching allocator holds from the driver but no tensor uses."""
    return torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def test_segmenter_skips_a_frame_that_runs_out_of_gpu_memory_and_goes_on(ros):
    node = ros.make_segmenter(mode='sam3', model_dir=_model_dir('sam3'), device='cuda',
                              input_qos='reliable', concepts=['apple'],
                              **TINY_SAM3_THRESHOLDS)
    assert node.pipeline is not None, node.last_error
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    frames = [f.image for f in _frames('sam3', 3, width=128, height=96)]
    ros.publish_frame(0, 10**9, frame=frames[0])
    assert ros.spin_until(lambda: len(docs) == 1)
    # A real CUDA out-of-memory, not an injected exception: cap this process at what it
    # holds now and fill the allocator's free blocks, so the next frame cannot allocate.
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
    ballast = []
    try:
        for size in (2**20, 2**16, 2**12, 512):
            try:
                while True:
                    ballast.append(torch.empty(size, dtype=torch.uint8, device='cuda'))
            except torch.cuda.OutOfMemoryError:
                pass
        ros.publish_frame(1, 2 * 10**9, frame=frames[1])
        assert ros.spin_until(lambda: node.stats()['oom_skips'] == 1)
    finally:
        ballast.clear()
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(docs) == 1  # the failed frame published nothing
    assert node.diagnostics().status[0].level == DiagnosticStatus.WARN
    ros.publish_frame(2, 3 * 10**9, frame=frames[2])  # and the node goes on
    assert ros.spin_until(lambda: len(docs) == 2)
    assert instances_json.document_stamp_ns(instances_json.loads(docs[-1].data)) == 3 * 10**9
    assert node.stats()['frames_processed'] == 2 and node.stats()['errors'] == 0


def test_segmenter_refuses_a_cuda_device_that_does_not_exist(ros):
    missing = f'cuda:{torch.cuda.device_count()}'
    node = ros.make_segmenter(mode='sam3', model_dir=_model_dir('sam3'), device=missing,
                              concepts=['apple'])
    assert node.pipeline is None
    assert missing in node.last_error and 'CUDA device' in node.last_error
