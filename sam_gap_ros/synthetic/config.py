"""Vocabulary, scene configuration and camera model of the synthetic orchard generator."""

from __future__ import annotations

from dataclasses import dataclass, fields
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from sam_gap_ros.geometry import CameraIntrinsics

COLOURS: Tuple[str, ...] = ('red', 'green', 'yellow')
"""Apple colour classes, in the order of ``OrchardSceneConfig.colour_probabilities``."""

COLOUR_NOUN_PHRASES: Dict[str, str] = {
    'red': 'ripe red apple',
    'green': 'unripe green apple',
    'yellow': 'yellow apple',
}
COLOUR_ATTRIBUTES: Dict[str, Tuple[str, ...]] = {
    'red': ('red', 'ripe'),
    'green': ('green', 'unripe'),
    'yellow': ('yellow',),
}
DAMAGED_NOUN_PHRASE = 'damaged apple'

NOUN_PHRASES: Tuple[str, ...] = (
    'apple', 'ripe red apple', 'unripe green apple', 'yellow apple', 'damaged apple', 'leaf',
    'trunk')
"""Every phrase an instance can be a positive for (see ``GroundTruthInstance.phrases``)."""

CATEGORIES: Tuple[Dict[str, object], ...] = (
    {'id': 1, 'name': 'apple', 'supercategory': 'fruit'},
    {'id': 2, 'name': 'leaf', 'supercategory': 'plant'},
    {'id': 3, 'name': 'trunk', 'supercategory': 'plant'},
)
CATEGORY_IDS: Dict[str, int] = {str(c['name']): int(c['id']) for c in CATEGORIES}


def apple_phrases(colour: str, damaged: bool) -> Tuple[str, Tuple[str, ...], Tuple[str, ...]]:
    """Return ``(noun_phrase, attributes, phrases)`` of an apple.

    The rule: every annotation carries ONE primary ``noun_phrase``; a damaged apple's is
    ``'damaged apple'``, otherwise the colour phrase. ``phrases`` lists every vocabulary
    phrase the apple is a positive for: ``'apple'``, its colour phrase and, when damaged,
    ``'damaged apple'`` (a damaged red apple is still a ripe red apple).
    """
    if colour not in COLOUR_NOUN_PHRASES:
        raise ValueError(f'unknown apple colour {colour!r}; expected one of {COLOURS}')
    colour_phrase = COLOUR_NOUN_PHRASES[colour]
    attributes = COLOUR_ATTRIBUTES[colour] + (('damaged',) if damaged else ())
    phrases = ('apple', colour_phrase) + ((DAMAGED_NOUN_PHRASE,) if damaged else ())
    return (DAMAGED_NOUN_PHRASE if damaged else colour_phrase), attributes, phrases


def _check_range(name: str, value: Tuple[float, float], low: float, high: float) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f'{name} must be a (min, max) pair, got {value!r}')
    if not (low <= value[0] <= value[1] <= high):
        raise ValueError(f'{name} must satisfy {low} <= min <= max <= {high}, got {value!r}')


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be a probability in [0, 1], got {value!r}')


@dataclass(frozen=True)
class OrchardSceneConfig:
    """Parameters of one synthetic orchard view; counts are per frame-sized area.

    Distances are metres from the camera and must keep the drawing order physical:
    front leaves < apples < trunk < background foliage.
    """

    width: int = 640
    height: int = 480
    n_apples: Tuple[int, int] = (8, 24)
    """Inclusive range of apples per frame area (a larger video world gets proportionally more)."""
    colour_probabilities: Tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Relative weights of red, green and yellow apples (normalised)."""
    damage_prob: float = 0.2
    cluster_size: Tuple[int, int] = (1, 3)
    """Apples grow in clusters of this many (inclusive range), so apples occlude apples."""
    apple_distance_m: Tuple[float, float] = (0.8, 2.5)
    apple_radius_m: Tuple[float, float] = (0.035, 0.045)
    leaf_occlusion_prob: float = 0.35
    """Probability that an apple gets a front leaf placed partly over it."""
    n_front_leaves: Tuple[int, int] = (2, 8)
    """Inclusive range of extra, freely placed front leaves per frame area."""
    leaf_distance_m: Tuple[float, float] = (0.45, 0.7)
    leaf_length_m: Tuple[float, float] = (0.06, 0.11)
    trunk_prob: float = 0.7
    """Probability that a trunk (with branches) is present; 0 gives trunk-free scenes."""
    trunk_distance_m: float = 2.8
    trunk_diameter_m: Tuple[float, float] = (0.15, 0.3)
    background_distance_m: Tuple[float, float] = (3.0, 4.5)
    sky_fraction: float = 0.15
    """Approximate fraction of background that is sky (0 disables sky)."""
    hfov_deg: float = 69.4
    """Horizontal field of view of the pinhole camera (RealSense D435 colour-like)."""
    brightness: Tuple[float, float] = (0.8, 1.15)
    """Range of a per-world exposure gain (lighting variety); (1, 1) disables it."""

    def __post_init__(self) -> None:
        """Validate every parameter with a clear message."""
        for name in ('width', 'height'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f'{name} must be an integer, got {value!r}')
            # Frozen dataclass: normalise numpy integers so the config stays JSON-friendly.
            object.__setattr__(self, name, int(value))
        for name, value in vars(self).items():
            if isinstance(value, list):
                # Lists from YAML/JSON configs become tuples so the config stays hashable.
                object.__setattr__(self, name, tuple(value))
        if self.width < 32 or self.height < 32:
            raise ValueError(f'image must be at least 32x32, got {self.width}x{self.height}')
        if self.width > 8192 or self.height > 8192:
            raise ValueError(f'image must be at most 8192x8192, got {self.width}x{self.height}')
        _check_range('n_apples', self.n_apples, 0, 10_000)
        _check_range('cluster_size', self.cluster_size, 1, 100)
        _check_range('n_front_leaves', self.n_front_leaves, 0, 10_000)
        probs = self.colour_probabilities
        if len(probs) != len(COLOURS) or min(probs) < 0 or sum(probs) <= 0:
            raise ValueError('colour_probabilities must be 3 non-negative weights (red, green, '
                             f'yellow) with a positive sum, got {probs!r}')
        for name in ('damage_prob', 'leaf_occlusion_prob', 'trunk_prob'):
            _check_probability(name, getattr(self, name))
        if not 0.0 <= self.sky_fraction < 0.9:
            raise ValueError(f'sky_fraction must be in [0, 0.9), got {self.sky_fraction!r}')
        _check_range('apple_radius_m', self.apple_radius_m, 1e-3, 1.0)
        _check_range('leaf_length_m', self.leaf_length_m, 1e-3, 1.0)
        _check_range('trunk_diameter_m', self.trunk_diameter_m, 1e-2, 5.0)
        for name in ('leaf_distance_m', 'apple_distance_m', 'background_distance_m'):
            _check_range(name, getattr(self, name), 0.05, 60.0)
        # Depth frames must agree with the painter's order used for the RGB image.
        if not (self.leaf_distance_m[1] < self.apple_distance_m[0]
                and self.apple_distance_m[1] < self.trunk_distance_m
                < self.background_distance_m[0]):
            raise ValueError('distances must be ordered leaves < apples < trunk < background, '
                             f'got leaves {self.leaf_distance_m}, apples {self.apple_distance_m}, '
                             f'trunk {self.trunk_distance_m}, background '
                             f'{self.background_distance_m}')
        _check_range('brightness', self.brightness, 0.2, 3.0)
        if not 10.0 <= self.hfov_deg <= 150.0:
            raise ValueError(f'hfov_deg must be in [10, 150], got {self.hfov_deg!r}')

    def camera(self) -> CameraIntrinsics:
        """Return the pinhole intrinsics of this configuration's camera."""
        focal = 0.5 * self.width / math.tan(math.radians(self.hfov_deg) / 2.0)
        return CameraIntrinsics(width=int(self.width), height=int(self.height), fx=focal,
                                fy=focal, cx=self.width / 2.0, cy=self.height / 2.0)


def scene_config_from_mapping(overrides: Optional[Mapping[str, Any]],
                              **base: Any) -> OrchardSceneConfig:
    """Return an ``OrchardSceneConfig`` from ``base`` plus ``overrides`` (e.g. parsed YAML).

    ``overrides`` wins over ``base``; YAML lists become tuples. Raises ValueError naming
    unknown fields or invalid values.
    """
    overrides = dict(overrides or {})
    known = {f.name for f in fields(OrchardSceneConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f'unknown scene fields {unknown}; known: {sorted(known)}')
    merged = dict(base)
    merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    try:
        return OrchardSceneConfig(**merged)
    except TypeError as exc:
        raise ValueError(f'invalid scene overrides: {exc}') from exc


def scene_config_from_text(text: str, reserved: Sequence[str] = (),
                           **base: Any) -> OrchardSceneConfig:
    """Return an ``OrchardSceneConfig`` from ``base`` plus overrides written as YAML/JSON.

    ``text`` is a mapping such as ``{hfov_deg: 30.0, n_apples: [3, 6]}`` (empty = none);
    see ``scene_config_from_mapping``. Fields in ``reserved`` (set by the caller's own
    options, e.g. a node's ``width`` parameter) are refused as overrides.
    """
    import yaml

    try:
        overrides = yaml.safe_load(text) if text and text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f'scene overrides are not valid YAML: {exc}') from exc
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f'scene overrides must be a mapping, got {type(overrides).__name__}')
    taken = sorted(set(overrides or {}) & set(reserved))
    if taken:
        raise ValueError(f'scene overrides cannot set {taken}: they have options of their own')
    return scene_config_from_mapping(overrides, **base)
