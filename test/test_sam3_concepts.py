"""SAM3 concept engine on the tiny randomly initialised SAM3 architecture."""

import numpy as np
import pytest
import torch
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
from sam_gap_ros.engines.types import ConceptError, Instance
from sam_gap_ros.mask_ops import mask_to_box

H, W = 45, 70   # non-square, smaller than the 112 px model input


@pytest.fixture(scope='module')
def engine():
    return Sam3ConceptEngine.from_config(seed=0)


@pytest.fixture
def counters(engine):
    """Count real forward calls of the text encoder, ViT backbone and DETR encoder."""
    calls = {'text': 0, 'backbone': 0, 'detr_batches': []}

    def text_hook(module, args, output):
        calls['text'] += 1

    def backbone_hook(module, args, output):
        calls['backbone'] += 1

    def detr_hook(module, args, kwargs, output):
        calls['detr_batches'].append(int(kwargs['text_features'].shape[0]))

    handles = [engine.model.text_encoder.register_forward_hook(text_hook),
               engine.model.vision_encoder.backbone.register_forward_hook(backbone_hook),
               engine.model.detr_encoder.register_forward_hook(detr_hook, with_kwargs=True)]
    yield calls
    for handle in handles:
        handle.remove()


def frame(seed=0, height=H, width=W):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_outputs_are_full_resolution_instances(engine):
    engine.set_concepts(['apple', 'leaf'])
    found = engine.segment(frame(), score_threshold=0.0, max_instances=100)
    assert found, 'threshold 0 keeps every query with a non-empty mask'
    for instance in found:
        assert isinstance(instance, Instance)
        assert instance.mask.shape == (H, W) and instance.mask.dtype == bool
        assert instance.area == int(instance.mask.sum()) > 0
        assert instance.box == mask_to_box(instance.mask)
        assert 0.0 < instance.score <= 1.0
        assert instance.concept in ('apple', 'leaf')
        assert instance.instance_id is None
    assert [i.score for i in found] == sorted((i.score for i in found), reverse=True)
    limited = engine.segment(frame(), score_threshold=0.0, max_instances=3)
    assert [(i.concept, i.score) for i in limited] == [(i.concept, i.score) for i in found[:3]]
    # The default threshold applies when none is passed.
    engine.score_threshold = 0.999
    assert engine.segment(frame()) == []
    engine.score_threshold = 0.5


def test_mask_threshold_sets_the_mask_probability_cut(engine):
    engine.set_concepts(['apple'])
    strict, loose = 0.5, 0.45  # random weights: mask probabilities all near 0.5
    try:
        engine.mask_threshold = strict
        tight = engine.detect(frame(), score_threshold=0.0, max_instances=5)['apple']
        engine.mask_threshold = loose
        wide = engine.detect(frame(), score_threshold=0.0, max_instances=5)['apple']
    finally:
        engine.mask_threshold = 0.5
    # Same queries (scores do not depend on it); each looser mask contains the stricter one.
    # (Queries whose strict mask is empty are dropped from the strict list.)
    by_score = {round(i.score, 6): i.mask for i in wide}
    assert tight and all(round(i.score, 6) in by_score for i in tight)
    assert all(np.array_equal(i.mask & by_score[round(i.score, 6)], i.mask) for i in tight)
    assert sum(i.area for i in wide) > sum(i.area for i in tight)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match='mask_threshold'):
            Sam3ConceptEngine.from_config(seed=0, mask_threshold=bad)


def test_matches_naive_processor_and_model_call(engine):
    """Cached text + broadcast backbone give the same detections as the plain HF recipe."""
    engine.set_concepts(['ripe apple', 'trunk', 'leaf', 'green apple'])
    image = frame(1)
    mine = engine.segment(image, score_threshold=0.0, max_instances=1000)
    processor, model = engine.processor, engine.model
    for phrase in ('ripe apple', 'green apple'):
        inputs = processor(images=image, text=phrase, return_tensors='pt')
        inputs.pop('original_sizes')
        with torch.no_grad():
            outputs = model(**inputs)
        naive = processor.post_process_instance_segmentation(
            outputs, threshold=0.0, mask_threshold=0.5, target_sizes=[(H, W)])[0]
        expected = [(m, s) for m, s in zip(naive['masks'].bool().numpy(),
                                           naive['scores'].tolist(), strict=True) if m.any()]
        candidates = engine.detect(image, score_threshold=0.0, max_instances=1000)[phrase]
        assert len(candidates) == len(expected)
        for mask, score in expected:
            assert any(np.array_equal(mask, c.mask) and abs(c.score - score) < 1e-5
                       for c in candidates)
    assert {i.concept for i in mine} <= {'ripe apple', 'trunk', 'leaf', 'green apple'}


def test_text_encoded_once_per_concept_set(engine, counters):
    # Phrases no other test of the shared engine uses, so none is cached yet.
    engine.set_concepts(['sunburnt pear', 'codling moth near bud'])
    assert counters['text'] == 1
    for seed in range(3):
        engine.segment(frame(seed))
    assert counters['text'] == 1
    # Only the new phrase is encoded; cached phrases are reused when switching back.
    engine.set_concepts(['sunburnt pear', 'hail spot'])
    assert counters['text'] == 2
    engine.set_concepts(['Sunburnt Pear', 'codling  moth NEAR bud'])
    engine.segment(frame())
    assert counters['text'] == 2


def test_one_backbone_pass_for_many_concepts(engine, counters):
    engine.set_concepts(['apple', 'pear', 'leaf', 'trunk'])
    engine.segment(frame())
    assert counters['backbone'] == 1
    assert counters['detr_batches'] == [4]
    engine.segment(frame(2))
    assert counters['backbone'] == 2
    # Compositions reuse the shared phrase set: 3 concepts, 3 base phrases, one batch.
    engine.set_concepts(['apple but not green apple', 'apple near trunk', 'trunk'])
    engine.segment(frame())
    assert counters['backbone'] == 3
    assert counters['detr_batches'][-1] == 3


def test_phrase_batches_share_the_backbone():
    small = Sam3ConceptEngine.from_config(seed=0, phrase_batch_size=2)
    calls = []
    small.model.vision_encoder.backbone.register_forward_hook(lambda *a: calls.append('vit'))
    small.model.detr_encoder.register_forward_hook(
        lambda m, a, k, o: calls.append(k['text_features'].shape[0]), with_kwargs=True)
    small.set_concepts(['apple', 'pear', 'leaf'])
    small.segment(frame())
    assert calls == ['vit', 2, 1]


@pytest.mark.parametrize('bad, message', [
    ([], 'empty'),
    (['apple', '   '], 'empty or whitespace'),
    (['x' * 129], '129 characters'),
    ([f'apple {i}' for i in range(17)], 'at most 16'),
    (['apple', 7], 'not a string'),
    ('apple', 'list of strings'),
    (['apple or pear'], "unknown operator 'or'"),
    (['z' * 40], 'tokens long'),
    (['apple', 'z' * 40], "'z+' is 42 tokens long"),
])
def test_invalid_concepts_keep_previous_set(engine, counters, bad, message):
    engine.set_concepts(['ripe apple', 'apple but not green apple'])
    before = (engine.concepts, engine.phrases)
    encoded = counters['text']
    with pytest.raises(ConceptError, match=message):
        engine.set_concepts(bad)
    assert (engine.concepts, engine.phrases) == before
    assert counters['text'] == encoded
    found = engine.segment(frame(), score_threshold=0.0)
    assert {i.concept for i in found} <= set(before[0])


def test_duplicates_are_canonicalised(engine):
    accepted = engine.set_concepts([' Ripe  Apple', 'ripe apple', 'apple AND NOT leaf'])
    assert accepted == ['ripe apple', 'apple but not leaf']
    assert engine.concepts == accepted
    assert engine.phrases == ['ripe apple', 'apple', 'leaf']


def test_composition_and_duplicate_rule_in_engine(engine):
    image = frame(3)
    engine.set_concepts(['apple'])
    plain = engine.segment(image, score_threshold=0.0, max_instances=1000)
    assert plain
    # Every apple overlaps itself: "apple but not apple" is empty.
    engine.set_concepts(['apple but not apple'])
    assert engine.segment(image, score_threshold=0.0) == []
    # "apple near apple" keeps every apple (distance 0), but as an exact duplicate of the
    # earlier "apple" concept each one is reported once, under the earlier concept.
    engine.set_concepts(['apple', 'apple near apple'])
    both = engine.segment(image, score_threshold=0.0, max_instances=1000)
    assert [(i.concept, i.score) for i in both] == [(i.concept, i.score) for i in plain]
    engine.set_concepts(['apple near apple'])
    near = engine.segment(image, score_threshold=0.0, max_instances=1000)
    assert [i.score for i in near] == [i.score for i in plain]
    assert {i.concept for i in near} == {'apple near apple'}


def test_bad_frames_and_missing_concepts_raise():
    fresh = Sam3ConceptEngine.from_config(seed=0)
    with pytest.raises(ConceptError, match='no concepts set'):
        fresh.segment(frame())
    fresh.set_concepts(['apple'])
    with pytest.raises(TypeError):
        fresh.segment([[0, 0, 0]])
    with pytest.raises(ValueError, match='RGB uint8'):
        fresh.segment(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match='RGB uint8'):
        fresh.segment(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match='empty'):
        fresh.segment(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match='score_threshold'):
        fresh.segment(frame(), score_threshold=1.0)
    with pytest.raises(ValueError, match='max_instances'):
        fresh.segment(frame(), max_instances=0)
    with pytest.raises(ValueError, match='max_instances must be a whole number'):
        fresh.detect(frame(), max_instances=2.7)  # was truncated to 2 silently


def test_negative_stride_frames_are_accepted(engine):
    """A BGR->RGB view (``[..., ::-1]``, negative strides) gives the copy's detections."""
    engine.set_concepts(['apple', 'leaf'])
    bgr = frame(4)
    view = bgr[..., ::-1]
    assert view.strides[-1] < 0
    expected = engine.segment(np.ascontiguousarray(view), score_threshold=0.0)
    found = engine.segment(view, score_threshold=0.0)
    assert [(i.concept, i.score) for i in found] == [(i.concept, i.score) for i in expected]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(found, expected, strict=True))
    assert engine.detect(view[::-1], score_threshold=0.0).keys() == {'apple', 'leaf'}


@pytest.mark.parametrize('height', [1, 3])
def test_frames_one_or_three_pixels_high_are_read_channels_last(engine, height):
    """A flat colour reaches the model as in a taller frame (not read as channels-first)."""
    engine.set_concepts(['apple'])
    colour = np.array([200, 30, 60], np.uint8)
    seen = []
    handle = engine.model.vision_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0] if args else kwargs['pixel_values']),
        with_kwargs=True)
    try:
        for rows in (height, 20):
            engine.detect(np.broadcast_to(colour, (rows, 40, 3)).copy(), score_threshold=0.0)
    finally:
        handle.remove()
    thin, tall = seen
    torch.testing.assert_close(thin, tall)
    # The first channel holds the red value (normalised with mean/std 0.5: 200 -> 0.57).
    assert float(thin[0, 0].mean()) == pytest.approx(200 / 127.5 - 1, abs=1e-4)


GRID = 28   # low-res mask side of the scripted detector outputs; frames are twice that
CELLS = [(0, 0, 6, 6), (8, 0, 14, 6), (16, 0, 22, 6), (0, 10, 6, 16)]


def scripted_detector(engine, script, empty=()):
    """Replace the detector: ``script[phrase]`` lists ``(cell, score)`` per query.

    Masks are the cells (at the low mask resolution); queries listed in ``empty`` as
    ``(phrase, query)`` get no pixel above the mask threshold.
    """
    def detector(vision, features, masks):
        phrases = engine.phrases[:features.shape[0]]
        queries = 8
        logits = torch.full((len(phrases), queries), -20.0)
        low_res = torch.full((len(phrases), queries, GRID, GRID), -10.0)
        for row, phrase in enumerate(phrases):
            for query, (cell, score) in enumerate(script[phrase]):
                logits[row, query] = float(np.log(score / (1 - score)))
                if (phrase, query) not in empty:
                    x0, y0, x1, y1 = CELLS[cell]
                    low_res[row, query, y0:y1, x0:x1] = 10.0
        return Sam3ImageSegmentationOutput(
            pred_logits=logits, pred_boxes=torch.zeros(len(phrases), queries, 4),
            pred_masks=low_res, presence_logits=torch.full((len(phrases), 1), 20.0))
    engine._detector = detector


def cells(instances):
    return [CELLS.index(tuple(int(v) // 2 for v in i.box)) for i in instances]


def test_compositions_see_every_instance_whatever_max_instances():
    # Four apples, the first three green. The set logic must see every green apple and
    # every apple: with max_instances=2, cutting each phrase to its best two would let
    # green apple 0 through (its 'green apple' detection ranks third) and hide the red one.
    local = Sam3ConceptEngine.from_config(seed=0, score_threshold=0.5)
    local.set_concepts(['apple but not green apple'])
    scripted_detector(local, {'apple': [(0, 0.9), (1, 0.8), (2, 0.7), (3, 0.6)],
                              'green apple': [(2, 0.95), (1, 0.9), (0, 0.85)]})
    image = frame(height=2 * GRID, width=2 * GRID)
    for cap in (1, 2, 10):
        assert cells(local.segment(image, max_instances=cap)) == [3]
    # detect() stays the raw per-phrase view: each phrase's best max_instances.
    assert [len(v) for v in local.detect(image, max_instances=2).values()] == [2, 2]
    # Plain concepts are still cut per phrase (nothing else needs their other instances).
    local.set_concepts(['apple', 'green apple near apple'])
    assert len(local.detect(image, max_instances=1)['apple']) == 1
    # Green apples 2 and 1 (0.95, 0.9) and apple 0 (0.9, the earlier concept wins the tie).
    assert cells(local.segment(image, max_instances=2)) == [2, 0]


def test_queries_without_mask_pixels_take_no_max_instances_slot():
    local = Sam3ConceptEngine.from_config(seed=0, score_threshold=0.5)
    local.set_concepts(['apple'])
    scripted_detector(local, {'apple': [(0, 0.95), (1, 0.9), (2, 0.8), (3, 0.7)]},
                      empty={('apple', 0), ('apple', 1)})
    image = frame(height=2 * GRID, width=2 * GRID)
    assert cells(local.segment(image, max_instances=2)) == [2, 3]
    assert cells(local.detect(image, max_instances=1)['apple']) == [2]
    assert cells(local.segment(image, max_instances=10)) == [2, 3]


@pytest.mark.parametrize('setting, value', [
    ('exclusion_iou', 0.0), ('exclusion_iou', 1.5), ('near_distance_px', -1.0),
    ('near_distance_px', float('inf')), ('near_distance_px', float('nan')),
    ('duplicate_iou', -0.1), ('score_threshold', 1.0), ('max_instances', 0),
    ('max_instances', 2.7),
])
def test_invalid_settings_are_refused_at_construction(setting, value):
    # exclusion_iou=0 would exclude an apple for a leaf anywhere in the image (an overlap
    # of 0 is >= 0); a bad near distance would only fail on the first frame of a 'near'
    # concept, and on every frame after it.
    with pytest.raises(ValueError, match=setting):
        Sam3ConceptEngine.from_config(seed=0, **{setting: value})
