"""Concept-query grammar, validation and set logic on hand-made masks (no model)."""

import re
import unicodedata

import numpy as np
import pytest

from sam_gap_ros.engines.concept_query import (
    base_phrases,
    Clause,
    ConceptQuery,
    evaluate_query,
    mask_distances,
    mask_overlaps,
    MAX_CONCEPT_CHARS,
    MAX_CONCEPTS,
    near_any,
    overlapping_any,
    parse_concepts,
    parse_query,
    resolve_duplicates,
)
from sam_gap_ros.engines.types import ConceptError, Instance
from sam_gap_ros.mask_ops import mask_iou, mask_to_box

SHAPE = (40, 60)


def rect(x0, y0, x1, y1, shape=SHAPE):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def inst(mask, score, concept):
    return Instance(mask=mask, box=mask_to_box(mask), score=score, concept=concept,
                    area=int(mask.sum()))


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize('text, canonical, phrases', [
    ('ripe red apple', 'ripe red apple', ('ripe red apple',)),
    ('  Ripe \t RED   apple ', 'ripe red apple', ('ripe red apple',)),
    ('apple but not green apple', 'apple but not green apple', ('apple', 'green apple')),
    ('Apple AND NOT green apple', 'apple but not green apple', ('apple', 'green apple')),
    ('damaged apple near trunk', 'damaged apple near trunk', ('damaged apple', 'trunk')),
    ('half-eaten apple', 'half-eaten apple', ('half-eaten apple',)),
    ("farmer's glove", "farmer's glove", ("farmer's glove",)),
    ('apple but not green apple but not leaf', 'apple but not green apple but not leaf',
     ('apple', 'green apple', 'leaf')),
    ('apple near trunk near wire', 'apple near trunk near wire', ('apple', 'trunk', 'wire')),
    ('apple near apple', 'apple near apple', ('apple',)),
])
def test_parse_valid_queries(text, canonical, phrases):
    query = parse_query(text)
    assert query.text == canonical
    assert query.phrases == phrases
    assert parse_query(query.text) == query


def test_near_binds_tighter_than_but_not():
    assert parse_query('a near b but not c') == ConceptQuery(Clause('a', ('b',)), (Clause('c'),))
    assert parse_query('a but not b near c') == ConceptQuery(Clause('a'), (Clause('b', ('c',)),))
    assert parse_query('a but not b but not c near d').exclude == (Clause('b'),
                                                                   Clause('c', ('d',)))
    assert parse_query('ripe apple').is_plain
    assert not parse_query('apple near trunk').is_plain


@pytest.mark.parametrize('text, message', [
    ('', 'empty'),
    ('   \n\t ', 'empty'),
    ('near trunk', "starts with operator 'near'"),
    ('but not apple', "starts with operator 'but not'"),
    ('apple but not', "'but not' at the end"),
    ('apple near', "'near' at the end"),
    ('apple near but not leaf', 'follow each other'),
    ('apple near near trunk', 'follow each other'),
    ('apple but not not green apple', 'double negation'),
    ('apple and not not green apple', 'double negation'),
    ('apple not green', "'not' must follow"),
    ('not apple', "'not' must follow"),
    ('apple but green apple', "'but' is only an operator"),
    ('apple and pear', "'and' is only an operator"),
    ('apple or pear', "unknown operator 'or'"),
    ('APPLE XOR pear', "unknown operator 'xor'"),
    ('apple except leaf', "unknown operator 'except'"),
    ('apple & pear', "unsupported character '&'"),
    ('(apple)', "unsupported character '('"),
    ('apple, pear', "unsupported character ','"),
    ('apple_pear', "unsupported character '_'"),
    ('apple -pear', "'-pear' is not a word"),
    ('a' * (MAX_CONCEPT_CHARS + 1), 'characters'),
])
def test_parse_rejects_invalid_queries(text, message):
    with pytest.raises(ConceptError, match=re.escape(message)):
        parse_query(text)


def test_length_limit_counts_canonical_text():
    word = 'a' * (MAX_CONCEPT_CHARS - 2)
    assert parse_query(f'  {word}  ').text == word
    assert parse_query(f'x    {word}').text == f'x {word}'


def test_parse_concepts_validates_and_deduplicates():
    queries = parse_concepts(['Apple', ' apple ', 'APPLE  but not green apple',
                              'apple and not green apple', 'green apple'])
    assert [q.text for q in queries] == ['apple', 'apple but not green apple', 'green apple']
    assert base_phrases(queries) == ['apple', 'green apple']
    with pytest.raises(ConceptError, match='empty'):
        parse_concepts([])
    with pytest.raises(ConceptError, match='list of strings'):
        parse_concepts('apple')
    with pytest.raises(ConceptError, match='list of strings'):
        parse_concepts(None)
    with pytest.raises(ConceptError, match='#1 is a int'):
        parse_concepts(['apple', 3])
    with pytest.raises(ConceptError, match=f'at most {MAX_CONCEPTS}'):
        parse_concepts([f'apple {i}' for i in range(MAX_CONCEPTS + 1)])
    with pytest.raises(ConceptError, match="#1: concept 'pear or apple'"):
        parse_concepts(['apple', 'pear or apple'])
    assert len(parse_concepts([f'apple {i}' for i in range(MAX_CONCEPTS)])) == MAX_CONCEPTS


def test_text_is_unicode_normalised_before_validation():
    # A decomposed umlaut ('a' + combining diaeresis, as macOS sends it) is the letter.
    decomposed = unicodedata.normalize('NFD', 'Äpfel')
    assert len(decomposed) == 6
    assert parse_query(decomposed).text == 'äpfel' == parse_query('äpfel').text
    # Full-width letters and the ideographic space (CJK input methods) spell the operator.
    query = parse_query('apple\u3000ＢＵＴ ＮＯＴ\u3000green apple')
    assert query == parse_query('apple but not green apple')
    assert [q.text for q in parse_concepts(['ＡＰＰＬＥ', 'apple', decomposed, 'äpfel'])] \
        == ['apple', 'äpfel']


def test_concept_limit_counts_distinct_concepts():
    assert [q.text for q in parse_concepts(['apple'] * (MAX_CONCEPTS + 1))] == ['apple']
    spellings = [f'apple {i}' for i in range(MAX_CONCEPTS)] + ['APPLE 0', ' apple  1']
    assert len(parse_concepts(spellings)) == MAX_CONCEPTS
    with pytest.raises(ConceptError, match=f'{MAX_CONCEPTS + 1} distinct concepts given'):
        parse_concepts(spellings + ['pear'])


def test_parse_concepts_limits_distinct_phrases():
    many = [f'p{i} near q{i} but not r{i}' for i in range(11)]
    with pytest.raises(ConceptError, match='33 distinct phrases'):
        parse_concepts(many)


# ----------------------------------------------------------------------------- set logic


def test_mask_distances_and_near():
    a = rect(0, 0, 10, 10)            # columns 0..9
    touching = rect(10, 0, 20, 10)    # starts at column 10: distance 1
    gap = rect(25, 0, 30, 10)         # column 25: distance 16
    diagonal = rect(13, 14, 15, 16)   # (13, 14) vs (9, 9): sqrt(16 + 25)
    overlapping = rect(5, 5, 8, 8)
    empty = np.zeros(SHAPE, dtype=bool)
    far = 100.0
    assert mask_distances([a], [touching], far)[0] == pytest.approx(1.0)
    assert mask_distances([a], [gap], far)[0] == pytest.approx(16.0)
    assert mask_distances([a], [diagonal], far)[0] == pytest.approx(np.sqrt(41), abs=1e-3)
    assert mask_distances([a], [overlapping], far)[0] == 0.0
    assert mask_distances([a], [gap, touching], far)[0] == pytest.approx(1.0)
    assert np.isinf(mask_distances([empty], [a], far)[0])
    assert np.isinf(mask_distances([a], [empty], far)[0])
    assert np.isinf(mask_distances([a], [], far)[0])
    # Beyond the search radius the answer is only "farther than max_distance".
    assert mask_distances([a], [gap], 5.0)[0] > 5.0
    assert near_any([a, gap, empty], [touching], 1.0).tolist() == [True, False, False]
    assert near_any([a, gap], [touching], 0.5).tolist() == [False, False]
    assert near_any([gap], [a], 16.0).tolist() == [True]
    assert near_any([gap], [a], 15.9).tolist() == [False]
    with pytest.raises(ValueError):
        near_any([a], [gap], -1.0)


@pytest.mark.parametrize('dx, dy', [(1, 2), (4, 7), (6, 1), (7, 0), (30, 17)])
def test_near_keeps_a_mask_exactly_at_the_limit(dx, dy):
    """The float32 distance of an exact neighbour may round above the float64 limit."""
    one = np.zeros(SHAPE, dtype=bool)
    other = np.zeros(SHAPE, dtype=bool)
    one[2, 2] = True
    other[2 + dy, 2 + dx] = True
    limit = float(np.hypot(dx, dy))
    assert near_any([one], [other], limit).tolist() == [True]
    # The next nearer grid distance is at least 1 / (2 * limit) below: still refused.
    assert near_any([one], [other], limit - 1e-3).tolist() == [False]


def test_overlaps_use_iou_and_coverage():
    big = rect(0, 0, 20, 20)
    inside = rect(2, 2, 6, 6)          # fully inside big, IoU 16/400
    half = rect(10, 0, 30, 20)         # IoU 200/600 with big, coverage 0.5
    empty = np.zeros(SHAPE, dtype=bool)
    iou, coverage = mask_overlaps([big, inside, empty], [half, big])
    assert iou[0, 0] == pytest.approx(mask_iou(big, half))
    assert coverage[0, 0] == pytest.approx(0.5)
    assert iou[1, 1] == pytest.approx(16 / 400)
    assert coverage[1, 1] == pytest.approx(1.0)
    assert not iou[2].any() and not coverage[2].any()
    # inside vs big: excluded through coverage although IoU is tiny; big vs inside: not.
    assert overlapping_any([inside], [big], 0.5).tolist() == [True]
    assert overlapping_any([big], [inside], 0.5).tolist() == [False]
    assert overlapping_any([big], [half], 0.5).tolist() == [True]
    assert overlapping_any([big], [half], 0.51).tolist() == [False]
    assert overlapping_any([], [big], 0.5).tolist() == []
    assert overlapping_any([big], [], 0.5).tolist() == [False]


def test_random_masks_match_dense_iou():
    rng = np.random.default_rng(3)
    masks = [rng.random(SHAPE) > 0.7 for _ in range(4)]
    iou, coverage = mask_overlaps(masks, masks)
    for i, a in enumerate(masks):
        for j, b in enumerate(masks):
            assert iou[i, j] == pytest.approx(mask_iou(a, b))
            assert coverage[i, j] == pytest.approx((a & b).sum() / a.sum())


def scene():
    """Three apples (one green), a trunk next to apple 1 and a leaf over apple 3."""
    apple1, apple2, apple3 = rect(0, 0, 8, 8), rect(20, 0, 28, 8), rect(40, 20, 48, 28)
    trunk = rect(10, 0, 14, 40)
    return {
        'apple': [inst(apple1, 0.9, 'apple'), inst(apple2, 0.8, 'apple'),
                  inst(apple3, 0.7, 'apple')],
        'green apple': [inst(rect(20, 0, 28, 9), 0.6, 'green apple')],
        'trunk': [inst(trunk, 0.95, 'trunk')],
        'leaf': [inst(rect(39, 19, 49, 29), 0.5, 'leaf')],
        'wire': [],
    }


def scores(instances):
    return [i.score for i in instances]


def test_evaluate_plain_exclusion_and_near():
    detections = scene()
    plain = evaluate_query(parse_query('apple'), detections)
    assert scores(plain) == [0.9, 0.8, 0.7]
    assert {i.concept for i in plain} == {'apple'}
    minus_green = evaluate_query(parse_query('apple but not green apple'), detections)
    assert scores(minus_green) == [0.9, 0.7]
    assert {i.concept for i in minus_green} == {'apple but not green apple'}
    # Masks, boxes and scores are the apple detections themselves.
    assert minus_green[0].mask is detections['apple'][0].mask
    chained = evaluate_query(parse_query('apple and not green apple but not leaf'), detections)
    assert scores(chained) == [0.9]
    # apple1 ends at column 7, trunk starts at column 10: distance 3.
    near = parse_query('apple near trunk')
    assert scores(evaluate_query(near, detections, near_distance_px=3.0)) == [0.9]
    assert scores(evaluate_query(near, detections, near_distance_px=2.9)) == []
    assert scores(evaluate_query(near, detections, near_distance_px=7.0)) == [0.9, 0.8]
    assert evaluate_query(parse_query('apple near wire'), detections) == []
    assert scores(evaluate_query(parse_query('apple near apple'), detections)) == [0.9, 0.8, 0.7]


def test_evaluate_precedence_and_thresholds():
    detections = scene()
    # (apple near trunk) - green apple  vs  apple - (green apple near trunk)
    left = evaluate_query(parse_query('apple near trunk but not green apple'), detections,
                          near_distance_px=7.0)
    assert scores(left) == [0.9]
    right = evaluate_query(parse_query('apple but not green apple near trunk'), detections,
                           near_distance_px=3.0)
    # Green apple (column 20) is 6 px from the trunk (column 13): not near at 3 px, so
    # nothing is excluded.
    assert scores(right) == [0.9, 0.8, 0.7]
    # apple3 has IoU 64/100 with the leaf and lies inside it.
    assert scores(evaluate_query(parse_query('apple but not leaf'), detections,
                                 exclusion_iou=1.0)) == [0.9, 0.8]
    with pytest.raises(ValueError, match='pear'):
        evaluate_query(parse_query('apple but not pear'), detections)


def test_resolve_duplicates_keeps_higher_score():
    a = rect(0, 0, 10, 10)
    a_shifted = rect(1, 0, 11, 10)      # IoU 90/110 = 0.82 with a
    a_half = rect(5, 0, 15, 10)         # IoU 50/150 with a
    other = rect(30, 30, 40, 40)
    found = [inst(a, 0.6, 'apple'), inst(a_shifted, 0.8, 'ripe apple'),
             inst(a_half, 0.7, 'apple'), inst(other, 0.5, 'leaf')]
    kept = resolve_duplicates(found, 0.7)
    assert [(i.concept, i.score) for i in kept] == [('ripe apple', 0.8), ('apple', 0.7),
                                                    ('leaf', 0.5)]
    assert len(resolve_duplicates(found, 0.85)) == 4
    # Ties: the earlier instance (earlier concept) wins.
    tie = resolve_duplicates([inst(a, 0.5, 'first'), inst(a.copy(), 0.5, 'second')], 0.7)
    assert [i.concept for i in tie] == ['first']
    assert resolve_duplicates([], 0.7) == []
