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
