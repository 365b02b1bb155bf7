"""Segmentation metrics for validation: region similarity J, boundary F (DAVIS) and J&F."""

from __future__ import annotations

import math
from typing import Dict, Sequence

import cv2
import numpy as np

from sam_gap_ros.mask_ops import mask_iou


def region_similarity(pred: np.ndarray, true: np.ndarray) -> float:
    """Return J, the IoU of two masks; 1.0 when both are empty (correctly predicted absence)."""
    if not pred.any() and not true.any():
        return 1.0
    return mask_iou(pred, true)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Return DAVIS's one-pixel boundary map of a boolean mask (Martin et al.'s seg2bmap).

    A pixel is on the boundary when its right, lower or lower-right neighbour differs; in
    the last row only the right one counts, in the last column only the lower one. The
    image border itself is no boundary, so a fruit cut by the frame edge is not scored
    along the cut.
    """
    right = np.zeros_like(mask)
    below = np.zeros_like(mask)
    diagonal = np.zeros_like(mask)
    right[:, :-1] = mask[:, 1:]
    below[:-1, :] = mask[1:, :]
    diagonal[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ diagonal)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def _disk(radius: int) -> np.ndarray:
    """Return the pixels within ``radius`` of the centre (skimage's ``disk``), as uint8."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2).astype(np.uint8)


def boundary_f_measure(pred: np.ndarray, true: np.ndarray, bound_th: float = 0.008) -> float:
    """Return the DAVIS boundary F-measure of two boolean masks.

    As the DAVIS 2017 evaluation computes it: boundary pixels (``_boundary``) match when
    within ``ceil(bound_th * image diagonal)`` pixels of the other boundary (``bound_th``
    >= 1 is a pixel distance). Both empty gives 1.0, exactly one empty gives 0.0.
    """
    if pred.shape != true.shape:
        raise ValueError(f'mask shapes differ: {pred.shape} vs {true.shape}')
    pred_b = _boundary(pred.astype(bool))
    true_b = _boundary(true.astype(bool))
    n_pred, n_true = int(pred_b.sum()), int(true_b.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0
    if n_pred == 0 or n_true == 0:
        return 0.0
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape)))
    disk = _disk(radius)
    pred_dil = cv2.dilate(pred_b.astype(np.uint8), disk).astype(bool)
    true_dil = cv2.dilate(true_b.astype(np.uint8), disk).astype(bool)
    precision = float((pred_b & true_dil).sum()) / n_pred
    recall = float((true_b & pred_dil).sum()) / n_true
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def video_j_and_f(pred: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> Dict[str, float]:
    """Return mean J, mean F and J&F over matching lists of ``(K, H, W)`` mask stacks.

    Every (frame, object) pair counts once, including frames where the object is absent
    (an empty prediction there scores 1, a false positive 0).
    """
    if len(pred) != len(true):
        raise ValueError(f'{len(pred)} predicted frames for {len(true)} true frames')
    j_values, f_values = [], []
    for p_frame, t_frame in zip(pred, true, strict=True):
        if p_frame.shape != t_frame.shape:
            raise ValueError(f'prediction {p_frame.shape} vs truth {t_frame.shape}')
        for p_mask, t_mask in zip(p_frame, t_frame, strict=True):
            j_values.append(region_similarity(p_mask, t_mask))
            f_values.append(boundary_f_measure(p_mask, t_mask))
    if not j_values:
        raise ValueError('no (frame, object) pairs to score')
    j_mean, f_mean = float(np.mean(j_values)), float(np.mean(f_values))
    return {'j': j_mean, 'f': f_mean, 'j_and_f': (j_mean + f_mean) / 2}


def mostly_inside(mask: np.ndarray, region: np.ndarray) -> bool:
    """Whether at least half of ``mask``'s pixels lie in ``region`` (False for an empty mask).

    COCO's rule for crowd (ignore) regions at IoU 0.5, where the IoU of a detection with a
    crowd is measured over the detection's own area: such a detection is neither a true nor
    a false positive.
    """
    area = np.count_nonzero(mask)
    return area > 0 and np.count_nonzero(np.logical_and(mask, region)) >= 0.5 * area
