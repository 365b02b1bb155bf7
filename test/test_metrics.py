"""Validation metrics: J, DAVIS boundary F and J&F on hand-checked masks."""

import numpy as np
import pytest

from training.metrics import (_boundary, boundary_f_measure, region_similarity,
                              video_j_and_f)


def _box_mask(shape, x0, y0, x1, y1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_boundary_is_davis_seg2bmap():
    # A pixel is boundary when its right, lower or lower-right neighbour differs: the
    # one-pixel ring sits half a pixel towards the origin (worked out by hand).
    mask = _box_mask((5, 6), 1, 1, 3, 3)
    expected = np.zeros((5, 6), bool)
    expected[0:3, 0:3] = True
    expected[1, 1] = False
    np.testing.assert_array_equal(_boundary(mask), expected)
    # The image border is no boundary: a mask filling the frame has none, and one cut by
    # the right edge has boundary there only where it starts and ends.
    assert not _boundary(np.ones((4, 5), bool)).any()
    cut = _boundary(_box_mask((8, 8), 4, 2, 8, 6))
    assert sorted(np.nonzero(cut[:, -1])[0]) == [1, 5]


def test_boundary_tolerance_is_the_ceiling_of_the_diagonal_share():
    # 96x128: diagonal 160 px, 0.008 of it is 1.28 -> DAVIS matches within 2 px.
    true = _box_mask((96, 128), 40, 30, 80, 70)
    assert boundary_f_measure(np.roll(true, 2, axis=1), true) == 1.0
    assert boundary_f_measure(np.roll(true, 3, axis=1), true) < 1.0
    assert boundary_f_measure(np.roll(true, 3, axis=1), true, bound_th=3) == 1.0


def test_boundary_f_empty_cases_and_shapes():
    empty = np.zeros((10, 10), bool)
    some = _box_mask((10, 10), 2, 2, 6, 6)
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(empty, some) == boundary_f_measure(some, empty) == 0.0
    assert boundary_f_measure(some, some) == 1.0
    with pytest.raises(ValueError):
        boundary_f_measure(some, some[:5])


def test_j_and_f_count_every_frame_object_pair():
    present = _box_mask((32, 32), 8, 8, 20, 20)
    absent = np.zeros((32, 32), bool)
    half = _box_mask((32, 32), 8, 8, 14, 20)
    assert region_similarity(absent, absent) == 1.0
    assert region_similarity(half, present) == pytest.approx(0.5)
    # Frame 0: both objects right; frame 1: object 0 half found, object 1 a false positive
    # where it is absent.
    scores = video_j_and_f([np.stack([present, absent]), np.stack([half, present])],
                           [np.stack([present, absent]), np.stack([present, absent])])
    assert scores['j'] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert scores['j_and_f'] == pytest.approx((scores['j'] + scores['f']) / 2)
    assert 0.5 < scores['f'] < 1.0  # the half mask shares three of its four sides
    with pytest.raises(ValueError):
        video_j_and_f([np.stack([present])], [])
