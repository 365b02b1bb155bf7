"""Run this package's node executables as child processes, as orchard.launch.py starts them.

For benchmarks that need the deployed topology (each node in its own process) on machines
without ``ros2 launch``: the same environment the launch file gives a node, parameters as
``--ros-args -p``, and a stop that always reaps the child.
"""

import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
LARGE_IMAGE_PROFILE = ROOT / 'config' / 'fastdds_large_images.xml'


def child_environment(threads: int = 0) -> Dict[str, str]:
    """Return the environment the launch file gives a node (``threads`` > 0 sets torch's)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    if threads > 0:
        env['OMP_NUM_THREADS'] = str(threads)
    return env


def parameter_args(params: Dict[str, Any]) -> list:
    """Return ``-p name:=value`` arguments for ``params`` (bools lower-case, '' quoted)."""
    args = []
    for name, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += ['-p', f'{name}:={text}' if text else f"{name}:=''"]
    return args


def start_node(module: str, namespace: str, params: Dict[str, Any], threads: int = 0,
               params_file: Optional[Path] = None) -> subprocess.Popen:
    """Start ``python -m <module>`` (a node executable) in ``namespace`` with ``params``.

    ``params_file`` is loaded first, as the launch file's ``params_file`` is, and ``params``
    override it.
    """
    command = [sys.executable, '-m', module, '--ros-args', '-r', f'__ns:={namespace}']
    if params_file is not None:
        command += ['--params-file', str(params_file)]
    return subprocess.Popen(command + parameter_args(params), env=child_environment(threads))


def use_large_image_profile() -> None:
    """Point Fast DDS at the shipped large-image profile, as orchard.launch.py does.

    Call it before this process creates its first participant, so that it publishes images
    the way the README asks camera drivers to; child processes inherit it.
    """
    if os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp') == 'rmw_fastrtps_cpp':
        os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(LARGE_IMAGE_PROFILE))


def _name(child: subprocess.Popen) -> str:
    """Return the module or script a child runs, for messages."""
    args = [str(arg) for arg in child.args]
    return args[2] if args[1:2] == ['-m'] else Path(args[1]).name


def wait_until(done: Callable[[], bool], executor: Any,
               children: Iterable[Optional[subprocess.Popen]] = (), timeout_s: float = 60.0,
               fail: bool = True, what: str = 'the node processes') -> bool:
    """Spin ``executor`` until ``done()``; a child that exits ends the wait with an error."""
    deadline = time.perf_counter() + timeout_s
    children = [child for child in children if child is not None]
    while not done() and time.perf_counter() < deadline:
        for child in children:
            if child.poll() is not None:
                raise SystemExit(f'{_name(child)} exited with code {child.returncode}')
        executor.spin_once(timeout_sec=0.05)
    if fail and not done():
        raise SystemExit(f'timed out after {timeout_s} s waiting for {what}')
    return done()


def stop_process(child: Optional[subprocess.Popen], timeout_s: float = 15.0) -> Optional[int]:
    """Stop ``child`` with SIGINT (as launch does), kill it if it hangs; return its code."""
    if child is None:
        return None
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return child.returncode
