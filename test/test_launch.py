"""Launch file and parameter file checks.

The launch-description test needs launch/launch_ros (a ROS install); it is skipped with a
reason otherwise. The file is always compiled, and config/orchard.yaml is always checked
against the parameters the nodes really declare.
"""

import ast
import importlib.util
import os
from pathlib import Path
import threading

import pytest
import rclpy
import rclpy.executors
from rclpy.context import Context
from rclpy.parameter import parameter_dict_from_yaml_file
import yaml

from node_harness import probe_segmenter

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'orchard.launch.py'
CONFIG = ROOT / 'config' / 'orchard.yaml'
REQUIRED_ARGS = {'mode', 'camera', 'model_dir', 'engine_path', 'device', 'concepts',
                 'params_file', 'namespace', 'use_depth', 'synthetic'}

# ament_index_python comes with rclpy's wheels, so launch_ros is the one to check.
NEEDS_LAUNCH_ROS = pytest.mark.skipif(
    importlib.util.find_spec('launch_ros') is None,
    reason='launch_ros is not installed (not pip-installable); needs a ROS 2 install')


def _load_launch_file():
    spec = importlib.util.spec_from_file_location('orchard_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_file_compiles_and_declares_the_arguments():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    compile(tree, str(LAUNCH_FILE), 'exec')
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert 'generate_launch_description' in names
    strings = {node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert REQUIRED_ARGS <= strings


def _declared_segmenter_parameters(cli_args=None):
    from sam_gap_ros.nodes.segmenter import SegmenterNode
    context = Context()
    rclpy.init(context=context)
    try:
        # autostart is overridden so no model is needed; the params file goes through rcl.
        node = SegmenterNode(context=context, namespace='/launch_check', cli_args=cli_args,
                             parameter_overrides=[
                                 rclpy.parameter.Parameter('autostart', value=False)])
        try:
            return {name: node.get_parameter(name).value
                    for name in node._parameters}
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def test_orchard_yaml_only_sets_declared_parameters_with_matching_types():
    params = parameter_dict_from_yaml_file(str(CONFIG), use_wildcard=True)
    declared = _declared_segmenter_parameters()
    assert params, 'config/orchard.yaml sets no parameters'
    for name, msg in params.items():
        assert name in declared, f"orchard.yaml sets '{name}', which the segmenter lacks"
        value = rclpy.parameter.parameter_value_to_python(msg.value)
        default = declared[name]
        if isinstance(default, float):
            assert isinstance(value, (int, float)), name
        elif isinstance(default, (list, tuple)):
            assert isinstance(value, (list, tuple)), name
        else:
            assert type(value) is type(default), (name, value, default)
    assert params['mode'].value.string_value in ('sam2', 'sam3', 'hybrid')


@NEEDS_LAUNCH_ROS
def test_launch_description_starts_one_segmenter_per_camera():
    from launch.actions import DeclareLaunchArgument
    from launch_ros.actions import LifecycleNode, Node

    description = _load_launch_file().generate_launch_description()
    declared = {a.name for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    assert REQUIRED_ARGS <= declared
    actions, context = _launch_actions({'camera': '/front,/rear', 'synthetic': 'true',
                                        'concepts': 'apple;damaged apple near trunk'})
    segmenters = [a for a in actions if isinstance(a, LifecycleNode)]
    cameras = [a for a in actions if isinstance(a, Node) and not isinstance(a, LifecycleNode)]
    assert len(segmenters) == 2 and len(cameras) == 2
    # Each segmenter and synthetic camera on its own camera's default topics.
    seeds = []
    for camera, segmenter, synthetic in zip(('/front', '/rear'), segmenters, cameras,
                                            strict=True):
        for node in (segmenter, synthetic):
            assert _remappings(node, context) == {
                'image': f'{camera}/image_raw',
                'image/compressed': f'{camera}/image_raw/compressed',
                'depth': f'{camera}/depth/image_raw',
                'depth/compressedDepth': f'{camera}/depth/image_raw/compressedDepth',
                'camera_info': f'{camera}/camera_info'}
        # Each camera's images in its own frame (the shipped orchard.yaml sets none).
        files = _parameter_files(synthetic, context)
        assert files[0]['frame_id'] == f'{camera[1:]}_color_optical_frame'
        assert all('frame_id' not in values and 'seed' not in values for values in files[1:])
        seeds.append(files[0]['seed'])
    # ... and its own orchard, the same in every launch (CRC-32 of the camera's name).
    assert len(set(seeds)) == 2
    (_, rear_alone), context = _launch_actions({'camera': '/rear', 'synthetic': 'true'})
    assert _parameter_files(rear_alone, context)[0]['seed'] == seeds[1]


def _launch_actions(configurations):
    """Run the launch file's setup with these launch arguments; return (actions, context)."""
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    description = _load_launch_file().generate_launch_description()
    context = LaunchContext()
    context.launch_configurations.update(dict({'params_file': str(CONFIG)}, **configurations))
    for action in description.entities:
        if isinstance(action, DeclareLaunchArgument):
            action.visit(context)
    opaque = [a for a in description.entities if isinstance(a, OpaqueFunction)][0]
    return opaque.execute(context), context


def _remappings(node, context):
    node._perform_substitutions(context)
    return dict(node.expanded_remapping_rules)


def _parameter_files(node, context):
    """Return the values in each params file handed to ``node`` (all its keys merged)."""
    node._perform_substitutions(context)
    merged = []
    for path, is_file in node._Node__expanded_parameter_arguments:
        if is_file:
            content = yaml.safe_load(Path(path).read_text())
            values = {}
            for section in content.values():
                values.update(section['ros__parameters'])
            merged.append(values)
    return merged


@NEEDS_LAUNCH_ROS
def test_shipped_models_run_at_their_operating_point_on_their_scene():
    from launch_ros.actions import LifecycleNode
    from sam_gap_ros.tiny_models import TINY_MODEL_SCENE, TINY_SAM3_THRESHOLDS

    actions, context = _launch_actions({'synthetic': 'true'})
    segmenter, camera = actions
    assert isinstance(segmenter, LifecycleNode)
    shipped = _parameter_files(segmenter, context)[0]  # lowest rank: below params_file
    assert shipped['model_dir'].endswith('tiny-orchard-sam3')
    assert {k: shipped[k] for k in TINY_SAM3_THRESHOLDS} == TINY_SAM3_THRESHOLDS
    assert _parameter_files(camera, context)[0] == {
        'scene': TINY_MODEL_SCENE, 'frame_id': 'camera_color_optical_frame', 'seed': 0}
    # The shipped orchard.yaml leaves thresholds to the model, so these apply.
    yaml_values = _parameter_files(segmenter, context)[1]
    assert 'score_threshold' not in yaml_values and 'mask_threshold' not in yaml_values

    # Your own model: no tiny-model thresholds, and the camera keeps its own scene.
    actions, context = _launch_actions({'synthetic': 'true', 'model_dir': '/opt/models/sam3'})
    segmenter, camera = actions
    assert 'score_threshold' not in _parameter_files(segmenter, context)[0]
    assert all('scene' not in values for values in _parameter_files(camera, context))


@NEEDS_LAUNCH_ROS
def test_mode_and_model_dir_are_read_from_the_keys_naming_the_segmenter(tmp_path):
    module = _load_launch_file()
    params_file = tmp_path / 'dumped.yaml'
    # What `ros2 param dump /segmenter` writes, next to a wildcard section.
    params_file.write_text('/**:\n  ros__parameters:\n    mode: sam3\n'
                           '/segmenter:\n  ros__parameters:\n    mode: sam2\n'
                           '    model_dir: /opt/models/sam2\n'
                           '/other_node:\n  ros__parameters:\n    mode: hybrid\n')
    assert module._file_params(str(params_file), '/segmenter') == {
        'mode': 'sam2', 'model_dir': '/opt/models/sam2'}
    assert module._file_params(str(tmp_path / 'missing.yaml'), '/segmenter') == {}


@NEEDS_LAUNCH_ROS
def test_each_camera_reads_its_own_section_of_the_params_file(tmp_path):
    from launch_ros.actions import LifecycleNode

    module = _load_launch_file()
    params_file = tmp_path / 'two_cameras.yaml'
    params_file.write_text('/**:\n  ros__parameters:\n    device: cpu\n'
                           '/front/segmenter:\n  ros__parameters:\n    mode: sam2\n'
                           '/rear/segmenter:\n  ros__parameters:\n    mode: sam3\n'
                           '/*/segmenter:\n  ros__parameters:\n    use_depth: false\n')
    assert module._file_params(str(params_file), '/front/segmenter') == {
        'device': 'cpu', 'mode': 'sam2', 'use_depth': False}
    assert module._file_params(str(params_file), '/rear/segmenter')['mode'] == 'sam3'
    assert module._file_params(str(params_file), '/segmenter') == {'device': 'cpu'}
    # The shipped model of each node's own mode: the rear's SAM3 directory would leave the
    # front's SAM2 unconfigured (rcl gives it mode sam2 from the same file).
    actions, context = _launch_actions({'camera': '/front,/rear',
                                        'params_file': str(params_file)})
    front, rear = [a for a in actions if isinstance(a, LifecycleNode)]
    assert _parameter_files(front, context)[0]['model_dir'].endswith('tiny-orchard-sam2')
    assert _parameter_files(rear, context)[0]['model_dir'].endswith('tiny-orchard-sam3')
    # Under an including launch file's namespace the keys name the nodes' full names.
    actions, context = _launch_actions({'camera': '/front,/rear', 'ros_namespace': '/robot1',
                                        'params_file': str(params_file)})
    front, rear = [a for a in actions if isinstance(a, LifecycleNode)]
    assert all(_parameter_files(node, context)[0]['model_dir'].endswith('tiny-orchard-sam3')
               for node in (front, rear))
    assert [node.expanded_node_namespace for node in (front, rear)] == [
        '/robot1/front', '/robot1/rear']


@NEEDS_LAUNCH_ROS
def test_camera_topic_arguments_remap_the_inputs():
    from launch_ros.actions import LifecycleNode

    # A RealSense: colour and aligned depth under one camera namespace, in sub-namespaces.
    actions, context = _launch_actions({
        'camera': '/camera/camera', 'image_topic': 'color/image_raw',
        'depth_topic': 'aligned_depth_to_color/image_raw',
        'camera_info_topic': '/camera/camera/color/camera_info',
        'depth_transport': 'compressedDepth'})
    segmenter, = [a for a in actions if isinstance(a, LifecycleNode)]
    assert _remappings(segmenter, context) == {
        'image': '/camera/camera/color/image_raw',
        'image/compressed': '/camera/camera/color/image_raw/compressed',
        'depth': '/camera/camera/aligned_depth_to_color/image_raw',
        'depth/compressedDepth':
            '/camera/camera/aligned_depth_to_color/image_raw/compressedDepth',
        'camera_info': '/camera/camera/color/camera_info'}
    # The launch arguments rank highest: last of the node's parameter files.
    assert _parameter_files(segmenter, context)[-1]['depth_transport'] == 'compressedDepth'
    # An absolute topic would be shared by every camera: refused with the reason.
    with pytest.raises(ValueError, match='depth_topic'):
        _launch_actions({'camera': '/front,/rear', 'depth_topic': '/front/depth'})


@NEEDS_LAUNCH_ROS
def test_shipped_defaults_rank_below_params_file_and_launch_arguments():
    module = _load_launch_file()
    path = module._defaults_file({'model_dir': '/shipped/sam3'})
    try:
        params = parameter_dict_from_yaml_file(path, use_wildcard=True)
        assert params['model_dir'].value.string_value == '/shipped/sam3'
    finally:
        os.unlink(path)


@pytest.mark.slow
@NEEDS_LAUNCH_ROS
def test_launch_service_runs_the_installed_launch_file():
    """Real ``ros2 launch`` path: arguments beat the params file; the node autostarts."""
    from ament_index_python.packages import (get_package_share_directory,
                                             PackageNotFoundError)
    import launch
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    try:
        share = get_package_share_directory('sam_gap_ros')
    except PackageNotFoundError:
        pytest.skip('sam_gap_ros is not installed in this environment (run via colcon test)')
    source = PythonLaunchDescriptionSource(os.path.join(share, 'launch', 'orchard.launch.py'))
    service = launch.LaunchService()
    service.include_launch_description(launch.LaunchDescription([
        launch.actions.IncludeLaunchDescription(source, launch_arguments=[
            ('synthetic', 'true'), ('mode', 'sam3'), ('device', 'cpu'),
            ('namespace', '/launch_test'), ('concepts', 'apple;damaged apple')])]))
    result = {}

    def probe():
        try:
            result['state'], result['params'] = probe_segmenter(
                '/launch_test/segmenter', ('mode', 'device', 'concepts', 'model_dir',
                                           'score_threshold', 'mask_threshold'))
        finally:
            service.shutdown()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    assert service.run() == 0
    thread.join(timeout=30.0)
    assert result.get('state') == 'active', result
    params = result['params']
    assert params['mode'] == 'sam3' and params['device'] == 'cpu'
    assert params['concepts'] == ['apple', 'damaged apple']
    assert params['model_dir'].endswith('tiny-orchard-sam3')
    # The shipped tiny SAM3 at its operating point (orchard.yaml leaves thresholds unset).
    assert (params['score_threshold'], params['mask_threshold']) == (0.3, 0.35)


def test_rcl_loads_orchard_yaml_into_the_segmenter():
    values = _declared_segmenter_parameters(['--ros-args', '--params-file', str(CONFIG)])
    expected = parameter_dict_from_yaml_file(str(CONFIG), use_wildcard=True)
    for name in ('max_instances', 'use_depth', 'dtype', 'concepts', 'min_depth_pixels'):
        assert values[name] == rclpy.parameter.parameter_value_to_python(
            expected[name].value), name


@NEEDS_LAUNCH_ROS
def test_dds_profile_argument_points_fast_dds_at_the_chosen_file(tmp_path):
    module = _load_launch_file()
    own = tmp_path / 'robot.xml'
    own.write_text('<dds/>')
    assert module._dds_environment('none', environ={}) == {}
    # A path is applied under the variable name of the distribution's Fast DDS.
    assert module._dds_environment(str(own), environ={'ROS_DISTRO': 'kilted'}) == {
        'FASTDDS_DEFAULT_PROFILES_FILE': str(own)}
    assert module._dds_environment(str(own), environ={'ROS_DISTRO': 'humble'}) == {
        'FASTRTPS_DEFAULT_PROFILES_FILE': str(own)}
    # The default yields to a profile the robot's environment already sets.
    for variable in module.PROFILE_VARIABLES:
        assert module._dds_environment('large_images', environ={variable: str(own)}) == {}
    with pytest.raises(FileNotFoundError, match='dds_profile'):
        module._dds_environment(str(tmp_path / 'missing.xml'), environ={})


def test_fast_dds_profile_segments_hold_whole_camera_frames():
    """The shipped profile parses, and its shared memory holds two 1080p rgb8 frames."""
    import xml.etree.ElementTree as ElementTree
    namespace = {'dds': 'http://www.eprosima.com'}
    root = ElementTree.parse(ROOT / 'config' / 'fastdds_large_images.xml').getroot()
    descriptors = {d.findtext('dds:transport_id', namespaces=namespace): d
                   for d in root.iterfind('.//dds:transport_descriptor', namespace)}
    participant = root.find('.//dds:participant', namespace)
    assert participant.get('is_default_profile') == 'true'
    used = [t.text for t in participant.iterfind('.//dds:userTransports/dds:transport_id',
                                                 namespace)]
    assert participant.findtext('.//dds:useBuiltinTransports', namespaces=namespace) == 'false'
    types = {descriptors[name].findtext('dds:type', namespaces=namespace) for name in used}
    assert types == {'SHM', 'UDPv4'}  # shared memory on the host, UDP for everything else
    shm = next(descriptors[n] for n in used
               if descriptors[n].findtext('dds:type', namespaces=namespace) == 'SHM')
    assert int(shm.findtext('dds:segment_size', namespaces=namespace)) >= 2 * 1920 * 1080 * 3
