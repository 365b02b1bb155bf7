"""RGB overlay of instance masks with IDs and labels for ``~/overlay`` and the demo video."""

from __future__ import annotations

from typing import Sequence, Tuple

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
        text = f'{record.instance_id} {record.label} {record.score:.2f}'
        if record.position is not None:
            text += f' {record.position[2]:.2f}m'
        # Shifted left where it would run off the right edge (fruit at the border).
        (text_width, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                                             thickness + 2)
        origin = (max(0, min(x0, out.shape[1] - text_width)),
                  max(y0 - 3, int(25 * font_scale) + 1))
        # A dark outline keeps the label readable on bright leaves and sky.
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    colour, thickness, cv2.LINE_AA)
    return out
