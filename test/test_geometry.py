"""Depth normalisation, median mask depth and back-projection."""

import math

import numpy as np
import pytest

from sam_gap_ros.geometry import align_depth, back_project, CameraIntrinsics, depth_to_meters
from sam_gap_ros.geometry import check_same_view, instance_position, median_depth

K = [100.0, 0.0, 64.0, 0.0, 120.0, 48.0, 0.0, 0.0, 1.0]


def test_16uc1_millimetres_and_zero_invalid():
    depth = np.array([[0, 1000], [2500, 65535]], dtype=np.uint16)
    meters = depth_to_meters(depth, '16UC1')
    assert meters.dtype == np.float32
    assert math.isnan(meters[0, 0])
    np.testing.assert_allclose(meters[0, 1], 1.0)
    np.testing.assert_allclose(meters[1, 0], 2.5)
    np.testing.assert_allclose(meters[1, 1], 65.535, rtol=1e-6)


def test_32fc1_nan_inf_and_nonpositive_invalid():
    depth = np.array([[np.nan, np.inf, -1.0, 0.0, 1.25]], dtype=np.float32)
    meters = depth_to_meters(depth, '32FC1')
    assert np.isnan(meters[0, :4]).all()
    assert meters[0, 4] == pytest.approx(1.25)
    assert np.isfinite(depth[0, 4]) and np.isnan(depth[0, 0])  # input untouched


@pytest.mark.parametrize('depth, encoding', [
    (np.zeros((2, 2), np.float32), '16UC1'),
    (np.zeros((2, 2), np.uint16), '32FC1'),
    (np.zeros((2, 2), np.uint16), 'rgb8'),
    (np.zeros((2, 2, 1), np.uint16), '16UC1'),
])
def test_bad_depth_is_refused(depth, encoding):
    with pytest.raises(ValueError):
        depth_to_meters(depth, encoding)


def test_median_ignores_invalid_pixels_and_outliers():
    depth = np.full((10, 10), np.nan, dtype=np.float32)
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:6, 2:6] = True
    depth[2:6, 2:6] = 1.5
    depth[2, 2] = 9.0  # leaked background pixel on the border
    depth[3, 3] = np.nan  # no return
    assert median_depth(depth, mask) == pytest.approx(1.5)
    assert median_depth(depth, mask, min_valid=20) is None
    assert median_depth(depth, np.zeros_like(mask)) is None
    with pytest.raises(ValueError):
        median_depth(depth, mask[:5])


def test_back_projection_round_trips_through_the_camera_matrix():
    intr = CameraIntrinsics.from_k(K, 128, 96)
    x, y, z = back_project(84.0, 24.0, 2.0, intr)
    assert (x, y, z) == pytest.approx((0.4, -0.4, 2.0))
    u = intr.fx * x / z + intr.cx
    v = intr.fy * y / z + intr.cy
    assert (u, v) == pytest.approx((84.0, 24.0))


def test_camera_info_binning_and_roi_give_the_published_windows_intrinsics():
    full = CameraIntrinsics.from_camera_info(K, 128, 96)
    assert full == CameraIntrinsics.from_k(K, 128, 96)  # zero binning and roi: full sensor
    # A 64x48 window at (32, 16), binned 2x2: a 32x24 image. Its pixel (16, 12) is sensor
    # pixel (64, 40), so both must see the same ray.
    window = CameraIntrinsics.from_camera_info(K, 128, 96, binning=(2, 2), roi=(32, 16, 64, 48))
    assert (window.width, window.height) == (32, 24)
    assert back_project(16.0, 12.0, 2.0, window) == \
        pytest.approx(back_project(64.0, 40.0, 2.0, full))
    binned = CameraIntrinsics.from_camera_info(K, 128, 96, binning=(4, 2))
    assert (binned.width, binned.height) == (32, 48)
    assert back_project(8.0, 20.0, 1.0, binned) == \
        pytest.approx(back_project(32.0, 40.0, 1.0, full))
    with pytest.raises(ValueError, match='not inside'):
        CameraIntrinsics.from_camera_info(K, 128, 96, roi=(100, 0, 64, 48))
    with pytest.raises(ValueError, match='no pixel'):
        CameraIntrinsics.from_camera_info(K, 128, 96, binning=(8, 1), roi=(0, 0, 4, 4))


@pytest.mark.parametrize('k', [[0.0] * 9, [1.0] * 8, [np.nan] + K[1:]])
def test_invalid_intrinsics_refused(k):
    with pytest.raises(ValueError):
        CameraIntrinsics.from_k(k, 128, 96)


def test_instance_position_uses_centroid_and_median_depth():
    intr = CameraIntrinsics.from_k(K, 128, 96)
    mask = np.zeros((96, 128), dtype=bool)
    mask[40:50, 74:84] = True  # centroid (78.5, 44.5)
    depth = np.zeros((96, 128), dtype=np.uint16)
    depth[40:50, 74:84] = 1200
    depth[40, 74] = 0
    pos = instance_position(mask, depth_to_meters(depth, '16UC1'), intr)
    assert pos == pytest.approx(((78.5 - 64) * 1.2 / 100, (44.5 - 48) * 1.2 / 120, 1.2))
    assert instance_position(np.zeros_like(mask), depth_to_meters(depth, '16UC1'), intr) is None
    no_depth = depth_to_meters(np.zeros_like(depth), '16UC1')
    assert instance_position(mask, no_depth, intr) is None


def test_half_resolution_depth_and_intrinsics_are_rescaled():
    full = CameraIntrinsics.from_k(K, 128, 96)
    half = full.scaled_to(64, 48)
    assert (half.fx, half.fy) == pytest.approx((50.0, 60.0))
    assert (half.cx, half.cy) == pytest.approx((31.75, 23.75))
    depth = np.full((48, 64), 2.0, dtype=np.float32)
    depth[:, :32] = np.nan
    aligned = align_depth(depth, (96, 128))
    assert aligned.shape == (96, 128)
    assert np.isnan(aligned[:, :64]).all() and (aligned[:, 64:] == 2.0).all()
    mask = np.zeros((96, 128), dtype=bool)
    mask[10:20, 100:110] = True
    pos_full = instance_position(mask, aligned, full)
    pos_half_k = instance_position(mask, aligned, half)
    assert pos_full == pytest.approx(pos_half_k, abs=0.02)


def test_median_of_a_large_mask_is_accurate():
    rng = np.random.default_rng(0)
    depth = rng.uniform(1.0, 3.0, size=(480, 640)).astype(np.float32)
    mask = np.ones((480, 640), dtype=bool)
    assert median_depth(depth, mask) == pytest.approx(float(np.median(depth)), abs=0.02)


def test_check_same_view_accepts_rescaled_views_and_refuses_other_cameras():
    check_same_view('depth', (320, 240), (640, 480))  # aligned depth at half resolution
    check_same_view('camera_info', (1280, 720), (848, 477))  # rounding of a 16:9 crop
    # A RealSense's raw depth (848x480) next to 640x480 colour: another camera's view.
    with pytest.raises(ValueError, match='depth is 848x480 but the colour image is 640x480'):
        check_same_view('depth', (848, 480), (640, 480))
    with pytest.raises(ValueError, match='camera_info is 640x640'):
        check_same_view('camera_info', (640, 640), (640, 480))
