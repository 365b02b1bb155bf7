"""Small rclpy helpers shared by the sam_gap_ros nodes."""

from __future__ import annotations

import argparse
import faulthandler
import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rcl_interfaces.msg import ParameterType
import rclpy
from rclpy.context import Context
from rclpy.exceptions import ParameterException
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy
from rclpy.utilities import get_default_context, remove_ros_args

from sam_gap_ros.allocator import keep_freed_buffers

INPUT_QOS = ('sensor_data', 'reliable')
MAX_RATE_HZ = 200.0
"""Highest publish rate of the source nodes: beyond it a timer is a busy loop."""
MIN_RATE_HZ = 0.1
"""Lowest publish rate of the source nodes: the first frame comes one period after start,
and a period beyond int64 nanoseconds (below ~1e-10 Hz) cannot make a timer at all."""
EXECUTORS = ('events', 'single_threaded')
DEFAULT_EXECUTOR = 'events'

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


def describe(description: str, default: Any, *, read_only: bool = False,
             float_range: Optional[Sequence[float]] = None,
             int_range: Optional[Sequence[int]] = None,
             choices: Optional[Sequence[str]] = None) -> ParameterDescriptor:
    """Return a ParameterDescriptor with type, description, range and read-only flag."""
    if isinstance(default, (list, tuple)):
        kind = ParameterType.PARAMETER_STRING_ARRAY
    else:
        kind = _TYPES[type(default)]
    descriptor = ParameterDescriptor(description=description, type=kind, read_only=read_only)
    if float_range is not None:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=float(float_range[0]), to_value=float(float_range[1]),
                               step=0.0)]
    if int_range is not None:
        descriptor.integer_range = [
            IntegerRange(from_value=int(int_range[0]), to_value=int(int_range[1]), step=1)]
    if choices:
        descriptor.additional_constraints = 'one of: ' + ', '.join(choices)
    return descriptor


def input_qos(name: str, depth: int = 5) -> QoSProfile:
    """Return the subscription QoS for ``sensor_data`` (best effort) or ``reliable``."""
    if name == 'sensor_data':
        return qos_profile_sensor_data
    if name == 'reliable':
        return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)
    raise ValueError(f"input_qos '{name}' is not one of {INPUT_QOS}")


def stamp_to_sec(stamp: Any) -> float:
    """Return a builtin_interfaces/Time as float seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def stamp_to_ns(stamp: Any) -> int:
    """Return a builtin_interfaces/Time as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def make_executor(kind: str = DEFAULT_EXECUTOR, context: Optional[Context] = None) -> Executor:
    """Return the executor that spins the nodes: ``events`` or ``single_threaded``.

    ``events`` is rclpy's EventsExecutor (``rclpy.experimental``): it waits and dispatches
    in C++, where the SingleThreadedExecutor rebuilds a Python wait set over every entity
    of the node (a lifecycle node with parameter services has dozens) on each spin. For the
    segmenter that is about 1 ms less per frame from image in to masks out (measured by
    benchmarks/bench_node_overhead.py). Where rclpy has no EventsExecutor (older distributions),
    ``events`` falls back to the single-threaded executor with a warning.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"executor '{kind}' is not one of {EXECUTORS}")
    if kind == 'events':
        try:
            from rclpy.experimental import EventsExecutor
        except ImportError:
            get_logger('sam_gap_ros').warning(
                'this rclpy has no EventsExecutor: using the SingleThreadedExecutor')
        else:
            return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


def init_node_process(args: Optional[Sequence[str]], name: str) -> None:
    """Initialise rclpy for a node executable whose process moves camera-sized images.

    Keeps freed image-sized buffers on the heap first (see ``sam_gap_ros.allocator``):
    ~40 % less publish-to-callback time for a 640x480 frame (1.44 -> 0.86 ms measured).
    A crash in native code (rclpy, the middleware, torch) writes every thread's Python
    stack to stderr (faulthandler), so the launch log of a robot shows where it died.
    """
    if not faulthandler.is_enabled():  # PYTHONFAULTHANDLER or -X faulthandler did it
        faulthandler.enable()
    reason = keep_freed_buffers()
    rclpy.init(args=args)
    if reason:
        get_logger(name).info(f'heap left at its defaults for image buffers: {reason}')


NodeT = TypeVar('NodeT', bound=Node)


def create_node_or_exit(factory: Callable[[], NodeT], name: str) -> NodeT:
    """Return ``factory()``; if it refuses its parameters, log why and exit with status 1.

    An out-of-range or mistyped parameter (``rate_hz: 15`` in YAML is an integer, not a
    double) raises from ``declare_parameter``; a user gets one fatal line naming it, as
    ``ros2 launch`` shows it, not a traceback. Ctrl-C while the factory runs (a node that
    loads its model on startup takes seconds on a robot) exits with status 0, as it does
    once the node spins.
    """
    try:
        return factory()
    except (ParameterException, ValueError, TypeError) as exc:
        get_logger(name).fatal(f'cannot start: {exc}')
        rclpy.try_shutdown()
        sys.exit(1)
    except KeyboardInterrupt:
        get_logger(name).info('interrupted while starting')
        rclpy.try_shutdown()
        sys.exit(0)


def spin_until_shutdown(executor: Executor, context: Optional[Context] = None) -> None:
    """Spin ``executor`` until ``context`` (default: the global one) shuts down.

    A loop of short ``spin_once`` calls, not ``executor.spin()``: the EventsExecutor's
    ``spin()`` (rclpy 9.1) blocks in C++ and ignores SIGINT, so Ctrl-C and launch's
    shutdown could never stop the node; between ``spin_once`` calls Python's signal
    handling runs (SIGINT raises KeyboardInterrupt, SIGTERM shuts the context down).
    """
    context = context or get_default_context()
    while context.ok():
        try:
            executor.spin_once(timeout_sec=0.1)
        except Exception:
            # SIGTERM's handler shuts the context down at any moment, also inside spin_once
            # after its check (rclpy then fails to create its wait set with an RCLError):
            # a normal stop, not a crash to print a traceback for.
            if context.ok():
                raise


def spin_node(node: Node, executor: Executor,
              on_stop: Optional[Callable[[], None]] = None) -> None:
    """Spin ``node`` on ``executor`` until shutdown or Ctrl-C, then tear everything down.

    ``on_stop`` runs first (a node's worker thread or file reader), then the executor, the
    node and rclpy are shut down: the one ending of every node executable here.
    """
    executor.add_node(node)
    try:
        spin_until_shutdown(executor, node.context)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if on_stop is not None:
            on_stop()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=node.context)


def executor_arg(args: Optional[Sequence[str]], prog: str) -> str:
    """Return the ``--executor`` choice from the non-ROS part of ``args`` (a full argv).

    Parse before ``rclpy.init`` (``--help`` or a bad value exits here, like any CLI).
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument('--executor', choices=EXECUTORS, default=DEFAULT_EXECUTOR,
                        help=f'rclpy executor (default {DEFAULT_EXECUTOR})')
    return parser.parse_args(remove_ros_args(args=list(args))[1:] if args else []).executor
