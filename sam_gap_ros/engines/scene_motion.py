"""Camera motion for SAM2's memory bank: where the scene has moved since a memory was made.

SAM2 stores each memory as a spatial map aligned with the frame it was encoded on. On a
panning camera the prompted frame's memory, which stays in the bank for the whole track,
points further and further from where the fruit now is; a small memory attention does not
bridge that, and its masks lag behind the fruit, stick at the image border and, once the
fruit has gone, grow into a blob over its neighbours while still claiming "present".

Two uses of one estimate, both in ``Sam2Tracker``:

* ``shift_memory`` moves the conditioning (prompted-frame) memory by the scene motion
  since its frame, so it lines up with the current frame. The recent memories are a few
  frames old, a displacement the model learns to bridge in training, and stay as they are.
* ``gate_to_moved_boxes`` keeps a tracked mask inside the object's last box moved by the
  scene motion (and grown by a margin): a mask that is mostly elsewhere has jumped to
  another fruit or exploded, and the object is reported absent instead.

The motion is one translation per frame, estimated by phase correlation between
consecutive model inputs: exact for a rotating (panning/tilting) camera and the dominant
term for a platform driving along a row (near and far layers then move at different
rates; the gate's margin absorbs the difference). A weak correlation peak (a texture-less
or cut view) counts as no motion.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# Phase-correlation peak below which an estimate is not trusted (a clean shift of a
# textured image scores about 0.8-1.0; unrelated images score < 0.1).
MIN_RESPONSE = 0.2
# Side of the image the motion is estimated on: enough for sub-pixel accuracy, and the
# FFTs stay well under a millisecond for a 1024 px model input.
ESTIMATION_SIDE = 256

Box = Tuple[float, float, float, float]


class SceneMotion:
    """Accumulate the per-frame image translation of a stream, in input pixels."""

    def __init__(self, min_response: float = MIN_RESPONSE,
                 estimation_side: int = ESTIMATION_SIDE) -> None:
        self._min_response = float(min_response)
        self._side = int(estimation_side)
        self._window: Optional[np.ndarray] = None
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame is the origin."""
        self._previous: Optional[np.ndarray] = None
        self._offset = (0.0, 0.0)

    @property
    def offset(self) -> Tuple[float, float]:
        """Scene displacement ``(x, y)`` of the latest frame since the first, in pixels."""
        return self._offset

    def update(self, gray: np.ndarray) -> Tuple[float, float]:
        """Add the next frame (2-D intensity image); return the new ``offset``."""
        gray = np.asarray(gray, dtype=np.float32)
        if gray.ndim != 2:
            raise ValueError(f'expected a 2-D image, got shape {gray.shape}')
        return self.update_pixels(torch.from_numpy(gray)[None])

    def update_pixels(self, pixels: torch.Tensor) -> Tuple[float, float]:
        """Add the next model input ``(C, H, W)`` on any device; return the new ``offset``.

        Averaged over channels and shrunk where it lives, so only a small image reaches
        the host (a 1024 px input on a GPU: 256 KB instead of 4 MB per frame).
        """
        if pixels.ndim != 3:
            raise ValueError(f'expected a (C, H, W) tensor, got shape {tuple(pixels.shape)}')
        gray = pixels.detach().float().mean(dim=0)
        scale = max(gray.shape) / self._side
        if scale > 1.0:
            size = (max(1, round(gray.shape[0] / scale)), max(1, round(gray.shape[1] / scale)))
            gray = F.interpolate(gray[None, None], size=size, mode='area')[0, 0]
        return self._add(gray.cpu().numpy(), max(scale, 1.0))

    def _add(self, gray: np.ndarray, scale: float) -> Tuple[float, float]:
        gray = np.ascontiguousarray(gray, dtype=np.float32)
        previous, self._previous = self._previous, gray
        if previous is None or previous.shape != gray.shape or min(gray.shape) < 2:
            return self._offset
        if self._window is None or self._window.shape != gray.shape:
            self._window = cv2.createHanningWindow(gray.shape[::-1], cv2.CV_32F)
        # Copies: OpenCV 5's phaseCorrelate multiplies its inputs by the window in place.
        (dx, dy), response = cv2.phaseCorrelate(previous.copy(), gray.copy(), self._window)
        if response >= self._min_response and np.isfinite(dx) and np.isfinite(dy):
            self._offset = (self._offset[0] + dx * scale, self._offset[1] + dy * scale)
        return self._offset


def shift_memory(features: torch.Tensor, shift_px: Tuple[float, float],
                 grid: Sequence[int], image_size: int) -> torch.Tensor:
    """Translate a flattened memory map ``(H*W, B, C)`` by ``shift_px`` model-input pixels.

    Content moves by ``shift_px`` (x right, y down), resampled bilinearly; cells whose
    source lies outside the map become zero (nothing remembered there).
    """
    height, width = int(grid[0]), int(grid[1])
    tokens, batch, channels = features.shape
    if tokens != height * width:
        raise ValueError(f'{tokens} memory tokens do not form a {height}x{width} grid')
    maps = features.permute(1, 2, 0).reshape(batch, channels, height, width)
    # Normalised coordinates span the image (2 units = image_size px); the output at x
    # samples the input at x - shift.
    theta = torch.tensor([[1.0, 0.0, -2.0 * shift_px[0] / image_size],
                          [0.0, 1.0, -2.0 * shift_px[1] / image_size]],
                         dtype=torch.float32, device=maps.device).expand(batch, 2, 3)
    sample = F.affine_grid(theta, [batch, channels, height, width], align_corners=False)
    moved = F.grid_sample(maps.float(), sample, mode='bilinear', padding_mode='zeros',
                          align_corners=False).to(maps.dtype)
    return moved.reshape(batch, channels, tokens).permute(2, 0, 1).contiguous()


def moved_box(box: Box, shift_px: Tuple[float, float], margin: float) -> Box:
    """Return ``box`` moved by ``shift_px`` and grown by ``margin`` of its size + 2 px a side."""
    x0, y0, x1, y1 = box
    grow_x = margin * (x1 - x0) + 2.0
    grow_y = margin * (y1 - y0) + 2.0
    dx, dy = shift_px
    return (x0 + dx - grow_x, y0 + dy - grow_y, x1 + dx + grow_x, y1 + dy + grow_y)


def logits_boxes(logits: torch.Tensor) -> List[Optional[Box]]:
    """Return the ``(x0, y0, x1, y1)`` box of ``logits > 0`` per map of ``(B, h, w)``.

    None for an empty map. Computed where the logits live, with one small transfer.
    """
    mask = logits > 0
    rows, cols = mask.any(dim=2), mask.any(dim=1)           # (B, h), (B, w)
    height, width = rows.shape[1], cols.shape[1]
    first_row = rows.int().argmax(dim=1)
    last_row = height - 1 - rows.flip(1).int().argmax(dim=1)
    first_col = cols.int().argmax(dim=1)
    last_col = width - 1 - cols.flip(1).int().argmax(dim=1)
    table = torch.stack([first_col, first_row, last_col + 1, last_row + 1,
                         rows.any(dim=1).int()], dim=1).tolist()
    return [tuple(float(v) for v in row[:4]) if row[4] else None for row in table]


def inside_boxes(boxes: torch.Tensor, shape: Sequence[int], image_size: int) -> torch.Tensor:
    """Return ``(B, h, w)``: which cells of an ``(h, w)`` map lie in each box of ``(B, 4)``.

    Boxes are in model-input pixels; the map covers the square model input.
    """
    height, width = int(shape[0]), int(shape[1])
    device = boxes.device
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (image_size / height)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (image_size / width)
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    return (((ys >= y0) & (ys <= y1))[:, :, None] & ((xs >= x0) & (xs <= x1))[:, None, :])


def gate_to_moved_boxes(high_res: torch.Tensor, low_res: torch.Tensor,
                        boxes: Sequence[Box], image_size: int, min_kept: float,
                        no_object: float) -> List[bool]:
    """Cut objects' mask logits to their boxes; return per object whether it is still there.

    ``high_res`` ``(B, S, S)`` and ``low_res`` ``(B, h, w)`` are the objects' logits over
    the model input, changed in place: outside its box a map becomes ``no_object``. An
    empty mask, or one that keeps less than ``min_kept`` of its pixels, is not the object
    any more (the caller reports it absent).
    """
    box_tensor = torch.tensor(boxes, dtype=torch.float32, device=high_res.device).reshape(-1, 4)
    before = (high_res > 0).flatten(1).sum(dim=1)
    for logits in (high_res, low_res):
        keep = inside_boxes(box_tensor, logits.shape[-2:], image_size)
        logits.copy_(torch.where(keep, logits, torch.full_like(logits, no_object)))
    after = (high_res > 0).flatten(1).sum(dim=1)
    return ((before > 0) & (after >= min_kept * before)).tolist()
