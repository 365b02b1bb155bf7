"""Mask geometry shared by the engines, the ROS nodes and training/evaluation.

All masks are boolean ``(H, W)`` numpy arrays at full image resolution; boxes are
``(x0, y0, x1, y1)`` in pixels with exclusive max corner (``x1 = last column + 1``).
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence, Tuple

import numpy as np

Box = Tuple[float, float, float, float]
MAX_LABEL_ID = int(np.iinfo(np.uint16).max)  # instance IDs are mono16 label values


def next_label_id(candidate: int, live: Collection[int]) -> int:
    """Return the first instance ID from ``candidate`` on that is not in ``live``.

    IDs are label values of a mono16 image, 1..65535. After 65535 (a long shift hands out
    that many) they start again at 1, and IDs still live are skipped, so that two live
    instances never share a label.
    """
    if len(live) >= MAX_LABEL_ID:
        raise ValueError(f'all {MAX_LABEL_ID} instance IDs are in use')
    object_id = (int(candidate) - 1) % MAX_LABEL_ID + 1
    while object_id in live:
        object_id = object_id % MAX_LABEL_ID + 1
    return object_id


def mask_to_box(mask: np.ndarray) -> Optional[Box]:
    """Return the tight ``(x0, y0, x1, y1)`` box of a boolean mask, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    # Columns only within the occupied rows: fruit masks cover a small band of the frame.
    cols = np.flatnonzero(mask[y0:y1].any(axis=0))
    return (float(cols[0]), float(y0), float(cols[-1] + 1), float(y1))


def mask_centroid(mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """Return the ``(x, y)`` pixel centroid of a mask, or None if empty."""
    # Row/column projections: O(H*W) sums instead of materialising every pixel's
    # coordinates with nonzero (several times faster on large masks).
    cols = np.count_nonzero(mask, axis=0)
    area = int(cols.sum())
    if area == 0:
        return None
    rows = np.count_nonzero(mask, axis=1)
    return (float(cols @ np.arange(cols.size, dtype=np.float64)) / area,
            float(rows @ np.arange(rows.size, dtype=np.float64)) / area)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 0.0
    return float(np.logical_and(a, b).sum() / union)


def mask_iou_matrix(masks_a: Sequence[np.ndarray], masks_b: Sequence[np.ndarray]) -> np.ndarray:
    """Pairwise IoU matrix of shape ``(len(a), len(b))`` computed with one matmul."""
    if len(masks_a) == 0 or len(masks_b) == 0:
        return np.zeros((len(masks_a), len(masks_b)), dtype=np.float64)
    flat_a = np.stack([m.reshape(-1) for m in masks_a]).astype(np.float32)
    flat_b = np.stack([m.reshape(-1) for m in masks_b]).astype(np.float32)
    inter = flat_a @ flat_b.T
    union = flat_a.sum(1)[:, None] + flat_b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float64)


def mask_coverage(inner: np.ndarray, outer: np.ndarray) -> float:
    """Fraction of ``inner``'s pixels that also lie in ``outer`` (0.0 for an empty inner)."""
    area = inner.sum()
    if area == 0:
        return 0.0
    return float(np.logical_and(inner, outer).sum() / area)


def label_image(masks: Sequence[np.ndarray], ids: Sequence[int], shape: Tuple[int, int],
                scores: Optional[Sequence[float]] = None,
                boxes: Optional[Sequence[Optional[Box]]] = None) -> np.ndarray:
    """Paint instance masks into a ``uint16`` label image (0 = background).

    Where masks overlap, the higher-scoring instance wins (the later one when no
    scores are given), so a pixel never carries two IDs. ``boxes``, each mask's
    ``mask_to_box`` (None for an empty mask), limits the painting to those boxes.
    """
    labels = np.zeros(shape, dtype=np.uint16)
    if boxes is not None and len(boxes) != len(masks):
        raise ValueError(f'{len(boxes)} boxes for {len(masks)} masks')
    order = range(len(masks)) if scores is None else np.argsort(np.asarray(scores), kind='stable')
    for index in order:
        object_id = int(ids[index])
        if not 0 < object_id <= MAX_LABEL_ID:
            raise ValueError(
                f'instance id {object_id} does not fit a mono16 label image (1..65535)')
        if boxes is None:
            np.copyto(labels, object_id, where=masks[index])
        elif boxes[index] is not None:
            x0, y0, x1, y1 = (int(v) for v in boxes[index])
            np.copyto(labels[y0:y1, x0:x1], object_id, where=masks[index][y0:y1, x0:x1])
    return labels
