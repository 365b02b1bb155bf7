"""The ``segmenter`` executable's own ``main``: executor choice, autostart, clean stop."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import uuid

import pytest
import rclpy
from rclpy.context import Context

from node_harness import probe_segmenter
from sam_gap_ros.nodes.ros_utils import EXECUTORS, executor_arg, make_executor
from sam_gap_ros.nodes.ros_utils import spin_until_shutdown

REPO = Path(__file__).resolve().parents[1]
SAM3_DIR = REPO / 'models' / 'tiny-orchard-sam3'


def _segmenter_command(*extra):
    return [sys.executable, '-m', 'sam_gap_ros.nodes.segmenter', *extra]


def _env():
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
    env.setdefault('OMP_NUM_THREADS', '1')
    return env


def test_executor_arg_reads_only_the_non_ros_arguments():
    argv = ['segmenter', '--executor', 'single_threaded', '--ros-args', '-p', 'mode:=sam3']
    assert executor_arg(argv, 'segmenter') == 'single_threaded'
    assert executor_arg(['segmenter', '--ros-args', '-r', '__ns:=/a'], 'segmenter') == 'events'
    with pytest.raises(SystemExit):
        executor_arg(['segmenter', '--executor', 'fast'], 'segmenter')
    with pytest.raises(ValueError, match='not one of'):
        make_executor('fast')


@pytest.mark.parametrize('kind', EXECUTORS)
def test_context_shut_down_inside_spin_once_is_a_clean_stop(kind):
    """A context shut down inside ``spin_once`` ends the spin without an error.

    SIGTERM's handler shuts the context down at any moment, also inside ``spin_once`` after
    its check; rclpy then raised an RCLError and the node died with a traceback.
    """
    context = Context()
    rclpy.init(context=context)
    executor = make_executor(kind, context=context)
    node = rclpy.create_node('spinner', context=context)
    executor.add_node(node)

    class ShutDownWithin:
        """The executor, with the context shut down as its spin_once begins."""

        def spin_once(self, timeout_sec=None):
            rclpy.try_shutdown(context=context)  # as the signal handler can, mid-call
            executor.spin_once(timeout_sec)

    try:
        spin_until_shutdown(ShutDownWithin(), context)
        assert not context.ok()
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_bad_executor_exits_with_usage_before_starting_ros():
    result = subprocess.run(_segmenter_command('--executor', 'fast'), env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "invalid choice: 'fast'" in result.stderr


@pytest.mark.parametrize('executor, stop_signal', [
    ('events', signal.SIGINT), ('events', signal.SIGTERM), ('single_threaded', signal.SIGINT)],
    ids=['events-SIGINT', 'events-SIGTERM', 'single_threaded-SIGINT'])
def test_segmenter_executable_autostarts_and_stops_cleanly(executor, stop_signal):
    """Ctrl-C (SIGINT) and launch's/systemd's SIGTERM stop the node with exit code 0."""
    assert executor in EXECUTORS
    namespace = '/x' + uuid.uuid4().hex[:10]
    process = subprocess.Popen(
        _segmenter_command('--executor', executor, '--ros-args', '-r', f'__ns:={namespace}',
                           '-p', 'mode:=sam3', '-p', f'model_dir:={SAM3_DIR}',
                           '-p', 'device:=cpu', '-p', "concepts:=['apple']"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state, _ = probe_segmenter(f'{namespace}/segmenter')
        assert process.poll() is None, 'the segmenter exited while starting'
        assert state == 'active'
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert 'Traceback' not in output, output


@pytest.mark.parametrize('module, params, reason', [
    ('segmenter', ['score_threshold:=5.0'], 'score_threshold out of range'),
    ('segmenter', ['score_threshold:=1'], "expecting type 'DOUBLE'"),  # YAML `1`, not `1.0`
    ('video_source', [f'path:={REPO}', 'rate_hz:=-5.0'], 'rate_hz out of range'),
    ('video_source', [], "set 'path'"),
    ('synthetic_camera', ['rate_hz:=0.0'], 'rate_hz out of range'),
    ('synthetic_camera', ["scene:='{width: 6000}'"], "cannot set ['width']"),
], ids=['segmenter-range', 'segmenter-type', 'video-range', 'video-no-path', 'camera-range',
        'camera-scene-width'])
def test_executables_refuse_bad_parameters_with_one_fatal_line(module, params, reason):
    """A bad parameter stops the process with status 1 and a reason, not a traceback."""
    command = [sys.executable, '-m', f'sam_gap_ros.nodes.{module}', '--ros-args']
    for param in params:
        command += ['-p', param]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert 'Traceback' not in output, output
    assert 'cannot start' in output and reason in output, output


def test_native_crash_leaves_every_threads_python_stack_in_the_log():
    """A segfault in rclpy, the middleware or torch is reported with Python stacks.

    SIGSEGV is sent from outside, as a crash in native code raises it: the process still
    dies of it (launch's respawn sees the signal), after writing the stacks of the spinning
    main thread and the inference worker. With the single-threaded executor, as the source
    nodes spin (rclpy's EventsExecutor turns faulthandler on by itself).
    """
    namespace = '/x' + uuid.uuid4().hex[:10]
    process = subprocess.Popen(
        _segmenter_command('--executor', 'single_threaded', '--ros-args',
                           '-r', f'__ns:={namespace}', '-p', 'mode:=sam3',
                           '-p', f'model_dir:={SAM3_DIR}', '-p', 'device:=cpu'),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state, _ = probe_segmenter(f'{namespace}/segmenter')
        assert state == 'active' and process.poll() is None
        process.send_signal(signal.SIGSEGV)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == -signal.SIGSEGV, output
    assert 'Fatal Python error: Segmentation fault' in output, output
    assert 'in spin_until_shutdown' in output and 'in _work' in output, output
