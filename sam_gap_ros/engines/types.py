"""Result types returned by the ROS-free engines.

Frames given to every engine are RGB ``uint8`` numpy arrays of shape ``(H, W, 3)``;
all masks in results are boolean ``(H, W)`` arrays at that same full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from sam_gap_ros.mask_ops import Box


def check_rgb_frame(frame: np.ndarray) -> None:
    """Raise a clear error unless ``frame`` is a non-empty RGB uint8 ``(H, W, 3)`` array."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(f'frame must be a numpy array, got {type(frame).__name__}')
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f'frame must be RGB uint8 (H, W, 3), got {frame.dtype} {frame.shape}')
    if frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f'frame is empty: {frame.shape}')


class ModelLoadError(RuntimeError):
    """A model directory is missing, incomplete or of the wrong model type."""


class PromptError(ValueError):
    """A prompt (box, point, mask, object id) is invalid for the current frame/session."""


class ConceptError(ValueError):
    """A concept set or compositional query is invalid."""


@dataclass
class TrackedObject:
    """One tracked object in one frame (SAM2 tracker output)."""

    object_id: int
    mask: np.ndarray
    score: float
    """Object-presence logit from SAM2's object-score head (< 0 means judged absent)."""
    present: bool
    """Judged present (``score`` > 0) with at least one mask pixel; absent objects have an
    empty ``mask``, no ``box`` and ``area`` 0."""
    box: Optional[Box]
    area: int


@dataclass
class TrackResult:
    """All objects of the session for one processed frame."""

    frame_index: int
    objects: List[TrackedObject] = field(default_factory=list)

    @property
    def present(self) -> List[TrackedObject]:
        """Objects judged present in this frame."""
        return [obj for obj in self.objects if obj.present]


@dataclass
class Instance:
    """One segmented instance of a concept (SAM3 / hybrid output)."""

    mask: np.ndarray
    box: Optional[Box]
    score: float
    """Detection probability in [0, 1]."""
    concept: str
    area: int
    instance_id: Optional[int] = None
    """Persistent track ID in hybrid mode; None for per-frame SAM3 detections."""
