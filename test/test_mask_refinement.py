"""Edge-aware mask refinement (colour guided filter) on synthetic images."""

import cv2
import numpy as np
import pytest

from sam_gap_ros.engines.mask_refinement import (
    guided_filter, refine_probabilities, refinement_radius)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _apple_scene(height=120, width=160, centre=(60, 70), radius=30, seed=0):
    """Return a red disc on green leaves with sensor noise, and its true mask."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    apple = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius ** 2
    image = np.empty((height, width, 3), np.float32)
    image[:] = (40, 120, 50)
    image[apple] = (200, 35, 30)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), apple


def _coarse_probability(mask, cell):
    """Return what a decoder on a grid ``cell`` times coarser gives, upsampled bilinearly."""
    height, width = mask.shape
    coarse = cv2.resize(mask.astype(np.float32), (width // cell, height // cell),
                        interpolation=cv2.INTER_AREA)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize('cell', [4, 8, 16])
def test_blocky_mask_snaps_to_the_colour_edge(cell):
    image, apple = _apple_scene()
    probability = _coarse_probability(apple, cell)
    refined = refine_probabilities(image, probability[None], radius=cell)[0]
    before, after = _iou(probability > 0.5, apple), _iou(refined > 0.5, apple)
    print(f'cell {cell}: IoU {before:.3f} -> {after:.3f}')
    assert after > before and after >= 0.97


def test_flat_guide_only_smooths():
    # Without colour edges the local linear models have no slope: the output is the
    # source's window mean, averaged again (what the filter does with no edges to follow).
    guide = np.full((40, 50, 3), 0.5, np.float32)
    source = np.random.default_rng(1).random((40, 50)).astype(np.float32)
    out = guided_filter(guide, source, 3)

    def box(x):
        return cv2.boxFilter(x, -1, (7, 7), borderType=cv2.BORDER_REFLECT)
    np.testing.assert_allclose(out, box(box(source)), atol=1e-5)


def test_fast_path_matches_the_exact_filter():
    image, apple = _apple_scene(240, 320, (120, 150), 70)
    probability = _coarse_probability(apple, 16)
    guide = image.astype(np.float32) / 255
    exact = guided_filter(guide, probability, 16) > 0.5
    fast = guided_filter(guide, probability, 16, subsample=4) > 0.5
    assert _iou(fast, exact) >= 0.99 and _iou(fast, apple) >= 0.97


def test_only_the_box_around_each_mask_is_touched():
    image, apple = _apple_scene()
    probability = _coarse_probability(apple, 8)
    # A faint, below-threshold second "mask" and an empty one stay exactly as they were.
    faint = np.where(apple, 0.3, 0.0).astype(np.float32)
    stack = np.stack([probability, faint, np.zeros_like(faint)])
    refined = refine_probabilities(image, stack, radius=4)
    np.testing.assert_array_equal(refined[1:], stack[1:])
    rows, cols = np.nonzero(probability > 0.5)
    outside = np.ones(apple.shape, bool)
    outside[max(rows.min() - 8, 0):rows.max() + 9, max(cols.min() - 8, 0):cols.max() + 9] = False
    np.testing.assert_array_equal(refined[0][outside], probability[outside])
    assert not np.shares_memory(stack, refined)


def test_bad_shapes_and_radius_are_refused():
    image, apple = _apple_scene()
    with pytest.raises(ValueError, match='matching the image'):
        refine_probabilities(image, apple[None, :10].astype(np.float32), 2)
    with pytest.raises(ValueError, match='guide must be'):
        guided_filter(image[..., 0].astype(np.float32), apple.astype(np.float32), 2)
    with pytest.raises(ValueError, match='radius'):
        guided_filter(image.astype(np.float32), apple.astype(np.float32), 0)


def test_radius_is_counted_in_coarse_grid_cells():
    assert refinement_radius(1.0, (32, 32), (128, 128)) == 4
    assert refinement_radius(1.0, (32, 32), (480, 640)) == 20  # the wider axis decides
    assert refinement_radius(0.5, (256, 256), (480, 640)) == 1
    assert refinement_radius(0.01, (256, 256), (256, 256)) == 1
