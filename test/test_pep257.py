"""ROS lint test: docstrings checked by ament_pep257 with the project's convention."""

from pathlib import Path

from ament_pep257.main import main
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Explicit paths, not the working directory, which may hold .venv/ and .ws/.
LINT_TARGETS = ('sam_gap_ros', 'training', 'test', 'benchmarks', 'launch', 'setup.py')
# Same rules as `pydocstyle --convention=pep257 --add-ignore=...` in the developer guide;
# ament's own default convention checks every rule, including numpy-style section ones.
PEP257_ARGS = [
    '--convention', 'pep257',
    '--add-ignore', 'D100', 'D101', 'D102', 'D103', 'D104', 'D105', 'D106', 'D107',
    'D203', 'D212', 'D404',
]


def lint_paths():
    """Return the existing lint targets as absolute paths."""
    return [str(REPO_ROOT / name) for name in LINT_TARGETS if (REPO_ROOT / name).exists()]


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=lint_paths() + PEP257_ARGS)
    assert rc == 0, 'Found code style errors / warnings'
