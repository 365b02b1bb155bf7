"""Segmenter node in sam3 mode: concepts through the parameter service, outputs, markers."""

import math

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseArray
import numpy as np
import pytest
from rcl_interfaces.srv import SetParameters, SetParametersAtomically
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String
import torch  # imported first, so conftest runs every test on 1 thread
from visualization_msgs.msg import Marker, MarkerArray

from node_harness import H, K, make_depth, make_frame, W
from sam_gap_ros import instances_json
from sam_gap_ros.image_conversion import image_msg_to_numpy, numpy_to_compressed_msg


@pytest.fixture(scope='module')
def sam3_dir(tmp_path_factory):
    from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
    return str(save_tiny_sam3(tmp_path_factory.mktemp('sam3') / 'tiny-sam3', seed=0))


def _depth_segmenter(ros, sam3_dir):
    # Threshold 0: a random tiny SAM3 scores ~0.25, so every query returns instances.
    return ros.make_segmenter(mode='sam3', model_dir=sam3_dir, device='cpu', use_depth=True,
                              input_qos='reliable', score_threshold=0.0, max_instances=4,
                              depth_wait_s=1.0, concepts=['apple'])


def _set_concepts(ros, client, concepts):
    request = SetParameters.Request(
        parameters=[Parameter('concepts', value=concepts).to_parameter_msg()])
    return ros.call(client, request).results[0]


def test_concepts_accepted_and_refused_via_parameter_service(ros, sam3_dir):
    node = _depth_segmenter(ros, sam3_dir)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    markers = ros.subscribe(MarkerArray, f'{ros.ns}/segmenter/markers')
    diagnostics = ros.subscribe(DiagnosticArray, '/diagnostics')
    client = ros.probe.create_client(SetParameters, f'{ros.ns}/segmenter/set_parameters')

    ros.publish_frame(0, 10**9, depth=make_depth(2000))
    assert ros.spin_until(lambda: len(docs) >= 1 and len(masks) >= 1 and len(markers) >= 1)
    doc = instances_json.loads(docs[-1].data)
    assert doc['concepts'] == ['apple'] and doc['mode'] == 'sam3'
    assert 1 <= len(doc['instances']) <= 4
    assert {i['label'] for i in doc['instances']} == {'apple'}
    labels = image_msg_to_numpy(masks[-1])
    for inst in doc['instances']:
        # Each instance owns exactly its painted pixels of the label image (or fewer where a
        # higher-scoring overlapping instance won).
        assert 0 < (labels == inst['id']).sum() <= inst['area']
        assert inst['position'] is not None and inst['position'][2] == pytest.approx(2.0)
    spheres = [m for m in markers[-1].markers if m.type == Marker.SPHERE]
    assert markers[-1].markers[0].action == Marker.DELETEALL
    assert sorted(m.id for m in spheres) == sorted(i['id'] for i in doc['instances'])
    # Sphere = the mask's equivalent circle at the fruit's depth, with fx at the image's
    # resolution, also when camera_info comes at another one of the same view.
    areas = {i['id']: i['area'] for i in doc['instances']}
    expected = {m.id: 2 * math.sqrt(areas[m.id] / math.pi) * 2.0 / K[0] for m in spheres}
    for sphere in spheres:
        assert sphere.scale.x == pytest.approx(max(0.01, expected[sphere.id]), rel=1e-3)
    double = CameraInfo(width=2 * W, height=2 * H)
    double.k = [2 * K[0], 0.0, 2 * K[2] + 0.5, 0.0, 2 * K[4], 2 * K[5] + 0.5, 0.0, 0.0, 1.0]
    node._camera_info = double
    assert node._focal_length_px((H, W)) == pytest.approx(K[0])

    compositional = ['apple but not green apple', 'damaged apple near trunk']
    result = _set_concepts(ros, client, compositional)
    assert result.successful, result.reason
    assert node.pipeline.concepts == compositional
    ros.publish_frame(1, 2 * 10**9, depth=make_depth(2000))
    assert ros.spin_until(lambda: len(docs) >= 2)
    doc = instances_json.loads(docs[-1].data)
    assert doc['concepts'] == compositional
    assert {i['label'] for i in doc['instances']} <= set(compositional)

    too_many = [f"apple {'x' * n}" for n in range(1, 41)]  # 40 distinct, 16 allowed
    for bad in (['apple ('], [], ['apple or pear'], too_many):
        result = _set_concepts(ros, client, bad)
        assert not result.successful and result.reason, bad
        assert node.pipeline.concepts == compositional
    assert list(node.get_parameter('concepts').value) == compositional

    # Runtime threshold change through the same service reaches the engine.
    request = SetParameters.Request(parameters=[
        Parameter('score_threshold', value=0.99).to_parameter_msg()])
    assert ros.call(client, request).results[0].successful
    ros.publish_frame(2, 3 * 10**9, depth=make_depth(2000))
    assert ros.spin_until(lambda: len(docs) >= 3 and len(masks) >= 3)
    assert instances_json.loads(docs[-1].data)['instances'] == []
    assert not np.any(image_msg_to_numpy(masks[-1]))
    request = SetParameters.Request(parameters=[
        Parameter('score_threshold', value=1.5).to_parameter_msg()])
    assert not ros.call(client, request).results[0].successful  # outside the declared range
    request = SetParameters.Request(parameters=[
        Parameter('mask_threshold', value=0.3).to_parameter_msg()])
    assert ros.call(client, request).results[0].successful
    assert node.pipeline._engine.mask_threshold == 0.3
    request = SetParameters.Request(parameters=[
        Parameter('mask_threshold', value=1.0).to_parameter_msg()])
    assert not ros.call(client, request).results[0].successful
    assert node.pipeline._engine.mask_threshold == 0.3

    name = node.get_fully_qualified_name()
    assert ros.spin_until(lambda: any(s.name.startswith(name) for d in diagnostics
                                      for s in d.status))
    status = [s for d in diagnostics for s in d.status if s.name.startswith(name)][-1]
    values = {kv.key: kv.value for kv in status.values}
    for key in ('input_rate_hz', 'processed_rate_hz', 'frames_dropped', 'latency_ms_p50',
                'latency_ms_p95', 'device', 'rss_mib', 'mode', 'model', 'active_concepts'):
        assert key in values, key
    assert values['mode'] == 'sam3' and values['device'] == 'cpu'


def test_optional_outputs_follow_their_subscribers(ros, sam3_dir):
    """Instances, poses and markers are built while subscribed: a late subscriber gets them."""
    _depth_segmenter(ros, sam3_dir)
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    ros.publish_frame(0, 10**9, depth=make_depth(2000))
    assert ros.spin_until(lambda: len(masks) >= 1)

    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    poses = ros.subscribe(PoseArray, f'{ros.ns}/segmenter/fruit_poses')
    markers = ros.subscribe(MarkerArray, f'{ros.ns}/segmenter/markers')
    ros.publish_frame(1, 2 * 10**9, depth=make_depth(2000))
    assert ros.spin_until(lambda: docs and poses and markers)
    doc = instances_json.loads(docs[-1].data)
    assert (doc['header']['stamp']['sec'], poses[-1].header.stamp.sec,
            markers[-1].markers[0].header.stamp.sec) == (2, 2, 2)
    assert len(poses[-1].poses) == len(doc['instances']) >= 1


def test_concepts_set_while_unconfigured_are_validated_and_used(ros, sam3_dir):
    node = ros.make_segmenter(mode='sam3', model_dir=sam3_dir, device='cpu', autostart=False)
    assert node.pipeline is None
    bad = node.set_parameters([Parameter('concepts', value=['apple ('])])[0]
    assert not bad.successful
    # Within the grammar's 128 characters but 42 tokens: too long for the text encoder,
    # refused now rather than failing configure later.
    long = node.set_parameters([Parameter('concepts', value=['leaf near ' + 'z' * 40])])[0]
    assert not long.successful and 'tokens long' in long.reason, long.reason
    good = node.set_parameters([Parameter('concepts', value=['yellow apple'])])[0]
    assert good.successful
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.pipeline.concepts == ['yellow apple']


def test_hybrid_node_publishes_persistent_ids(ros, sam3_dir, tmp_path):
    from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
    sam2_dir = str(save_tiny_sam2(tmp_path / 'sam2', seed=0, image_size=64))
    node = ros.make_segmenter(mode='hybrid', model_dir=sam3_dir, tracker_model_dir=sam2_dir,
                              device='cpu', input_qos='reliable', score_threshold=0.0,
                              max_instances=3, redetect_every_n=2)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    for count in range(1, 4):
        ros.publish_frame(0, count * 10**9)  # a static scene
        assert ros.spin_until(lambda n=count: len(docs) >= n)
    ids = [[inst['id'] for inst in instances_json.loads(d.data)['instances']] for d in docs]
    assert ids[0] and ids[2] == ids[0]
    values = {kv.key: kv.value for kv in node.diagnostics().status[0].values}
    assert values['mode'] == 'hybrid' and values['active_concepts'] == 'apple'
    assert '+' in values['model']


def test_depth_pairing_after_stamps_go_back_and_zero_stamps(ros, sam3_dir):
    """A bag played in a loop: frames after the jump still get their depth (3D poses)."""
    node = _depth_segmenter(ros, sam3_dir)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    masks = ros.subscribe(Image, f'{ros.ns}/segmenter/masks')
    for count, stamp_s in enumerate((100, 101, 1), start=1):
        ros.publish_frame(count, stamp_s * 10**9, depth=make_depth(2000))
        assert ros.spin_until(lambda count=count: len(docs) >= count)
        doc = instances_json.loads(docs[-1].data)
        assert doc['header']['stamp']['sec'] == stamp_s
        # Paired with its own depth: before the jump was handled, the frame at 1 s was
        # released unpaired at once (the depth held from 100-101 s made it look late).
        assert doc['instances'] and all(i['position'] is not None for i in doc['instances'])
    stats = node.stats()
    assert stats['stamp_jumps_back'] == 1 and stats['unpaired_depth'] == 0

    # A driver that does not stamp: processed and published, and counted for diagnostics.
    ros.publish_frame(4, 0, depth=make_depth(2000))
    assert ros.spin_until(lambda: len(docs) >= 4 and len(masks) >= 4)
    assert masks[-1].header.stamp.sec == 0 and masks[-1].header.stamp.nanosec == 0
    # Its latency is left out: now - 0 would be the time since 1970.
    assert 'latency_ms' not in instances_json.loads(docs[-1].data)
    stats = node.stats()
    assert stats['zero_stamps'] == 1 and stats['frames_processed'] == 4
    assert stats['bad_input'] == 0 and stats['errors'] == 0


def test_depth_without_valid_pixels_in_the_masks_is_counted_and_warned(ros, sam3_dir):
    """All-zero depth (out of range, laser off) leaves every fruit without a 3D position."""
    node = _depth_segmenter(ros, sam3_dir)
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    for index in range(2):  # one at a time: a burst would drop all but the newest
        ros.publish_frame(index, (index + 1) * 10**9, depth=make_depth(2000))
        assert ros.spin_until(lambda index=index: len(docs) > index)
    with_position = node.stats()['instances_with_position']
    assert with_position >= 1 and node.stats()['instances_without_position'] == 0
    assert node.diagnostics().status[0].message == 'processing'
    ros.publish_frame(2, 3 * 10**9, depth=np.zeros((H, W), np.uint16))
    assert ros.spin_until(lambda: len(docs) >= 3)
    doc = instances_json.loads(docs[-1].data)
    assert doc['instances'] and all(i['position'] is None for i in doc['instances'])
    stats = node.stats()
    assert stats['instances_without_position'] == len(doc['instances'])
    assert stats['bad_depth'] == 0 and stats['errors'] == 0
    # Poses came lately too, so not yet WARN; only missing ones from now on would be.
    assert node.diagnostics().status[0].message == 'processing'
    node._last_counted.pop('instances_with_position')
    status = node.diagnostics().status[0]
    assert status.level == DiagnosticStatus.WARN and 'valid depth' in status.message
    values = {kv.key: kv.value for kv in status.values}
    assert values['instances_without_position'] == str(len(doc['instances']))


def test_compressed_depth_gives_3d_positions(ros, sam3_dir):
    """depth_transport compressedDepth: a recorded bag's depth/compressedDepth, read as is."""
    node = ros.make_segmenter(mode='sam3', model_dir=sam3_dir, device='cpu', use_depth=True,
                              input_qos='reliable', score_threshold=0.0, max_instances=4,
                              depth_wait_s=1.0, concepts=['apple'],
                              depth_transport='compressedDepth')
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    for index in range(2):
        ros.publish_frame(index, (index + 1) * 10**9, depth=make_depth(2000),
                          depth_transport='compressedDepth')
        assert ros.spin_until(lambda index=index: len(docs) > index)
    doc = instances_json.loads(docs[-1].data)
    assert doc['instances']
    for inst in doc['instances']:
        assert inst['position'] is not None and inst['position'][2] == pytest.approx(2.0)
    stats = node.stats()
    assert stats['unpaired_depth'] == 0 and stats['bad_depth'] == 0
    # Colour on the depth topic (a wrong remap) is refused as depth, the frame still goes out.
    header = ros.publish_frame(2, 3 * 10**9).header
    ros.publisher(CompressedImage, f'{ros.ns}/depth/compressedDepth').publish(
        numpy_to_compressed_msg(make_frame(2), 'png', header, encoding='rgb8'))
    assert ros.spin_until(lambda: len(docs) >= 3)
    assert instances_json.loads(docs[-1].data)['instances'][0]['position'] is None
    assert node.stats()['bad_depth'] == 1


def test_atomic_parameter_set_is_all_or_none(ros, sam3_dir):
    """A refused parameter in an atomic set leaves the earlier ones unapplied as well."""
    node = ros.make_segmenter(mode='sam3', model_dir=sam3_dir, device='cpu',
                              concepts=['apple'], score_threshold=0.2)
    client = ros.probe.create_client(SetParametersAtomically,
                                     f'{ros.ns}/segmenter/set_parameters_atomically')

    def atomically(**values):
        request = SetParametersAtomically.Request(parameters=[
            Parameter(name, value=value).to_parameter_msg() for name, value in values.items()])
        return ros.call(client, request).result

    # Applied in order: the thresholds pass, then the concept query is refused.
    result = atomically(score_threshold=0.6, mask_threshold=0.7, concepts=['apple ('])
    assert not result.successful and result.reason
    assert node.pipeline.config.score_threshold == pytest.approx(0.2)
    assert node.pipeline._engine.score_threshold == pytest.approx(0.2)
    assert node.pipeline._engine.mask_threshold == pytest.approx(0.5)
    assert node.get_parameter('score_threshold').value == pytest.approx(0.2)
    assert node.pipeline.concepts == ['apple']
    result = atomically(concepts=['ripe apple'], score_threshold=0.6)
    assert result.successful, result.reason
    assert node.pipeline.concepts == ['ripe apple']
    assert node.pipeline.config.score_threshold == pytest.approx(0.6)


def test_concepts_failing_in_the_text_encoder_are_refused_and_the_node_keeps_running(
        ros, sam3_dir, monkeypatch):
    """A new concept runs the text encoder in the parameter callback: a failure refuses it."""
    node = ros.make_segmenter(mode='sam3', model_dir=sam3_dir, device='cpu',
                              input_qos='reliable', score_threshold=0.0, concepts=['apple'])
    docs = ros.subscribe(String, f'{ros.ns}/segmenter/instances')
    client = ros.probe.create_client(SetParameters, f'{ros.ns}/segmenter/set_parameters')

    # Fault injection (the model itself stays real): the encoder runs out of memory. Before,
    # the exception left the parameter service callback and stopped the executor.
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')

    monkeypatch.setattr(node.pipeline._engine, '_encode', out_of_memory)
    result = _set_concepts(ros, client, ['pear'])
    assert not result.successful and 'out of memory' in result.reason
    assert node.pipeline.concepts == ['apple']
    assert list(node.get_parameter('concepts').value) == ['apple']
    ros.publish_frame(0, 10**9)
    assert ros.spin_until(lambda: len(docs) >= 1)  # still spinning
    assert instances_json.loads(docs[-1].data)['concepts'] == ['apple']
