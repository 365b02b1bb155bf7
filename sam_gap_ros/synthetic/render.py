"""Drawing primitives of the orchard generator: background, trunk, apple sprites, front leaves.

Everything here is drawn once per world (video or scene); per-frame work only crops and
pastes these precomputed layers (see ``video.py``). All functions take an explicit
``numpy.random.Generator`` so a seed fully determines the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import List, Optional, Tuple

import cv2
import numpy as np

from sam_gap_ros.synthetic.config import OrchardSceneConfig

# Base RGB colours of the apple classes (before shading and per-apple jitter).
_APPLE_BASE = {
    'red': (182.0, 28.0, 32.0),
    'green': (128.0, 182.0, 52.0),
    'yellow': (228.0, 196.0, 58.0),
}
# Secondary colour blended into part of each apple's surface (at most _BLUSH_MAX).
_APPLE_BLUSH = {
    'red': (196.0, 70.0, 28.0),
    'green': (160.0, 190.0, 60.0),
    'yellow': (214.0, 150.0, 50.0),
}
_BLUSH_MAX = 0.45
_DAMAGE_RGB = (72.0, 46.0, 26.0)
_BARK_RGB = (98.0, 68.0, 44.0)
_SKY_RGB = (150.0, 192.0, 236.0)
_FOLIAGE_DARK = (22.0, 52.0, 18.0)
_FOLIAGE_LIGHT = (84.0, 128.0, 44.0)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Return a ``float32`` ``(height, width)`` field in [0, 1] varying over ``cell`` pixels."""
    grid_h = max(2, int(math.ceil(height / max(cell, 1.0))) + 1)
    grid_w = max(2, int(math.ceil(width / max(cell, 1.0))) + 1)
    grid = rng.random((grid_h, grid_w), dtype=np.float32)
    field = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(field, 0.0, 1.0)


@dataclass
class BackgroundLayer:
    """Far layer: foliage, sky and (optionally) the trunk with its branches."""

    rgb: np.ndarray
    """``uint8 (H, W, 3)``."""
    depth_mm: np.ndarray
    """``uint16 (H, W)``; 0 on sky (no depth return)."""
    trunk_mask: Optional[np.ndarray]
    """Boolean ``(H, W)`` wood mask (trunk + branches), None when the world has no trunk."""


def render_background(rng: np.random.Generator, height: int, width: int,
                      config: OrchardSceneConfig, focal: float, with_trunk: bool,
                      trunk_x_range: Tuple[float, float]) -> BackgroundLayer:
    """Draw foliage, sky patches and optionally a trunk into a ``height x width`` layer."""
    scale = config.width / 640.0
    coarse = smooth_noise(rng, height, width, 64.0 * scale)
    medium = smooth_noise(rng, height, width, 16.0 * scale)
    fine = smooth_noise(rng, height, width, 4.0 * scale)
    shade = 0.55 * coarse + 0.3 * medium + 0.15 * fine
    dark = np.asarray(_FOLIAGE_DARK, np.float32)
    light = np.asarray(_FOLIAGE_LIGHT, np.float32)
    rgb = dark + shade[..., None] * (light - dark)

    sky = np.zeros((height, width), dtype=bool)
    if config.sky_fraction > 0:
        rows = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None]
        score = smooth_noise(rng, height, width, 96.0 * scale) + 0.8 * rows
        fraction = float(np.clip(config.sky_fraction * rng.uniform(0.4, 1.6), 0.0, 0.9))
        if fraction > 0:
            sky = score > np.quantile(score, 1.0 - fraction)
        tint = 30.0 * rows[..., None] + 12.0 * fine[..., None] - 6.0
        sky_rgb = np.asarray(_SKY_RGB, np.float32) + tint
        rgb = np.where(sky[..., None], sky_rgb, rgb)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)

    # Background leaves: small ellipses; most avoid the sky so patches stay open.
    foliage = np.zeros((height, width), dtype=np.uint8)
    n_leaves = int(height * width / (170.0 * scale * scale))
    _draw_background_leaves(rng, rgb, foliage, sky, n_leaves, scale)
    sky &= foliage == 0

    trunk_mask = None
    depth_m = config.background_distance_m[0] + shade * (
        config.background_distance_m[1] - config.background_distance_m[0])
    if with_trunk:
        trunk_mask, trunk_depth_m = _draw_trunk(rng, rgb, config, focal, scale, trunk_x_range)
        # A few background leaves in front of the branches make them disappear into the
        # canopy; they are removed from the wood mask so the mask stays what is visible.
        cover = np.zeros((height, width), dtype=np.uint8)
        _draw_background_leaves(rng, rgb, cover, np.zeros_like(sky), n_leaves // 8, scale)
        trunk_mask &= cover == 0
        sky &= ~trunk_mask & (cover == 0)
        depth_m = np.where(trunk_mask, trunk_depth_m, depth_m)
        wood_pixels = rgb[trunk_mask]
    rgb = cv2.GaussianBlur(rgb, (3, 3), 0)
    if trunk_mask is not None:
        # Keep the wood sharp-edged so its mask matches its pixels; only the foliage is blurred.
        rgb[trunk_mask] = wood_pixels
    depth_mm = np.where(sky, 0.0, np.round(depth_m * 1000.0)).astype(np.uint16)
    return BackgroundLayer(rgb=rgb, depth_mm=depth_mm, trunk_mask=trunk_mask)


def _draw_background_leaves(rng: np.random.Generator, rgb: np.ndarray, coverage: np.ndarray,
                            avoid: np.ndarray, count: int, scale: float) -> None:
    height, width = coverage.shape
    if count <= 0:
        return
    xs = rng.uniform(0, width, count)
    ys = rng.uniform(0, height, count)
    major = rng.uniform(5.0, 12.0, count) * scale
    minor = major * rng.uniform(0.3, 0.5, count)
    angles = rng.uniform(0, 180, count)
    tone = rng.uniform(0.0, 1.0, count)
    keep = rng.random(count)
    dark = np.asarray(_FOLIAGE_DARK)
    light = np.asarray(_FOLIAGE_LIGHT) * 1.15
    for i in range(count):
        x, y = int(xs[i]), int(ys[i])
        if avoid[min(y, height - 1), min(x, width - 1)] and keep[i] < 0.8:
            continue
        colour = tuple(float(c) for c in dark + tone[i] * (light - dark))
        axes = (max(1, int(major[i])), max(1, int(minor[i])))
        cv2.ellipse(rgb, (x, y), axes, float(angles[i]), 0, 360, colour, -1)
        cv2.ellipse(coverage, (x, y), axes, float(angles[i]), 0, 360, 1, -1)


def _draw_trunk(rng: np.random.Generator, rgb: np.ndarray, config: OrchardSceneConfig,
                focal: float, scale: float,
                x_range: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """Draw a textured trunk with branches; return its mask and per-pixel depth in metres."""
    height, width = rgb.shape[:2]
    diameter_m = rng.uniform(*config.trunk_diameter_m)
    half_w = 0.5 * focal * diameter_m / config.trunk_distance_m
    x0 = rng.uniform(*x_range)
    top = rng.uniform(0.05, 0.4) * height
    bend = rng.uniform(-1.0, 1.0) * half_w
    phase = rng.uniform(0, 2 * math.pi)
    ys = np.linspace(top, height + 2, 24)
    progress = (ys - top) / max(height - top, 1.0)
    centre = x0 + bend * np.sin(progress * math.pi + phase)
    widths = half_w * (0.8 + 0.45 * progress)
    left = np.stack([centre - widths, ys], axis=1)
    right = np.stack([centre + widths, ys], axis=1)[::-1]
    polygon = np.round(np.concatenate([left, right])).astype(np.int32)
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [polygon], 1)
    for _ in range(int(rng.integers(2, 5))):
        start_t = rng.uniform(0.0, 0.45)
        sy = top + start_t * (height - top)
        sx = float(np.interp(sy, ys, centre))
        side = 1.0 if rng.random() < 0.5 else -1.0
        angle = math.radians(rng.uniform(15, 60))
        length = rng.uniform(0.15, 0.35) * config.width
        thickness = half_w * rng.uniform(0.5, 0.8)
        point = (sx, sy)
        for segment in range(3):
            angle_s = angle + rng.uniform(-0.25, 0.25)
            nxt = (point[0] + side * math.cos(angle_s) * length / 3,
                   point[1] - math.sin(angle_s) * length / 3)
            cv2.line(mask, (int(point[0]), int(point[1])), (int(nxt[0]), int(nxt[1])), 1,
                     max(1, int(round(thickness * (1.0 - 0.3 * segment)))), cv2.LINE_8)
            point = nxt
    wood = mask.astype(bool)
    # Bark: vertical streaks, darker towards the edges (distance to the silhouette).
    streaks = cv2.resize(
        rng.random((max(2, height // int(max(3, 6 * scale))), max(2, int(width / (3 * scale)))),
                   dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    roundness = np.clip(dist / max(half_w, 1.0), 0.0, 1.0)
    shading = 0.45 + 0.55 * np.sqrt(roundness)
    bark = np.asarray(_BARK_RGB, np.float32) * (0.7 + 0.6 * streaks)[..., None]
    bark *= shading[..., None]
    rgb[wood] = np.clip(bark[wood], 0, 255).astype(np.uint8)
    depth = config.trunk_distance_m - 0.5 * diameter_m * roundness
    return wood, depth


@dataclass
class AppleSprite:
    """A pre-rendered apple: colour, silhouette and depth in a small square patch."""

    rgb: np.ndarray
    mask: np.ndarray
    depth_mm: np.ndarray
    half: int
    """Offset of the apple centre from the patch's top-left corner (both axes)."""


def render_apple(rng: np.random.Generator, radius_px: float, colour: str, damaged: bool,
                 distance_m: float, radius_m: float,
                 light: Tuple[float, float, float]) -> AppleSprite:
    """Render one shaded apple (optionally with damage blotches) as a sprite."""
    aspect = rng.uniform(1.0, 1.1)
    lobes = rng.uniform(0.0, 0.04), rng.uniform(0.0, 0.025)
    phases = rng.uniform(0, 2 * math.pi, 2)
    half = int(math.ceil(radius_px * aspect * 1.08)) + 1
    coords = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = np.meshgrid(coords, coords, indexing='ij')
    ux = dx / aspect
    rho = np.sqrt(ux * ux + dy * dy)
    theta = np.arctan2(dy, ux)
    edge = radius_px * (1.0 + lobes[0] * np.cos(2 * theta + phases[0])
                        + lobes[1] * np.cos(3 * theta + phases[1]))
    mask = rho <= edge
    mask[half, half] = True
    rel = np.clip(rho / edge, 0.0, 1.0)
    nz = np.sqrt(1.0 - rel * rel)
    safe = np.maximum(rho, 1e-6)
    nx = ux / safe * rel
    ny = dy / safe * rel
    lx, ly, lz = light
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0.0, 1.0)
    hx, hy, hz = lx, ly, lz + 1.0
    norm = math.sqrt(hx * hx + hy * hy + hz * hz)
    spec = np.clip((nx * hx + ny * hy + nz * hz) / norm, 0.0, 1.0) ** 24

    jitter = rng.uniform(0.88, 1.08) * np.asarray(_APPLE_BASE[colour], np.float32)
    jitter += rng.uniform(-8, 8, 3).astype(np.float32)
    blush_dir = rng.uniform(0, 2 * math.pi)
    blush = _BLUSH_MAX * np.clip(nx * math.cos(blush_dir) + ny * math.sin(blush_dir), 0, 1)
    base = jitter + blush[..., None] * (np.asarray(_APPLE_BLUSH[colour], np.float32) - jitter)
    # Lenticels: sparse light dots on the skin.
    dots = (rng.random(mask.shape) < 0.03)[..., None] * 18.0
    colour_f = base * (0.32 + 0.78 * diffuse)[..., None] + dots

    if damaged:
        for _ in range(int(rng.integers(1, 4))):
            angle = rng.uniform(0, 2 * math.pi)
            offset = rng.uniform(0.0, 0.55) * radius_px
            bx = offset * math.cos(angle)
            by = offset * math.sin(angle)
            ra = rng.uniform(0.18, 0.38) * radius_px + 0.6
            rb = ra * rng.uniform(0.6, 1.0)
            rot = rng.uniform(0, math.pi)
            cx = (dx - bx) * math.cos(rot) + (dy - by) * math.sin(rot)
            cy = -(dx - bx) * math.sin(rot) + (dy - by) * math.cos(rot)
            blotch = (cx / ra) ** 2 + (cy / rb) ** 2 <= 1.0
            spot = np.asarray(_DAMAGE_RGB, np.float32) * (0.6 + 0.5 * diffuse)[..., None]
            colour_f = np.where(blotch[..., None], spot, colour_f)
    colour_f = colour_f + (255.0 * 0.55) * spec[..., None]
    rgb = np.clip(colour_f, 0, 255).astype(np.uint8)
    rgb[~mask] = 0
    depth = np.round((distance_m - radius_m * nz) * 1000.0).astype(np.uint16)
    depth[~mask] = 0
    return AppleSprite(rgb=rgb, mask=mask, depth_mm=depth, half=half)


@dataclass
class LeafSpec:
    """A front leaf in leaf-layer coordinates."""

    x: float
    y: float
    length: float
    width_ratio: float
    angle: float
    bend: float
    rgb: Tuple[float, float, float]
    distance_m: float

    def polygon(self) -> Tuple[np.ndarray, np.ndarray]:
        """Return the integer outline and the midrib polyline of the leaf."""
        u = np.linspace(0.0, math.pi, 14)
        along = 0.5 * self.length * np.cos(u)
        across = 0.5 * self.length * self.width_ratio * np.sin(u) ** 0.8
        curve = self.bend * self.length * (1.0 - (along / (0.5 * self.length)) ** 2)
        upper = np.stack([along, curve + across], axis=1)
        lower = np.stack([along, curve - across], axis=1)[::-1]
        mid = np.stack([along, curve], axis=1)
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        rot = np.asarray([[cos_a, -sin_a], [sin_a, cos_a]])
        outline = np.concatenate([upper, lower]) @ rot.T + (self.x, self.y)
        midrib = mid @ rot.T + (self.x, self.y)
        return np.round(outline).astype(np.int32), np.round(midrib).astype(np.int32)

    def bounds(self) -> Tuple[float, float, float, float]:
        """Return a conservative ``(x0, y0, x1, y1)`` box of the leaf."""
        reach = 0.5 * self.length + abs(self.bend) * self.length + 2
        return (self.x - reach, self.y - reach, self.x + reach, self.y + reach)


def draw_leaf(leaf: LeafSpec, leaf_id: int, rgb: np.ndarray, ids: np.ndarray,
              depth_mm: np.ndarray, origin: Tuple[int, int]) -> None:
    """Draw a two-tone leaf with a midrib into the leaf layer (later leaves on top)."""
    outline, midrib = leaf.polygon()
    outline = outline - np.asarray(origin, np.int32)
    midrib = midrib - np.asarray(origin, np.int32)
    colour = np.asarray(leaf.rgb)
    cv2.fillPoly(ids, [outline], int(leaf_id))
    cv2.fillPoly(depth_mm, [outline], int(round(leaf.distance_m * 1000.0)))
    cv2.fillPoly(rgb, [outline], tuple(float(c) for c in colour))
    # The darker half: the outline's second half plus the midrib closes it.
    n = len(outline) // 2
    shadow = np.concatenate([outline[n:], midrib])
    cv2.fillPoly(rgb, [shadow], tuple(float(c) for c in colour * 0.78))
    # The midrib may spill a pixel past the tips; compositing copies only pixels with a leaf id.
    thickness = max(1, int(round(leaf.length / 45.0)))
    cv2.polylines(rgb, [midrib], False, tuple(float(min(255.0, c * 1.3)) for c in colour),
                  thickness)


def random_leaf(rng: np.random.Generator, config: OrchardSceneConfig, focal: float,
                x: float, y: float) -> LeafSpec:
    """Return a front leaf centred at ``(x, y)`` sized by its distance."""
    distance = rng.uniform(*config.leaf_distance_m)
    length = focal * rng.uniform(*config.leaf_length_m) / distance
    green = np.asarray((60.0, 130.0, 40.0)) * rng.uniform(0.75, 1.3)
    green += rng.uniform(-12, 12, 3)
    rgb = tuple(float(c) for c in np.clip(green, 0, 255))
    return LeafSpec(x=float(x), y=float(y), length=float(length),
                    width_ratio=float(rng.uniform(0.35, 0.5)),
                    angle=float(rng.uniform(0, 2 * math.pi)), bend=float(rng.uniform(-0.08, 0.08)),
                    rgb=rgb, distance_m=float(distance))


def leaf_layer_arrays(height: int, width: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return empty ``(rgb, ids, depth_mm)`` arrays of a leaf layer."""
    return (np.zeros((height, width, 3), np.uint8), np.zeros((height, width), np.uint16),
            np.zeros((height, width), np.uint16))


def light_direction(rng: np.random.Generator) -> Tuple[float, float, float]:
    """Return a unit light direction from the upper half (sun through the canopy)."""
    azimuth = rng.uniform(-math.pi, 0.0)
    elevation = rng.uniform(0.5, 1.0)
    vec = np.asarray([math.cos(azimuth) * math.cos(elevation),
                      math.sin(azimuth) * math.cos(elevation), math.sin(elevation)])
    vec /= np.linalg.norm(vec)
    return float(vec[0]), float(vec[1]), float(vec[2])


__all__: List[str] = ['AppleSprite', 'BackgroundLayer', 'LeafSpec', 'draw_leaf',
                      'leaf_layer_arrays', 'light_direction', 'random_leaf', 'render_apple',
                      'render_background', 'smooth_noise']
