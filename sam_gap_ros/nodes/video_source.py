"""``video_source`` node: publish a video file or an image folder as a camera stream.

Publishes ``image`` (bgr8, as OpenCV decodes it) and, when ``fx`` > 0, ``camera_info`` with
the same header, at ``rate_hz`` (0 = the video's own frame rate). A folder plays in natural
name order (``frame_2`` before ``frame_10``); files that cannot be decoded are skipped
with a warning.
"""

from __future__ import annotations

import os
from pathlib import Path
import re
import sys
from typing import Callable, List, Optional, Tuple, Union

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from sam_gap_ros import image_conversion
from sam_gap_ros.nodes.ros_utils import create_node_or_exit, describe, init_node_process
from sam_gap_ros.nodes.ros_utils import make_executor, MAX_RATE_HZ, MIN_RATE_HZ, spin_node

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def natural_key(name: str) -> Tuple[Union[int, str], ...]:
    """Sort key that orders digit runs by value: ``frame_2`` before ``frame_10``."""
    # isdecimal, not isdigit: the parts between digit runs may be all superscripts or
    # circled digits (``²``, ``①``), which isdigit accepts but int() refuses.
    return tuple(int(part) if part.isdecimal() else part.lower()
                 for part in re.split(r'(\d+)', name))


def printable_path(path: Path) -> str:
    r"""Return ``path`` for a log line; bytes of a non-UTF-8 name as ``\xNN`` escapes.

    Python holds such names (Latin-1 from a FAT stick or an old archive) as lone
    surrogates, which rclpy's logger refuses with a TypeError.
    """
    return os.fsencode(path).decode('utf-8', 'backslashreplace')


def read_image(path: Path) -> Optional[np.ndarray]:
    """Return the image file ``path`` as 8-bit BGR, or None if it cannot be read or decoded.

    Read by numpy and decoded from memory: ``cv2.imread`` takes the name as UTF-8 and
    crashes the process (SIGSEGV) on a name that is not. ``imdecode`` applies the EXIF
    orientation and converts grey, alpha and 16-bit images to BGR as ``imread`` does.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:  # deleted while playing, a folder named like an image, no permission
        return None
    if data.size == 0:  # imdecode raises on an empty buffer
        return None
    try:
        return cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:
        return None


class FrameReader:
    """Read BGR frames from a video file or a folder of images, optionally looping.

    ``on_unreadable(path)`` is called once for each image file that cannot be decoded; such a
    file is left out from then on.
    """

    def __init__(self, path: str, loop: bool = True,
                 on_unreadable: Optional[Callable[[Path], None]] = None) -> None:
        if not str(path).strip():
            raise ValueError("no video source given: set 'path' to a video file or a folder "
                             'of images')
        self.path = Path(path).expanduser()
        self.loop = loop
        self.unreadable: List[Path] = []
        self._on_unreadable = on_unreadable
        self._files: List[Path] = []
        self._capture: Optional[cv2.VideoCapture] = None
        self._index = 0
        if self.path.is_dir():
            self._files = sorted((p for p in self.path.iterdir()
                                  if p.suffix.lower() in IMAGE_SUFFIXES),
                                 key=lambda p: natural_key(p.name))
            if not self._files:
                raise ValueError(f"folder '{self.path}' holds no {IMAGE_SUFFIXES} images")
        elif self.path.is_file():
            self._capture = cv2.VideoCapture(str(self.path))
            if not self._capture.isOpened():
                raise ValueError(f"OpenCV cannot open video '{self.path}'")
        else:
            raise ValueError(f"video source '{self.path}' does not exist")

    @property
    def fps(self) -> float:
        """Native frame rate of a video (0.0 for folders or when unknown)."""
        if self._capture is None:
            return 0.0
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        return fps if np.isfinite(fps) and fps > 0 else 0.0

    def read(self) -> Optional[np.ndarray]:
        """Return the next BGR frame, or None at the end (when not looping)."""
        for _ in range(2):
            frame = self._next()
            if frame is not None:
                return frame
            if not self.loop:
                return None
            self._rewind()
        return None

    def _next(self) -> Optional[np.ndarray]:
        if self._capture is not None:
            ok, frame = self._capture.read()
            return frame if ok else None
        while self._index < len(self._files):
            path = self._files[self._index]
            frame = read_image(path)
            if frame is not None:
                self._index += 1
                return frame
            # Dropped from the list, so a looping folder does not decode it again each pass.
            del self._files[self._index]
            self.unreadable.append(path)
            if self._on_unreadable is not None:
                self._on_unreadable(path)
        return None

    def _rewind(self) -> None:
        self._index = 0
        if self._capture is not None:
            # Reopened rather than seeked: CAP_PROP_POS_FRAMES seeks are approximate or
            # ignored for some codecs and backends, which would end a looping source.
            self._capture.release()
            self._capture = cv2.VideoCapture(str(self.path))

    def close(self) -> None:
        """Release the video file."""
        if self._capture is not None:
            self._capture.release()


class VideoSourceNode(Node):
    """Publish frames from ``FrameReader`` at a fixed rate."""

    def __init__(self, node_name: str = 'video_source', **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        for name, default, text, extra in (
                ('path', '', 'video file (any OpenCV format) or folder of images', {}),
                ('rate_hz', 0.0, 'publish rate; 0 = the video frame rate (10 Hz for folders), '
                 f'else at least {MIN_RATE_HZ:g}',
                 dict(float_range=(0.0, MAX_RATE_HZ))),
                ('loop', True, 'restart at the end instead of stopping', {}),
                ('frame_id', 'camera_color_optical_frame', 'frame_id of the published headers',
                 {}),
                ('fx', 0.0, 'focal length x (px) for camera_info; 0 = no camera_info',
                 dict(float_range=(0.0, 1e6))),
                ('fy', 0.0, 'focal length y (px); 0 = fx', dict(float_range=(0.0, 1e6))),
                # Ranged like fx: inf or NaN would go out in every camera_info.
                ('cx', -1.0, 'principal point x (px); < 0 = image centre',
                 dict(float_range=(-1.0, 1e6))),
                ('cy', -1.0, 'principal point y (px); < 0 = image centre',
                 dict(float_range=(-1.0, 1e6)))):
            self.declare_parameter(name, default, describe(text, default, read_only=True,
                                                           **extra))
        rate_hz = float(self.get_parameter('rate_hz').value)
        if 0.0 < rate_hz < MIN_RATE_HZ:
            # The range must admit 0 (the video's rate); a timer period of days never
            # publishes, and one beyond int64 ns fails in rclpy with an unreadable TypeError.
            raise ValueError(f'rate_hz {rate_hz:g} is below {MIN_RATE_HZ:g} Hz; set 0 for the '
                             "video's own rate")
        self.reader = FrameReader(self.get_parameter('path').value,
                                  bool(self.get_parameter('loop').value),
                                  on_unreadable=self._warn_unreadable)
        rate = rate_hz or self.reader.fps or 10.0
        if rate < MIN_RATE_HZ:  # a time-lapse, or a header claiming a rate near 0
            self.get_logger().warning(f'{self.reader.path} runs at {rate:g} fps: publishing at '
                                      f'{MIN_RATE_HZ:g} Hz (set rate_hz to choose)')
            rate = MIN_RATE_HZ
        if rate > MAX_RATE_HZ:  # a high-speed recording played at its own rate
            self.get_logger().warning(f'{self.reader.path} runs at {rate:g} fps: publishing at '
                                      f'{MAX_RATE_HZ:g} Hz (set rate_hz to choose)')
            rate = MAX_RATE_HZ
        self.image_pub = self.create_publisher(Image, 'image', 5)
        self.info_pub = self.create_publisher(CameraInfo, 'camera_info', 5)
        self.published = 0
        self.finished = False
        self.timer = self.create_timer(1.0 / rate, self._tick)
        self.get_logger().info(f"publishing '{self.reader.path}' at {rate:.1f} Hz")

    def _warn_unreadable(self, path: Path) -> None:
        self.get_logger().warning(f"cannot decode '{printable_path(path)}': skipped")

    def _tick(self) -> None:
        frame = self.reader.read()
        if frame is None:
            # The end (loop off), or nothing left that decodes: stop the timer, stay up.
            self.timer.cancel()
            self.finished = True
            if self.published == 0:
                self.get_logger().error(
                    f'no frame could be read from {self.reader.path} '
                    f'({len(self.reader.unreadable)} files could not be decoded)')
            else:
                self.get_logger().info(f'end of {self.reader.path} after {self.published} '
                                       'frames')
            return
        stamp = self.get_clock().now().to_msg()
        msg = image_conversion.numpy_to_image_msg(frame, 'bgr8')
        msg.header.stamp = stamp
        msg.header.frame_id = self.get_parameter('frame_id').value
        self.image_pub.publish(msg)
        fx = float(self.get_parameter('fx').value)
        if fx > 0:
            self.info_pub.publish(self._camera_info(msg, fx))
        self.published += 1

    def _camera_info(self, image: Image, fx: float) -> CameraInfo:
        param = self.get_parameter
        fy = float(param('fy').value) or fx
        cx = float(param('cx').value)
        cy = float(param('cy').value)
        cx = cx if cx >= 0 else (image.width - 1) / 2.0
        cy = cy if cy >= 0 else (image.height - 1) / 2.0
        info = CameraInfo(header=image.header, width=image.width, height=image.height)
        info.distortion_model = 'plumb_bob'
        info.d = [0.0] * 5
        info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
        return info


def main(args: Optional[List[str]] = None) -> None:
    """Run the video_source node until shutdown."""
    init_node_process(args, 'video_source')
    node = create_node_or_exit(VideoSourceNode, 'video_source')
    spin_node(node, make_executor('single_threaded'), on_stop=node.reader.close)


if __name__ == '__main__':
    main(sys.argv)
