"""Hybrid concept tracking: SAM3 detections every N frames, SAM2 tracking in between.

``HybridTracker`` combines a concept engine (``Sam3ConceptEngine``: ``set_concepts``,
``segment(frame) -> list[Instance]``, with a ``max_instances`` keyword if the engine has a
``max_instances`` cap) with the streaming ``Sam2Tracker``. IDs persist across frames; the
rules, per frame:

* Every frame goes through ``tracker.track`` first, so SAM2 keeps its memory current.
* Re-detection frames (the first frame, then every ``redetect_every_n`` frames, and the
  frame after a concept change) also run ``concept_engine.segment``. The rules follow
  SAM3's video tracker (transformers ``Sam3VideoModel``: ``det_nms_thresh``,
  ``assoc_iou_thresh``), whose defaults are ours:

  - The engine is asked for its ``max_instances`` best detections plus one per live
    track, so that a track SAM3 still detects, outranked by new objects, is confirmed and
    not counted as missed; only the engine's ``max_instances`` best may start new tracks,
    as without live tracks. Detections without a mask pixel are ignored.
  - Detections go through mask NMS first (of two with IoU > ``detection_nms_iou``, 0.1,
    the lower-scoring one goes): a partial mask or a duplicate of a detected object must
    not start a second track.
  - Detections are associated one-to-one with the live tracks by mask IoU (Hungarian
    assignment maximising the total IoU over pairs with IoU >= ``match_iou``, 0.1; the
    rest stay unmatched). The loose threshold is deliberate: SAM2's mask lags a moving
    object between re-detections, and a lagging track must keep its ID. A track's mask
    for matching is its SAM2 mask on this frame, or, when SAM2 judges it absent, its last
    known mask, so a briefly lost object is re-acquired where it was last seen.
  - A matched track keeps its ID, takes the detection's concept and score, and (with
    ``reprompt_matched``) SAM2 is re-prompted with the detection mask. With ``reanchor``
    that mask replaces the track's earlier prompts as its only conditioning frame: on a
    moving camera an old prompt pulls the mask back towards where the object was.
  - An unmatched detection starts a new track with a new ID (not reused, also not after
    ``reset``, until the mono16 label range 1..65535 wraps; live IDs are then skipped,
    see ``mask_ops.next_label_id``), unless it overlaps a live track by IoU >=
    ``match_iou`` (a piece of an object already tracked, SAM3's many-to-one rule). A track
    left unmatched on ``max_missed_redetections`` consecutive re-detections is dropped, and
    at once if its concept is no longer in the set (``set_concepts``).
* Every frame, two tracks whose SAM2 masks cover one object (IoU > ``duplicate_iou``)
  are resolved: the one that strayed from its last SAM3-confirmed mask is dropped (see
  ``duplicate_tracks``), so an ID that SAM2 carried onto a neighbour does not take over
  the neighbour's ID at the next re-detection.
* On other frames every track SAM2 judges present is reported with its SAM2 mask and the
  concept and score of its last matching detection; absent tracks are not reported but are
  kept until the re-detection rule drops them. A track SAM2 judges present with an empty
  mask counts as absent (nothing to report, and its last known mask is kept).
* A frame reports at most ``max_instances`` instances (by default the concept engine's
  ``max_instances``, which caps its detections per frame). Tracks live on beside new
  detections, so more may be visible; the highest-scoring ones are reported (the score of
  each track's last matching detection, ties to the lower ID), the same rule by which SAM3
  keeps its best detections. The others stay tracked and are reported when they rank high
  enough again.

Detections and tracks are associated regardless of concept: the ID names the physical
object, whose concept may change (e.g. ``unripe apple`` to ``ripe apple``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from sam_gap_ros.engines.concept_query import mask_overlaps, resolve_duplicates
from sam_gap_ros.engines.types import Instance
from sam_gap_ros.mask_ops import mask_iou, mask_to_box, next_label_id

logger = logging.getLogger(__name__)


def associate(track_masks: Sequence[np.ndarray], detection_masks: Sequence[np.ndarray],
              min_iou: float) -> Tuple[List[Tuple[int, int]], List[int], List[int]]:
    """Match tracks to detections one-to-one by mask IoU.

    Returns ``(matches, unmatched_tracks, unmatched_detections)`` as index lists;
    ``matches`` holds ``(track, detection)`` pairs from the assignment that maximises the
    total IoU over the pairs with IoU >= ``min_iou``.
    """
    return assign_by_iou(mask_overlaps(track_masks, detection_masks)[0], min_iou)


def assign_by_iou(iou: np.ndarray, min_iou: float
                  ) -> Tuple[List[Tuple[int, int]], List[int], List[int]]:
    """``associate`` on a ready ``(tracks, detections)`` IoU matrix."""
    if min_iou <= 0.0:
        raise ValueError(f'min_iou must be > 0, got {min_iou}')
    num_tracks, num_detections = iou.shape
    matches: List[Tuple[int, int]] = []
    if num_tracks and num_detections:
        # Pairs below the threshold must not steal a valid partner in the assignment.
        valid = np.where(iou >= min_iou, iou, 0.0)
        rows, cols = linear_sum_assignment(valid, maximize=True)
        matches = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)
                   if valid[r, c] >= min_iou]
    matched_tracks = {t for t, _ in matches}
    matched_detections = {d for _, d in matches}
    return (matches, [t for t in range(num_tracks) if t not in matched_tracks],
            [d for d in range(num_detections) if d not in matched_detections])


def duplicate_tracks(current: Mapping[int, np.ndarray], anchors: Mapping[int, np.ndarray],
                     duplicate_iou: float) -> List[int]:
    """Return the IDs of tracks whose mask has moved onto another track's object.

    When an object leaves the image or hides, SAM2 may follow a similar neighbour instead of
    reporting it absent; two IDs then cover one object (mask IoU of their ``current`` masks
    > ``duplicate_iou``). Of such a pair, the track whose mask strayed further from where
    SAM3 last confirmed it (lower IoU with its ``anchors`` mask) is the one that moved
    over and is returned; the other keeps its ID. Ties drop the higher (newer) ID.
    """
    ids = sorted(t for t, mask in current.items() if mask.any())
    if len(ids) < 2:
        return []
    masks = [current[t] for t in ids]
    overlap, _ = mask_overlaps(masks, masks)
    pairs = sorted(((overlap[i, j], ids[i], ids[j]) for i in range(len(ids))
                    for j in range(i + 1, len(ids)) if overlap[i, j] > duplicate_iou),
                   reverse=True)
    dropped: List[int] = []
    for _, first, second in pairs:
        if first in dropped or second in dropped:
            continue
        stay_first = mask_iou(anchors[first], current[first])
        stay_second = mask_iou(anchors[second], current[second])
        dropped.append(second if stay_second <= stay_first else first)
    return sorted(dropped)


@dataclass
class _Track:
    concept: str
    score: float
    last_mask: np.ndarray
    anchor_mask: np.ndarray
    """The mask SAM3 last confirmed for this track (at its last matching re-detection)."""
    missed: int = 0

    @classmethod
    def from_detection(cls, detection: Instance) -> _Track:
        return cls(detection.concept, detection.score, detection.mask, detection.mask)


class HybridTracker:
    """Track every instance of text concepts: SAM3 re-detection plus SAM2 tracking (ROS-free)."""

    def __init__(self, concept_engine: Any, tracker: Any, redetect_every_n: int = 10,
                 max_missed_redetections: int = 2, match_iou: float = 0.1,
                 reprompt_matched: bool = True, duplicate_iou: float = 0.5,
                 detection_nms_iou: float = 0.1, reanchor: bool = True,
                 max_instances: Optional[int] = None) -> None:
        """Combine a concept engine and a ``Sam2Tracker`` (which this object then owns).

        See the module docstring for the rules; ``detection_nms_iou=1.0`` turns the NMS off.
        ``max_instances`` caps the instances reported per frame; None follows the concept
        engine's ``max_instances`` (read every frame, so changing it there applies at once;
        an engine without one means no cap).
        """
        if redetect_every_n < 1:
            raise ValueError(f'redetect_every_n must be >= 1, got {redetect_every_n}')
        if max_missed_redetections < 1:
            raise ValueError(f'max_missed_redetections must be >= 1, got '
                             f'{max_missed_redetections}')
        if not 0.0 < match_iou <= 1.0:
            raise ValueError(f'match_iou must be in (0, 1], got {match_iou}')
        if not 0.0 < duplicate_iou <= 1.0:
            raise ValueError(f'duplicate_iou must be in (0, 1], got {duplicate_iou}')
        if not 0.0 < detection_nms_iou <= 1.0:
            raise ValueError(f'detection_nms_iou must be in (0, 1], got {detection_nms_iou}')
        self.concept_engine = concept_engine
        self.tracker = tracker
        self.redetect_every_n = int(redetect_every_n)
        self.max_missed_redetections = int(max_missed_redetections)
        self.match_iou = float(match_iou)
        self.reprompt_matched = bool(reprompt_matched)
        self.duplicate_iou = float(duplicate_iou)
        self.detection_nms_iou = float(detection_nms_iou)
        self.reanchor = bool(reanchor)
        if max_instances is not None and max_instances < 1:
            raise ValueError(f'max_instances must be >= 1 or None, got {max_instances}')
        self._max_instances = None if max_instances is None else int(max_instances)
        self._next_id = 1
        self._tracks: Dict[int, _Track] = {}
        self._frame_index = -1
        self._last_detection: Optional[int] = None
        self.tracker.reset()

    # -- state ------------------------------------------------------------------------------
    @property
    def concepts(self) -> List[str]:
        """Return the concept engine's active concepts."""
        return list(self.concept_engine.concepts)

    @property
    def frame_index(self) -> int:
        """Return the index of the last processed frame (-1 before the first)."""
        return self._frame_index

    @property
    def max_instances(self) -> Optional[int]:
        """Return the most instances a frame reports (None: no cap)."""
        if self._max_instances is not None:
            return self._max_instances
        limit = getattr(self.concept_engine, 'max_instances', None)
        return None if limit is None else int(limit)

    @property
    def track_ids(self) -> List[int]:
        """Return the IDs of all live tracks (present or briefly lost)."""
        return sorted(self._tracks)

    def missed_redetections(self, track_id: int) -> int:
        """Return how many consecutive re-detections have missed a live track."""
        return self._tracks[track_id].missed

    def set_concepts(self, concepts: Sequence[str]) -> List[str]:
        """Change the concepts; the next frame re-detects, and tracks keep their IDs.

        A planner that adds ``damaged apple`` to ``ripe apple`` must not see every apple
        renumbered. So tracks live on, and the re-detection on the next frame sorts them:
        a track matched by a detection of the new set keeps its ID and takes that
        detection's concept; an unmatched one whose concept left the set is dropped then
        and there (never reported under a concept no longer asked for). Invalid concepts
        raise ConceptError and change nothing (tracks continue).
        """
        accepted = self.concept_engine.set_concepts(concepts)
        self.request_redetection()
        return accepted

    def request_redetection(self) -> None:
        """Run concept detection on the next frame, whatever the schedule says."""
        self._last_detection = None

    def reset(self) -> None:
        """Drop all tracks and SAM2 memory (a new stream); IDs continue where they were."""
        self._drop_all_tracks()
        self._frame_index = -1

    def _drop_all_tracks(self) -> None:
        self.tracker.reset()
        self._tracks.clear()
        self._last_detection = None

    # -- per frame --------------------------------------------------------------------------
    def step(self, frame: np.ndarray) -> List[Instance]:
        """Process the next RGB uint8 ``(H, W, 3)`` frame; return tracked instances by ID."""
        result = self.tracker.track(frame)
        self._frame_index += 1
        # The tracker reports an object present only with a mask pixel (TrackedObject):
        # an empty last mask would match no detection and give the fruit a new ID.
        visible = {obj.object_id: obj.mask for obj in result.objects
                   if obj.present and obj.object_id in self._tracks}
        for track_id, mask in visible.items():
            self._tracks[track_id].last_mask = mask
        self._drop_duplicates(visible)
        detect = (self._last_detection is None
                  or self._frame_index - self._last_detection >= self.redetect_every_n)
        if not detect:
            shown = dict(visible)
        else:
            shown = self._redetect(frame, visible)
        return [self._instance(track_id, shown[track_id]) for track_id in self._capped(shown)]

    def _capped(self, shown: Mapping[int, np.ndarray]) -> List[int]:
        """Return the IDs of ``shown`` to report, by ID: the best ``max_instances`` by score."""
        limit = self.max_instances
        if limit is not None and len(shown) > limit:
            best = sorted(shown, key=lambda t: (-self._tracks[t].score, t))[:limit]
            return sorted(best)
        return sorted(shown)

    def _drop_duplicates(self, visible: Dict[int, np.ndarray]) -> None:
        """Drop the tracks ``duplicate_tracks`` finds (from SAM2 too, and from ``visible``)."""
        anchors = {t: self._tracks[t].anchor_mask for t in visible}
        for track_id in duplicate_tracks(visible, anchors, self.duplicate_iou):
            logger.debug('track %d moved onto another track\'s object: dropped', track_id)
            del self._tracks[track_id]
            del visible[track_id]
            self.tracker.remove_object(track_id)

    def _detect(self, frame: np.ndarray) -> Tuple[List[Instance], List[bool]]:
        """Return the frame's detections after NMS, and which of them may start a track."""
        engine_cap = getattr(self.concept_engine, 'max_instances', None)
        if engine_cap is None:
            found = list(self.concept_engine.segment(frame))
            starters = len(found)
        else:
            # The engine keeps only its best ``engine_cap``: a live track outranked by that
            # many new objects would count as missed although SAM3 still finds it, be
            # dropped, and come back under a new ID. One more per live track confirms them
            # all; new tracks still come from the best ``engine_cap`` only.
            starters = int(engine_cap)
            found = list(self.concept_engine.segment(
                frame, max_instances=starters + len(self._tracks)))
        # Best first (as the engine returns them); a detection without a pixel can be
        # neither matched nor prompted (SAM2 refuses an empty mask).
        found = sorted((d for d in found if d.mask.any()), key=lambda d: -d.score)
        may_start = {id(d) for d in found[:starters]}
        detections = resolve_duplicates(found, self.detection_nms_iou)
        return detections, [id(d) in may_start for d in detections]

    def _redetect(self, frame: np.ndarray, visible: Dict[int, np.ndarray]
                  ) -> Dict[int, np.ndarray]:
        """Run the re-detection rules; return the mask of every track to show, by ID."""
        detections, may_start = self._detect(frame)
        # Only a detection that ran counts: after an error the next frame tries again.
        self._last_detection = self._frame_index
        before = {t: replace(track) for t, track in self._tracks.items()}
        track_ids = sorted(self._tracks)
        reference = [self._tracks[t].last_mask for t in track_ids]
        iou, _ = mask_overlaps(reference, [d.mask for d in detections])
        matches, unmatched_tracks, unmatched_detections = assign_by_iou(iou, self.match_iou)
        if reference:
            # SAM3's rule: a detection overlapping any track is not a new object.
            unmatched_detections = [d for d in unmatched_detections
                                    if iou[:, d].max() < self.match_iou]
        unmatched_detections = [d for d in unmatched_detections if may_start[d]]
        active = set(self.concept_engine.concepts)
        for index in unmatched_tracks:
            track_id = track_ids[index]
            track = self._tracks[track_id]
            track.missed += 1
            # A concept outside the set: the planner removed it since this track's
            # detection (set_concepts), so the track must not be shown again.
            if track.missed >= self.max_missed_redetections or track.concept not in active:
                logger.debug('dropping track %d (%s) after %d missed re-detections',
                             track_id, track.concept, track.missed)
                del self._tracks[track_id]
                self.tracker.remove_object(track_id)
        shown: Dict[int, np.ndarray] = {}
        prompt_ids: List[int] = []
        prompt_masks: List[np.ndarray] = []
        for track_index, det_index in matches:
            track_id, detection = track_ids[track_index], detections[det_index]
            self._tracks[track_id] = _Track.from_detection(detection)
            shown[track_id] = detection.mask
            if self.reprompt_matched:
                prompt_ids.append(track_id)
                prompt_masks.append(detection.mask)
        for det_index in unmatched_detections:
            detection = detections[det_index]
            track_id = next_label_id(self._next_id, self._tracks)
            self._next_id = track_id + 1
            self._tracks[track_id] = _Track.from_detection(detection)
            shown[track_id] = detection.mask
            prompt_ids.append(track_id)
            prompt_masks.append(detection.mask)
        if prompt_ids:
            try:
                self.tracker.add_objects(masks=np.stack(prompt_masks), object_ids=prompt_ids,
                                         replace_conditioning=self.reanchor)
            except BaseException:
                # SAM2 withdrew the prompts (out of GPU memory, say). New tracks it never
                # received would fail its remove_object when dropped later: go back to the
                # tracks as before this re-detection, less those already dropped from SAM2,
                # and re-detect on the next frame.
                live = set(self.tracker.object_ids)
                self._tracks = {t: track for t, track in before.items() if t in live}
                self._last_detection = None
                raise
        # Tracks SAM3 missed this time but SAM2 still sees stay visible until dropped.
        for track_id in self._tracks:
            if track_id not in shown and track_id in visible:
                shown[track_id] = visible[track_id]
        return shown

    def _instance(self, track_id: int, mask: np.ndarray) -> Instance:
        track = self._tracks[track_id]
        return Instance(mask=mask, box=mask_to_box(mask), score=track.score,
                        concept=track.concept, area=int(np.count_nonzero(mask)),
                        instance_id=track_id)


__all__ = ['HybridTracker', 'assign_by_iou', 'associate', 'duplicate_tracks']
