"""Quality metrics of the shipped tiny orchard models on held-out synthetic data.

Shared by ``benchmarks/quality_tiny_models.py`` and ``test/test_quality_tiny_models.py``
(one implementation of the metrics). Held-out data use the scene statistics of the
training configs (``training/configs/tiny_orchard_sam2.yaml``,
``tiny_orchard_sam3.yaml``) with seeds the trainers
never use (the trainers' seeds are checked to be disjoint, see ``check_held_out``).

Metrics (instances/apples smaller than ``MIN_AREA`` visible pixels are not scored: slivers
at the image border or behind a leaf):

* SAM3 concept segmentation: per scene and concept, the predictions at score >=
  ``SCORE_THRESHOLD`` are matched one-to-one with the ground-truth instances of that concept by
  mask IoU (Hungarian, IoU >= ``MATCH_IOU``, the convention of ``training.evaluate``);
  ``recall`` is matched / ground truth, ``miou`` the mean IoU of the matched pairs. An
  absent concept (``trunk`` on trunk-free scenes) must return no instance at all.
* SAM2 tracking: one box prompt per apple on frame 0 (its tight ground-truth box), then
  the clip is tracked; ``track_miou`` is the mean over apples of each apple's mean IoU over
  the frames where it is visible; after an apple has left the image it must be absent. A
  new apple is prompted at frame ``NEW_OBJECT_FRAME`` and the other tracks must be the
  same as in a run without that prompt.
* SAM2 prompted frames (a diagnostic of the tracker's starting point): the mask IoU of each
  apple's box prompt on the first frame of ``PROMPT_SEEDS`` pans, before any tracking. A
  track whose first mask is poor is lost within a few frames, so this bounds
  ``track_miou``.
* Hybrid (SAM3 every ``REDETECT_EVERY`` frames + SAM2): ground-truth apples are matched to
  reported instances per frame (IoU >= ``MATCH_IOU``); an ID switch is a matched apple
  whose instance ID differs from the ID it was last matched to (CLEAR-MOT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sam_gap_ros.tiny_models import TINY_SAM3_THRESHOLDS
from sam_gap_ros.engines.hybrid import associate
from sam_gap_ros.mask_ops import mask_iou, mask_to_box
from sam_gap_ros.synthetic import (generate_scene, OrchardSceneConfig, OrchardVideo,
                                   sample_seed, Scene)
from sam_gap_ros.synthetic.config import scene_config_from_mapping

REPO = Path(__file__).resolve().parents[1]
SAM2_DIR = REPO / 'models' / 'tiny-orchard-sam2'
SAM3_DIR = REPO / 'models' / 'tiny-orchard-sam3'
# The configs that define the training data.
SAM2_CONFIG = REPO / 'training' / 'configs' / 'tiny_orchard_sam2.yaml'
SAM3_CONFIG = REPO / 'training' / 'configs' / 'tiny_orchard_sam3.yaml'

MIN_AREA = 40
MATCH_IOU = 0.5
SCORE_THRESHOLD = TINY_SAM3_THRESHOLDS['score_threshold']
"""SAM3 operating score threshold of the tests (the one ``make demo`` runs the segmenter with)."""
MASK_THRESHOLD = TINY_SAM3_THRESHOLDS['mask_threshold']
"""SAM3 mask threshold of the tests and ``make demo``, chosen on validation scenes."""
CONCEPTS = ('ripe red apple', 'unripe green apple')
ABSENT_CONCEPT = 'trunk'
CLIP_FRAMES = 60
NEW_OBJECT_FRAME = 30
PAN_SPEED = 1.5
REDETECT_EVERY = 10
# Held-out seeds: far from the SAM2 trainer's video seeds (seed + index, validation
# 100_000 + index) and never equal to the SAM3 dataset's spread sample seeds.
SCENE_SEEDS = tuple(range(700_000, 700_040))
CLIP_SEEDS = (800_000, 800_001, 800_002)
PROMPT_SEEDS = tuple(range(800_100, 800_130))


def _scene_config(config_path: Path, key: str, overrides: Mapping[str, Any]
                  ) -> OrchardSceneConfig:
    """Return the synthetic scene of a training config, with ``overrides`` on top."""
    from training import common

    data = common.load_config(config_path)['data']['synthetic']
    scene = dict(data.get('scene') or {})
    if key == 'sam2':
        scene.update(width=int(data['width']), height=int(data['height']))
    return scene_config_from_mapping(dict(scene, **overrides))


def sam3_scene_config(**overrides: Any) -> OrchardSceneConfig:
    """Return the scene configuration the tiny SAM3 model was trained on (plus overrides)."""
    return _scene_config(SAM3_CONFIG, 'sam3', overrides)


def sam2_scene_config(**overrides: Any) -> OrchardSceneConfig:
    """Return the scene configuration the tiny SAM2 model was trained on (plus overrides)."""
    return _scene_config(SAM2_CONFIG, 'sam2', overrides)


def check_held_out() -> None:
    """Raise ValueError if a held-out seed could be one the trainers used."""
    from training import common

    sam3 = common.load_config(SAM3_CONFIG)['data']['synthetic']
    used = {sample_seed(int(sam3['seed']), i) for i in range(int(sam3['n_images']))}
    sam2 = common.load_config(SAM2_CONFIG)['data']['synthetic']
    base = int(sam2['seed'])
    used |= set(range(base, base + int(sam2['num_train_videos'])))
    used |= set(range(base + 100_000, base + 100_000 + int(sam2['num_val_videos'])))
    overlap = used & (set(SCENE_SEEDS) | set(CLIP_SEEDS) | set(PROMPT_SEEDS))
    if overlap:
        raise ValueError(f'held-out seeds {sorted(overlap)} were used for training')


# ----------------------------------------------------------------------------- SAM3


@dataclass
class ConceptScores:
    """Matched IoUs and counts of a concept-segmentation evaluation."""

    ious: List[float] = field(default_factory=list)
    num_truth: int = 0
    num_pred: int = 0
    absent_scenes: int = 0
    absent_clean: int = 0
    present_scenes: int = 0
    present_found: int = 0

    @property
    def miou(self) -> float:
        """Return the mean IoU of matched instances (0 when none matched)."""
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def recall(self) -> float:
        """Return the fraction of ground-truth instances found."""
        return len(self.ious) / self.num_truth if self.num_truth else 0.0

    @property
    def precision(self) -> float:
        """Return the fraction of predictions that matched a ground-truth instance."""
        return len(self.ious) / self.num_pred if self.num_pred else 0.0

    @property
    def present_found_rate(self) -> float:
        """Return the fraction of scenes WITH the absent concept where it was found."""
        return self.present_found / self.present_scenes if self.present_scenes else 0.0

    @property
    def absent_clean_rate(self) -> float:
        """Return the fraction of scenes where the absent concept returned nothing."""
        return self.absent_clean / self.absent_scenes if self.absent_scenes else 0.0


def truth_masks(scene: Scene, phrase: str) -> List[np.ndarray]:
    """Return the visible masks (>= ``MIN_AREA`` px) of the instances positive for ``phrase``."""
    return [inst.mask for inst in scene.instances
            if phrase in inst.phrases and int(inst.mask.sum()) >= MIN_AREA]


def evaluate_concepts(engine: Any, seeds: Sequence[int] = SCENE_SEEDS,
                      concepts: Sequence[str] = CONCEPTS,
                      absent_concept: str = ABSENT_CONCEPT) -> ConceptScores:
    """Score ``engine`` (a ``Sam3ConceptEngine``) on held-out scenes; see the module doc.

    Every scene is scored for ``concepts``; the same seeds rendered without a trunk are
    prompted with ``absent_concept``, and so are the scenes that do have it (a model that
    never finds anything must not pass the absent-concept check unnoticed).
    """
    scores = ConceptScores()
    config = sam3_scene_config()
    no_trunk = sam3_scene_config(trunk_prob=0.0)
    for seed in seeds:
        scene = generate_scene(int(seed), config)
        engine.set_concepts(list(concepts))
        found = engine.segment(scene.image)
        for concept in concepts:
            truth = truth_masks(scene, concept)
            preds = [inst.mask for inst in found if inst.concept == concept]
            matches, _, _ = associate(truth, preds, MATCH_IOU)
            scores.num_truth += len(truth)
            scores.num_pred += len(preds)
            scores.ious += [mask_iou(truth[t], preds[p]) for t, p in matches]
        empty = generate_scene(int(seed), no_trunk)
        if any(absent_concept in inst.phrases for inst in empty.instances):
            raise ValueError(f"scene {seed} without trunk still has a '{absent_concept}'")
        engine.set_concepts([absent_concept])
        if truth_masks(scene, absent_concept):
            scores.present_scenes += 1
            scores.present_found += int(bool(engine.segment(scene.image)))
        scores.absent_scenes += 1
        scores.absent_clean += int(not engine.segment(empty.image))
    return scores


# ----------------------------------------------------------------------------- SAM2


@dataclass
class TrackScores:
    """Per-apple IoUs and failure counts of a tracking evaluation."""

    per_apple_miou: Dict[str, float] = field(default_factory=dict)
    left_frames: int = 0
    left_reported_present: int = 0
    new_object_miou: List[float] = field(default_factory=list)
    disturbance_min_iou: float = 1.0

    @property
    def track_miou(self) -> float:
        """Return the mean over apples of their mean IoU over the clip."""
        return float(np.mean(list(self.per_apple_miou.values()))) if self.per_apple_miou else 0.0


def make_clip(seed: int) -> OrchardVideo:
    """Return the held-out 60-frame pan with an apple entering at ``NEW_OBJECT_FRAME``."""
    # The apple enters a few frames before it is prompted so its first box is not a sliver.
    return OrchardVideo(int(seed), sam2_scene_config(), n_frames=CLIP_FRAMES,
                        pan_speed=PAN_SPEED, enter_frame=NEW_OBJECT_FRAME - 4)


def _boxes(frame: Scene, ids: Sequence[int]) -> np.ndarray:
    masks = frame.masks
    return np.asarray([mask_to_box(masks[i]) for i in ids], dtype=np.float32)


def _visible_apples(frame: Scene) -> List[int]:
    """Return the track IDs of the apples with >= ``MIN_AREA`` visible pixels on ``frame``."""
    return sorted(i for i in _apple_ids(frame) if int(frame.masks[i].sum()) >= MIN_AREA)


def _start_tracks(tracker: Any, frame: Scene, ids: Sequence[int]) -> None:
    """Reset ``tracker`` and box-prompt the apples ``ids`` on ``frame``, its first frame."""
    tracker.reset()
    tracker.track(frame.image)
    tracker.add_objects(boxes=_boxes(frame, ids), object_ids=ids)


def run_tracker(tracker: Any, clip: OrchardVideo, prompt_new: bool) -> Dict[int, list]:
    """Track ``clip`` from box prompts; return per track ID the per-frame ``TrackedObject``."""
    first = clip[0]
    ids = _visible_apples(first)
    if not ids:
        raise ValueError(f'clip {clip.seed} has no apple to prompt on frame 0')
    _start_tracks(tracker, first, ids)
    history: Dict[int, list] = {i: [None] * clip.n_frames for i in ids}
    for obj in tracker.last_result.objects:
        history[obj.object_id][0] = obj
    for t in range(1, clip.n_frames):
        frame = clip[t]
        result = tracker.track(frame.image)
        if prompt_new and t == NEW_OBJECT_FRAME:
            new_id = clip.entering_track_id
            tracker.add_objects(boxes=_boxes(frame, [new_id]), object_ids=[new_id])
            history[new_id] = [None] * clip.n_frames
            result = tracker.last_result
        for obj in result.objects:
            history[obj.object_id][t] = obj
    return history


def _apple_ids(frame: Scene) -> set:
    return {inst.track_id for inst in frame.instances if inst.category == 'apple'}


def score_tracks(clip: OrchardVideo, history: Mapping[int, list], scores: TrackScores) -> None:
    """Add one clip's per-apple IoUs and absence checks to ``scores``."""
    frames = [clip[t] for t in range(clip.n_frames)]
    for track_id, objects in history.items():
        ious, gone_for = [], 0
        for t, obj in enumerate(objects):
            if obj is None:
                continue
            truth = frames[t].masks.get(track_id)
            area = 0 if truth is None else int(truth.sum())
            if area >= MIN_AREA:
                ious.append(mask_iou(obj.mask, truth))
            # Absent = no visible pixel; one frame of grace after the last pixel left.
            gone_for = gone_for + 1 if area == 0 else 0
            if gone_for >= 2:
                scores.left_frames += 1
                scores.left_reported_present += int(obj.present and bool(obj.mask.any()))
        if ious:
            scores.per_apple_miou[f'{clip.seed}/{track_id}'] = float(np.mean(ious))
            if track_id == clip.entering_track_id:
                scores.new_object_miou.append(float(np.mean(ious)))


def evaluate_tracking(tracker: Any, seeds: Sequence[int] = CLIP_SEEDS,
                      check_disturbance: bool = True) -> TrackScores:
    """Score a ``Sam2Tracker`` on held-out pans; see the module doc."""
    scores = TrackScores()
    for seed in seeds:
        clip = make_clip(seed)
        history = run_tracker(tracker, clip, prompt_new=True)
        score_tracks(clip, history, scores)
        if check_disturbance:
            alone = run_tracker(tracker, clip, prompt_new=False)
            for track_id, objects in alone.items():
                for t in range(NEW_OBJECT_FRAME, clip.n_frames):
                    a, b = objects[t].mask, history[track_id][t].mask
                    same = 1.0 if not a.any() and not b.any() else mask_iou(a, b)
                    scores.disturbance_min_iou = min(scores.disturbance_min_iou, same)
    return scores


def evaluate_prompted_frames(tracker: Any, seeds: Sequence[int] = PROMPT_SEEDS) -> List[float]:
    """Return the mask IoU of every apple box-prompted on the first frame of each pan."""
    ious = []
    for seed in seeds:
        first = make_clip(seed)[0]
        ids = _visible_apples(first)
        if not ids:
            continue
        _start_tracks(tracker, first, ids)
        ious.extend(mask_iou(obj.mask, first.masks[obj.object_id])
                    for obj in tracker.last_result.objects)
    return ious


# ----------------------------------------------------------------------------- hybrid


@dataclass
class HybridScores:
    """ID switches over the ground-truth apple tracks of hybrid tracking."""

    switches: int = 0
    tracks: int = 0
    matched_frames: int = 0
    truth_frames: int = 0

    @property
    def switches_per_10(self) -> float:
        """Return ID switches per 10 ground-truth tracks (inf when nothing was tracked)."""
        return 10.0 * self.switches / self.tracks if self.tracks else float('inf')

    @property
    def coverage(self) -> float:
        """Return the fraction of visible (apple, frame) pairs matched to an instance."""
        return self.matched_frames / self.truth_frames if self.truth_frames else 0.0


def evaluate_hybrid(hybrid: Any, seeds: Sequence[int] = CLIP_SEEDS,
                    concepts: Sequence[str] = ('apple',),
                    concept_change: Optional[Tuple[int, Sequence[str]]] = None) -> HybridScores:
    """Score a ``HybridTracker`` (concept ``apple``) for ID switches on held-out pans.

    ``concept_change=(t, new_concepts)``: a planner sets ``new_concepts`` before frame ``t``
    of every pan, as the node's ``concepts`` parameter does.
    """
    scores = HybridScores()
    for seed in seeds:
        clip = make_clip(seed)
        hybrid.reset()
        hybrid.set_concepts(list(concepts))
        last_id: Dict[int, int] = {}
        for t in range(clip.n_frames):
            if concept_change is not None and t == concept_change[0]:
                hybrid.set_concepts(list(concept_change[1]))
            frame = clip[t]
            instances = hybrid.step(frame.image)
            truth_ids = _visible_apples(frame)
            matches, _, _ = associate([frame.masks[i] for i in truth_ids],
                                      [inst.mask for inst in instances], MATCH_IOU)
            scores.truth_frames += len(truth_ids)
            for gt_index, inst_index in matches:
                apple, inst_id = truth_ids[gt_index], instances[inst_index].instance_id
                scores.matched_frames += 1
                if apple in last_id and last_id[apple] != inst_id:
                    scores.switches += 1
                last_id[apple] = inst_id
        scores.tracks += len(last_id)
    return scores


def load_engines(device: str = 'cpu') -> Dict[str, Any]:
    """Load the shipped tiny models as ``sam3`` / ``sam2`` engines (raise if missing)."""
    from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine

    return {'sam3': Sam3ConceptEngine.load(SAM3_DIR, device=device,
                                           score_threshold=SCORE_THRESHOLD,
                                           mask_threshold=MASK_THRESHOLD),
            'sam2': Sam2Tracker.load(SAM2_DIR, device=device)}


def summary_line(concepts: ConceptScores, tracks: TrackScores, hybrid: HybridScores) -> str:
    """Return the fixed last line of ``benchmarks/quality_tiny_models.py``."""
    return (f'sam3_miou={concepts.miou:.4f} sam3_recall={concepts.recall:.4f} '
            f'sam2_track_miou={tracks.track_miou:.4f} '
            f'hybrid_id_switches_per_10={hybrid.switches_per_10:.4f}')
