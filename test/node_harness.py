"""Shared helpers for the in-process node tests: isolated rclpy context + probe node."""

import struct
import time
import uuid

import cv2
import numpy as np
import rclpy
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from sam_gap_ros.image_conversion import numpy_to_image_msg
from sam_gap_ros.nodes.ros_utils import DEFAULT_EXECUTOR, make_executor

H, W = 96, 128
K = [100.0, 0.0, 64.0, 0.0, 100.0, 48.0, 0.0, 0.0, 1.0]
# Discovery inside one context is immediate, but the 2-core CI box can be very loaded.
TIMEOUT_S = 30.0
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def make_frame(index, seed=0):
    """Return an RGB frame with a bright square moving right over textured noise."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    x = 20 + 2 * (index % 20)
    frame[30:60, x:x + 30] = 250
    return frame


def make_depth(mm=1500):
    depth = np.full((H, W), mm, dtype=np.uint16)
    depth[:, :8] = 0  # a strip without returns
    return depth


def compressed_depth_msg(depth_mm, header):
    """Return 16UC1 depth as compressed_depth_image_transport publishes it (PNG)."""
    _, png = cv2.imencode('.png', depth_mm)
    # Its 12-byte ConfigHeader (format, depthParam[2]) comes first; unused for 16UC1.
    data = struct.pack('<iff', 0, 0.0, 0.0) + png.tobytes()
    return CompressedImage(header=header, format='16UC1; compressedDepth png', data=data)


class Harness:
    """An isolated rclpy context with an executor and a probe node for pub/sub.

    ``executor`` is an ``EXECUTORS`` kind: the node tests run under the one the node
    executable spins by default, and the segmenter tests also under the other one.
    """

    def __init__(self, executor=DEFAULT_EXECUTOR):
        self.context = Context()
        rclpy.init(context=self.context)
        self.ns = '/t' + uuid.uuid4().hex[:10]
        self.executor = make_executor(executor, context=self.context)
        self.probe = rclpy.create_node('probe', namespace=self.ns, context=self.context)
        self.executor.add_node(self.probe)
        self.nodes = []
        self.received = {}
        self._pubs = {}

    def add(self, node):
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def make_segmenter(self, name='segmenter', **params):
        from sam_gap_ros.nodes.segmenter import SegmenterNode
        overrides = [Parameter(key, value=value) for key, value in params.items()]
        node = SegmenterNode(name, namespace=self.ns, context=self.context,
                             parameter_overrides=overrides)
        return self.add(node)

    def subscribe(self, msg_type, topic, qos=RELIABLE):
        store = self.received.setdefault(topic, [])
        self.probe.create_subscription(msg_type, topic, store.append, qos)
        return store

    def publisher(self, msg_type, topic, qos=RELIABLE):
        if topic not in self._pubs:
            self._pubs[topic] = self.probe.create_publisher(msg_type, topic, qos)
        return self._pubs[topic]

    def publish_frame(self, index, stamp_ns, depth=None, encoding='rgb8', frame=None,
                      depth_transport='raw'):
        frame = make_frame(index) if frame is None else frame
        msg = numpy_to_image_msg(frame, encoding)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.header.frame_id = 'cam'
        if depth is not None:
            info = CameraInfo(header=msg.header, width=W, height=H)
            info.k = K
            self.publisher(CameraInfo, f'{self.ns}/camera_info').publish(info)
            # Drivers publish camera_info with every frame, so a node knows the intrinsics
            # from the second frame on. On the first, a loaded machine may pair image and
            # depth before the executor has run the camera_info callback, and (by design)
            # such a frame gets no 3D poses; these tests check the steady state.
            self.spin_until(self._intrinsics_known, timeout=5.0)
        self.publisher(Image, f'{self.ns}/image').publish(msg)
        if depth is not None and depth_transport == 'compressedDepth':
            self.publisher(CompressedImage, f'{self.ns}/depth/compressedDepth').publish(
                compressed_depth_msg(depth, msg.header))
        elif depth is not None:
            depth_msg = numpy_to_image_msg(depth, '16UC1' if depth.dtype == np.uint16 else '32FC1',
                                           msg.header)
            self.publisher(Image, f'{self.ns}/depth').publish(depth_msg)
        return msg

    def _intrinsics_known(self):
        """Return whether every active segmenter that pairs depth has a camera_info."""
        return all(node._camera_info is not None for node in self.nodes
                   if getattr(node, '_pairer', None) is not None and node._active)

    def spin_until(self, condition, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            self.executor.spin_once(timeout_sec=0.02)
        return bool(condition())

    def call(self, client, request, timeout=TIMEOUT_S):
        assert self.spin_until(lambda: client.service_is_ready(), timeout), 'service not ready'
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout), 'service call timed out'
        return future.result()

    def close(self):
        for node in self.nodes:
            teardown = getattr(node, '_teardown', None)
            if teardown is not None:
                teardown()
        self.executor.shutdown()
        for node in self.nodes + [self.probe]:
            node.destroy_node()
        rclpy.shutdown(context=self.context)


def save_present_sam2(path, seed=0):
    """Save a tiny SAM2 whose object-score head judges every object present.

    Random weights give an arbitrary presence decision; the bias makes prompted objects
    produce masks, so the outputs have content (the architecture and code path are real).
    """
    import torch

    from sam_gap_ros.engines.tiny_sam2 import build_sam2_video_processor, build_tiny_sam2
    model = build_tiny_sam2(seed=seed, image_size=64)
    with torch.no_grad():
        head = model.mask_decoder.pred_obj_score_head.proj_out
        head.weight.zero_()
        head.bias.fill_(3.0)
    model.save_pretrained(path, safe_serialization=True)
    build_sam2_video_processor(model.config.image_size).save_pretrained(path)
    return path


def probe_segmenter(full_name, names=(), timeout_s=60.0):
    """Return (lifecycle state label, {parameter: value}) of a segmenter in another process.

    Waits until the node reports ``active`` (or ``timeout_s`` passes), then reads ``names``.
    """
    from lifecycle_msgs.srv import GetState
    from rcl_interfaces.srv import GetParameters
    context = Context()
    rclpy.init(args=[], context=context)
    node = rclpy.create_node('segmenter_probe', context=context)
    executor = make_executor('single_threaded', context=context)
    executor.add_node(node)
    try:
        deadline = time.monotonic() + timeout_s
        state, values = None, {}
        state_client = node.create_client(GetState, f'{full_name}/get_state')
        while time.monotonic() < deadline and state != 'active':
            if state_client.wait_for_service(timeout_sec=2.0):
                future = state_client.call_async(GetState.Request())
                executor.spin_until_future_complete(future, timeout_sec=5.0)
                if future.result() is not None:
                    state = future.result().current_state.label
            time.sleep(0.2)
        if names:
            client = node.create_client(GetParameters, f'{full_name}/get_parameters')
            if client.wait_for_service(timeout_sec=5.0):
                future = client.call_async(GetParameters.Request(names=list(names)))
                executor.spin_until_future_complete(future, timeout_sec=5.0)
                if future.result() is not None:
                    values = {name: rclpy.parameter.parameter_value_to_python(value)
                              for name, value in zip(names, future.result().values,
                                                     strict=True)}
        return state, values
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
