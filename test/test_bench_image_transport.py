"""The image transport benchmark runs every case and reports each one's latency."""

import os
from pathlib import Path
import subprocess
import sys

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_image_transport.py'


@pytest.mark.slow
def test_quick_run_reports_every_case():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--quick', '--messages', '10'], capture_output=True,
        text=True, timeout=300, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    cases = {'inproc_builtin_default', 'inproc_builtin_kept', 'xproc_builtin_default',
             'xproc_builtin_kept'}
    if os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp') == 'rmw_fastrtps_cpp':
        cases |= {'xproc_profile_default', 'xproc_profile_kept'}
    name, *fields = result.stdout.strip().splitlines()[-1].split()
    assert name == 'image_transport_ms'
    medians = {key: float(value) for key, value in (f.split('=') for f in fields)}
    assert set(medians) == cases
    assert all(value > 0 for value in medians.values())
    # Every case delivered all its messages (reliable QoS, 20 Hz): nothing lost or stuck.
    assert result.stdout.count('(10/10 received)') == len(cases)


def test_failed_publisher_leaves_no_receiver_running(monkeypatch):
    """A case that fails must not leave its receiver waiting out its timeout, orphaned."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_script import load_benchmark
    bench = load_benchmark('bench_image_transport')
    started = []

    class RecordingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def crashed_publisher(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, '', 'publisher crashed')

    monkeypatch.setattr(subprocess, 'Popen', RecordingPopen)
    monkeypatch.setattr(subprocess, 'run', crashed_publisher)
    try:
        with pytest.raises(SystemExit, match='publisher failed'):
            bench._run_case('64x48', 'default', 'builtin', 2, 10, f'orphan_{os.getpid()}')
        assert len(started) == 1
        assert started[0].poll() is not None, 'the receiver is still running'
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait()
