"""Shared pytest fixtures for the sam_gap_ros test suite."""

import sys

import pytest

from sam_gap_ros.nodes.ros_utils import EXECUTORS


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run each test's torch work on one thread.

    CI has 2 cores and the node tests run executor and worker threads beside torch; one
    intra-op thread keeps timings stable and results deterministic. Tests that never
    import torch are left alone (importing it here would slow them down).
    """
    torch = sys.modules.get('torch')
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=EXECUTORS)
def ros(request):
    """Yield a node-test ``Harness`` (isolated rclpy context), once per executor kind.

    The segmenter tests run under each executor the executable can spin; a module whose
    nodes do not depend on it overrides ``ros`` with a single-executor harness.
    """
    from node_harness import Harness
    harness = Harness(request.param)
    yield harness
    harness.close()
