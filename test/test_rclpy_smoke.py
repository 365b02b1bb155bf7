"""Prove that rclpy from the PyPI wheels really moves images over DDS in this environment."""

import time
import uuid

import numpy as np
import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from sam_gap_ros.image_conversion import image_msg_to_numpy, numpy_to_image_msg

# Discovery on a loaded 2-core machine can take a few seconds; past this the test fails
# instead of hanging the suite.
EXCHANGE_TIMEOUT_S = 20.0


@pytest.fixture
def ros_contexts(monkeypatch):
    """Yield two isolated, initialised rclpy contexts (two DDS participants)."""
    # Keep discovery traffic on this machine (the Makefile sets these for `make test`).
    monkeypatch.setenv('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    monkeypatch.delenv('ROS_STATIC_PEERS', raising=False)
    contexts = []
    try:
        for _ in range(2):
            context = Context()
            rclpy.init(context=context)
            contexts.append(context)
        yield contexts
    finally:
        for context in contexts:
            rclpy.shutdown(context=context)


@pytest.mark.parametrize('encoding, pixels', [
    ('rgb8', np.random.default_rng(0).integers(0, 256, (120, 161, 3), dtype=np.uint8)),
    ('mono16', np.random.default_rng(1).integers(0, 65536, (48, 33), dtype=np.uint16)),
])
def test_image_round_trip_over_dds(ros_contexts, encoding, pixels):
    suffix = uuid.uuid4().hex[:12]
    topic = f'/sam_gap_smoke_{suffix}/image'
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    pub_context, sub_context = ros_contexts
    pub_node = rclpy.create_node(f'smoke_pub_{suffix}', context=pub_context)
    sub_node = rclpy.create_node(f'smoke_sub_{suffix}', context=sub_context)
    received = []
    sub_node.create_subscription(Image, topic, received.append, qos)
    publisher = pub_node.create_publisher(Image, topic, qos)
    executor = SingleThreadedExecutor(context=sub_context)
    executor.add_node(sub_node)
    sent = numpy_to_image_msg(pixels, encoding)
    sent.header.frame_id = f'frame_{suffix}'
    try:
        deadline = time.monotonic() + EXCHANGE_TIMEOUT_S
        # Publish repeatedly: the first messages can go out before discovery has matched
        # the two participants, and volatile durability does not replay them.
        while not received and time.monotonic() < deadline:
            publisher.publish(sent)
            executor.spin_once(timeout_sec=0.1)
        assert received, f'no Image arrived on {topic} within {EXCHANGE_TIMEOUT_S} s'
    finally:
        executor.shutdown()
        sub_node.destroy_node()
        pub_node.destroy_node()

    message = received[0]
    assert message is not sent
    assert message.header.frame_id == f'frame_{suffix}'
    assert (message.encoding, message.height, message.width) == (
        encoding, pixels.shape[0], pixels.shape[1])
    result = image_msg_to_numpy(message)
    assert result.dtype == pixels.dtype
    np.testing.assert_array_equal(result, pixels)
