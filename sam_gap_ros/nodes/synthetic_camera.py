"""``synthetic_camera`` node: a seeded synthetic orchard camera for robot-less runs and tests.

Publishes ``image`` (rgb8), ``depth`` (16UC1 mm, or 32FC1 m) and ``camera_info`` with one
shared header per frame at ``rate_hz``, looping over ``n_frames`` frames of an
``OrchardVideo`` (a panning camera along an apple row).
"""

from __future__ import annotations

import sys
from typing import List, Optional

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image

from sam_gap_ros import image_conversion
from sam_gap_ros.nodes.ros_utils import create_node_or_exit, describe, init_node_process
from sam_gap_ros.nodes.ros_utils import make_executor, MAX_RATE_HZ, spin_node
from sam_gap_ros.synthetic.config import scene_config_from_text
from sam_gap_ros.synthetic.video import OrchardVideo


class SyntheticCameraNode(Node):
    """Publish synthetic orchard frames, depth and intrinsics at a fixed rate."""

    def __init__(self, node_name: str = 'synthetic_camera', **kwargs) -> None:
        super().__init__(node_name, **kwargs)
        for name, default, text, extra in (
                ('rate_hz', 10.0, 'frames per second', dict(float_range=(0.1, MAX_RATE_HZ))),
                ('width', 640, 'image width (px)', dict(int_range=(32, 4096))),
                ('height', 480, 'image height (px)', dict(int_range=(32, 4096))),
                ('seed', 0, 'scene seed (same seed = same frames)', dict(int_range=(0, 2**31))),
                ('n_frames', 300, 'frames before the video loops; the world panned over must fit '
                 'one image layer, so a long video needs a slow pan (refused at start '
                 'otherwise)', dict(int_range=(1, 100000))),
                ('pan_speed', 4.0, 'camera pan in px per frame', {}),
                ('publish_depth', True, 'publish depth and camera_info', {}),
                ('depth_encoding', '16UC1', '16UC1 (mm) or 32FC1 (m)',
                 dict(choices=('16UC1', '32FC1'))),
                ('frame_id', 'camera_color_optical_frame', 'frame_id of every header', {}),
                ('max_frames', 0, 'stop publishing after this many frames (0 = never)',
                 dict(int_range=(0, 10**9))),
                ('scene', '', 'OrchardSceneConfig overrides as a YAML mapping, e.g. '
                 "'{hfov_deg: 30.0, n_apples: [3, 6]}' (empty = defaults)", {})):
            self.declare_parameter(name, default, describe(text, default, read_only=True,
                                                           **extra))
        param = self.get_parameter
        encoding = param('depth_encoding').value
        if encoding not in ('16UC1', '32FC1'):
            raise ValueError(f"depth_encoding '{encoding}' is not 16UC1 or 32FC1")
        # Invalid overrides raise ValueError naming the field: the camera must not start
        # with a scene other than the one asked for.
        config = scene_config_from_text(str(param('scene').value),
                                        width=int(param('width').value),
                                        height=int(param('height').value),
                                        reserved=('width', 'height'))
        self.video = OrchardVideo(int(param('seed').value), config,
                                  n_frames=int(param('n_frames').value),
                                  pan_speed=float(param('pan_speed').value))
        self.image_pub = self.create_publisher(Image, 'image', 5)
        self.depth_pub = self.create_publisher(Image, 'depth', 5)
        self.info_pub = self.create_publisher(CameraInfo, 'camera_info', 5)
        self.published = 0
        self.stamps: List[int] = []
        self.timer = self.create_timer(1.0 / float(param('rate_hz').value), self.publish_next)

    def publish_next(self) -> None:
        """Render and publish the next frame (image, depth, camera_info share one header)."""
        max_frames = int(self.get_parameter('max_frames').value)
        if max_frames and self.published >= max_frames:
            return
        frame = self.video[self.published % len(self.video)]
        stamp = self.get_clock().now().to_msg()
        frame_id = self.get_parameter('frame_id').value
        image = image_conversion.numpy_to_image_msg(frame.image, 'rgb8')
        image.header.stamp, image.header.frame_id = stamp, frame_id
        self.image_pub.publish(image)
        if self.get_parameter('publish_depth').value:
            if self.get_parameter('depth_encoding').value == '32FC1':
                meters = frame.depth_mm.astype(np.float32) / 1000.0
                meters[frame.depth_mm == 0] = np.nan  # 32FC1 marks "no return" with NaN
                depth = image_conversion.numpy_to_image_msg(meters, '32FC1')
            else:
                depth = image_conversion.numpy_to_image_msg(frame.depth_mm, '16UC1')
            depth.header = image.header
            self.depth_pub.publish(depth)
            camera = frame.camera
            info = CameraInfo(header=image.header, width=camera.width, height=camera.height,
                              distortion_model='plumb_bob')
            info.d = [0.0] * 5
            info.k = [float(v) for v in camera.k]
            info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            info.p = [float(v) for v in camera.p]
            self.info_pub.publish(info)
        self.published += 1
        self.stamps.append(stamp.sec * 1_000_000_000 + stamp.nanosec)
        del self.stamps[:-1000]


def main(args: Optional[List[str]] = None) -> None:
    """Run the synthetic_camera node until shutdown."""
    init_node_process(args, 'synthetic_camera')
    node = create_node_or_exit(SyntheticCameraNode, 'synthetic_camera')
    spin_node(node, make_executor('single_threaded'))


if __name__ == '__main__':
    main(sys.argv)
