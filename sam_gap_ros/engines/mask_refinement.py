"""Edge-aware mask refinement: snap upsampled mask probabilities to the image's colour edges.

A SAM mask decoder predicts masks on a coarse grid (a quarter of the model input per side)
that is upsampled bilinearly to the camera resolution, so mask borders are as coarse as
that grid: blocks of 4 px at a 128 px model input shown on a 128 px frame, 20 px on a
640 px frame. The colour guided filter of He, Sun and Tang (ECCV 2010, "Guided Image
Filtering") fits, in every window, the mask probability as a linear function of the pixel
colour, so a border between two colours (a red apple, green leaves) moves onto that colour
edge while flat regions keep their probability. Applied to each mask inside its box only,
since fruit masks cover a small part of the frame.

Measured on the tiny orchard SAM2 model (docs/tiny_models.md): a window radius of one
coarse-grid cell and ``eps`` 3e-4 lifted box-prompted masks and tracks by ~0.03 mIoU.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import cv2
import numpy as np

from sam_gap_ros.mask_ops import mask_to_box

# Regularisation of the per-window colour covariance, for colours in [0, 1]: colour
# differences with a variance below ~eps (about 0.017 ~ 4/255 standard deviation) are
# treated as flat, so sensor noise does not carve holes into a mask.
DEFAULT_EPS = 3e-4

# Radius (pixels) above which the linear models are fitted on a subsampled crop: a window
# of a coarse-grid cell seen at 4+ px per cell is smooth enough to be fitted coarser.
FAST_RADIUS = 4


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window for every pixel (and channel), mirrored at the border."""
    size = 2 * radius + 1
    return cv2.boxFilter(values, -1, (size, size), normalize=True,
                         borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int,
                  eps: float = DEFAULT_EPS, subsample: int = 1) -> np.ndarray:
    """Filter ``source`` (H, W) with the colour ``guide`` (H, W, 3, float in [0, 1]).

    Returns a float32 (H, W) array: ``source`` smoothed within regions of similar colour
    and sharpened onto the guide's edges (He et al.'s colour guided filter). With
    ``subsample`` s > 1 the per-window linear models are fitted on images s times smaller
    and upsampled before they are applied to the full-resolution guide (He and Sun's "fast
    guided filter", arXiv 1505.00996): s^2 times less work for wide windows, the same sharp
    edges.
    """
    if guide.ndim != 3 or guide.shape[2] != 3 or guide.shape[:2] != source.shape:
        raise ValueError(f'guide must be (H, W, 3) matching source {source.shape}, '
                         f'got {guide.shape}')
    if radius < 1 or subsample < 1:
        raise ValueError(f'radius and subsample must be >= 1, got {radius}, {subsample}')
    full_guide = guide.astype(np.float32, copy=False)
    guide, source = full_guide, source.astype(np.float32, copy=False)
    height, width = source.shape
    if subsample > 1:
        small = (max(width // subsample, 1), max(height // subsample, 1))
        guide = cv2.resize(full_guide, small, interpolation=cv2.INTER_AREA)
        source = cv2.resize(source, small, interpolation=cv2.INTER_AREA)
        radius = max(1, int(round(radius / subsample)))
    # Planar arrays throughout: box filters and arithmetic on contiguous 2-D planes are
    # several times faster than on interleaved (H, W, C) arrays.
    red, green, blue = (np.ascontiguousarray(guide[..., c]) for c in range(3))
    mr, mg, mb, mean_p = (_box_mean(plane, radius) for plane in (red, green, blue, source))
    rr = _box_mean(red * red, radius) - mr * mr + eps
    rg = _box_mean(red * green, radius) - mr * mg
    rb = _box_mean(red * blue, radius) - mr * mb
    gg = _box_mean(green * green, radius) - mg * mg + eps
    gb = _box_mean(green * blue, radius) - mg * mb
    bb = _box_mean(blue * blue, radius) - mb * mb + eps
    cr = _box_mean(red * source, radius) - mr * mean_p
    cg = _box_mean(green * source, radius) - mg * mean_p
    cb = _box_mean(blue * source, radius) - mb * mean_p
    # Closed-form inverse of the symmetric 3x3 covariance (cofactors / determinant).
    inv_rr = gg * bb - gb * gb
    inv_rg = gb * rb - rg * bb
    inv_rb = rg * gb - gg * rb
    inv_gg = rr * bb - rb * rb
    inv_gb = rb * rg - rr * gb
    inv_bb = rr * gg - rg * rg
    inv_det = 1.0 / (rr * inv_rr + rg * inv_rg + rb * inv_rb)
    a_r = (inv_rr * cr + inv_rg * cg + inv_rb * cb) * inv_det
    a_g = (inv_rg * cr + inv_gg * cg + inv_gb * cb) * inv_det
    a_b = (inv_rb * cr + inv_gb * cg + inv_bb * cb) * inv_det
    b = mean_p - (a_r * mr + a_g * mg + a_b * mb)
    smoothed = [_box_mean(plane, radius) for plane in (a_r, a_g, a_b, b)]
    if subsample > 1:
        smoothed = [cv2.resize(plane, (width, height), interpolation=cv2.INTER_LINEAR)
                    for plane in smoothed]
    return (smoothed[0] * full_guide[..., 0] + smoothed[1] * full_guide[..., 1]
            + smoothed[2] * full_guide[..., 2] + smoothed[3])


def _crop_around(mask: np.ndarray, margin: int) -> Tuple[slice, slice]:
    """Rows and columns of ``mask``'s bounding box grown by ``margin`` (clipped)."""
    x0, y0, x1, y1 = (int(v) for v in mask_to_box(mask))
    height, width = mask.shape
    return (slice(max(y0 - margin, 0), min(y1 + margin, height)),
            slice(max(x0 - margin, 0), min(x1 + margin, width)))


def refine_probabilities(image: np.ndarray, probabilities: np.ndarray, radius: int,
                         eps: float = DEFAULT_EPS) -> np.ndarray:
    """Return ``probabilities`` (N, H, W) snapped to the edges of ``image`` (H, W, 3 uint8).

    Each mask is filtered inside the box of its pixels above 0.5 grown by twice the radius
    (how far the filter reaches); outside that box, and for masks with no pixel above 0.5,
    the probabilities are returned unchanged. Windows wider than ``2 * FAST_RADIUS + 1``
    pixels are fitted on a subsampled crop (see ``guided_filter``).
    """
    if probabilities.ndim != 3 or image.shape[:2] != probabilities.shape[1:]:
        raise ValueError(f'probabilities must be (N, H, W) matching the image '
                         f'{image.shape[:2]}, got {probabilities.shape}')
    refined = np.array(probabilities, dtype=np.float32)
    for index, mask in enumerate(refined > 0.5):
        if not mask.any():
            continue
        rows, cols = _crop_around(mask, 2 * radius)
        guide = image[rows, cols].astype(np.float32) * (1.0 / 255.0)
        refined[index, rows, cols] = guided_filter(
            guide, refined[index, rows, cols], radius, eps,
            subsample=max(1, radius // FAST_RADIUS))
    return refined


def refinement_radius(cells: float, coarse_shape: Sequence[int],
                      output_shape: Sequence[int]) -> int:
    """Radius in output pixels of ``cells`` coarse-mask cells (at least 1)."""
    scale = max(output_shape[0] / coarse_shape[0], output_shape[1] / coarse_shape[1])
    return max(1, int(round(cells * scale)))


__all__ = ['DEFAULT_EPS', 'FAST_RADIUS', 'guided_filter', 'refine_probabilities',
           'refinement_radius']
