"""RGB overlay of instance masks with IDs and labels for ``~/overlay`` and the demo video."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from sam_gap_ros.instances_json import InstanceRecord


def id_color(instance_id: int) -> Tuple[int, int, int]:
    """Return a stable, well-separated RGB colour for an instance ID."""
    # Golden-ratio hue steps keep consecutive IDs far apart on the colour wheel.
    hue = int((instance_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def _place_label(parts: Sequence[str], corner: Tuple[int, int], shape: Tuple[int, int],
                 font_scale: float, thickness: int) -> Optional[Tuple[str, Tuple[int, int]]]:
    """Return the longest label of leading ``parts`` that fits the image, and its origin.

    The label goes just above the box corner, moved inside where it would run off the image
    (fruit at the border). Where the whole label is too wide (small images: the font keeps a
    legible minimum size), trailing parts are left off, down to the ID alone, which still
    links the mask to ``~/instances``; None where not even that fits.
    """
    height, width = shape
    for count in range(len(parts), 0, -1):
        text = ' '.join(parts[:count])
        # Measured with the outline's thickness: the drawn text lies within
        # [x, x + text_width) and [y - text_height, y + baseline) of its origin (x, y).
        (text_width, text_height), baseline = cv2.getTextSize(
            text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        if text_width <= width and text_height + baseline <= height:
            x = max(0, min(corner[0], width - text_width))
            y = max(text_height, min(corner[1] - 3, height - baseline))
            return text, (x, y)
    return None


def render_overlay(rgb: np.ndarray, labels: np.ndarray, records: Sequence[InstanceRecord],
                   alpha: float = 0.5) -> np.ndarray:
    """Return an RGB uint8 copy of ``rgb`` with coloured masks, boxes, IDs and labels.

    ``labels`` is the uint16 instance-label image (0 = background) that is published on
    ``~/masks``, so the overlay shows exactly what downstream nodes receive.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'overlay needs an RGB uint8 (H, W, 3) image, got {rgb.shape} '
                         f'{rgb.dtype}')
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f'label image {labels.shape} does not match image {rgb.shape[:2]}')
    out = rgb.copy()
    ids = [int(r.instance_id) for r in records]
    if ids:
        palette = np.zeros((max(ids) + 1, 3), dtype=np.float32)
        for instance_id in ids:
            palette[instance_id] = id_color(instance_id)
        painted = labels > 0
        painted &= labels <= max(ids)
        colours = palette[labels[painted]]
        blended = (1.0 - alpha) * out[painted].astype(np.float32) + alpha * colours
        out[painted] = np.clip(blended, 0, 255).astype(np.uint8)
    font_scale = max(0.3, min(rgb.shape[:2]) / 1000.0)
    thickness = 1 if font_scale < 0.6 else 2
    for record in records:
        colour = id_color(int(record.instance_id))
        x0, y0, x1, y1 = (int(round(v)) for v in record.bbox)
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thickness)
        parts = [str(record.instance_id), str(record.label), f'{record.score:.2f}']
        if record.position is not None:
            parts.append(f'{record.position[2]:.2f}m')
        placed = _place_label(parts, (x0, y0), out.shape[:2], font_scale, thickness + 2)
        if placed is None:
            continue
        text, origin = placed
        # A dark outline keeps the label readable on bright leaves and sky.
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    colour, thickness, cv2.LINE_AA)
    return out
