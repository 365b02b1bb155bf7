"""Launch the sam_gap_ros segmenter (one per camera), optionally with a synthetic camera.

Examples::

    ros2 launch sam_gap_ros orchard.launch.py mode:=hybrid camera:=/camera
    ros2 launch sam_gap_ros orchard.launch.py synthetic:=true use_depth:=true
    ros2 launch sam_gap_ros orchard.launch.py camera:=/front,/rear concepts:='apple;damaged apple'
    # RealSense (realsense2_camera 4.x with align_depth.enable:=true)
    ros2 launch sam_gap_ros orchard.launch.py camera:=/camera/camera \
        image_topic:=color/image_raw camera_info_topic:=color/camera_info \
        depth_topic:=aligned_depth_to_color/image_raw use_depth:=true

Parameter precedence (lowest first): shipped tiny-model defaults, ``params_file``, launch
arguments that are set (non-empty). Without a ``model_dir`` (argument or params file) the
shipped tiny models run, at the tiny SAM3's thresholds, and a synthetic camera shows them
the close-range scene they were trained on. The segmenter configures and activates itself
(``autostart``), so no lifecycle manager is needed, on Humble as on newer distributions.
"""

import os
import re
import tempfile
import zlib

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare
from sam_gap_ros.tiny_models import TINY_MODEL_SCENE, TINY_SAM3_THRESHOLDS, TRAINED
import yaml

PACKAGE = 'sam_gap_ros'

ARGUMENTS = (
    ('mode', '', 'sam2 | sam3 | hybrid (empty = params_file value, default hybrid)'),
    ('camera', '/camera', 'camera namespace(s), comma separated: one segmenter per camera, '
     'subscribed to <camera>/<image_topic>, <camera>/<depth_topic>, <camera>/<camera_info_topic>'),
    ('image_topic', 'image_raw', 'colour image topic relative to each camera namespace (a '
     "name starting with '/' is used as is, one camera only); the compressed transport is "
     '<image_topic>/compressed'),
    ('depth_topic', 'depth/image_raw', 'depth image aligned to the colour camera (16UC1 mm or '
     '32FC1 m), relative to each camera namespace or absolute, e.g. '
     'aligned_depth_to_color/image_raw (RealSense); the compressedDepth transport is '
     '<depth_topic>/compressedDepth'),
    ('camera_info_topic', 'camera_info', 'colour camera_info, relative to each camera '
     'namespace or absolute'),
    ('model_dir', '', 'local model directory (empty = params_file value or the shipped tiny '
     'orchard model)'),
    ('tracker_model_dir', '', 'SAM2 model directory for hybrid mode (empty = params_file value '
     'or the shipped tiny orchard SAM2 model)'),
    ('engine_path', '', 'TensorRT engine for the vision encoder (empty = PyTorch)'),
    ('device', '', 'auto | cpu | cuda | cuda:N (empty = params_file value)'),
    ('concepts', '', "concept prompts separated by ';', e.g. 'apple;damaged apple near trunk'"),
    ('namespace', '', 'namespace of the segmenter node(s)'),
    ('use_depth', '', 'true/false: pair depth + camera_info for 3D poses (empty = params_file)'),
    ('image_transport', '', 'raw | compressed (empty = params_file value)'),
    ('depth_transport', '', 'raw | compressedDepth (empty = params_file value)'),
    ('synthetic', 'false', 'also start a synthetic orchard camera (robot-less run)'),
    ('executor', 'events', 'rclpy executor of the segmenter: events (faster; falls back to '
     'single_threaded where rclpy lacks it) | single_threaded'),
    ('log_level', 'info', 'ROS log level'),
    ('dds_profile', 'large_images', 'Fast DDS profile of the started nodes: large_images (the '
     'shipped config/fastdds_large_images.xml, unless FASTDDS_DEFAULT_PROFILES_FILE or '
     'FASTRTPS_DEFAULT_PROFILES_FILE is set already), a file path, or none (leave the '
     'middleware settings alone)'),
)

# Fast DDS 3 (Kilted and newer) reads the first; Fast DDS 2 (Humble to Jazzy) only the
# second, which rmw_fastrtps on Fast DDS 3 still honours with a deprecation warning.
PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
FAST_DDS_2_DISTROS = ('humble', 'iron', 'jazzy')


def _shipped_model(name):
    path = os.path.join(get_package_share_directory(PACKAGE), 'models', name)
    return path if os.path.isdir(path) else ''


def _key_matches(key, full_name):
    """Return whether params-file ``key`` names the node ``full_name``, as rcl matches it.

    ``/**`` stands for any number of namespace tokens, ``*`` for one; a key without the
    leading ``/`` is absolute (``segmenter`` is ``/segmenter``).
    """
    pattern = ''
    for token in str(key).strip('/').split('/'):
        pattern += {'**': '(/[^/]+)*', '*': '/[^/]+'}.get(token, '/' + re.escape(token))
    return re.fullmatch(pattern, full_name) is not None


def _full_name(namespace, base_namespace=None, name='segmenter'):
    """Return the full name launch_ros gives node ``name`` in ``namespace``.

    A relative namespace goes below ``base_namespace``, the one an including launch file
    pushed (``PushRosNamespace``), as launch_ros puts it.
    """
    if not namespace.startswith('/'):
        namespace = f"{base_namespace or ''}/{namespace}"
    return '/' + '/'.join(token for token in f'{namespace}/{name}'.split('/') if token)


def _file_params(params_file, full_name):
    """Return what a params file sets for the node ``full_name``, as far as the launch needs it.

    Read from every key that names the node (``/**``, ``/**/segmenter``, ``/segmenter`` as
    ``ros2 param dump`` writes it, ``/front/segmenter``), ``/**`` first, so that the more
    specific ones win as they do in rcl. Keys of other nodes are left out: a file with
    ``/front/segmenter`` and ``/rear/segmenter`` sections sets each camera its own mode.
    """
    try:
        with open(params_file) as stream:
            content = yaml.safe_load(stream) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(content, dict):
        return {}
    keys = [key for key in content if _key_matches(key, full_name)]
    merged = {}
    for key in sorted(keys, key=lambda k: k != '/**'):
        params = (content.get(key) or {}).get('ros__parameters') or {}
        if isinstance(params, dict):
            merged.update(params)
    return merged


def _defaults_file(defaults):
    """Return a params file that sets ``defaults`` for every node (key ``/**``).

    Not a dict in ``parameters``: launch_ros keys a dict by the node's full name, and rclpy
    (Kilted, checked with 9.1.2) ranks the node keys of all params files by where each key
    first appears, later keys winning. A full-name key created before ``params_file`` made
    that file's ``/**`` values beat the launch-argument overrides (merged into the same,
    earlier key): ``mode:=sam3 device:=cpu`` were ignored. ``/**`` ranks lowest on every
    distro (Humble applies ``/**`` first, then the full name).
    """
    with tempfile.NamedTemporaryFile(
            'w', prefix='sam_gap_ros_defaults_', suffix='.yaml', delete=False) as stream:
        yaml.safe_dump({'/**': {'ros__parameters': defaults}}, stream)
    return stream.name


def _dds_environment(choice, environ=os.environ):
    """Return the variables that point Fast DDS at ``choice`` (see the dds_profile argument).

    The shipped profile gives shared-memory segments that hold whole camera frames:
    without it Fast DDS sends every image over fragmented UDP (~10x slower between
    processes, see config/fastdds_large_images.xml). Other middlewares ignore it.
    """
    if choice in ('', 'none'):
        return {}
    if choice == 'large_images':
        if any(environ.get(name) for name in PROFILE_VARIABLES):
            return {}  # the robot's own profile wins over the default
        choice = os.path.join(get_package_share_directory(PACKAGE), 'config',
                              'fastdds_large_images.xml')
    if not os.path.isfile(choice):
        raise FileNotFoundError(f'dds_profile {choice!r} is not a file')
    fast_dds_2 = environ.get('ROS_DISTRO', '') in FAST_DDS_2_DISTROS
    return {PROFILE_VARIABLES[1] if fast_dds_2 else PROFILE_VARIABLES[0]: choice}


def _camera_name(camera):
    """Return ``camera`` as one name (``/robot1/front``: robot1_front; ``/``: camera)."""
    return '_'.join(token for token in camera.split('/') if token) or 'camera'


def _optical_frame(camera):
    """Return the colour optical frame of ``camera`` as drivers name it (``/front``: front_...)."""
    return f'{_camera_name(camera)}_color_optical_frame'


def _scene_seed(camera):
    """Return the synthetic scene seed of ``camera``: 0 for ``/camera``, else from its name.

    Every camera sees its own orchard, also across separate launches; CRC-32, not hash(),
    which Python salts per process.
    """
    name = _camera_name(camera)
    return 0 if name == 'camera' else zlib.crc32(name.encode()) % 2**31


def _truthy(text):
    return str(text).strip().lower() in ('1', 'true', 'yes', 'on')


def _camera_topics(camera, value, several):
    """Return the remappings of one camera's inputs (``*_topic`` arguments, see ARGUMENTS)."""
    defaults = {name: default for name, default, _ in ARGUMENTS}
    topics = {}
    for key in ('image', 'depth', 'camera_info'):
        name = value[f'{key}_topic'] or defaults[f'{key}_topic']
        if name.startswith('/') and several:
            raise ValueError(f"{key}_topic {name!r} is absolute, so every camera would share "
                             'it: give it relative to the camera namespaces')
        topics[key] = name if name.startswith('/') else f"{camera}/{name.strip('/')}"
    return [('image', topics['image']), ('image/compressed', f"{topics['image']}/compressed"),
            ('depth', topics['depth']),
            ('depth/compressedDepth', f"{topics['depth']}/compressedDepth"),
            ('camera_info', topics['camera_info'])]


def _shipped_defaults(value, from_file):
    """Return (defaults below the params file, whether the shipped tiny models run).

    ``from_file``: what the params file sets for this node (``_file_params``).
    """
    mode = value['mode'] or str(from_file.get('mode') or 'hybrid')
    # Defaults below the params file: the tiny orchard models installed with the package,
    # with the operating point the tiny SAM3 was tuned for when it is the detector.
    defaults = {}
    sam3, sam2 = _shipped_model(TRAINED['sam3']), _shipped_model(TRAINED['sam2'])
    shipped = not (value['model_dir'] or from_file.get('model_dir'))
    if shipped and mode == 'sam2' and sam2:
        defaults['model_dir'] = sam2
    elif shipped and mode != 'sam2' and sam3:
        defaults['model_dir'] = sam3
        defaults.update(TINY_SAM3_THRESHOLDS)
    if sam2:
        defaults['tracker_model_dir'] = sam2
    return defaults, shipped


def _setup(context, *args, **kwargs):
    value = {name: LaunchConfiguration(name).perform(context).strip()
             for name, _, _ in ARGUMENTS}
    params_file = LaunchConfiguration('params_file').perform(context)

    overrides = {'autostart': True}
    for name in ('mode', 'model_dir', 'tracker_model_dir', 'engine_path', 'device',
                 'image_transport', 'depth_transport'):
        if value[name]:
            overrides[name] = value[name]
    if value['concepts']:
        overrides['concepts'] = [c.strip() for c in value['concepts'].split(';') if c.strip()]
    if value['use_depth']:
        overrides['use_depth'] = _truthy(value['use_depth'])

    cameras = [c.strip().rstrip('/') for c in value['camera'].split(',') if c.strip()]
    dds_env = _dds_environment(value['dds_profile'])
    actions = []
    for camera in cameras:
        # One node per camera; with several cameras each gets its own sub-namespace,
        # relative without a namespace argument, so that it stays below the namespace of
        # an including launch file (PushRosNamespace) as a single camera's node does.
        namespace = value['namespace']
        if len(cameras) > 1:
            sub_namespace = camera.strip('/').replace('/', '_')
            namespace = f"{namespace.rstrip('/')}/{sub_namespace}" if namespace else sub_namespace
        # Per node: a params file may give each camera's segmenter its own mode/model_dir.
        defaults, shipped = _shipped_defaults(value, _file_params(
            params_file, _full_name(namespace, context.launch_configurations.get(
                'ros_namespace'))))
        defaults_file = _defaults_file(defaults) if defaults else None
        remappings = _camera_topics(camera, value, len(cameras) > 1)
        actions.append(LifecycleNode(
            package=PACKAGE, executable='segmenter', name='segmenter', namespace=namespace,
            output='screen', emulate_tty=True,
            parameters=[p for p in (defaults_file, params_file, overrides) if p],
            remappings=remappings,
            # --ros-args in `arguments` works on every distro (ros_arguments is newer).
            arguments=['--executor', value['executor'] or 'events',
                       '--ros-args', '--log-level', value['log_level']],
            # numpy's BLAS only multiplies small mask matrices; a multi-threaded OpenBLAS
            # competing with torch for the cores is many times slower there.
            additional_env={'OPENBLAS_NUM_THREADS': '1', **dds_env}))
        if _truthy(value['synthetic']):
            # The synthetic camera shows the shipped models the close-range scene they were
            # trained on (its default 69 deg view makes apples too small for them), in a
            # frame named after its camera as camera drivers name theirs, and a scene of its
            # own, so that several cameras share neither; a params file may set them.
            camera_defaults = {'frame_id': _optical_frame(camera), 'seed': _scene_seed(camera)}
            if shipped:
                camera_defaults['scene'] = TINY_MODEL_SCENE
            actions.append(Node(
                package=PACKAGE, executable='synthetic_camera', name='synthetic_camera',
                namespace=namespace, output='screen',
                parameters=[p for p in (_defaults_file(camera_defaults), params_file) if p],
                additional_env=dds_env,
                remappings=remappings))
    return actions


def generate_launch_description():
    """Return the launch description (arguments + segmenter per camera)."""
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, default, text in ARGUMENTS]
    declared.append(DeclareLaunchArgument(
        'params_file',
        default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), 'config', 'orchard.yaml']),
        description='segmenter / synthetic camera parameter file'))
    return LaunchDescription(declared + [OpaqueFunction(function=_setup)])
