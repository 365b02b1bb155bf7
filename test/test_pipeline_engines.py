"""SegmentationPipeline on the real tiny engines: sam2 prompts, sam3, hybrid, depth, errors."""

import numpy as np
import pytest

from node_harness import K, make_depth, make_frame, save_present_sam2
from sam_gap_ros.engines.types import ConceptError, ModelLoadError, PromptError
from sam_gap_ros.geometry import CameraIntrinsics
from sam_gap_ros.mask_ops import mask_to_box
from sam_gap_ros.pipeline import PipelineConfig, SegmentationPipeline


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
    from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
    root = tmp_path_factory.mktemp('models')
    return {'sam2': str(save_present_sam2(root / 'sam2')),
            # Unbiased random SAM2 for hybrid: it does not overwrite the tracks' last masks
            # with arbitrary masks, so re-detections of a static scene match them.
            'sam2_plain': str(save_tiny_sam2(root / 'sam2_plain', seed=0, image_size=64)),
            'sam3': str(save_tiny_sam3(root / 'sam3', seed=0))}


def _pipeline(mode, models, **kwargs):
    model_dir = models['sam2'] if mode == 'sam2' else models['sam3']
    config = PipelineConfig(mode=mode, model_dir=model_dir,
                            tracker_model_dir=models['sam2_plain'],
                            device='cpu', **kwargs)
    pipeline = SegmentationPipeline(config)
    pipeline.load()
    return pipeline


def _check_consistent(result):
    ids = [r.instance_id for r in result.records]
    assert len(set(ids)) == len(ids)
    for record, mask in zip(result.records, result.masks, strict=True):
        assert record.area == int(mask.sum()) > 0
        assert record.bbox == mask_to_box(mask)  # the engine's box, bounding its own mask
        assert (result.labels[mask] > 0).all()  # a masked pixel always carries some ID
        assert 0 < (result.labels == record.instance_id).sum() <= record.area
    assert set(np.unique(result.labels)) <= {0, *ids}


def test_sam2_prompt_before_first_frame_and_depth_positions(models):
    # The random decoder's tracked masks wander off their boxes, which the motion gate
    # reports as absent: this test is about prompts and records.
    pipeline = _pipeline('sam2', models, motion_gate_margin=-1.0)
    assert pipeline.add_box((20, 30, 50, 60)) == 1  # no frame yet: kept for the first
    assert pipeline.object_ids == [1]
    intr = CameraIntrinsics.from_k(K, 128, 96)
    result = pipeline.process(make_frame(0), make_depth(1800), '16UC1', intr)
    assert [r.instance_id for r in result.records] == [1]
    assert result.records[0].label == 'object' and 0.5 < result.records[0].score < 1.0
    assert result.records[0].position[2] == pytest.approx(1.8)
    _check_consistent(result)
    assert pipeline.add_point(90, 40, True, image_size=(128, 96)) == 2
    result = pipeline.process(make_frame(1))
    assert [r.instance_id for r in result.records] == [1, 2]
    assert all(r.position is None for r in result.records)  # no depth given
    with pytest.raises(PromptError):
        pipeline.add_point(200, 40, image_size=(128, 96))
    with pytest.raises(PromptError):
        pipeline.add_box((10, 10, 10, 40))
    with pytest.raises(PromptError):
        pipeline.remove_object(99)
    with pytest.raises(ConceptError):
        pipeline.set_concepts(['apple'])
    pipeline.remove_object(1)
    assert pipeline.object_ids == [2]
    # After 65535 IDs (a long shift of prompts) new ones start again at 1, past live ones:
    # the label image can hold every ID.
    pipeline._next_object_id = 65535
    assert [pipeline.add_box((20, 30, 50, 60)) for _ in range(3)] == [65535, 1, 3]
    result = pipeline.process(make_frame(2))
    assert sorted(r.instance_id for r in result.records) == [1, 2, 3, 65535]
    # (The random decoder's masks of the same box overlap, so not every ID keeps pixels.)
    assert set(np.unique(result.labels)) - {0} <= {1, 2, 3, 65535}
    # A new camera resolution cannot continue the old tracks: they are reset, no crash.
    bigger = pipeline.process(np.zeros((120, 160, 3), np.uint8))
    assert bigger.labels.shape == (120, 160) and pipeline.object_ids == []
    pipeline.reset()
    assert pipeline.object_ids == [] and pipeline.frame_index == -1


def test_a_bad_prompt_waiting_for_the_first_frame_is_refused_alone(models):
    """Before any frame no size is known; a prompt that does not fit costs no frame."""
    pipeline = _pipeline('sam2', models, motion_gate_margin=-1.0)
    assert pipeline.add_box((20, 30, 50, 60)) == 1
    assert pipeline.add_point(500, 500) == 2  # cannot be checked yet
    assert pipeline.add_box((60, 20, 90, 50)) == 3

    result = pipeline.process(make_frame(0))  # 128 x 96

    assert len(result.refused_prompts) == 1
    assert 'object 2' in result.refused_prompts[0] and 'outside' in result.refused_prompts[0]
    assert pipeline.object_ids == [1, 3]  # the others were applied to this frame
    assert [r.instance_id for r in result.records] == [1, 3]
    assert pipeline.process(make_frame(1)).refused_prompts == []
    # A point is a pixel: x = width is outside, as the tracker sees it (a box corner there
    # is fine).
    with pytest.raises(PromptError, match='outside'):
        pipeline.add_point(128, 40, image_size=(128, 96))
    assert pipeline.add_box((100, 40, 128, 96), image_size=(128, 96)) == 4


def test_a_prompt_sent_after_reset_goes_to_a_first_frame_of_a_new_size(models):
    """~/reset, a prompt, then the camera's new resolution: the prompt is not lost."""
    pipeline = _pipeline('sam2', models, motion_gate_margin=-1.0)
    pipeline.process(make_frame(0))  # 128 x 96
    pipeline.reset()
    assert pipeline.add_box((20, 30, 50, 60)) == 1  # waits for the first frame
    assert pipeline.add_point(500, 500) == 2  # cannot be checked yet
    bigger = np.zeros((120, 160, 3), np.uint8)
    bigger[30:60, 20:50] = 250
    result = pipeline.process(bigger)
    # The size change resets the (already empty) session but keeps the waiting prompts:
    # the box is applied, the point that does not fit the new frame is refused alone.
    assert pipeline.object_ids == [1]
    assert [r.instance_id for r in result.records] == [1]
    assert len(result.refused_prompts) == 1 and 'object 2' in result.refused_prompts[0]


def test_sam3_ids_continue_after_a_new_frame_size(models):
    pipeline = _pipeline('sam3', models, score_threshold=0.0, max_instances=3)
    first = pipeline.process(make_frame(0))
    assert first.records
    bigger = pipeline.process(np.kron(make_frame(0), np.ones((2, 2, 1), np.uint8)))
    assert bigger.labels.shape == (192, 256) and bigger.records
    ids = [r.instance_id for r in bigger.records]
    assert not set(ids) & {r.instance_id for r in first.records}  # nothing to match
    _check_consistent(bigger)
    again = pipeline.process(np.kron(make_frame(0), np.ones((2, 2, 1), np.uint8)))
    assert [r.instance_id for r in again.records] == ids


def test_a_reset_during_a_frame_leaves_no_label_image_to_correct(models, monkeypatch):
    import sam_gap_ros.pipeline as pipeline_module

    pipeline = _pipeline('sam2', models, motion_gate_margin=-1.0)
    pipeline.add_box((20, 30, 50, 60))
    paint = pipeline_module.label_image

    def reset_while_painting(*args, **kwargs):
        pipeline.reset()  # ~/reset from another thread, after inference released the lock
        return paint(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, 'label_image', reset_while_painting)
    pipeline.process(make_frame(0))
    with pytest.raises(PromptError, match='no frame'):
        pipeline.add_point(30, 40, False)


def test_sam2_background_point_corrects_the_object_under_it(models):
    pipeline = _pipeline('sam2', models, motion_gate_margin=-1.0)
    with pytest.raises(PromptError, match='no frame'):
        pipeline.add_point(30, 40, False)  # nothing segmented yet: nothing to correct
    assert pipeline.add_box((20, 30, 50, 60)) == 1
    pipeline.process(make_frame(0))
    labels = pipeline.process(make_frame(1)).labels
    ys, xs = np.nonzero(labels == 1)
    assert len(xs) > 0
    # Off every object: refused, since a background point alone cannot seed an object.
    off_y, off_x = np.argwhere(labels == 0)[0]
    with pytest.raises(PromptError, match='no tracked object'):
        pipeline.add_point(float(off_x), float(off_y), False, image_size=(128, 96))
    assert pipeline.object_ids == [1]
    session = pipeline._tracker.session
    conditioning = session.output_dict_per_obj[session.obj_id_to_idx(1)]['cond_frame_outputs']
    assert sorted(conditioning) == [0]  # the box prompt's frame
    # On object 1's mask: object 1 is re-predicted on this frame with the point excluded
    # (a new conditioning frame from its memory), and no object is added.
    assert pipeline.add_point(float(xs[0]) + 0.5, float(ys[0]) + 0.5, False,
                              image_size=(128, 96)) == 1
    assert pipeline.object_ids == [1] and sorted(conditioning) == [0, 1]
    assert [r.instance_id for r in pipeline.process(make_frame(2)).records] == [1]
    # A foreground point still adds an object; after a reset there is nothing to correct.
    assert pipeline.add_point(90, 40, True, image_size=(128, 96)) == 2
    pipeline.reset()
    with pytest.raises(PromptError, match='no frame'):
        pipeline.add_point(float(xs[0]), float(ys[0]), False)


def test_concepts_set_before_load_are_checked_against_the_model_tokenizer(models, tmp_path):
    too_long = ['leaf near ' + 'z' * 40]  # 128 characters allow it, 32 tokens do not
    pipeline = SegmentationPipeline(PipelineConfig(mode='hybrid', model_dir=models['sam3'],
                                                   tracker_model_dir=models['sam2_plain'],
                                                   device='cpu'))
    with pytest.raises(ConceptError, match='tokens long'):
        pipeline.set_concepts(too_long)
    assert pipeline.set_concepts(['Red  apple']) == ['red apple']
    pipeline.load()  # would fail on the refused set
    assert pipeline.concepts == ['red apple']
    # A directory that is not there yet: the grammar alone, load() reports the directory.
    missing = SegmentationPipeline(PipelineConfig(mode='sam3', model_dir=str(tmp_path / 'x')))
    assert missing.set_concepts(too_long) == too_long
    with pytest.raises(ConceptError, match='sam2 mode'):
        SegmentationPipeline(PipelineConfig(mode='sam2', model_dir=models['sam2'])
                             ).set_concepts(['apple'])


def test_sam3_ids_persist_on_a_static_scene_and_concepts_are_validated(models):
    pipeline = _pipeline('sam3', models, score_threshold=0.0, max_instances=3)
    first = pipeline.process(make_frame(0))
    second = pipeline.process(make_frame(0))
    assert first.records and [r.instance_id for r in first.records] == \
        [r.instance_id for r in second.records]
    _check_consistent(second)
    with pytest.raises(ConceptError):
        pipeline.set_concepts(['apple or pear'])
    assert pipeline.concepts == ['apple']
    assert pipeline.set_concepts(['Apple  but not green apple']) == ['apple but not green apple']
    # Each result names the concepts it was segmented with: a change made before the node
    # publishes it does not relabel it.
    assert second.concepts == ['apple']
    pipeline.set_score_threshold(0.99)
    third = pipeline.process(make_frame(0))
    assert third.records == [] and third.concepts == ['apple but not green apple']
    with pytest.raises(ValueError):
        pipeline.set_score_threshold(1.0)
    with pytest.raises(ValueError):
        pipeline.set_max_instances(0)
    pipeline.set_mask_threshold(0.3)
    assert pipeline._engine.mask_threshold == 0.3 == pipeline.config.mask_threshold
    with pytest.raises(ValueError):
        pipeline.set_mask_threshold(1.0)
    assert pipeline._engine.mask_threshold == 0.3


def test_hybrid_tracks_keep_ids_between_redetections(models):
    pipeline = _pipeline('hybrid', models, score_threshold=0.0, max_instances=3,
                         redetect_every_n=2)
    results = [pipeline.process(make_frame(0)) for _ in range(4)]
    ids = [[r.instance_id for r in res.records] for res in results]
    assert ids[0], 'hybrid found nothing on the first (re-detection) frame'
    # Same frame again: re-detections match the live tracks, so no new IDs appear.
    assert ids[2] == ids[0]
    assert pipeline.object_ids == sorted(ids[0])
    for result in results:
        _check_consistent(result)
    pipeline.set_redetect_every_n(5)
    assert pipeline._engine.redetect_every_n == 5
    with pytest.raises(PromptError):
        pipeline.add_box((1, 1, 20, 20))
    pipeline.reset()
    assert pipeline.object_ids == []


def test_max_object_batch_caps_the_trackers_batches(models):
    """0 leaves the batch size to the tracker's byte budget; N caps it (peak GPU memory)."""
    assert _pipeline('sam2', models)._tracker._max_batch is None
    assert _pipeline('sam2', models, max_object_batch=2)._tracker._max_batch == 2
    assert _pipeline('hybrid', models, max_object_batch=3)._tracker._max_batch == 3
    with pytest.raises(ValueError, match='max_object_batch -1 must be >= 0'):
        PipelineConfig(mode='sam2', model_dir='x', max_object_batch=-1).validate()


def test_box_mask_margin_reaches_the_tracker(models):
    """0.1 by default; a negative margin keeps SAM2's uncut box-prompted masks."""
    assert _pipeline('sam2', models)._tracker._box_mask_margin == pytest.approx(0.1)
    assert _pipeline('sam2', models, box_mask_margin=0.0)._tracker._box_mask_margin == 0.0
    assert _pipeline('sam2', models, box_mask_margin=-1.0)._tracker._box_mask_margin is None
    with pytest.raises(ValueError, match='box_mask_margin 11.0 must be <= 10'):
        PipelineConfig(mode='sam2', model_dir='x', box_mask_margin=11.0).validate()


def test_motion_settings_reach_the_tracker(models):
    """Camera-motion memory and gate are on by default; False / < 0 switch them off."""
    default = _pipeline('sam2', models)._tracker
    assert default._align_memory and default._gate_margin == pytest.approx(0.25)
    off = _pipeline('sam2', models, motion_compensation=False,
                    motion_gate_margin=-1.0)._tracker
    assert not off._align_memory and off._gate_margin is None and off._scene_motion is None
    with pytest.raises(ValueError, match='motion_gate_margin 11.0 must be <= 10'):
        PipelineConfig(mode='sam2', model_dir='x', motion_gate_margin=11.0).validate()


def test_mask_refinement_setting_reaches_the_tracker(models):
    """Edge refinement is on by default (1 coarse-grid cell); <= 0 switches it off."""
    assert _pipeline('sam2', models)._tracker._refine_cells == pytest.approx(1.0)
    assert _pipeline('sam2', models, mask_refine_radius=0.0)._tracker._refine_cells is None
    assert _pipeline('hybrid', models, mask_refine_radius=-1.0)._tracker._refine_cells is None
    with pytest.raises(ValueError, match='mask_refine_radius 12.0 must be <= 10'):
        PipelineConfig(mode='sam2', model_dir='x', mask_refine_radius=12.0).validate()


def test_prompt_mirror_union_setting_reaches_the_tracker(models):
    """The mirrored first-prompt pass is on by default; False switches it off."""
    assert _pipeline('sam2', models)._tracker._mirror_union is True
    assert _pipeline('sam2', models, prompt_mirror_union=False)._tracker._mirror_union is False


def test_load_errors_and_tensorrt_fallback(models, tmp_path):
    bad = SegmentationPipeline(PipelineConfig(mode='sam3', model_dir=str(tmp_path / 'none')))
    with pytest.raises(ModelLoadError):
        bad.load()
    wrong = SegmentationPipeline(PipelineConfig(mode='sam3', model_dir=models['sam2']))
    with pytest.raises(ModelLoadError):
        wrong.load()
    pipeline = _pipeline('sam3', models, engine_path=str(tmp_path / 'missing.engine'))
    assert pipeline.loaded
    assert pipeline.tensorrt_status.startswith('pytorch')
    assert pipeline.process(make_frame(0)).labels.shape == (96, 128)
    with pytest.raises(ValueError):
        pipeline.process(make_frame(0)[..., 0])
    pipeline.unload()
    assert not pipeline.loaded
    with pytest.raises(RuntimeError):
        pipeline.process(make_frame(0))
