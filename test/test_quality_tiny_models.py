"""Quality bars of the shipped tiny orchard models on held-out synthetic scenes (issue 9).

Inference only: the models in ``models/`` were trained with ``training/`` (see
``docs/tiny_models.md``); the metrics are those of ``training.tiny_quality`` and each test
prints its figures so regressions are visible in the CI log.

The bars are the ones of issue 9 and are never lowered; the shipped models reach all of
them. Guards marked "ours" keep a bar from being met the wrong way (absence by dropping
visible apples, say) and carry the value measured when they were set.
"""

from pathlib import Path

import pytest
import torch

from sam_gap_ros.engines.hybrid import HybridTracker
from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
from training import tiny_quality as quality

MAX_MODEL_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='module')
def engines(_one_thread):
    return quality.load_engines()


@pytest.fixture(scope='module')
def concept_scores(engines):
    return quality.evaluate_concepts(engines['sam3'])


@pytest.fixture(scope='module')
def track_scores(engines):
    return quality.evaluate_tracking(engines['sam2'])


def test_held_out_seeds_differ_from_training_seeds():
    quality.check_held_out()


@pytest.mark.parametrize('directory, required', [
    (quality.SAM2_DIR, ('config.json', 'model.safetensors', 'processor_config.json')),
    (quality.SAM3_DIR, ('config.json', 'model.safetensors', 'processor_config.json',
                        'tokenizer_config.json')),
])
def test_shipped_model_directories_are_complete_and_small(directory: Path, required):
    names = {p.name for p in directory.iterdir()}
    assert set(required) <= names, f'{directory} lacks {sorted(set(required) - names)}'
    assert (directory / 'MODEL_CARD.md').is_file()
    # Only the inference files ship (no optimizer state, no pickles).
    assert not any(n.endswith(('.pt', '.pth', '.bin', '.pkl')) for n in names), names
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    print(f'{directory.name}: {size / 1e6:.2f} MB')
    assert size <= MAX_MODEL_BYTES


def test_sam3_ripe_vs_unripe_mask_iou_of_matched_instances(concept_scores):
    s = concept_scores
    print(f'sam3: {s.num_truth} instances, {len(s.ious)} matched at score >= '
          f'{quality.SCORE_THRESHOLD}, miou={s.miou:.3f} precision={s.precision:.3f}')
    assert s.num_truth >= 40  # enough instances for the rates to mean something
    assert len(s.ious) >= 20
    assert s.miou >= 0.6


def test_sam3_ripe_vs_unripe_recall(concept_scores):
    s = concept_scores
    print(f'sam3: {s.num_truth} instances, recall={s.recall:.3f} at score >= '
          f'{quality.SCORE_THRESHOLD} (mask threshold {quality.MASK_THRESHOLD})')
    assert s.num_truth >= 40
    assert s.recall >= 0.8


def test_sam3_absent_concept_returns_nothing(concept_scores):
    s = concept_scores
    print(f"sam3: '{quality.ABSENT_CONCEPT}' absent -> no instance on {s.absent_clean}/"
          f'{s.absent_scenes} scenes ({s.absent_clean_rate:.3f})')
    assert s.absent_scenes == len(quality.SCENE_SEEDS)
    assert s.absent_clean_rate >= 0.9


def test_sam3_finds_the_concept_when_it_is_present(concept_scores):
    # Guards the absent-concept bar against a model that never returns anything.
    s = concept_scores
    print(f"sam3: '{quality.ABSENT_CONCEPT}' present -> found on {s.present_found}/"
          f'{s.present_scenes} scenes ({s.present_found_rate:.3f})')
    assert s.present_scenes >= 10
    assert s.present_found_rate >= 0.8


def test_sam2_tracks_each_apple_from_one_box(track_scores):
    s = track_scores
    worst = min(s.per_apple_miou.values())
    print(f'sam2: {len(s.per_apple_miou)} apples, track_miou={s.track_miou:.3f} '
          f'worst apple={worst:.3f}; per apple {s.per_apple_miou}')
    assert len(s.per_apple_miou) >= 10
    assert s.track_miou >= 0.7


def test_sam2_apple_that_left_the_frame_is_absent(track_scores):
    # The tiny model's object score never says "absent" (about +8 after an apple left);
    # the tracker's motion gate does: once the mask leaves the apple's last box moved with
    # the camera, the track is reported absent (0 of 74 frames present; 74 without it).
    s = track_scores
    print(f'sam2: {s.left_reported_present} of {s.left_frames} frames after an apple left '
          f'were reported present; track_miou={s.track_miou:.3f}')
    assert s.left_frames >= 20  # the pans really take apples out of the image
    assert s.left_reported_present == 0
    # Guard (ours): absence must not come from dropping visible apples as well. Measured
    # 0.752 with the gate, the camera-motion memory, edge refinement and the mirrored
    # first prompt (0.540 with none).
    assert s.track_miou >= 0.6


def test_sam2_new_apple_at_frame_30_leaves_others_undisturbed(track_scores):
    s = track_scores
    print(f'sam2: other tracks vs a run without the frame-{quality.NEW_OBJECT_FRAME} prompt: '
          f'min mask IoU {s.disturbance_min_iou:.4f}')
    assert len(s.new_object_miou) == len(quality.CLIP_SEEDS)
    assert s.disturbance_min_iou >= 0.99


def test_sam2_new_apple_at_frame_30_is_tracked(track_scores):
    s = track_scores
    print(f'sam2: new apple miou per clip {s.new_object_miou}')
    assert len(s.new_object_miou) == len(quality.CLIP_SEEDS)
    assert min(s.new_object_miou) >= 0.7


def test_sam2_box_prompt_masks_on_the_prompted_frame(engines):
    # Guard (ours): the tracker's starting point, the box-prompted mask before any memory
    # is involved. Measured 0.782 over 108 apples (SAM2's uncut masks: 0.583; the tracker
    # also decodes the mirrored frame and takes the union, prompt_mirror_union, cuts a
    # box-prompted mask to its box, box_mask_margin, and snaps it to the colour edges,
    # mask_refine_radius): it caps what the tracks can reach (docs/tiny_models.md).
    ious = quality.evaluate_prompted_frames(engines['sam2'])
    mean = sum(ious) / len(ious)
    print(f'sam2: prompted-frame box mIoU {mean:.3f} over {len(ious)} apples, '
          f'{sum(i >= 0.7 for i in ious)} at >= 0.7')
    assert len(ious) >= 60
    assert mean >= 0.7


def test_hybrid_id_switches_per_10_tracks(engines):
    hybrid = HybridTracker(engines['sam3'], Sam2Tracker.load(quality.SAM2_DIR, device='cpu'),
                           redetect_every_n=quality.REDETECT_EVERY)
    s = quality.evaluate_hybrid(hybrid)
    print(f'hybrid: {s.switches} ID switches over {s.tracks} tracks '
          f'({s.switches_per_10:.2f} per 10), coverage {s.coverage:.3f}')
    assert s.tracks >= 10
    assert s.switches_per_10 <= 1.0
    # Guard (ours): fewer switches must not come from reporting fewer apples. Measured
    # 0.43 (the rules before SAM3's association defaults: 0.50 with 9.2 switches per 10).
    # Both models' scores move it: a better model must not trade coverage for switches.
    assert s.coverage >= 0.4


def test_hybrid_concept_change_keeps_the_apples_ids(engines):
    """A planner adds a concept mid-pan: the apples keep their IDs through the change."""
    hybrid = HybridTracker(engines['sam3'], Sam2Tracker.load(quality.SAM2_DIR, device='cpu'),
                           redetect_every_n=quality.REDETECT_EVERY)
    steady = quality.evaluate_hybrid(hybrid)
    changed = quality.evaluate_hybrid(hybrid, concept_change=(30, ('apple', 'damaged apple')))
    print(f'hybrid, concepts changed at frame 30: {changed.switches} ID switches over '
          f'{changed.tracks} tracks (unchanged: {steady.switches} over {steady.tracks})')
    # Dropping every track at a concept change (the old rule) renumbered each apple in
    # view: 9 switches over these three pans (1 without the change).
    assert changed.switches <= steady.switches + 1
    assert changed.coverage >= steady.coverage - 0.05
