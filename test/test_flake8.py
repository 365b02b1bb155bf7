"""ROS lint test: flake8 with ament_flake8's configuration over the package's sources."""

from pathlib import Path
import subprocess
import sys

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Explicit paths, not the working directory, which may hold .venv/ and .ws/.
LINT_TARGETS = ('sam_gap_ros', 'training', 'test', 'benchmarks', 'launch', 'setup.py')


def lint_paths():
    """Return the existing lint targets as absolute paths."""
    return [str(REPO_ROOT / name) for name in LINT_TARGETS if (REPO_ROOT / name).exists()]


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    # In a child process: flake8 forks its workers, and a fork of this pytest process
    # after the node tests (rclpy/DDS threads holding locks) can deadlock.
    result = subprocess.run([sys.executable, '-m', 'ament_flake8.main', *lint_paths()],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f'code style errors / warnings:\n{result.stdout[-6000:]}{result.stderr[-2000:]}')
