"""Hybrid SAM3 -> SAM2 tracking: association, ID persistence, re-detection and dropping.

The tracker is always the real ``Sam2Tracker`` on the tiny SAM2 architecture. SAM2's
object-score head is biased so every object is judged present (or absent); with random
weights that is what makes the SAM2 side deterministic. Association tests feed hand-made
detections through a scripted concept engine (the seam); one test runs the real tiny SAM3
engine end to end.
"""

import numpy as np
import pytest
import torch

from sam_gap_ros.engines.concept_query import parse_concepts, resolve_duplicates
from sam_gap_ros.engines.hybrid import associate, duplicate_tracks, HybridTracker
from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
from sam_gap_ros.engines.tiny_sam2 import tiny_sam2_video_config
from sam_gap_ros.engines.types import ConceptError, Instance
from sam_gap_ros.mask_ops import mask_to_box

H, W = 64, 96


def rect(x0, y0, x1, y1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def det(mask, score=0.9, concept='apple'):
    return Instance(mask=mask, box=mask_to_box(mask), score=score, concept=concept,
                    area=int(mask.sum()))


A, A_MOVED = rect(4, 4, 24, 24), rect(6, 5, 26, 25)
B, C = rect(40, 10, 60, 40), rect(70, 30, 90, 60)
FRAME = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


class ScriptedConcepts:
    """Concept-engine seam returning hand-made detections frame by frame."""

    def __init__(self, script):
        self.script = dict(script)
        self.calls = []
        # As a real engine, it only returns concepts of its set.
        self.concepts = sorted({d.concept for dets in self.script.values() for d in dets})

    def set_concepts(self, concepts):
        self.concepts = [q.text for q in parse_concepts(concepts)]
        return self.concepts

    def segment(self, frame, max_instances=None):
        self.calls.append(len(self.calls))
        found = list(self.script.get(len(self.calls) - 1, []))
        if max_instances is None:
            return found
        # As a real engine: the best max_instances, best first.
        return sorted(found, key=lambda d: -d.score)[:max_instances]


def make_tracker(presence):
    # Without the motion gate: the random decoder's tracked masks wander off their boxes
    # and would be reported absent; these tests are about association (the gate itself:
    # test_sam2_tracker, test_quality_tiny_models).
    tracker = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=0, motion_gate_margin=None)
    with torch.no_grad():
        head = tracker.model.mask_decoder.pred_obj_score_head.proj_out
        head.weight.zero_()
        head.bias.fill_(presence)
    return tracker


def ids(instances):
    return [i.instance_id for i in instances]


# ----------------------------------------------------------------------------- association


def test_associate_is_one_to_one_and_thresholded():
    matches, lost, new = associate([A, B], [C, A_MOVED], 0.5)
    assert matches == [(0, 1)] and lost == [1] and new == [0]
    # Greedy would pair t0 with d0 (IoU 0.8) and leave t1 unmatched; the assignment
    # maximising the total IoU pairs t0-d1 (0.5) and t1-d0 (1/3).
    t0, t1 = rect(0, 0, 10, 10), rect(0, 0, 4, 10)
    d0, d1 = rect(1, 0, 9, 10), rect(5, 0, 10, 10)
    assert associate([t0, t1], [d0, d1], 0.3) == ([(0, 1), (1, 0)], [], [])
    # Below-threshold pairs take no part: at 0.4 the best valid pairing is t0-d0.
    assert associate([t0, t1], [d0, d1], 0.4) == ([(0, 0)], [1], [1])
    assert associate([], [A], 0.5) == ([], [], [0])
    assert associate([A], [], 0.5) == ([], [0], [])
    assert associate([A], [A_MOVED], 0.99) == ([], [0], [0])
    with pytest.raises(ValueError):
        associate([A], [A], 0.0)


def test_duplicate_tracks_drops_the_track_that_strayed_from_its_anchor():
    # Track 1 was confirmed on A and is still there; track 2 was confirmed on C but SAM2
    # carried it onto A (C left the image): 2 is the duplicate, whatever the ID order.
    assert duplicate_tracks({1: A_MOVED, 2: A}, {1: A, 2: C}, 0.5) == [2]
    assert duplicate_tracks({1: A, 2: A_MOVED}, {1: C, 2: A}, 0.5) == [1]
    # Overlap below the threshold, empty masks and single tracks are left alone.
    assert duplicate_tracks({1: A, 2: B}, {1: A, 2: B}, 0.5) == []
    assert duplicate_tracks({1: A, 2: np.zeros_like(A)}, {1: A, 2: A}, 0.5) == []
    assert duplicate_tracks({1: A}, {1: C}, 0.5) == []
    # Equally consistent: the newer ID goes. Three on one object: two go.
    assert duplicate_tracks({1: A, 2: A}, {1: A, 2: A}, 0.5) == [2]
    assert duplicate_tracks({1: A, 2: A, 3: A_MOVED}, {1: C, 2: A, 3: B}, 0.5) == [1, 3]


# ----------------------------------------------------------------------------- with SAM2


def test_ids_persist_new_ids_and_drop_after_k_misses():
    script = {0: [det(A), det(B, 0.8, 'leaf')],
              1: [det(A_MOVED, 0.7, 'ripe apple'), det(C)],
              2: [det(C), det(A)],
              3: [det(B)]}
    concepts = ScriptedConcepts(script)
    # SAM2 judges every object absent after its prompt frame, so association runs on the
    # last known (detection) masks: fully determined by the script.
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=3,
                           max_missed_redetections=2)
    first = hybrid.step(FRAME)
    assert ids(first) == [1, 2]
    assert np.array_equal(first[0].mask, A) and first[1].concept == 'leaf'
    assert hybrid.tracker.object_ids == [1, 2]
    for _ in range(2):
        assert hybrid.step(FRAME) == []         # absent in SAM2, not re-detected yet
        assert hybrid.track_ids == [1, 2]
    third = hybrid.step(FRAME)                  # frame 3: re-detection
    assert len(concepts.calls) == 2
    assert ids(third) == [1, 3]
    assert (third[0].concept, third[0].score) == ('ripe apple', 0.7)
    assert np.array_equal(third[0].mask, A_MOVED)
    assert hybrid.missed_redetections(2) == 1 and hybrid.track_ids == [1, 2, 3]
    for _ in range(2):
        hybrid.step(FRAME)
    sixth = hybrid.step(FRAME)                  # B missed twice: dropped
    assert ids(sixth) == [1, 3]
    assert hybrid.track_ids == [1, 3] and hybrid.tracker.object_ids == [1, 3]
    for _ in range(2):
        hybrid.step(FRAME)
    ninth = hybrid.step(FRAME)                  # B again: a new ID, 2 is never reused
    assert ids(ninth) == [4]
    assert hybrid.track_ids == [1, 3, 4]
    assert hybrid.missed_redetections(1) == 1
    assert hybrid.frame_index == 9 and len(concepts.calls) == 4


def test_new_track_ids_wrap_after_65535_past_live_tracks():
    concepts = ScriptedConcepts({0: [det(A)], 1: [det(A), det(B), det(C)]})
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=1,
                           max_missed_redetections=2)
    assert ids(hybrid.step(FRAME)) == [1]
    hybrid._next_id = 65535  # as after a long shift of apples coming and going
    # A keeps 1; the two new apples get 65535, then 2: IDs are mono16 label values.
    assert ids(hybrid.step(FRAME)) == [1, 2, 65535]
    assert hybrid.track_ids == sorted(hybrid.tracker.object_ids) == [1, 2, 65535]


def test_present_tracks_reported_between_redetections():
    concepts = ScriptedConcepts({0: [det(A), det(C)]})
    # Random SAM2 weights give both prompts the same mask; duplicate_iou=1.0 turns off the
    # duplicate rule (tested on its own below) so that both tracks stay.
    hybrid = HybridTracker(concepts, make_tracker(3.0), redetect_every_n=4,
                           max_missed_redetections=2, duplicate_iou=1.0)
    assert ids(hybrid.step(FRAME)) == [1, 2]
    for _ in range(3):
        tracked = hybrid.step(FRAME)
        assert ids(tracked) == [1, 2]
        for instance in tracked:
            assert instance.mask.shape == (H, W) and instance.mask.dtype == bool
            assert instance.area == int(instance.mask.sum())
            assert (instance.concept, instance.score) == ('apple', 0.9)
    assert len(concepts.calls) == 1
    # Missed by SAM3 but still seen by SAM2: reported until dropped on the second miss.
    assert ids(hybrid.step(FRAME)) == [1, 2]
    hybrid.redetect_every_n = 1
    assert ids(hybrid.step(FRAME)) == []
    assert hybrid.track_ids == [] and hybrid.tracker.object_ids == []
    assert len(concepts.calls) == 3


def test_two_tracks_on_one_object_keep_one_id():
    # Random SAM2 weights give every prompt the same mask: the two tracks below cover one
    # object on the next frame, and the duplicate rule keeps exactly one of them (in the
    # hybrid and in SAM2's session alike).
    concepts = ScriptedConcepts({0: [det(A), det(C)]})
    hybrid = HybridTracker(concepts, make_tracker(3.0), redetect_every_n=10)
    assert ids(hybrid.step(FRAME)) == [1, 2]
    second = hybrid.step(FRAME)
    assert len(second) == 1 and hybrid.track_ids == ids(second)
    assert hybrid.tracker.object_ids == hybrid.track_ids


def test_reported_instances_respect_max_instances():
    # SAM2 keeps seeing every track; each re-detection finds one new object. Old tracks
    # live on beside the new ones, but a frame reports at most max_instances: the
    # highest-scoring (score of the last matching detection), listed by ID.
    script = {0: [det(A, 0.6)], 1: [det(C, 0.9)], 2: [det(B, 0.8)]}

    def run(cap_on_engine=None, cap=None):
        concepts = ScriptedConcepts(script)
        if cap_on_engine is not None:
            concepts.max_instances = cap_on_engine
        explicit = {} if cap is None else {'max_instances': cap}
        hybrid = HybridTracker(concepts, make_tracker(3.0), redetect_every_n=1,
                               duplicate_iou=1.0, max_missed_redetections=5, **explicit)
        frames = [[(i.instance_id, i.score) for i in hybrid.step(FRAME)] for _ in range(4)]
        return hybrid, frames

    hybrid, uncapped = run()
    assert uncapped == [[(1, 0.6)], [(1, 0.6), (2, 0.9)], [(1, 0.6), (2, 0.9), (3, 0.8)],
                        [(1, 0.6), (2, 0.9), (3, 0.8)]]
    # The concept engine's max_instances (what the node sets) caps the frame's output.
    hybrid, one = run(cap_on_engine=1)
    assert one == [[(1, 0.6)], [(2, 0.9)], [(2, 0.9)], [(2, 0.9)]]
    assert hybrid.track_ids == [1, 2, 3]            # the others are still tracked
    assert hybrid.max_instances == 1
    hybrid.concept_engine.max_instances = 2         # changed at run time: applies at once
    assert [(i.instance_id, i.score) for i in hybrid.step(FRAME)] == [(2, 0.9), (3, 0.8)]
    # An explicit cap wins over the engine's; under the cap nothing changes.
    assert run(cap_on_engine=1, cap=3)[1] == uncapped
    assert run(cap=2)[1][2:] == [[(2, 0.9), (3, 0.8)]] * 2
    with pytest.raises(ValueError, match='max_instances'):
        HybridTracker(ScriptedConcepts({}), make_tracker(0.0), max_instances=0)


def test_concept_change_reset_and_bad_frames():
    concepts = ScriptedConcepts({0: [det(A)], 1: [det(B, concept='leaf')], 2: [det(C)]})
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=10)
    assert ids(hybrid.step(FRAME)) == [1]
    with pytest.raises(ConceptError):
        hybrid.set_concepts(['apple or pear'])
    assert hybrid.track_ids == [1] and concepts.concepts == ['apple', 'leaf']
    assert hybrid.set_concepts(['Leaf']) == ['leaf']
    assert hybrid.track_ids == [1]              # sorted out by the next re-detection
    # Detection right after the change; apple track 1 is not matched and its concept has
    # left the set, so it goes at once (max_missed_redetections would keep it one more).
    assert ids(hybrid.step(FRAME)) == [2]
    assert hybrid.track_ids == [2] and hybrid.tracker.object_ids == [2]
    with pytest.raises(ValueError, match='stream size'):
        hybrid.step(np.zeros((H + 2, W, 3), np.uint8))
    assert hybrid.track_ids == [2] and hybrid.frame_index == 1
    hybrid.reset()
    assert hybrid.frame_index == -1 and hybrid.track_ids == []
    assert ids(hybrid.step(FRAME)) == [3]       # IDs continue after a reset
    assert len(concepts.calls) == 3
    with pytest.raises(ValueError):
        HybridTracker(concepts, make_tracker(0.0), redetect_every_n=0)


def test_concept_change_keeps_the_ids_of_tracks_still_detected():
    # A planner asks for ripe and unripe apples, then for ripe and damaged ones, then for
    # any apple: the ripe apple keeps ID 1 throughout, whatever its concept is called.
    script = {0: [det(A, concept='ripe apple'), det(B, concept='unripe apple')],
              1: [det(A_MOVED, concept='ripe apple'), det(C, concept='damaged apple')],
              2: [det(A, concept='apple')]}
    concepts = ScriptedConcepts(script)
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=10,
                           max_missed_redetections=3)
    hybrid.set_concepts(['ripe apple', 'unripe apple'])
    assert ids(hybrid.step(FRAME)) == [1, 2]
    hybrid.set_concepts(['ripe apple', 'damaged apple'])
    second = hybrid.step(FRAME)                 # re-detects right after the change
    assert [(i.instance_id, i.concept) for i in second] == [(1, 'ripe apple'),
                                                            (3, 'damaged apple')]
    # The unripe apple (2) is no longer asked for: gone although it missed only once.
    assert hybrid.track_ids == [1, 3] and hybrid.tracker.object_ids == [1, 3]
    hybrid.set_concepts(['apple'])
    third = hybrid.step(FRAME)
    assert [(i.instance_id, i.concept) for i in third] == [(1, 'apple')]
    assert hybrid.track_ids == [1] and len(concepts.calls) == 3


def test_detection_rules_follow_sam3_video():
    part_of_a = rect(4, 4, 14, 24)              # IoU 0.5 with A: a partial mask of A
    a_lagging = rect(14, 4, 34, 24)             # IoU 1/3 with A: A moved, SAM2 lags
    wide = rect(0, 40, 40, 60)                  # one SAM2 mask over two touching objects
    left, right = rect(0, 40, 22, 60), rect(22, 40, 40, 60)
    script = {0: [det(A), det(part_of_a, 0.8), det(wide, 0.7)],
              1: [det(a_lagging), det(left), det(right, 0.8)],
              2: [det(A)]}
    hybrid = HybridTracker(ScriptedConcepts(script), make_tracker(-3.0), redetect_every_n=1)
    # NMS: the partial mask of A does not start a track of its own.
    assert ids(hybrid.step(FRAME)) == [1, 2]
    # Loose association keeps A's ID at IoU 1/3; of the two detections on track 2's mask
    # one keeps the ID and the other is a piece of a tracked object, not a new one.
    second = hybrid.step(FRAME)
    assert ids(second) == [1, 2] and hybrid.track_ids == [1, 2]
    assert np.array_equal(second[0].mask, a_lagging) and np.array_equal(second[1].mask, left)
    # Re-anchoring: a matched track's new prompt replaces its earlier conditioning frames.
    session = hybrid.tracker.session
    assert list(session.output_dict_per_obj[session.obj_id_to_idx(1)]['cond_frame_outputs']) \
        == [1]
    hybrid.step(FRAME)
    assert list(session.output_dict_per_obj[session.obj_id_to_idx(1)]['cond_frame_outputs']) \
        == [2]
    # The old rules (strict matching, no NMS): the partial mask becomes track 2, the
    # lagging A and the right object get new IDs 4 and 5; only left keeps 3 (IoU 0.55).
    old = HybridTracker(ScriptedConcepts(script), make_tracker(-3.0), redetect_every_n=1,
                        match_iou=0.5, detection_nms_iou=1.0, reanchor=False)
    assert ids(old.step(FRAME)) == [1, 2, 3]
    assert ids(old.step(FRAME)) == [3, 4, 5]
    with pytest.raises(ValueError):
        HybridTracker(ScriptedConcepts({}), make_tracker(0.0), detection_nms_iou=0.0)


def test_end_to_end_with_tiny_sam3():
    engine = Sam3ConceptEngine.from_config(seed=0, score_threshold=0.0, max_instances=3)
    hybrid = HybridTracker(engine, make_tracker(-3.0), redetect_every_n=2)
    concepts = ['apple', 'leaf but not apple']
    assert hybrid.set_concepts(concepts) == concepts
    # Random weights: the three detections overlap, NMS keeps those it keeps.
    expected = resolve_duplicates(engine.segment(FRAME), hybrid.detection_nms_iou)
    first = hybrid.step(FRAME)
    assert ids(first) == list(range(1, len(expected) + 1))
    for instance, detection in zip(first, expected, strict=True):
        assert np.array_equal(instance.mask, detection.mask)
    for instance in first:
        assert instance.mask.shape == (H, W) and instance.area > 0
        assert instance.concept in ('apple', 'leaf but not apple')
    assert hybrid.step(FRAME) == []
    # The same frame again: SAM3 finds the same instances, so every ID is kept.
    again = hybrid.step(FRAME)
    assert ids(again) == ids(first)
    for old, new in zip(first, again, strict=True):
        assert np.array_equal(old.mask, new.mask) and old.concept == new.concept
    # The planner sets the same concepts in another order (a new set to the node): the
    # next frame re-detects at once, and every instance keeps its ID.
    assert hybrid.set_concepts(concepts[::-1]) == concepts[::-1]
    after_change = hybrid.step(FRAME)
    assert ids(after_change) == ids(first)
    for old, new in zip(first, after_change, strict=True):
        assert np.array_equal(old.mask, new.mask)


def test_failed_detection_is_retried_next_frame():
    class FailingOnce(ScriptedConcepts):
        def segment(self, frame):
            if not self.calls:
                self.calls.append('failed')
                raise ConceptError('no concepts set')
            self.calls.append('ok')
            return [det(A)]

    concepts = FailingOnce({})
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=10)
    with pytest.raises(ConceptError):
        hybrid.step(FRAME)
    assert ids(hybrid.step(FRAME)) == [1]
    assert hybrid.step(FRAME) == [] and concepts.calls == ['failed', 'ok']


def test_present_track_without_pixels_counts_as_absent():
    # SAM2 may judge an object present yet give it no mask pixel. Such a track has nothing
    # to report, and its empty mask must not replace the last known one: the re-detection
    # of the fruit where it was keeps its ID instead of starting a second track.
    tracker = make_tracker(3.0)
    with torch.no_grad():   # tracked frames: mask logits 0 everywhere, i.e. no pixel
        for mlp in tracker.model.mask_decoder.output_hypernetworks_mlps:
            for parameter in mlp.parameters():
                parameter.zero_()
    hybrid = HybridTracker(ScriptedConcepts({0: [det(A)], 1: [det(A)]}), tracker,
                           redetect_every_n=2)
    assert ids(hybrid.step(FRAME)) == [1]
    assert hybrid.step(FRAME) == []
    # What the test is about: SAM2 judges the object present (the tracker reports it
    # absent, having no pixel of it).
    assert tracker.last_result.objects[0].score > 0
    again = hybrid.step(FRAME)
    assert ids(again) == [1] and np.array_equal(again[0].mask, A)
    assert hybrid.track_ids == [1] and hybrid.missed_redetections(1) == 0


def test_tracks_outranked_beyond_the_engine_cap_keep_their_ids():
    # Three apples, the engine keeps its best two. B ranks third on two re-detections: it
    # is still detected, so it stays track 2 (not reported while two rank higher) and is
    # reported as 2 when it ranks first again. New tracks still come from the best two.
    script = {0: [det(A, 0.9), det(B, 0.8), det(C, 0.7)],
              1: [det(A, 0.9), det(C, 0.85), det(B, 0.8)],
              2: [det(A, 0.9), det(C, 0.85), det(B, 0.8)],
              3: [det(B, 0.95), det(A, 0.9), det(C, 0.85)]}
    concepts = ScriptedConcepts(script)
    concepts.max_instances = 2
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=1)
    frames = [[(i.instance_id, i.score) for i in hybrid.step(FRAME)] for _ in script]
    assert frames == [[(1, 0.9), (2, 0.8)], [(1, 0.9), (3, 0.85)], [(1, 0.9), (3, 0.85)],
                      [(1, 0.9), (2, 0.95)]]
    assert hybrid.track_ids == [1, 2, 3]
    assert [hybrid.missed_redetections(t) for t in (1, 2, 3)] == [0, 0, 0]
    # Only the engine's best two start tracks: a third new apple waits for its turn.
    fresh = ScriptedConcepts({0: [det(A, 0.9), det(B, 0.8), det(C, 0.7)]})
    fresh.max_instances = 2
    hybrid = HybridTracker(fresh, make_tracker(-3.0), redetect_every_n=1)
    assert ids(hybrid.step(FRAME)) == [1, 2] and hybrid.track_ids == [1, 2]


def test_detections_without_pixels_are_ignored():
    # An engine's empty mask can be neither matched nor prompted (SAM2 refuses it): it must
    # not fail the frame, nor leave a track SAM2 never received.
    empty = np.zeros_like(A)
    concepts = ScriptedConcepts({0: [det(A), det(empty, 0.95)], 1: [det(empty), det(B)]})
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=1)
    assert ids(hybrid.step(FRAME)) == [1]
    assert ids(hybrid.step(FRAME)) == [2]
    assert hybrid.track_ids == hybrid.tracker.object_ids == [1, 2]


def test_a_prompt_failing_in_sam2_leaves_no_track_sam2_does_not_know(monkeypatch):
    # SAM2 refuses the re-detection's prompts (out of GPU memory) and withdraws them. The
    # new track used to stay in the hybrid without a SAM2 object: dropping it at a later
    # re-detection then failed with "unknown object id", frame after frame.
    script = {0: [det(A)], 1: [det(A), det(C)], 2: [det(A), det(C)], 3: [det(A)],
              4: [det(A)]}
    concepts = ScriptedConcepts(script)
    hybrid = HybridTracker(concepts, make_tracker(-3.0), redetect_every_n=10)
    assert ids(hybrid.step(FRAME)) == [1]
    hybrid.request_redetection()

    def out_of_memory(frame_idx, ids):
        raise RuntimeError('CUDA out of memory (injected)')

    with monkeypatch.context() as patch:
        patch.setattr(hybrid.tracker, '_run_prompted', out_of_memory)
        with pytest.raises(RuntimeError, match='out of memory'):
            hybrid.step(FRAME)
    assert hybrid.track_ids == hybrid.tracker.object_ids == [1]
    assert hybrid.missed_redetections(1) == 0
    # The next frame re-detects at once; ID 2 went with the failed prompt.
    assert ids(hybrid.step(FRAME)) == [1, 3]
    assert hybrid.track_ids == hybrid.tracker.object_ids == [1, 3]
    hybrid.redetect_every_n = 1
    assert ids(hybrid.step(FRAME)) == [1]      # C missed once: kept, absent in SAM2
    assert ids(hybrid.step(FRAME)) == [1]      # missed twice: dropped without an error
    assert hybrid.track_ids == hybrid.tracker.object_ids == [1]
