"""Tests of the camera-motion helpers of the SAM2 tracker (sam_gap_ros.engines.scene_motion)."""

import cv2
import numpy as np
import pytest
import torch

from sam_gap_ros.engines.scene_motion import (gate_to_moved_boxes, logits_boxes, moved_box,
                                              SceneMotion, shift_memory)
from sam_gap_ros.mask_ops import mask_to_box


def textured(height, width, seed=0):
    rng = np.random.RandomState(seed)
    return cv2.GaussianBlur(rng.rand(height, width).astype(np.float32), (7, 7), 2.0)


def test_scene_motion_accumulates_the_shift_between_frames():
    world = textured(140, 220)
    motion = SceneMotion()
    # Content moves 3 px right and 2 px up per frame.
    views = [world[20 + 2 * i:120 + 2 * i, 60 - 3 * i:188 - 3 * i] for i in range(5)]
    offsets = [motion.update(view) for view in views]
    assert offsets[0] == (0.0, 0.0)
    assert offsets[-1] == pytest.approx((12.0, -8.0), abs=0.5)
    motion.reset()
    assert motion.update(views[0]) == (0.0, 0.0)


def test_scene_motion_still_camera_and_inputs_untouched():
    frame = textured(96, 160)
    before = frame.copy()
    motion = SceneMotion()
    for _ in range(20):
        offset = motion.update(frame.copy())
    # No drift on a still camera (OpenCV 5 windows phaseCorrelate's inputs in place; the
    # estimator must not compare a windowed frame with a fresh one).
    assert np.hypot(*offset) < 1e-3
    motion.update(frame)
    assert np.array_equal(frame, before)


def test_scene_motion_large_images_are_estimated_downscaled():
    world = textured(1100, 1100, seed=1)
    motion = SceneMotion()
    motion.update(world[:1024, 40:1064])
    x, y = motion.update(world[:1024, 30:1054])   # content 10 px right
    assert (x, y) == pytest.approx((10.0, 0.0), abs=1.0)


def test_scene_motion_ignores_texture_less_views():
    motion = SceneMotion()
    flat = np.full((64, 64), 0.5, np.float32)
    motion.update(flat)
    assert np.hypot(*motion.update(flat)) < 1e-6
    with pytest.raises(ValueError, match='2-D'):
        motion.update(np.zeros((4, 4, 3), np.float32))


def test_shift_memory_moves_content_by_whole_cells_and_clears_the_border():
    grid, image_size = (4, 6), 96          # cells of 16 x 24 model pixels
    maps = torch.zeros(1, 2, *grid)
    maps[0, :, 1, 2] = torch.tensor([1.0, 2.0])
    tokens = maps.reshape(1, 2, -1).permute(2, 0, 1)     # (H*W, B, C) as SAM2 stores it
    moved = shift_memory(tokens, (32.0, 24.0), grid, image_size)
    moved_maps = moved.permute(1, 2, 0).reshape(1, 2, *grid)
    expected = torch.zeros_like(maps)
    expected[0, :, 2, 4] = torch.tensor([1.0, 2.0])
    assert torch.allclose(moved_maps, expected, atol=1e-6)
    assert torch.equal(shift_memory(tokens, (0.0, 0.0), grid, image_size), tokens)
    # Content pushed out of the map is gone; nothing comes in from outside.
    gone = shift_memory(tokens, (96.0, 0.0), grid, image_size)
    assert not gone.any()
    with pytest.raises(ValueError, match='grid'):
        shift_memory(tokens, (1.0, 0.0), (5, 5), image_size)


def test_moved_box_and_gate():
    assert moved_box((10, 20, 30, 60), (5, -4), 0.25) == (8.0, 4.0, 42.0, 68.0)
    size = 64
    high = torch.full((5, size, size), -5.0)
    low = torch.full((5, 16, 16), -5.0)
    high[:4, 10:20, 10:20] = 5.0                       # objects 0-3: a 10 x 10 px square
    low[:4, 2:5, 2:5] = 5.0                            # object 4: empty
    boxes = [(8, 8, 22, 22),    # all inside: kept unchanged
             (8, 8, 15, 22),    # half inside: cut, still there
             (8, 8, 13, 22),    # less than half inside: gone
             (40, 40, 60, 60),  # elsewhere: gone
             (0, 0, 64, 64)]    # an empty mask is not the object either
    before = high.clone()
    kept = gate_to_moved_boxes(high, low, boxes, size, 0.5, -1024.0)
    assert kept == [True, True, False, False, False]
    # Inside its box a map is untouched; outside it is "no object".
    assert torch.equal(high[0, 8:22, 8:22], before[0, 8:22, 8:22])
    assert torch.equal(high[0] > 0, before[0] > 0) and int((low[0] > 0).sum()) == 9
    assert [int((high[i] > 0).sum()) for i in range(4)] == [100, 50, 30, 0]
    assert float(high[2].min()) == -1024.0 and not (low[3] > 0).any()


def test_logits_boxes_match_mask_to_box():
    rng = np.random.RandomState(3)
    logits = torch.from_numpy(rng.randn(6, 20, 30).astype(np.float32)) - 1.5
    logits[5] = -1.0
    boxes = logits_boxes(logits)
    assert boxes[:5] == [mask_to_box(m.numpy() > 0) for m in logits[:5]]
    assert boxes[5] is None


def test_update_pixels_matches_update_and_shrinks_large_inputs_first():
    world = textured(1100, 1100, seed=2)
    small = [world[:128, 40 - 3 * i:168 - 3 * i] for i in range(3)]
    on_host, on_tensor = SceneMotion(), SceneMotion()
    for view in small:
        expected = on_host.update(view)
        got = on_tensor.update_pixels(torch.from_numpy(np.stack([view] * 3)))
        assert got == pytest.approx(expected, abs=1e-4)  # channel mean: float rounding
    assert got == pytest.approx((6.0, 0.0), abs=0.3)
    large = SceneMotion()
    large.update_pixels(torch.from_numpy(np.stack([world[:1024, 40:1064]] * 3)))
    x, y = large.update_pixels(torch.from_numpy(np.stack([world[:1024, 30:1054]] * 3)))
    assert (x, y) == pytest.approx((10.0, 0.0), abs=1.0)
    with pytest.raises(ValueError, match='C, H, W'):
        large.update_pixels(torch.zeros(4, 4))
