"""Launch file and parameter file checks.

The launch-description test needs launch/launch_ros (a ROS install); it is skipped with a
reason otherwise. The file is always compiled, and config/orchard.yaml is always checked
against the parameters the nodes really declare.
"""

import ast
import importlib.util
from pathlib import Path

import pytest
import rclpy
from rclpy.context import Context
from rclpy.parameter import parameter_dict_from_yaml_file

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'orchard.launch.py'
CONFIG = ROOT / 'config' / 'orchard.yaml'
REQUIRED_ARGS = {'mode', 'camera', 'model_dir', 'engine_path', 'device', 'concepts',
                 'params_file', 'namespace', 'use_depth', 'synthetic'}


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


@pytest.mark.skipif(importlib.util.find_spec('launch_ros') is None,
                    reason='launch_ros is not installed (not pip-installable); needs a ROS '
                           '2 install')
def test_launch_description_starts_one_segmenter_per_camera():
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch_ros.actions import LifecycleNode, Node

    spec = importlib.util.spec_from_file_location('orchard_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {a.name for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    assert REQUIRED_ARGS <= declared
    context = LaunchContext()
    context.launch_configurations.update({
        'camera': '/front,/rear', 'synthetic': 'true', 'params_file': str(CONFIG),
        'concepts': 'apple;damaged apple near trunk'})
    for action in description.entities:
        if isinstance(action, DeclareLaunchArgument):
            action.visit(context)
    opaque = [a for a in description.entities if isinstance(a, OpaqueFunction)][0]
    actions = opaque.execute(context)
    segmenters = [a for a in actions if isinstance(a, LifecycleNode)]
    cameras = [a for a in actions if isinstance(a, Node) and not isinstance(a, LifecycleNode)]
    assert len(segmenters) == 2 and len(cameras) == 2


def test_rcl_loads_orchard_yaml_into_the_segmenter():
    values = _declared_segmenter_parameters(['--ros-args', '--params-file', str(CONFIG)])
    expected = parameter_dict_from_yaml_file(str(CONFIG), use_wildcard=True)
    for name in ('max_instances', 'use_depth', 'dtype', 'concepts', 'min_depth_pixels'):
        assert values[name] == rclpy.parameter.parameter_value_to_python(
            expected[name].value), name
