"""Small rclpy helpers shared by the sam_gap_ros nodes."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rcl_interfaces.msg import ParameterType
from rclpy.qos import qos_profile_sensor_data, QoSProfile, ReliabilityPolicy

INPUT_QOS = ('sensor_data', 'reliable')

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
