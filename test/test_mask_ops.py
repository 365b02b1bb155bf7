import numpy as np
import pytest

from sam_gap_ros.mask_ops import (label_image, mask_centroid, mask_coverage, mask_iou,
                                  mask_iou_matrix, mask_to_box, next_label_id)


def _rect(shape, x0, y0, x1, y1):
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_box_and_centroid_of_rectangle():
    mask = _rect((20, 30), 3, 4, 10, 8)
    assert mask_to_box(mask) == (3.0, 4.0, 10.0, 8.0)
    assert mask_centroid(mask) == pytest.approx((6.0, 5.5))


def test_empty_mask_has_no_box_or_centroid():
    empty = np.zeros((5, 5), dtype=bool)
    assert mask_to_box(empty) is None
    assert mask_centroid(empty) is None
    assert mask_iou(empty, empty) == 0.0
    assert mask_coverage(empty, _rect((5, 5), 0, 0, 5, 5)) == 0.0


def test_iou_matrix_matches_pairwise_iou():
    rng = np.random.default_rng(0)
    a = [rng.random((16, 16)) > 0.5 for _ in range(3)]
    b = [rng.random((16, 16)) > 0.6 for _ in range(4)] + [np.zeros((16, 16), dtype=bool)]
    matrix = mask_iou_matrix(a, b)
    assert matrix.shape == (3, 5)
    for i, mask_a in enumerate(a):
        for j, mask_b in enumerate(b):
            assert matrix[i, j] == pytest.approx(mask_iou(mask_a, mask_b), abs=1e-6)
    assert mask_iou_matrix([], b).shape == (0, 5)


def test_iou_and_coverage_of_known_overlap():
    a = _rect((10, 10), 0, 0, 4, 4)   # 16 px
    b = _rect((10, 10), 2, 0, 6, 4)   # 16 px, 8 shared
    assert mask_iou(a, b) == pytest.approx(8 / 24)
    assert mask_coverage(a, b) == pytest.approx(0.5)


def test_label_image_higher_score_wins_overlap():
    a = _rect((10, 10), 0, 0, 6, 6)
    b = _rect((10, 10), 4, 4, 10, 10)
    labels = label_image([a, b], [7, 9], (10, 10), scores=[0.9, 0.2])
    assert labels.dtype == np.uint16
    assert labels[5, 5] == 7
    assert labels[8, 8] == 9
    assert labels[0, 9] == 0
    labels = label_image([a, b], [7, 9], (10, 10), scores=[0.1, 0.2])
    assert labels[5, 5] == 9


def test_label_image_rejects_ids_outside_mono16():
    mask = _rect((4, 4), 0, 0, 2, 2)
    with pytest.raises(ValueError, match='mono16'):
        label_image([mask], [0], (4, 4))
    with pytest.raises(ValueError, match='mono16'):
        label_image([mask], [70000], (4, 4))


def test_box_of_irregular_masks_matches_the_pixel_extremes():
    rng = np.random.default_rng(3)
    for _ in range(50):
        mask = np.zeros((24, 31), dtype=bool)
        mask[rng.integers(0, 24, 6), rng.integers(0, 31, 6)] = True  # scattered pixels
        ys, xs = np.nonzero(mask)
        assert mask_to_box(mask) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_label_image_within_boxes_equals_painting_whole_masks():
    rng = np.random.default_rng(4)
    for _ in range(30):
        masks = [rng.random((20, 26)) > threshold for threshold in (0.7, 0.9, 0.97, 1.1)]
        ids, scores = [3, 1, 65535, 8], rng.random(4)
        boxes = [mask_to_box(m) for m in masks]  # the last mask is empty: None
        np.testing.assert_array_equal(
            label_image(masks, ids, (20, 26), scores, boxes=boxes),
            label_image(masks, ids, (20, 26), scores))
    with pytest.raises(ValueError, match='2 boxes for 1 masks'):
        label_image([masks[0]], [1], (20, 26), boxes=[None, None])


def test_next_label_id_counts_up_wraps_after_65535_and_skips_live_ids():
    assert next_label_id(1, set()) == 1 and next_label_id(7, {1, 2}) == 7
    assert next_label_id(65535, set()) == 65535
    assert next_label_id(65536, set()) == 1  # past the mono16 range: from 1 again
    assert next_label_id(5, {5, 6}) == 7
    assert next_label_id(65535, {65535, 1, 2}) == 3  # live IDs skipped across the wrap
    with pytest.raises(ValueError, match='in use'):
        next_label_id(1, range(1, 65536))
