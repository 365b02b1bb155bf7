"""Orchard worlds rendered as single scenes or as panning videos with stable track IDs.

A world is drawn once (background + trunk layer, apple sprites, front-leaf layer); a frame
only crops the layers at the camera's pan position and pastes the apple sprites, so video
frames are cheap. A single scene is the first frame of a world that is exactly one frame
large (no pan, no sway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from sam_gap_ros.mask_ops import Box, mask_to_box
from sam_gap_ros.synthetic.config import (apple_phrases, CameraIntrinsics, COLOURS,
                                          NOUN_PHRASES, OrchardSceneConfig)
from sam_gap_ros.synthetic.render import (AppleSprite, draw_leaf, leaf_layer_arrays, LeafSpec,
                                          light_direction, random_leaf, render_apple,
                                          render_background)

PAN_REFERENCE_DISTANCE_M = 1.0
"""With ``parallax=True``, ``pan_speed`` is the image motion of a point at this distance."""

_MAX_TRACK_ID = int(np.iinfo(np.uint16).max)
_MAX_LAYER_PIXELS = 4096 * 4096
"""Largest pan layer: a still 4096x4096 frame, the synthetic camera's largest (building
it takes ~64 bytes a pixel, 1 GiB here)."""


@dataclass(frozen=True)
class TrackInfo:
    """What an object is; constant over a video (keyed by ``track_id``)."""

    track_id: int
    category: str
    """``'apple'``, ``'leaf'`` or ``'trunk'`` (a name of ``CATEGORIES``)."""
    noun_phrase: str
    """The ONE primary phrase of the object (see ``config.apple_phrases`` for the rule)."""
    attributes: Tuple[str, ...]
    phrases: Tuple[str, ...]
    """Every vocabulary phrase the object is a positive for (e.g. ``'apple'`` too)."""
    colour: Optional[str] = None
    damaged: bool = False
    distance_m: float = 0.0
    """Distance of the object's centre (apples), or its nominal layer distance."""

    def to_dict(self) -> Dict[str, object]:
        """Return a JSON-friendly dict."""
        return {'track_id': self.track_id, 'category': self.category,
                'noun_phrase': self.noun_phrase, 'attributes': list(self.attributes),
                'phrases': list(self.phrases), 'colour': self.colour, 'damaged': self.damaged,
                'distance_m': round(self.distance_m, 4)}


class GroundTruthInstance:
    """One visible object of a scene/frame with its exact visible mask.

    Full-frame masks are built on first access from the object's cropped mask, which keeps
    rendering fast when a consumer only needs the image, the depth or ``Scene.labels``.
    """

    __slots__ = ('info', 'box', 'area', '_region', '_visible', '_amodal', '_shape', '_mask',
                 '_amodal_mask')

    def __init__(self, info: TrackInfo, visible: np.ndarray, region: Tuple[slice, slice],
                 shape: Tuple[int, int], amodal: Optional[np.ndarray] = None) -> None:
        self.info = info
        self.area = int(np.count_nonzero(visible))
        if self.area == 0:
            raise ValueError(f'instance {info.track_id} has an empty visible mask')
        box = mask_to_box(visible)
        dy, dx = region[0].start, region[1].start
        self.box: Box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        """Tight ``(x0, y0, x1, y1)`` box of ``mask`` (exclusive max corner, as in mask_ops)."""
        self._region = region
        self._visible = visible
        self._amodal = amodal
        self._shape = shape
        self._mask: Optional[np.ndarray] = None
        self._amodal_mask: Optional[np.ndarray] = None

    def _paste(self, crop: np.ndarray) -> np.ndarray:
        full = np.zeros(self._shape, dtype=bool)
        full[self._region] = crop
        return full

    @property
    def mask(self) -> np.ndarray:
        """Return the boolean ``(H, W)`` visible part (after nearer apples and front leaves)."""
        if self._mask is None:
            self._mask = self._paste(self._visible)
        return self._mask

    @property
    def amodal_mask(self) -> Optional[np.ndarray]:
        """Return the unoccluded silhouette inside the frame (apples, trunk; None for leaves)."""
        if self._amodal is None:
            return None
        if self._amodal_mask is None:
            self._amodal_mask = self._paste(self._amodal)
        return self._amodal_mask

    @property
    def amodal_area(self) -> int:
        """Return the pixel count of the unoccluded silhouette (``area`` without one)."""
        return self.area if self._amodal is None else int(np.count_nonzero(self._amodal))

    @property
    def track_id(self) -> int:
        """Return the object's stable track ID (also its value in ``Scene.labels``)."""
        return self.info.track_id

    @property
    def category(self) -> str:
        """Return the category name."""
        return self.info.category

    @property
    def noun_phrase(self) -> str:
        """Return the primary noun phrase."""
        return self.info.noun_phrase

    @property
    def attributes(self) -> Tuple[str, ...]:
        """Return attribute words such as ``('red', 'ripe', 'damaged')``."""
        return self.info.attributes

    @property
    def phrases(self) -> Tuple[str, ...]:
        """Return every vocabulary phrase this instance is a positive for."""
        return self.info.phrases

    @property
    def colour(self) -> Optional[str]:
        """Return the apple colour class (``COLOURS``), None for leaves and the trunk."""
        return self.info.colour

    @property
    def damaged(self) -> bool:
        """Return True for an apple with damage blotches."""
        return self.info.damaged

    @property
    def visible_fraction(self) -> float:
        """Return visible area / unoccluded area inside the frame (1.0 without an amodal mask)."""
        total = self.amodal_area
        return float(self.area) / total if total else 0.0

    def __repr__(self) -> str:
        """Return a short description."""
        return (f'GroundTruthInstance(track_id={self.track_id}, noun_phrase={self.noun_phrase!r}, '
                f'area={self.area}, box={self.box})')


@dataclass
class Scene:
    """One rendered image with its depth, camera and ground truth (a video frame too)."""

    image: np.ndarray
    """RGB ``uint8 (H, W, 3)``."""
    depth_mm: np.ndarray
    """``uint16 (H, W)`` depth in millimetres along the optical axis; 0 = no return (sky)."""
    labels: np.ndarray
    """``uint16 (H, W)`` track-ID image of every instance (0 = unlabelled background)."""
    instances: List[GroundTruthInstance]
    camera: CameraIntrinsics
    index: int = 0
    seed: int = 0
    pan_px: Tuple[float, float] = (0.0, 0.0)
    """Camera pan at this frame in pixels (at ``PAN_REFERENCE_DISTANCE_M`` with parallax)."""
    absent_phrases: Tuple[str, ...] = field(default_factory=tuple)
    """Vocabulary phrases with no instance in this image (negatives for concept training)."""

    @property
    def masks(self) -> Dict[int, np.ndarray]:
        """Return visible masks keyed by track ID."""
        return {inst.track_id: inst.mask for inst in self.instances}

    def instances_of(self, category: str) -> List[GroundTruthInstance]:
        """Return the instances of one category (``'apple'``, ``'leaf'``, ``'trunk'``)."""
        return [inst for inst in self.instances if inst.category == category]

    def phrase_mask(self, phrase: str) -> np.ndarray:
        """Return the union of the visible masks of all instances positive for ``phrase``."""
        out = np.zeros(self.labels.shape, dtype=bool)
        for inst in self.instances:
            if phrase in inst.phrases:
                out |= inst.mask
        return out


Frame = Scene
"""A video frame is a ``Scene`` whose ``index`` is its position in the video."""


@dataclass
class _Apple:
    info: TrackInfo
    sprite: AppleSprite
    x: float
    y: float
    rate: float
    sway: Tuple[float, float, float, float]
    """(amplitude px, period frames, phase rad, direction rad)."""
    enter: Optional[Tuple[int, float, float]] = None
    """(enter_frame, slide speed px/frame, frame at which the slide ends) for an entering apple."""


def _check_int(name: str, value: int, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name} must be an integer, got {value!r}')
    if value < low or (high is not None and value > high):
        upper = '' if high is None else f' and <= {high}'
        raise ValueError(f'{name} must be >= {low}{upper}, got {value!r}')
    return int(value)


class OrchardVideo:
    """A seeded orchard world seen by a panning camera; index or iterate it for frames.

    ``pan_speed``/``pan_speed_y`` are pixels per frame (scene content moves the opposite
    way), so apples leave at one edge and new ones enter at the other. Without parallax the
    whole image shifts (a rotating camera); with ``parallax=True`` each layer moves by
    ``pan_speed * PAN_REFERENCE_DISTANCE_M / distance`` (a camera driving along the row).
    Apples sway by up to ``sway_px``. ``enter_frame=k`` adds one extra, nearest apple
    (``entering_track_id``) that is absent before frame ``k`` and slides in from the right
    edge, partly visible at frame ``k`` (no front leaf covers its entry).
    Same seed and arguments give byte-identical frames; frames may be rendered in any order.
    """

    def __init__(self, seed: int, config: Optional[OrchardSceneConfig] = None,
                 n_frames: int = 60, pan_speed: float = 4.0, pan_speed_y: float = 0.0,
                 parallax: bool = False, sway_px: float = 1.5,
                 enter_frame: Optional[int] = None) -> None:
        self.seed = _check_int('seed', seed, 0)
        self.config = config if config is not None else OrchardSceneConfig()
        if not isinstance(self.config, OrchardSceneConfig):
            raise TypeError(f'config must be an OrchardSceneConfig, got {type(config).__name__}')
        self.n_frames = _check_int('n_frames', n_frames, 1, 100_000)
        for name, value in (('pan_speed', pan_speed), ('pan_speed_y', pan_speed_y)):
            if not math.isfinite(value) or abs(value) > 0.5 * self.config.width:
                raise ValueError(f'{name} must be finite and at most half the image width per '
                                 f'frame, got {value!r}')
        if not math.isfinite(sway_px) or not 0.0 <= sway_px <= 50.0:
            raise ValueError(f'sway_px must be in [0, 50], got {sway_px!r}')
        if enter_frame is not None:
            enter_frame = _check_int('enter_frame', enter_frame, 1, self.n_frames - 1)
        self.pan_speed = (float(pan_speed), float(pan_speed_y))
        self.parallax = bool(parallax)
        self.sway_px = float(sway_px)
        self.enter_frame = enter_frame
        self.camera = self.config.camera()
        self.entering_track_id: Optional[int] = None
        self._build()

    # ------------------------------------------------------------------ world construction
    def _rate(self, distance_m: float) -> float:
        return PAN_REFERENCE_DISTANCE_M / distance_m if self.parallax else 1.0

    def _shift(self, rate: float, index: float) -> Tuple[float, float]:
        return rate * self.pan_speed[0] * index, rate * self.pan_speed[1] * index

    def _layer(self, rate: float) -> Tuple[int, int, int, int, np.ndarray]:
        """Return (origin x, origin y, width, height, int shifts per frame) of a pan layer."""
        frames = np.arange(self.n_frames, dtype=np.float64)
        shifts = np.round(np.stack([rate * self.pan_speed[0] * frames,
                                    rate * self.pan_speed[1] * frames], axis=1)).astype(int)
        lo = np.minimum(shifts.min(axis=0), 0)
        hi = np.maximum(shifts.max(axis=0), 0)
        width = self.config.width + int(hi[0] - lo[0])
        height = self.config.height + int(hi[1] - lo[1])
        if self.config.width * self.config.height > _MAX_LAYER_PIXELS:
            raise ValueError(f'a {self.config.width}x{self.config.height} frame is larger than '
                             f'{_MAX_LAYER_PIXELS} px: use a smaller image')
        if width * height > _MAX_LAYER_PIXELS:
            raise ValueError(f'the world seen by {self.n_frames} frames at pan '
                             f'{self.pan_speed} px/frame needs a {width}x{height} layer '
                             f'(> {_MAX_LAYER_PIXELS} px); use fewer frames, a slower pan, or '
                             'ping_pong_index() to loop a shorter video')
        return int(lo[0]), int(lo[1]), width, height, shifts - lo

    def _build(self) -> None:
        cfg = self.config
        streams = [np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5)]
        rng_layout, rng_background, rng_apples, rng_leaves, rng_enter = streams
        focal = self.camera.fx
        has_trunk = bool(rng_layout.random() < cfg.trunk_prob)
        light = light_direction(rng_layout)
        gain = float(rng_layout.uniform(*cfg.brightness))

        bg_rate = self._rate(cfg.trunk_distance_m)
        _, _, bg_w, bg_h, self._bg_offsets = self._layer(bg_rate)
        self._background = render_background(
            rng_background, bg_h, bg_w, cfg, focal, has_trunk,
            (0.15 * cfg.width, bg_w - 0.15 * cfg.width))

        apples = self._make_apples(rng_apples, focal, light)
        entering = self._make_entering_apple(rng_enter, focal, light, len(apples) + 1)
        if entering is not None:
            apples.append(entering)
        self._apples = apples

        leaf_rate = self._rate(float(np.mean(cfg.leaf_distance_m)))
        lox, loy, leaf_w, leaf_h, self._leaf_offsets = self._layer(leaf_rate)
        self._leaf_origin = (lox, loy)
        self._leaf_rgb, self._leaf_ids, self._leaf_depth = leaf_layer_arrays(leaf_h, leaf_w)
        self._leaves = self._make_leaves(rng_leaves, focal, leaf_rate, len(apples) + 1)

        next_id = len(apples) + len(self._leaves) + 1
        self._trunk_info = None
        if has_trunk:
            self._trunk_info = TrackInfo(next_id, 'trunk', 'trunk', (), ('trunk',),
                                         distance_m=cfg.trunk_distance_m)
        if next_id > _MAX_TRACK_ID:
            raise ValueError(f'world has {next_id} objects; track IDs must fit uint16')
        if gain != 1.0:
            # Exposure is baked into the layers once so frames stay a crop-and-paste.
            layers = [self._background.rgb, self._leaf_rgb] + [a.sprite.rgb for a in apples]
            for layer in layers:
                cv2.convertScaleAbs(layer, dst=layer, alpha=gain)
        # Painter's order: far apples first; the entering apple (nearest) last.
        self._draw_order = sorted(range(len(apples)), key=lambda i: (
            apples[i].enter is not None, -apples[i].info.distance_m))
        self.tracks: Dict[int, TrackInfo] = {a.info.track_id: a.info for a in apples}
        self.tracks.update({leaf_id: info for leaf_id, info, _ in self._leaves})
        if self._trunk_info is not None:
            self.tracks[self._trunk_info.track_id] = self._trunk_info

    def _random_apple(self, rng: np.random.Generator, focal: float,
                      light: Tuple[float, float, float], track_id: int,
                      distance: float) -> Tuple[TrackInfo, AppleSprite, float]:
        cfg = self.config
        probs = np.asarray(cfg.colour_probabilities, dtype=np.float64)
        colour = COLOURS[int(rng.choice(len(COLOURS), p=probs / probs.sum()))]
        damaged = bool(rng.random() < cfg.damage_prob)
        radius_m = rng.uniform(*cfg.apple_radius_m)
        radius_px = focal * radius_m / distance
        noun, attributes, phrases = apple_phrases(colour, damaged)
        info = TrackInfo(track_id, 'apple', noun, attributes, phrases, colour=colour,
                         damaged=damaged, distance_m=float(distance))
        sprite = render_apple(rng, radius_px, colour, damaged, distance, radius_m, light)
        return info, sprite, radius_px

    def _make_apples(self, rng: np.random.Generator, focal: float,
                     light: Tuple[float, float, float]) -> List[_Apple]:
        cfg = self.config
        width, height = cfg.width, cfg.height
        mid_rate = self._rate(float(np.mean(cfg.apple_distance_m)))
        span = np.abs(np.asarray(self._shift(mid_rate, self.n_frames - 1)))
        area_ratio = (width + span[0]) * (height + span[1]) / float(width * height)
        target = int(round(int(rng.integers(cfg.n_apples[0], cfg.n_apples[1] + 1)) * area_ratio))
        apples: List[_Apple] = []
        while len(apples) < target:
            size = min(int(rng.integers(cfg.cluster_size[0], cfg.cluster_size[1] + 1)),
                       target - len(apples))
            cluster_distance = rng.uniform(*cfg.apple_distance_m)
            rate = self._rate(cluster_distance)
            end = self._shift(rate, self.n_frames - 1)
            # Centres anywhere the camera sees during the clip (in this rate's coordinates).
            cx = rng.uniform(min(0.0, end[0]), width + max(0.0, end[0]))
            cy = rng.uniform(min(0.0, end[1]), height + max(0.0, end[1]))
            for member in range(size):
                distance = float(np.clip(cluster_distance + rng.normal(0.0, 0.04),
                                         *cfg.apple_distance_m))
                info, sprite, radius_px = self._random_apple(rng, focal, light,
                                                             len(apples) + 1, distance)
                x, y = cx, cy
                if member:
                    angle = rng.uniform(0, 2 * math.pi)
                    reach = rng.uniform(1.2, 2.1) * radius_px
                    x, y = cx + reach * math.cos(angle), cy + reach * math.sin(angle)
                sway = (self.sway_px * rng.uniform(0.3, 1.0), rng.uniform(25.0, 60.0),
                        rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi))
                apples.append(_Apple(info, sprite, x, y, self._rate(distance), sway))
        return apples

    def _make_entering_apple(self, rng: np.random.Generator, focal: float,
                             light: Tuple[float, float, float],
                             track_id: int) -> Optional[_Apple]:
        if self.enter_frame is None:
            return None
        cfg = self.config
        distance = cfg.apple_distance_m[0]
        info, sprite, radius_px = self._random_apple(rng, focal, light, track_id, distance)
        rate = self._rate(distance)
        cols = np.flatnonzero(sprite.mask.any(axis=0))
        left_offset = int(cols[0]) - sprite.half
        base_speed = max(2, int(math.ceil(0.6 * radius_px)))
        speed = base_speed + int(math.ceil(abs(rate * self.pan_speed[0])))
        # Visible columns at the entry frame; one frame earlier it is fully right of the image.
        depth_in = max(1, base_speed // 2)
        x_enter = cfg.width - left_offset - depth_in
        x_rest = rng.uniform(0.55 * cfg.width, max(0.55 * cfg.width, cfg.width - 1.5 * radius_px))
        margin = min(1.5 * radius_px, 0.5 * cfg.height)
        y_rest = rng.uniform(margin, cfg.height - margin)
        slide_end = self.enter_frame + (x_enter - x_rest) / speed
        shift = self._shift(rate, self.enter_frame)
        # Store the rest position in this rate's layer coordinates, like the other apples.
        self.entering_track_id = track_id
        return _Apple(info, sprite, x_rest + shift[0], y_rest + shift[1], rate,
                      (0.0, 1.0, 0.0, 0.0), enter=(self.enter_frame, float(speed), slide_end))

    def _apple_centre(self, apple: _Apple, index: int) -> Tuple[float, float]:
        shift = self._shift(apple.rate, index)
        amp, period, phase, direction = apple.sway
        wobble = amp * math.sin(2.0 * math.pi * index / period + phase)
        x = apple.x - shift[0] + wobble * math.cos(direction)
        y = apple.y - shift[1] + wobble * math.sin(direction)
        if apple.enter is not None:
            _, speed, slide_end = apple.enter
            x += speed * max(0.0, slide_end - index)
        return x, y

    def _make_leaves(self, rng: np.random.Generator, focal: float, rate: float,
                     first_id: int) -> List[Tuple[int, TrackInfo, Tuple[int, int, int, int]]]:
        cfg = self.config
        lox, loy = self._leaf_origin
        layer_h, layer_w = self._leaf_ids.shape
        avoid = []
        if self.entering_track_id is not None:
            apple = self._apples[-1]
            x, y = self._apple_centre(apple, self.enter_frame)
            shift = np.round(self._shift(rate, self.enter_frame))
            half = apple.sprite.half
            x_rest = x - apple.enter[1] * max(0.0, apple.enter[2] - self.enter_frame)
            avoid.append((x_rest - half + shift[0], y - half + shift[1],
                          max(x, cfg.width) + half + shift[0], y + half + shift[1]))

        def clear(leaf: LeafSpec) -> bool:
            x0, y0, x1, y1 = leaf.bounds()
            return all(x1 < a0 or x0 > a1 or y1 < b0 or y0 > b1 for a0, b0, a1, b1 in avoid)

        specs: List[LeafSpec] = []
        for apple in self._apples:
            if apple.enter is not None or rng.random() >= cfg.leaf_occlusion_prob:
                continue
            # Cover the apple when it is nearest the image centre during the clip.
            index = 0
            if self.pan_speed[0]:
                index = int(np.clip(round((apple.x - 0.5 * cfg.width)
                                          / (apple.rate * self.pan_speed[0])),
                                    0, self.n_frames - 1))
            x, y = self._apple_centre(apple, index)
            shift = self._shift(rate, index)
            leaf = random_leaf(rng, cfg, focal, 0.0, 0.0)
            angle = rng.uniform(0, 2 * math.pi)
            reach = rng.uniform(0.3, 0.75) * 0.5 * leaf.length
            leaf.x = x + shift[0] + reach * math.cos(angle)
            leaf.y = y + shift[1] + reach * math.sin(angle)
            if clear(leaf):
                specs.append(leaf)
        area_ratio = layer_w * layer_h / float(cfg.width * cfg.height)
        n_free = int(round(int(rng.integers(cfg.n_front_leaves[0], cfg.n_front_leaves[1] + 1))
                           * area_ratio))
        for _ in range(n_free):
            for _attempt in range(5):
                leaf = random_leaf(rng, cfg, focal, rng.uniform(lox, lox + layer_w),
                                   rng.uniform(loy, loy + layer_h))
                if clear(leaf):
                    specs.append(leaf)
                    break
        if first_id + len(specs) > _MAX_TRACK_ID:
            raise ValueError(f'world has {first_id + len(specs)} objects; track IDs must fit '
                             'uint16: use fewer apples/leaves or a shorter pan')
        # Interleave occluding and free leaves in a seeded order so either kind can be on top.
        order = rng.permutation(len(specs))
        leaves = []
        for rank, spec_index in enumerate(order):
            leaf = specs[int(spec_index)]
            leaf_id = first_id + rank
            draw_leaf(leaf, leaf_id, self._leaf_rgb, self._leaf_ids, self._leaf_depth,
                      (lox, loy))
            x0, y0, x1, y1 = leaf.bounds()
            bounds = (max(0, int(x0) - lox), max(0, int(y0) - loy),
                      min(layer_w, int(math.ceil(x1)) - lox + 1),
                      min(layer_h, int(math.ceil(y1)) - loy + 1))
            info = TrackInfo(leaf_id, 'leaf', 'leaf', (), ('leaf',), distance_m=leaf.distance_m)
            leaves.append((leaf_id, info, bounds))
        return leaves

    # ------------------------------------------------------------------ frames
    def __len__(self) -> int:
        """Return the number of frames."""
        return self.n_frames

    def __iter__(self) -> Iterator[Scene]:
        """Yield the frames in order."""
        for index in range(self.n_frames):
            yield self.render(index)

    def __getitem__(self, index: int) -> Scene:
        """Return frame ``index`` (negative indices count from the end)."""
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool) and index < 0:
            index += self.n_frames
        return self.render(index)

    def render(self, index: int, draw_apples: bool = True, draw_leaves: bool = True) -> Scene:
        """Render frame ``index``; the flags leave out layers (for ground-truth checks)."""
        index = _check_int('frame index', index, 0, self.n_frames - 1)
        cfg = self.config
        height, width = cfg.height, cfg.width
        bx, by = self._bg_offsets[index]
        image = self._background.rgb[by:by + height, bx:bx + width].copy()
        depth = self._background.depth_mm[by:by + height, bx:bx + width].copy()
        labels = np.zeros((height, width), dtype=np.uint16)
        trunk_crop = None
        if self._trunk_info is not None:
            trunk_crop = self._background.trunk_mask[by:by + height, bx:bx + width]
            labels[trunk_crop] = self._trunk_info.track_id

        placed = []
        if draw_apples:
            for i in self._draw_order:
                apple = self._apples[i]
                x, y = self._apple_centre(apple, index)
                sprite = apple.sprite
                size = sprite.mask.shape[0]
                x0 = int(round(x)) - sprite.half
                y0 = int(round(y)) - sprite.half
                fx0, fy0 = max(x0, 0), max(y0, 0)
                fx1, fy1 = min(x0 + size, width), min(y0 + size, height)
                if fx0 >= fx1 or fy0 >= fy1:
                    continue
                window = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
                region = (slice(fy0, fy1), slice(fx0, fx1))
                sub = sprite.mask[window]
                sub_u8 = sub.view(np.uint8)
                # cv2.copyTo writes through the ROI views; far faster than boolean indexing.
                cv2.copyTo(sprite.rgb[window], sub_u8, image[region])
                cv2.copyTo(sprite.depth_mm[window], sub_u8, depth[region])
                labels[region][sub] = apple.info.track_id
                placed.append((apple.info, region, sub))

        leaf_window = None
        if draw_leaves and self._leaves:
            lx, ly = self._leaf_offsets[index]
            leaf_window = (lx, ly)
            ids = self._leaf_ids[ly:ly + height, lx:lx + width]
            covered = (ids > 0).view(np.uint8)
            cv2.copyTo(self._leaf_rgb[ly:ly + height, lx:lx + width], covered, image)
            cv2.copyTo(self._leaf_depth[ly:ly + height, lx:lx + width], covered, depth)
            cv2.copyTo(ids, covered, labels)

        instances: List[GroundTruthInstance] = []
        for info, region, sub in sorted(placed, key=lambda item: item[0].track_id):
            visible = labels[region] == info.track_id
            instance = _instance(info, visible, region, (height, width), amodal=sub)
            if instance is not None:
                instances.append(instance)
        if leaf_window is not None:
            lx, ly = leaf_window
            for leaf_id, info, (x0, y0, x1, y1) in self._leaves:
                x0, x1 = max(x0, lx), min(x1, lx + width)
                y0, y1 = max(y0, ly), min(y1, ly + height)
                if x0 >= x1 or y0 >= y1:
                    continue
                region = (slice(y0 - ly, y1 - ly), slice(x0 - lx, x1 - lx))
                instance = _instance(info, labels[region] == leaf_id, region, (height, width))
                if instance is not None:
                    instances.append(instance)
        if trunk_crop is not None:
            full = (slice(0, height), slice(0, width))
            instance = _instance(self._trunk_info, labels == self._trunk_info.track_id, full,
                                 (height, width), amodal=trunk_crop)
            if instance is not None:
                instances.append(instance)

        present = {phrase for inst in instances for phrase in inst.phrases}
        return Scene(image=image, depth_mm=depth, labels=labels, instances=instances,
                     camera=self.camera, index=index, seed=self.seed,
                     pan_px=(self.pan_speed[0] * index, self.pan_speed[1] * index),
                     absent_phrases=tuple(p for p in NOUN_PHRASES if p not in present))


def _instance(info: TrackInfo, visible: np.ndarray, region: Tuple[slice, slice],
              shape: Tuple[int, int],
              amodal: Optional[np.ndarray] = None) -> Optional[GroundTruthInstance]:
    """Build an instance from a visible sub-mask at ``region``; None when nothing is visible."""
    if not visible.any():
        return None
    return GroundTruthInstance(info, visible, region, shape, amodal)


def ping_pong_index(tick: int, n_frames: int) -> int:
    """Return the frame for ``tick`` of an endless stream that plays a video back and forth.

    The camera pans forward, then back, so an endless camera never jumps between frames.
    """
    if n_frames < 1 or tick < 0:
        raise ValueError(f'need n_frames >= 1 and tick >= 0, got {n_frames}, {tick}')
    if n_frames == 1:
        return 0
    phase = tick % (2 * n_frames - 2)
    return phase if phase < n_frames else 2 * n_frames - 2 - phase


def generate_scene(seed: int, config: Optional[OrchardSceneConfig] = None) -> Scene:
    """Return one seeded orchard image with ground truth (a one-frame world, no pan, no sway)."""
    return OrchardVideo(seed, config, n_frames=1, pan_speed=0.0, sway_px=0.0).render(0)
