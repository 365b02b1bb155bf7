"""Check that the colcon-installed package is registered in the ament index as ROS expects."""

from importlib import metadata
import os
from pathlib import Path
import xml.etree.ElementTree as ElementTree

from ament_index_python.packages import (
    get_package_prefix,
    get_package_share_directory,
    PackageNotFoundError,
)
import pytest

PACKAGE = 'sam_gap_ros'
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def prefix():
    """Return the install prefix, or skip when the workspace is not sourced."""
    try:
        return Path(get_package_prefix(PACKAGE))
    except (PackageNotFoundError, OSError):  # OSError: AMENT_PREFIX_PATH unset
        pytest.skip(
            f'{PACKAGE} is not in AMENT_PREFIX_PATH '
            f'({os.environ.get("AMENT_PREFIX_PATH", "unset")!r}): run `make build` and '
            f'`source .ws/install/setup.bash` first (`make test` does both)')


def _package_xml_fields(path):
    root = ElementTree.parse(path).getroot()
    return root.findtext('name'), root.findtext('version')


def test_share_directory_holds_package_xml(prefix):
    share = Path(get_package_share_directory(PACKAGE))

    assert share == prefix / 'share' / PACKAGE
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / PACKAGE).is_file()
    assert _package_xml_fields(share / 'package.xml') == _package_xml_fields(
        REPO_ROOT / 'package.xml')


@pytest.mark.parametrize('folder, pattern', [('launch', '*.launch.py'), ('config', '*.yaml')])
def test_launch_and_config_files_are_installed(prefix, folder, pattern):
    sources = sorted(path.name for path in (REPO_ROOT / folder).glob(pattern))
    if not sources:
        pytest.skip(f'no {folder}/{pattern} files in the source tree yet')
    share = Path(get_package_share_directory(PACKAGE)) / folder

    installed = sorted(path.name for path in share.glob(pattern))

    assert installed == sources, f'rebuild: {share} is out of date with {folder}/'


def test_console_scripts_are_where_ros2_run_looks(prefix):
    # `ros2 run sam_gap_ros <name>` executes <prefix>/lib/sam_gap_ros/<name>.
    entry_points = metadata.distribution(PACKAGE).entry_points
    scripts = sorted(ep.name for ep in entry_points if ep.group == 'console_scripts')
    assert scripts, 'setup.py declares no console_scripts'

    for name in scripts:
        path = prefix / 'lib' / PACKAGE / name
        assert path.is_file() and os.access(path, os.X_OK), f'{path} missing or not executable'
