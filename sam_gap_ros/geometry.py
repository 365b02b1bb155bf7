"""Depth handling and pinhole back-projection for 3D instance positions.

Depth images come as ``16UC1`` (millimetres, 0 = no return) or ``32FC1`` (metres, NaN/inf/0
= no return). Both are normalised to float32 metres with NaN marking invalid pixels, so one
median over the valid pixels inside a mask gives a robust instance depth: a median ignores
the background/edge pixels that leak into a mask border much better than a mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from sam_gap_ros.mask_ops import mask_centroid

DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')
Point3 = Tuple[float, float, float]
_MEDIAN_SAMPLE = 8192


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics in pixels, without distortion (ROS ``CameraInfo`` with zero D)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_k(cls, k: Sequence[float], width: int, height: int) -> CameraIntrinsics:
        """Build intrinsics from a row-major 3x3 camera matrix (sensor_msgs/CameraInfo ``k``)."""
        values = [float(v) for v in k]
        if len(values) != 9:
            raise ValueError(f'camera matrix needs 9 values, got {len(values)}')
        fx, fy, cx, cy = values[0], values[4], values[2], values[5]
        if not (np.isfinite([fx, fy, cx, cy]).all() and fx > 0 and fy > 0):
            raise ValueError(f'invalid intrinsics fx={fx} fy={fy} cx={cx} cy={cy}')
        if width <= 0 or height <= 0:
            raise ValueError(f'invalid camera size {width}x{height}')
        return cls(fx, fy, cx, cy, int(width), int(height))

    @classmethod
    def from_camera_info(cls, k: Sequence[float], width: int, height: int,
                         binning: Tuple[int, int] = (0, 0),
                         roi: Tuple[int, int, int, int] = (0, 0, 0, 0)) -> CameraIntrinsics:
        """Build the intrinsics of the image a ``sensor_msgs/CameraInfo`` describes.

        ``k``, ``width`` and ``height`` are the full sensor's; ``binning`` (``binning_x``,
        ``binning_y``; 0 = 1) and ``roi`` (``x_offset, y_offset, width, height`` in full
        resolution pixels; all 0 = the full sensor) say which window of it, at which
        subsampling, the published image holds. As image_geometry's PinholeCameraModel
        does: the principal point moves by the window offset, then all scales by binning.
        """
        full = cls.from_k(k, width, height)
        binning_x, binning_y = (max(1, int(b)) for b in binning)
        x_offset, y_offset, roi_width, roi_height = (int(v) for v in roi)
        if not any((x_offset, y_offset, roi_width, roi_height)):
            roi_width, roi_height = full.width, full.height
        if (roi_width <= 0 or roi_height <= 0 or x_offset + roi_width > full.width
                or y_offset + roi_height > full.height):
            raise ValueError(f'camera_info roi {tuple(roi)} (x, y, width, height) is not inside '
                             f'its {full.width}x{full.height} sensor')
        if roi_width < binning_x or roi_height < binning_y:
            raise ValueError(f'camera_info binning {binning_x}x{binning_y} leaves no pixel '
                             f'of its {roi_width}x{roi_height} window')
        return cls(full.fx / binning_x, full.fy / binning_y, (full.cx - x_offset) / binning_x,
                   (full.cy - y_offset) / binning_y, roi_width // binning_x,
                   roi_height // binning_y)

    def scaled_to(self, width: int, height: int) -> CameraIntrinsics:
        """Return these intrinsics rescaled to another image size of the same camera."""
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        # Pixel centres sit at +0.5, so the principal point scales about the image corner.
        return CameraIntrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5,
                                (self.cy + 0.5) * sy - 0.5, int(width), int(height))

    @property
    def k(self) -> List[float]:
        """Return the row-major 3x3 camera matrix (``CameraInfo.k``)."""
        return [self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0]

    @property
    def p(self) -> List[float]:
        """Return the row-major 3x4 projection matrix of a monocular camera (``CameraInfo.p``)."""
        return [self.fx, 0.0, self.cx, 0.0, 0.0, self.fy, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0]

    @property
    def matrix(self) -> np.ndarray:
        """Return ``k`` as a float64 ``(3, 3)`` array."""
        return np.asarray(self.k, dtype=np.float64).reshape(3, 3)

    def to_dict(self) -> Dict[str, float]:
        """Return a JSON-friendly dict."""
        return {'width': self.width, 'height': self.height, 'fx': self.fx, 'fy': self.fy,
                'cx': self.cx, 'cy': self.cy}


def depth_to_meters(depth: np.ndarray, encoding: str) -> np.ndarray:
    """Return a float32 depth image in metres with NaN for every invalid pixel.

    ``16UC1``/``mono16`` is millimetres with 0 = invalid; ``32FC1`` is metres where NaN,
    inf and values <= 0 are invalid.
    """
    if depth.ndim != 2:
        raise ValueError(f'depth must be a single-channel (H, W) image, got shape {depth.shape}')
    if encoding in ('16UC1', 'mono16'):
        if depth.dtype != np.uint16:
            raise ValueError(f'{encoding} depth must be uint16, got {depth.dtype}')
        meters = depth.astype(np.float32) * np.float32(0.001)
        meters[depth == 0] = np.nan
        return meters
    if encoding == '32FC1':
        if depth.dtype != np.float32:
            raise ValueError(f'32FC1 depth must be float32, got {depth.dtype}')
        meters = depth.astype(np.float32, copy=True)
        meters[~np.isfinite(meters) | (meters <= 0)] = np.nan
        return meters
    raise ValueError(f"unsupported depth encoding '{encoding}': use one of {DEPTH_ENCODINGS}")


def check_same_view(name: str, size: Tuple[int, int], image_size: Tuple[int, int],
                    tolerance: float = 0.01) -> None:
    """Raise ValueError unless ``size`` (width, height) can be the colour image's view rescaled.

    Depth aligned to the colour camera, and the colour camera's camera_info, may come at
    another resolution but never at another aspect ratio. One that differs belongs to
    another camera (unaligned depth, the depth camera's intrinsics), and rescaling it
    would place every fruit wrongly.
    """
    width, height = size
    image_width, image_height = image_size
    aspect, image_aspect = width / height, image_width / image_height
    if abs(aspect / image_aspect - 1.0) > tolerance:
        raise ValueError(
            f'{name} is {width}x{height} but the colour image is {image_width}x{image_height}, '
            f'another aspect ratio: it is not registered to the colour camera (use depth '
            f'aligned to colour and the colour camera_info)')


def align_depth(depth_m: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Resize a registered depth image to the colour image size (nearest neighbour).

    Nearest neighbour keeps NaN holes and never invents depths between a fruit and the
    background behind it, which interpolation would.
    """
    if depth_m.shape == tuple(shape):
        return depth_m
    height, width = shape
    return cv2.resize(depth_m, (width, height), interpolation=cv2.INTER_NEAREST)


def median_depth(depth_m: np.ndarray, mask: np.ndarray, min_valid: int = 1) -> Optional[float]:
    """Return the median valid depth (m) inside a mask, or None with < ``min_valid`` pixels."""
    if depth_m.shape != mask.shape:
        raise ValueError(f'depth shape {depth_m.shape} != mask shape {mask.shape}')
    values = depth_m[mask]
    values = values[np.isfinite(values)]
    if values.size < max(1, min_valid):
        return None
    if values.size > _MEDIAN_SAMPLE:
        # A regular subsample of ~8k values estimates the median to ~1 % of the depth
        # spread inside the mask (sub-millimetre for a fruit) at a fraction of the cost.
        values = values[::values.size // _MEDIAN_SAMPLE]
    return float(np.median(values))


def back_project(u: float, v: float, z: float, intrinsics: CameraIntrinsics) -> Point3:
    """Return the camera-frame point (x right, y down, z forward; m) of pixel (u, v) at depth z."""
    return ((u - intrinsics.cx) * z / intrinsics.fx, (v - intrinsics.cy) * z / intrinsics.fy, z)


def instance_position(mask: np.ndarray, depth_m: np.ndarray, intrinsics: CameraIntrinsics,
                      min_valid: int = 1,
                      crop_box: Optional[Tuple[int, int, int, int]] = None) -> Optional[Point3]:
    """Return the 3D centre of a masked instance: pixel centroid at the median mask depth.

    None when the mask is empty or has too few valid depth pixels (never a made-up depth).
    ``crop_box`` ``(x0, y0, x1, y1)``, when given, must contain the whole mask; the work is
    then done on that crop only.
    """
    height, width = mask.shape
    if (intrinsics.width, intrinsics.height) != (width, height):
        intrinsics = intrinsics.scaled_to(width, height)
    x0, y0 = 0, 0
    if crop_box is not None:
        x0, y0, x1, y1 = crop_box
        mask, depth_m = mask[y0:y1, x0:x1], depth_m[y0:y1, x0:x1]
    centroid = mask_centroid(mask)
    if centroid is None:
        return None
    z = median_depth(depth_m, mask, min_valid)
    if z is None:
        return None
    return back_project(centroid[0] + x0, centroid[1] + y0, z, intrinsics)
