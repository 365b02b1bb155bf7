"""Versioned JSON document published on ``~/instances`` (std_msgs/String).

One document per processed frame; the schema is described in DEVELOPERS.md. Consumers must
check ``schema`` and ``version``: a change that removes or renames a field bumps the version,
added optional fields do not.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

SCHEMA_NAME = 'sam_gap_ros/instances'
SCHEMA_VERSION = 1


@dataclass
class InstanceRecord:
    """One instance in one frame, in the form published on ``~/instances``."""

    instance_id: int
    label: str
    score: float
    bbox: Tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` pixels, exclusive max corner (as mask_ops.mask_to_box)."""
    area: int
    centroid: Tuple[float, float]
    position: Optional[Tuple[float, float, float]] = None
    """Camera-frame ``(x, y, z)`` metres from depth, None without (valid) depth."""

    def to_dict(self) -> Dict[str, Any]:
        """Return the JSON-ready dict of this record."""
        return {
            'id': int(self.instance_id),
            'label': str(self.label),
            'score': _finite(self.score, 'score'),
            'bbox': [_finite(v, 'bbox') for v in self.bbox],
            'area': int(self.area),
            'centroid': [_finite(v, 'centroid') for v in self.centroid],
            'position': (None if self.position is None
                         else [_finite(v, 'position') for v in self.position]),
        }


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        # JSON has no NaN; a NaN would also poison every consumer's arithmetic.
        raise ValueError(f'{name} value {value} is not finite')
    return round(value, 4)


def build_document(records: Sequence[InstanceRecord], *, stamp_sec: int, stamp_nanosec: int,
                   frame_id: str, width: int, height: int, mode: str, model: str,
                   frame_index: int, concepts: Sequence[str] = (),
                   inference_ms: Optional[float] = None,
                   latency_ms: Optional[float] = None) -> Dict[str, Any]:
    """Return the versioned instances document for one frame.

    ``inference_ms`` (optional) is the model's time on this frame, which lets a consumer
    split its end-to-end latency into model time and transport/queueing. ``latency_ms``
    (optional) is the time from the image stamp to the ~/masks publish on the node's clock
    (negative when the camera's clock runs ahead of the node's).
    """
    document = {
        'schema': SCHEMA_NAME,
        'version': SCHEMA_VERSION,
        'header': {'stamp': {'sec': int(stamp_sec), 'nanosec': int(stamp_nanosec)},
                   'frame_id': str(frame_id)},
        'image': {'width': int(width), 'height': int(height)},
        'mode': str(mode),
        'model': str(model),
        'frame_index': int(frame_index),
        'concepts': [str(c) for c in concepts],
        'instances': _with_pose_index(records),
    }
    if inference_ms is not None:
        document['inference_ms'] = _finite(inference_ms, 'inference_ms')
    if latency_ms is not None:
        document['latency_ms'] = _finite(latency_ms, 'latency_ms')
    return document


def _with_pose_index(records: Sequence[InstanceRecord]) -> List[Dict[str, Any]]:
    """Add ``pose_index``: the instance's index in ~/fruit_poses (None without position)."""
    items, next_pose = [], 0
    for record in records:
        item = record.to_dict()
        item['pose_index'] = None if record.position is None else next_pose
        next_pose += record.position is not None
        items.append(item)
    return items


def dumps(document: Dict[str, Any]) -> str:
    """Serialise a document compactly (strict JSON: no NaN/inf)."""
    return json.dumps(document, separators=(',', ':'), allow_nan=False)


_REQUIRED_INSTANCE_KEYS = ('id', 'label', 'score', 'bbox', 'area', 'centroid', 'position',
                           'pose_index')
_MAX_ID = 65535  # IDs are the values of the mono16 ~/masks image


def loads(text: str) -> Dict[str, Any]:
    """Parse and validate a document; raise ValueError naming the first problem."""
    try:
        # Python's json accepts NaN/Infinity, which strict JSON (and the schema) does not.
        document = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise ValueError(f'instances document is not valid JSON: {exc}') from exc
    validate_document(document)
    return document


def _refuse_constant(name: str) -> None:
    raise ValueError(f'{name} is not a JSON number')


def document_stamp_ns(document: Dict[str, Any]) -> int:
    """Return a (validated) document's header stamp as integer nanoseconds.

    The key to pair a document with the ``~/masks`` image and other messages of its frame.
    """
    stamp = document['header']['stamp']
    return int(stamp['sec']) * 1_000_000_000 + int(stamp['nanosec'])


def _check_optional_time(document: Dict[str, Any], key: str, non_negative: bool) -> None:
    """Raise ValueError unless ``document[key]`` is absent or a finite number (>= 0)."""
    value = document.get(key)
    if value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or (non_negative and value < 0)):
        kind = 'finite non-negative' if non_negative else 'finite'
        raise ValueError(f"'{key}' must be a {kind} number, got {value!r}")


def validate_document(document: Any) -> None:
    """Raise ValueError unless ``document`` follows the current schema version."""
    if not isinstance(document, dict):
        raise ValueError('instances document must be a JSON object')
    if document.get('schema') != SCHEMA_NAME:
        raise ValueError(f"schema must be '{SCHEMA_NAME}', got {document.get('schema')!r}")
    if type(document.get('version')) is not int or document['version'] != SCHEMA_VERSION:
        raise ValueError(f'unsupported instances schema version {document.get("version")!r} '
                         f'(this reader understands {SCHEMA_VERSION})')
    for key in ('header', 'image', 'mode', 'model', 'frame_index', 'concepts', 'instances'):
        if key not in document:
            raise ValueError(f"instances document lacks '{key}'")
    _check_stamp(document['header'])
    _check_optional_time(document, 'inference_ms', non_negative=True)
    _check_optional_time(document, 'latency_ms', non_negative=False)
    image = document['image']
    if not (isinstance(image, dict) and all(_is_int(image.get(key)) and image[key] > 0
                                            for key in ('width', 'height'))):
        raise ValueError(f"'image' must hold positive integer 'width' and 'height', got "
                         f'{image!r}')
    if not _is_int(document['frame_index']):
        raise ValueError(f"'frame_index' must be an integer, got {document['frame_index']!r}")
    if not (isinstance(document['concepts'], list)
            and all(isinstance(c, str) for c in document['concepts'])):
        raise ValueError("'concepts' must be a list of strings")
    instances: List[Any] = document['instances']
    if not isinstance(instances, list):
        raise ValueError("'instances' must be a list")
    seen_ids, next_pose = set(), 0
    for index, item in enumerate(instances):
        if not isinstance(item, dict):
            raise ValueError(f'instance {index} must be an object, got {item!r}')
        missing = [key for key in _REQUIRED_INSTANCE_KEYS if key not in item]
        if missing:
            raise ValueError(f'instance {index} lacks {missing}')
        instance_id = item['id']
        if not (_is_int(instance_id) and 0 < instance_id <= _MAX_ID):
            raise ValueError(f'instance {index} id must be an integer in 1..{_MAX_ID} (a '
                             f'~/masks value), got {instance_id!r}')
        if instance_id in seen_ids:
            raise ValueError(f'instance {index} repeats id {instance_id}')
        seen_ids.add(instance_id)
        if not isinstance(item['label'], str) or not _is_numbers([item['score']], 1):
            raise ValueError(f'instance {index} needs a string label and a numeric score')
        if not (_is_int(item['area']) and item['area'] >= 0):
            raise ValueError(f"instance {index} area must be a pixel count, got {item['area']!r}")
        if not (_is_numbers(item['bbox'], 4) and _is_numbers(item['centroid'], 2)):
            raise ValueError(f'instance {index} has a malformed bbox or centroid')
        if item['position'] is not None and not _is_numbers(item['position'], 3):
            raise ValueError(f'instance {index} position must be [x, y, z] or null')
        # Poses follow the instance order: the n-th instance with a position is pose n.
        expected = None if item['position'] is None else next_pose
        pose_index = item['pose_index']
        if not (pose_index is None if expected is None
                else _is_int(pose_index) and pose_index == expected):
            raise ValueError(f"instance {index} pose_index must be {expected} (the index of "
                             f'its ~/fruit_poses entry), got {pose_index!r}')
        next_pose += item['position'] is not None


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a JSON integer (not a boolean, not a float)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_numbers(value: Any, count: int) -> bool:
    """Whether ``value`` is a list of ``count`` numbers (not booleans)."""
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _check_stamp(header: Any) -> None:
    """Raise ValueError unless ``header.stamp`` holds integer ``sec`` and ``nanosec``."""
    stamp = header.get('stamp') if isinstance(header, dict) else None
    if not (isinstance(stamp, dict)
            and all(type(stamp.get(key)) is int for key in ('sec', 'nanosec'))):
        raise ValueError(f"'header.stamp' must hold integer 'sec' and 'nanosec', got {stamp!r}")
