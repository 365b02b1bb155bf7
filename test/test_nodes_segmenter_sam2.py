"""Segmenter node end to end in sam2 mode: outputs, prompts, services, bad input, lifecycle."""

import math
import shutil
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import Point32, PointStamped, PolygonStamped, PoseArray
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import String, UInt32
from std_srvs.srv import SetBool, Trigger
import torch
from visualization_msgs.msg import Marker, MarkerArray

from node_harness import H, make_depth, save_present_sam2, TIMEOUT_S, W
from sam_gap_ros import instances_json
from sam_gap_ros.image_conversion import (image_msg_to_numpy, image_msg_to_rgb,
                                          numpy_to_image_msg)
from sam_gap_ros.nodes import segmenter as segmenter_module


# The random decoder's tracked masks wander off their boxes, which the tracker's motion
# gate reports as absent; these tests are about the node's plumbing and need the masks
# (the gate itself: test_sam2_tracker, test_quality_tiny_models).
NO_MOTION_GATE = {'motion_gate_margin': -1.0}


@pytest.fixture(scope='module')
def sam2_dir(tmp_path_factory):
    return str(save_present_sam2(tmp_path_factory.mktemp('sam2') / 'tiny-sam2'))


def _box(ros, x0, y0, x1, y1):
    msg = PolygonStamped()
    msg.polygon.points = [Point32(x=float(x0), y=float(y0)), Point32(x=float(x1), y=float(y1))]
    ros.publisher(PolygonStamped, f'{ros.ns}/segmenter/prompt_box').publish(msg)


def _stamp_ns(msg):
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _document_for(messages, stamp_ns):
    """Return the ~/instances document stamped ``stamp_ns`` among ``messages``, or None."""
    for message in messages:
        document = instances_json.loads(message.data)
        if instances_json.document_stamp_ns(document) == stamp_ns:
            return document
    return None


def test_prompted_object_is_tracked_with_stamped_outputs_and_3d_pose(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=1.0, **NO_MOTION_GATE)
    assert node.pipeline is not None and node._active
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    poses = ros.subscribe(PoseArray, f'{ros.ns}/segmenter/fruit_poses')
    overlay = ros.subscribe(Image, f'{ros.ns}/segmenter/overlay')
    base = 1_000_000_000
    ros.publish_frame(0, base, depth=make_depth())
    assert ros.spin_until(lambda: len(docs) >= 1), 'no output for the first frame'
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: node.pipeline.object_ids == [1])
    sent = []
    for i in range(1, 4):
        # One frame at a time: this test is about content, not about dropping.
        sent.append(ros.publish_frame(i, base + i * 50_000_000, depth=make_depth()))
        assert ros.spin_until(lambda n=i + 1: node.stats()['frames_processed'] >= n)
    assert ros.spin_until(lambda: len(docs) >= 4 and len(masks) >= 4 and len(poses) >= 4
                          and len(overlay) >= 1)
    sent_stamps = {_stamp_ns(m) for m in sent}
    last_mask = masks[-1]
    assert _stamp_ns(last_mask) in sent_stamps and last_mask.header.frame_id == 'cam'
    assert (last_mask.height, last_mask.width, last_mask.encoding) == (H, W, 'mono16')
    labels = image_msg_to_numpy(last_mask)
    doc = instances_json.loads(docs[-1].data)
    assert instances_json.document_stamp_ns(doc) == _stamp_ns(last_mask)
    assert doc['mode'] == 'sam2' and doc['image'] == {'width': W, 'height': H}
    # The model's time on this frame: > 0 and part of what the node measured end to end.
    assert 0 < doc['inference_ms'] <= node.latency.percentile_ms(100)
    assert [inst['id'] for inst in doc['instances']] == [1]
    inst = doc['instances'][0]
    assert inst['area'] == int((labels == 1).sum()) > 0
    assert set(np.unique(labels)) <= {0, 1}
    # 1.5 m everywhere except an invalid strip: the median must ignore the zeros.
    assert inst['position'][2] == pytest.approx(1.5)
    x, y, z = inst['position']
    # JSON keeps 4 decimals (0.1 mm), so the reprojection matches to ~0.01 px.
    reprojected = (x * 100.0 / z + 64.0, y * 100.0 / z + 48.0)
    assert reprojected == pytest.approx(inst['centroid'], abs=0.01)
    last_poses = poses[-1]
    assert _stamp_ns(last_poses) == _stamp_ns(last_mask)
    assert len(last_poses.poses) == 1 and last_poses.poses[0].position.z == pytest.approx(1.5)
    assert overlay[-1].encoding == 'rgb8' and (overlay[-1].height, overlay[-1].width) == (H, W)
    stats = node.stats()
    assert stats['frames_processed'] >= 4 and stats['bad_input'] == 0
    assert stats['latency_ms_p50'] is not None
    # A frame stamped by a clock the node shares: latency_ms is stamp in -> masks out, so
    # it holds the model time and ends before the document reached us.
    stamp_ns = node.get_clock().now().nanoseconds
    ros.publish_frame(4, stamp_ns, depth=make_depth())
    # ~/masks and ~/instances are separate topics: wait for this frame's own document.
    assert ros.spin_until(lambda: _document_for(docs, stamp_ns) is not None)
    seen_ms = (node.get_clock().now().nanoseconds - stamp_ns) / 1e6
    doc = _document_for(docs, stamp_ns)
    assert doc['inference_ms'] < doc['latency_ms'] < seen_ms


def test_overlay_shows_the_input_in_rgb_whatever_its_encoding(ros, sam2_dir):
    # No prompt, so no instance: every overlay pixel is the input frame's, in RGB.
    ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', input_qos='reliable')
    overlay = ros.subscribe(Image, f'{ros.ns}/segmenter/overlay')
    rng = np.random.default_rng(3)
    channels = {'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'bayer_grbg8': 1, 'yuyv': 2,
                'uyvy': 2}
    for second, (encoding, count) in enumerate(channels.items(), start=1):
        frame = rng.integers(0, 256, (H, W, count)[:2 if count == 1 else 3], dtype=np.uint8)
        sent = ros.publish_frame(0, second * 10**9, encoding=encoding, frame=frame)
        assert ros.spin_until(lambda s=second: any(o.header.stamp.sec == s for o in overlay))
        shown = next(o for o in overlay if o.header.stamp.sec == second)
        assert shown.encoding == 'rgb8', encoding
        np.testing.assert_array_equal(image_msg_to_numpy(shown), image_msg_to_rgb(sent),
                                      err_msg=encoding)


def test_markers_are_deleted_when_reset_deactivate_or_cleanup_ends_their_instances(
        ros, sam2_dir):
    # RViz keeps a marker until it is deleted: after these no frame replaces the last one's.
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=1.0, **NO_MOTION_GATE)
    markers = ros.subscribe(MarkerArray, f'{ros.ns}/segmenter/markers')
    reset = ros.probe.create_client(Trigger, f'{ros.ns}/segmenter/reset')

    def show_fruit(index):
        if not node.pipeline.object_ids:  # a deactivate keeps the tracked objects
            _box(ros, 20, 30, 50, 60)
            assert ros.spin_until(lambda: len(node.pipeline.object_ids) == 1)
        count = len(markers)
        ros.publish_frame(index, (index + 1) * 10**9, depth=make_depth())
        assert ros.spin_until(lambda: len(markers) > count)
        shown = markers[-1].markers
        assert shown[0].action == Marker.DELETEALL
        assert [(m.ns, m.action) for m in shown[1:]] == [('fruit', Marker.ADD),
                                                         ('labels', Marker.ADD)]

    def deleted_all(step):
        count = len(markers)
        step()
        assert ros.spin_until(lambda: len(markers) > count), 'markers left in RViz'
        assert [m.action for m in markers[-1].markers] == [Marker.DELETEALL]

    ros.publish_frame(0, 10**9, depth=make_depth())
    assert ros.spin_until(lambda: node.stats()['frames_processed'] >= 1)
    show_fruit(1)
    deleted_all(lambda: ros.call(reset, Trigger.Request()))
    show_fruit(2)
    deleted_all(node.trigger_deactivate)
    node.trigger_activate()
    show_fruit(3)
    deleted_all(node.trigger_shutdown)  # active -> finalized, no deactivate on the way


def test_enable_false_deletes_markers_and_publishes_no_frame_after_it(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=1.0, **NO_MOTION_GATE)
    markers = ros.subscribe(MarkerArray, f'{ros.ns}/segmenter/markers')
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    enable = ros.probe.create_client(SetBool, f'{ros.ns}/segmenter/enable')
    ros.publish_frame(0, 10**9, depth=make_depth())
    assert ros.spin_until(lambda: node.stats()['frames_processed'] == 1)
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: len(node.pipeline.object_ids) == 1)
    ros.publish_frame(1, 2 * 10**9, depth=make_depth())
    assert ros.spin_until(lambda: len(markers) == 2 and len(markers[-1].markers) == 3)
    assert ros.call(enable, SetBool.Request(data=False)).success
    assert ros.spin_until(lambda: len(markers) == 3), 'markers left in RViz'
    assert [m.action for m in markers[-1].markers] == [Marker.DELETEALL]

    # ~/enable false landing while a frame is in inference: that frame is not published.
    assert ros.call(enable, SetBool.Request(data=True)).success
    process = node.pipeline.process

    def disabled_during_inference(*args, **kwargs):
        result = process(*args, **kwargs)
        node._on_enable(SetBool.Request(data=False), SetBool.Response())
        return result

    node.pipeline.process = disabled_during_inference
    published = len(masks)
    ros.publish_frame(2, 3 * 10**9, depth=make_depth())
    assert ros.spin_until(lambda: node.stats()['disabled_skips'] == 1)
    ros.spin_until(lambda: False, timeout=0.3)
    assert len(masks) == published and len(markers) == 4  # only the DELETEALL
    stats = node.stats()
    assert stats['frames_in'] == 3 and stats['frames_processed'] == 2


def test_frames_dropped_at_deactivate_stay_counted_after_cleanup(ros, sam2_dir):
    # /diagnostics goes on showing the counters until the next activate restarts them.
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=2.0)
    ros.publish_frame(0, 10**9)  # waits for depth that never comes
    assert ros.spin_until(lambda: node.stats()['frames_in'] == 1)
    node.trigger_deactivate()
    assert node.stats()['frames_dropped'] == 1
    node.trigger_cleanup()
    assert node.stats()['frames_in'] == node.stats()['frames_dropped'] == 1


def test_prompts_remove_reset_enable_and_refused_concepts(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)
    _box(ros, 20, 30, 50, 60)
    point = PointStamped()
    point.point.x, point.point.y, point.point.z = 90.0, 40.0, 1.0
    ros.publisher(PointStamped, f'{ros.ns}/segmenter/prompt_point').publish(point)
    assert ros.spin_until(lambda: node.pipeline.object_ids == [1, 2])
    ros.publisher(UInt32, f'{ros.ns}/segmenter/remove_object').publish(UInt32(data=1))
    assert ros.spin_until(lambda: node.pipeline.object_ids == [2])
    ros.publish_frame(1, 2 * 10**9)
    assert ros.spin_until(lambda: len(docs) >= 2)
    assert [i['id'] for i in instances_json.loads(docs[-1].data)['instances']] == [2]

    # A background point on object 2's mask corrects object 2 (a new conditioning frame);
    # it adds no object.
    assert ros.spin_until(lambda: len(masks) >= 2)
    labels = image_msg_to_numpy(masks[-1])
    (on_y, on_x), (off_y, off_x) = np.argwhere(labels == 2)[0], np.argwhere(labels == 0)[0]
    session = node.pipeline._tracker.session
    conditioning = session.output_dict_per_obj[session.obj_id_to_idx(2)]['cond_frame_outputs']
    before = len(conditioning)
    point.point.x, point.point.y, point.point.z = float(on_x), float(on_y), 0.0
    ros.publisher(PointStamped, f'{ros.ns}/segmenter/prompt_point').publish(point)
    assert ros.spin_until(lambda: len(conditioning) == before + 1)
    assert node.pipeline.object_ids == [2] and node.stats()['bad_prompts'] == 0

    # Unknown ID, a point outside the image, a bad label and a background point on no
    # object: refused, counted, node alive.
    ros.publisher(UInt32, f'{ros.ns}/segmenter/remove_object').publish(UInt32(data=77))
    _box(ros, 100, 10, 400, 50)
    point.point.z = 0.5
    ros.publisher(PointStamped, f'{ros.ns}/segmenter/prompt_point').publish(point)
    point.point.x, point.point.y, point.point.z = float(off_x), float(off_y), 0.0
    ros.publisher(PointStamped, f'{ros.ns}/segmenter/prompt_point').publish(point)
    assert ros.spin_until(lambda: node.stats()['bad_prompts'] == 4)
    assert node.pipeline.object_ids == [2]

    enable = ros.probe.create_client(SetBool, f'{ros.ns}/segmenter/enable')
    assert ros.call(enable, SetBool.Request(data=False)).success
    ros.publish_frame(2, 3 * 10**9)
    assert ros.spin_until(lambda: node.stats()['disabled_skips'] >= 1)
    assert len(docs) == 2
    assert ros.call(enable, SetBool.Request(data=True)).success
    ros.publish_frame(3, 4 * 10**9)
    assert ros.spin_until(lambda: len(docs) >= 3)

    reset = ros.probe.create_client(Trigger, f'{ros.ns}/segmenter/reset')
    assert ros.call(reset, Trigger.Request()).success
    assert node.pipeline.object_ids == []

    # Concepts mean nothing in sam2 mode: the parameter service refuses with a reason.
    set_params = ros.probe.create_client(SetParameters, f'{ros.ns}/segmenter/set_parameters')
    request = SetParameters.Request(
        parameters=[Parameter('concepts', value=['apple']).to_parameter_msg()])
    result = ros.call(set_params, request).results[0]
    assert not result.successful and 'sam2' in result.reason
    # Read-only parameters cannot change at runtime either.
    request = SetParameters.Request(
        parameters=[Parameter('mode', value='sam3').to_parameter_msg()])
    assert not ros.call(set_params, request).results[0].successful
    assert node.get_parameter('mode').value == 'sam2'


def _bad_image(kind):
    msg = Image(height=H, width=W, encoding='rgb8', step=W * 3)
    msg.data = bytes(H * W * 3)
    if kind == 'size':
        msg.data = bytes(H * W * 3 - 5)
    elif kind == 'encoding':
        msg.encoding = 'yuv422_weird'
    elif kind == 'empty':
        msg.height = msg.width = msg.step = 0
        msg.data = b''
    elif kind == 'huge':
        msg.width, msg.step = 9000, 9000 * 3
        msg.data = bytes(1)
    elif kind == 'odd_yuyv':  # a supported encoding, but YUV 4:2:2 pixels come in pairs
        msg.encoding, msg.width, msg.step = 'yuyv', W - 1, (W - 1) * 2
        msg.data = bytes(H * msg.step)
    return msg


def test_bad_input_is_counted_and_the_node_keeps_running(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=0.5, **NO_MOTION_GATE)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    pub = ros.publisher(Image, f'{ros.ns}/image')
    # A burst while processing is paused: each malformed frame is refused and counted as it
    # arrives, so none waits in the latest-frame slot to be dropped or skipped uncounted.
    enable = ros.probe.create_client(SetBool, f'{ros.ns}/segmenter/enable')
    assert ros.call(enable, SetBool.Request(data=False)).success
    kinds = ('size', 'encoding', 'empty', 'huge', 'odd_yuyv')
    for kind in kinds:
        pub.publish(_bad_image(kind))
    assert ros.spin_until(lambda: node.stats()['frames_in'] == len(kinds)), node.stats()
    stats = node.stats()
    assert stats['bad_input'] == len(kinds), stats
    assert stats['frames_dropped'] == stats['disabled_skips'] == 0, stats
    assert ros.call(enable, SetBool.Request(data=True)).success
    # NaN depth everywhere: frame processed, no 3D position, nothing crashes.
    nan_depth = np.full((H, W), np.nan, dtype=np.float32)
    ros.publish_frame(0, 10**9, depth=nan_depth)
    assert ros.spin_until(lambda: len(docs) >= 1)
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: node.pipeline.object_ids == [1])
    ros.publish_frame(1, 2 * 10**9, depth=nan_depth)
    assert ros.spin_until(lambda: len(docs) >= 2)
    doc = instances_json.loads(docs[-1].data)
    assert doc['instances'] and all(i['position'] is None for i in doc['instances'])
    # A depth image of the wrong encoding is ignored and counted; the frame still goes out.
    colour = ros.publish_frame(2, 3 * 10**9)
    wrong = numpy_to_image_msg(np.zeros((H, W, 3), np.uint8), 'rgb8', colour.header)
    ros.publisher(Image, f'{ros.ns}/depth').publish(wrong)
    assert ros.spin_until(lambda: len(docs) >= 3 and node.stats()['bad_depth'] >= 1)
    # Depth of another aspect ratio is another camera's view (not aligned to colour):
    # refused and counted, never rescaled into wrong 3D poses ...
    ros.publish_frame(3, 4 * 10**9, depth=np.full((H, W + 40), 800, np.uint16))
    assert ros.spin_until(lambda: len(docs) >= 4 and node.stats()['bad_depth'] >= 2)
    assert all(i['position'] is None for i in instances_json.loads(docs[-1].data)['instances'])
    # ... while aligned depth at half the resolution is the same view: poses come out.
    ros.publish_frame(4, 5 * 10**9, depth=np.full((H // 2, W // 2), 800, np.uint16))
    assert ros.spin_until(lambda: len(docs) >= 5)
    positions = [i['position'] for i in instances_json.loads(docs[-1].data)['instances']]
    assert positions and all(p is not None and p[2] == pytest.approx(0.8) for p in positions)
    assert node.stats()['bad_depth'] == 2 and node.stats()['errors'] == 0
    diag = node.diagnostics().status[0]
    values = {kv.key: kv.value for kv in diag.values}
    assert values['bad_input'] == str(len(kinds)) and values['mode'] == 'sam2'
    assert diag.level == DiagnosticStatus.OK


def test_max_image_side_changes_at_runtime_for_colour_and_depth(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=0.5, **NO_MOTION_GATE)
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    client = ros.probe.create_client(SetParameters, f'{ros.ns}/segmenter/set_parameters')

    def set_max_side(value):
        request = SetParameters.Request(
            parameters=[Parameter('max_image_side', value=value).to_parameter_msg()])
        return ros.call(client, request).results[0]

    # Below the colour width (W = 128): the next frame is refused as it arrives.
    assert set_max_side(W - 1).successful
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: node.stats()['bad_input'] == 1), node.stats()
    # Between the colour and the depth width: the frame goes out, its depth is refused.
    assert set_max_side(W).successful
    ros.publish_frame(1, 2 * 10**9, depth=np.full((H, 2 * W), 800, np.uint16))
    assert ros.spin_until(lambda: len(masks) == 1 and node.stats()['bad_depth'] == 1), \
        node.stats()
    assert not set_max_side(8).successful  # below its range
    assert node.get_parameter('max_image_side').value == W
    stats = node.stats()
    assert stats['bad_input'] == 1 and stats['errors'] == 0, stats


def test_lifecycle_via_change_state_service(ros, sam2_dir, tmp_path):
    broken = ros.make_segmenter('broken', mode='sam2', model_dir=str(tmp_path / 'missing'),
                                device='cpu')
    assert broken.pipeline is None
    assert broken._state_machine.current_state[1] == 'unconfigured'
    assert 'does not exist' in broken.last_error
    assert broken.diagnostics().status[0].level == DiagnosticStatus.ERROR
    # A later failure (after a success and a cleanup) reports its own error, not the first
    # one; a success clears it.
    shutil.copytree(sam2_dir, tmp_path / 'missing')
    assert broken.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert broken.last_error == ''
    assert broken.diagnostics().status[0].level == DiagnosticStatus.OK
    assert broken.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    weights = next((tmp_path / 'missing').glob('*.safetensors'))
    weights.rename(tmp_path / 'weights')
    assert broken.trigger_configure() == TransitionCallbackReturn.FAILURE
    status = broken.diagnostics().status[0]
    assert status.level == DiagnosticStatus.ERROR and 'safetensors' in status.message
    assert 'does not exist' not in status.message
    (tmp_path / 'weights').rename(weights)
    assert broken.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert broken.last_error == ''
    assert broken.diagnostics().status[0].level == DiagnosticStatus.OK

    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', autostart=False,
                              stale_image_s=0.1)
    change = ros.probe.create_client(ChangeState, f'{ros.ns}/segmenter/change_state')
    get = ros.probe.create_client(GetState, f'{ros.ns}/segmenter/get_state')
    assert ros.call(get, GetState.Request()).current_state.id == State.PRIMARY_STATE_UNCONFIGURED

    def transition(tid):
        return ros.call(change, ChangeState.Request(transition=Transition(id=tid))).success

    assert transition(Transition.TRANSITION_CONFIGURE)
    assert node.pipeline is not None and node.pipeline.loaded and not node._active
    assert ros.call(get, GetState.Request()).current_state.id == State.PRIMARY_STATE_INACTIVE
    assert transition(Transition.TRANSITION_ACTIVATE)
    worker = node._worker
    assert node._active and worker.is_alive()
    # No image since activation -> WARN after stale_image_s.
    assert ros.spin_until(lambda: node.diagnostics().status[0].level == DiagnosticStatus.WARN)
    assert 'no image' in node.diagnostics().status[0].message
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    # Deactivate parks the worker thread (a new thread per activation grows the heap);
    # activate hands it frames again.
    assert transition(Transition.TRANSITION_DEACTIVATE)
    assert not node._active and node.pipeline.loaded
    assert node._worker is worker and worker.is_alive()
    ros.publish_frame(0, 10**9)
    ros.spin_until(lambda: node.stats()['frames_in'] > 0, timeout=1.0)
    assert node.stats()['frames_in'] == 0 and not docs  # inactive: frames are not taken in
    assert transition(Transition.TRANSITION_ACTIVATE)
    ros.publish_frame(1, 2 * 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)
    assert node._worker is worker
    assert transition(Transition.TRANSITION_DEACTIVATE)
    # Cleanup unloads the model and ends the worker thread.
    assert transition(Transition.TRANSITION_CLEANUP)
    assert node.pipeline is None and node._worker is None and not worker.is_alive()
    # Cleanup destroyed the inputs: a configure/activate cycle brings them back.
    assert transition(Transition.TRANSITION_CONFIGURE)
    assert transition(Transition.TRANSITION_ACTIVATE)
    ros.publish_frame(2, 3 * 10**9)
    assert ros.spin_until(lambda: len(docs) >= 2)
    assert not math.isnan(node.stats()['input_rate_hz'])


def test_images_without_depth_warn_in_diagnostics(ros, sam2_dir):
    """use_depth on and images arriving, but no depth (not remapped): WARN naming the topic."""
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=0.05, stale_image_s=0.5)
    frames = iter(range(1000))

    def feed(seconds, depth=None):
        # A camera at ~10 Hz, so that images never go stale.
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            index = next(frames)
            ros.publish_frame(index, (index + 1) * 10**8, depth=depth)
            ros.spin_until(lambda: False, timeout=0.1)

    feed(1.0)
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.WARN
    assert 'no depth' in status.message and f'{ros.ns}/depth' in status.message
    assert node.stats()['frames_processed'] > 0  # processed all the same, without poses
    feed(0.3, depth=make_depth())
    status = node.diagnostics().status[0]
    assert (status.level, status.message) == (DiagnosticStatus.OK, 'processing')


def test_sim_time_standing_still_keeps_diagnostics_and_the_depth_wait(ros, sam2_dir):
    """use_sim_time before the first /clock (or a paused bag): the node clock reads 0.

    /diagnostics and the depth wait run on steady time all the same. On the node's clock
    they stood still with it: the node was missing from /diagnostics, and a frame waiting
    for its depth waited until the bag played on. latency_ms against a clock at 0 is left
    out.
    """
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu', use_depth=True,
                              input_qos='reliable', depth_wait_s=0.1,
                              diagnostics_period_s=0.1, use_sim_time=True)
    assert node.get_clock().now().nanoseconds == 0  # nobody publishes /clock here
    diagnostics = ros.subscribe(DiagnosticArray, '/diagnostics')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')

    def mine():
        return [d for d in diagnostics if d.status[0].name.startswith(f'{ros.ns}/segmenter')]

    assert ros.spin_until(lambda: len(mine()) >= 2), 'no /diagnostics on a sim clock at 0'
    ros.publish_frame(0, 10**9)  # no depth: released unpaired after depth_wait_s
    assert ros.spin_until(lambda: len(docs) >= 1), 'frame held while the sim clock stood'
    assert node.stats()['unpaired_depth'] == 1
    assert 'latency_ms' not in instances_json.loads(docs[0].data)


def test_engine_path_not_in_use_warns_in_diagnostics(ros, sam2_dir, tmp_path):
    """An engine that cannot be used leaves the node running on PyTorch, visibly."""
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              engine_path=str(tmp_path / 'missing.engine'))
    assert node._state_machine.current_state[1] == 'active'
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.WARN
    assert status.message.startswith('engine_path not in use: pytorch')
    assert 'missing.engine' in status.message


def test_latest_frame_only_drops_a_burst_and_latency_stays_bounded(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: node.pipeline.object_ids == [1])
    burst = 40
    stamps = [10**9 + i * 1_000_000 for i in range(1, burst + 1)]
    for i, stamp in enumerate(stamps):
        # Faster than inference: the executor hands each frame to the slot at once.
        ros.publish_frame(i, stamp)
        ros.executor.spin_once(timeout_sec=0.0)

    def newest_done():
        doc = instances_json.loads(docs[-1].data)
        return instances_json.document_stamp_ns(doc) == stamps[-1]

    # The newest frame is always processed, never an old one left behind.
    assert ros.spin_until(newest_done), node.stats()
    stats = node.stats()
    # Every frame that reached the node was either processed or counted as dropped (the
    # KEEP_LAST reader queue may also discard some before the node sees them).
    assert stats['frames_processed'] + stats['frames_dropped'] == stats['frames_in'], stats
    assert stats['frames_dropped'] > 0, stats
    assert stats['frames_processed'] < stats['frames_in']
    # Latency (receive -> publish) stays near one inference: nothing queues up.
    assert stats['latency_ms_p95'] < 20 * max(stats['inference_ms_p50'], 10.0), stats


def test_compressed_transport_and_out_of_memory_skip(ros, sam2_dir, monkeypatch):
    from sensor_msgs.msg import CompressedImage

    from node_harness import make_frame
    from sam_gap_ros.image_conversion import numpy_to_compressed_msg
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable', image_transport='compressed')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    pub = ros.publisher(CompressedImage, f'{ros.ns}/image/compressed')

    def send(index):
        msg = numpy_to_compressed_msg(make_frame(index), 'png')
        msg.header.stamp.sec = index + 1
        pub.publish(msg)

    send(0)
    assert ros.spin_until(lambda: len(docs) >= 1)
    assert instances_json.loads(docs[-1].data)['image'] == {'width': W, 'height': H}

    # Fault injection (the model itself stays real): the next inference runs out of memory.
    real_process = node.pipeline.process
    calls = []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')
        return real_process(*args, **kwargs)

    monkeypatch.setattr(node.pipeline, 'process', out_of_memory_once)
    send(1)
    assert ros.spin_until(lambda: node.stats()['oom_skips'] == 1)
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.WARN and 'skipped' in status.message
    send(2)
    assert ros.spin_until(lambda: len(docs) >= 2)  # still alive, next frame processed
    assert instances_json.loads(docs[-1].data)['header']['stamp']['sec'] == 3
    assert node.stats()['errors'] == 0
    # The WARN is about recent skips (the counter keeps the history): it clears once the
    # skip is RECENT_S old.
    monkeypatch.setattr(segmenter_module, 'RECENT_S', 0.3)
    assert ros.spin_until(
        lambda: node.diagnostics().status[0].level == DiagnosticStatus.OK, timeout=1.5)
    assert node.stats()['oom_skips'] == 1


def test_diagnostics_warn_while_every_image_is_refused(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    pub = ros.publisher(Image, f'{ros.ns}/image')
    for _ in range(3):  # e.g. the depth topic remapped to image by mistake
        pub.publish(numpy_to_image_msg(np.full((H, W), 900, np.uint16), '16UC1'))
    assert ros.spin_until(lambda: node.stats()['bad_input'] == 3)
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.WARN and 'refused (bad_input)' in status.message
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)
    assert node.diagnostics().status[0].level == DiagnosticStatus.OK


def test_prompt_failing_in_the_model_is_counted_and_the_node_keeps_running(ros, sam2_dir,
                                                                           monkeypatch):
    """A valid prompt runs the decoder in the callback; its failure must not end the spin."""
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)

    # Fault injection (the model itself stays real): the prompt's decoder pass runs out of
    # memory. Before, the exception left the subscription callback and stopped the executor.
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')

    monkeypatch.setattr(node.pipeline._tracker, '_run_prompted', out_of_memory)
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: node.stats()['bad_prompts'] == 1)
    ros.publish_frame(1, 2 * 10**9)
    assert ros.spin_until(lambda: len(docs) >= 2)  # still spinning, next frame processed
    assert node.stats()['errors'] == 0


def test_reset_during_a_frame_publishes_nothing_of_the_old_session(ros, sam2_dir):
    """Once ~/reset returned, no output carries the IDs of the tracking session it ended."""
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu',
                              input_qos='reliable', **NO_MOTION_GATE)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)
    _box(ros, 20, 30, 50, 60)
    assert ros.spin_until(lambda: node.pipeline.object_ids == [1])
    # The real model segments the frame; the worker is then held before it publishes, and
    # the reset lands there (the order a reset sent during inference can take).
    real_process = node.pipeline.process
    inferred, release = threading.Event(), threading.Event()

    def held_after_inference(*args, **kwargs):
        result = real_process(*args, **kwargs)
        inferred.set()
        release.wait(TIMEOUT_S)
        return result

    node.pipeline.process = held_after_inference
    ros.publish_frame(1, 2 * 10**9)
    assert ros.spin_until(inferred.is_set)
    reset = ros.probe.create_client(Trigger, f'{ros.ns}/segmenter/reset')
    assert ros.call(reset, Trigger.Request()).success
    before = len(docs)
    release.set()
    assert ros.spin_until(lambda: node.stats()['frames_dropped'] == 1)
    ros.spin_until(lambda: len(docs) > before, timeout=0.5)
    assert len(docs) == before, 'the old session was published after ~/reset returned'
    assert not node._recent  # prompts after the reset are not checked against that frame
    stats = node.stats()
    assert stats['frames_in'] == stats['frames_processed'] + stats['frames_dropped'], stats
    node.pipeline.process = real_process
    ros.publish_frame(2, 3 * 10**9)
    assert ros.spin_until(lambda: len(docs) > before)
    assert instances_json.loads(docs[-1].data)['instances'] == []


def test_destroy_node_ends_the_worker_and_unloads_the_model(ros, sam2_dir):
    node = ros.make_segmenter(mode='sam2', model_dir=sam2_dir, device='cpu')
    worker, pipeline = node._worker, node.pipeline
    assert worker.is_alive() and pipeline.loaded
    ros.executor.remove_node(node)
    ros.nodes.remove(node)
    node.destroy_node()
    # Before, the worker thread polled on (holding the node and its model) until rclpy
    # shut down.
    worker.join(5.0)
    assert not worker.is_alive() and not pipeline.loaded


def test_ctrl_c_while_the_model_loads_exits_with_status_0(ros, sam2_dir, monkeypatch):
    """SIGINT during autostart's model load (seconds on a robot): no traceback, status 0."""
    from sam_gap_ros.nodes.ros_utils import create_node_or_exit

    def interrupted_load(self):
        raise KeyboardInterrupt  # what Python raises where the load was when SIGINT came

    monkeypatch.setattr(segmenter_module.SegmentationPipeline, 'load', interrupted_load)
    try:
        create_node_or_exit(lambda: ros.make_segmenter(mode='sam2', model_dir=sam2_dir,
                                                       device='cpu'), 'segmenter')
    except SystemExit as exc:
        status = exc.code
    except KeyboardInterrupt:  # caught here, or it would stop the whole test session
        status = 'KeyboardInterrupt escaped (a traceback, status -2)'
    else:
        status = 'no exit'
    assert status == 0
