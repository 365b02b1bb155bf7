"""The ``segmenter`` executable's own ``main``: executor choice, autostart, clean stop."""

import os
from pathlib import Path
import signal
import subprocess
import sys
import uuid

import pytest

from node_harness import probe_segmenter
from sam_gap_ros.nodes.ros_utils import EXECUTORS, executor_arg, make_executor

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
