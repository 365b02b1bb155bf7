"""ROS lint test: flake8 with ament_flake8's configuration over the package's sources."""

from pathlib import Path

from ament_flake8.main import main_with_errors
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
    rc, errors = main_with_errors(argv=lint_paths())
    assert rc == 0, (
        f'Found {len(errors)} code style errors / warnings:\n' + '\n'.join(errors))
