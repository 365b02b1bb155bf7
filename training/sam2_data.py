"""Video clips and ground-truth-derived prompts for SAM2 fine-tuning.

A :class:`VideoClip` is ``T`` RGB frames with ``K`` per-frame boolean instance masks that
keep their track identity across frames. Whole videos are kept as a :class:`LabelledVideo`
(frames plus one ``uint16`` track-ID image per frame, 5 bytes a pixel) and training clips are
cut from them with their masks built on demand: a boolean mask per object and frame would
cost ``K`` bytes a pixel for the whole video. Videos come from the synthetic orchard
generator (``data: synthetic``) or from a video dataset folder written by
``python -m sam_gap_ros.synthetic.cli video``.

Prompts imitate a human annotator on the first frame of a clip: positive/negative clicks,
a jittered box, or the full mask. They are turned into model inputs by the transformers
processor exactly as at inference (``add_inputs_to_inference_session``), so training and
the :class:`~sam_gap_ros.engines.sam2_tracker.Sam2Tracker` see identical prompt encodings.
"""

from __future__ import annotations

from dataclasses import dataclass
import functools
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from sam_gap_ros.mask_ops import mask_to_box

PathLike = Union[str, Path]
PROMPT_KINDS = ('points', 'box', 'mask')


@dataclass
class VideoClip:
    """``T`` frames with ``K`` tracked instance masks per frame."""

    frames: np.ndarray
    """RGB ``uint8`` ``(T, H, W, 3)``."""
    masks: np.ndarray
    """Boolean ``(T, K, H, W)``; an all-False slice means the object is absent there."""
    track_ids: List[int]
    name: str = ''

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f'frames must be uint8 (T, H, W, 3), got {self.frames.dtype} '
                             f'{self.frames.shape}')
        t, h, w = self.frames.shape[:3]
        if self.masks.dtype != bool or self.masks.ndim != 4 or self.masks.shape[0] != t \
                or self.masks.shape[2:] != (h, w):
            raise ValueError(f'masks must be bool (T={t}, K, {h}, {w}), got {self.masks.dtype} '
                             f'{self.masks.shape}')
        if len(self.track_ids) != self.masks.shape[1]:
            raise ValueError(f'{len(self.track_ids)} track ids for {self.masks.shape[1]} masks')

    @property
    def num_frames(self) -> int:
        """Return ``T``."""
        return int(self.frames.shape[0])

    @property
    def num_objects(self) -> int:
        """Return ``K``."""
        return int(self.masks.shape[1])

    @property
    def size(self) -> Tuple[int, int]:
        """Return ``(H, W)``."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @functools.cached_property
    def object_areas(self) -> np.ndarray:
        """Return the ``(T, K)`` pixel count of every object on every frame."""
        return self.masks.reshape(self.num_frames, self.num_objects, -1).sum(2)

    def subclip(self, frame_index: Sequence[int], objects: Sequence[int],
                name: str = '') -> VideoClip:
        """Return the clip of the given frames (in order) and objects (by position)."""
        index = np.asarray(frame_index, dtype=int)
        objects = np.asarray(objects, dtype=int)
        return VideoClip(self.frames[index], self.masks[index][:, objects],
                         [self.track_ids[i] for i in objects], name)


class LabelledVideo:
    """A whole video: RGB frames and a track-ID image per frame (masks made per clip).

    ``labels`` is ``(T, H, W)`` with each pixel's track ID (0 = background; IDs of tracks
    not in ``track_ids`` are ignored). Clips cut with :meth:`subclip` are the same
    :class:`VideoClip` a full ``(T, K, H, W)`` boolean mask stack would give.
    """

    def __init__(self, frames: np.ndarray, labels: np.ndarray, track_ids: Sequence[int],
                 name: str = '') -> None:
        frames = np.asarray(frames)
        labels = np.asarray(labels)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f'{name}: frames must be uint8 (T, H, W, 3), got {frames.dtype} '
                             f'{frames.shape}')
        if labels.shape != frames.shape[:3] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f'{name}: labels must be integer (T, H, W) = {frames.shape[:3]}, '
                             f'got {labels.dtype} {labels.shape}')
        ids = np.asarray([int(t) for t in track_ids], dtype=np.int64)
        if ids.size and (ids.min() < 1 or ids.max() > np.iinfo(np.uint16).max):
            raise ValueError(f'{name}: track IDs must be in 1..65535, got {ids.tolist()}')
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
            raise ValueError(f'{name}: labels must be in 0..65535')
        self.frames = frames
        self.labels = labels.astype(np.uint16, copy=False)
        self.track_ids = [int(t) for t in ids]
        self.name = name
        # Per frame and object pixel counts, all the clip sampler needs besides the masks.
        counts = [np.bincount(frame.ravel(), minlength=int(ids.max(initial=0)) + 1)
                  for frame in self.labels]
        self.object_areas = np.stack([c[ids] for c in counts]).astype(np.int64) \
            if len(counts) else np.zeros((0, ids.size), dtype=np.int64)

    @property
    def num_frames(self) -> int:
        """Return ``T``."""
        return int(self.frames.shape[0])

    @property
    def num_objects(self) -> int:
        """Return ``K``."""
        return len(self.track_ids)

    @property
    def size(self) -> Tuple[int, int]:
        """Return ``(H, W)``."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def masks(self) -> np.ndarray:
        """Return the full boolean ``(T, K, H, W)`` mask stack (built now: K bytes/pixel)."""
        return self._masks(np.arange(self.num_frames), np.arange(self.num_objects))

    def _masks(self, index: np.ndarray, objects: np.ndarray) -> np.ndarray:
        ids = np.asarray(self.track_ids, dtype=np.uint16)[objects]
        return self.labels[index][:, None] == ids[None, :, None, None]

    def subclip(self, frame_index: Sequence[int], objects: Sequence[int],
                name: str = '') -> VideoClip:
        """Return the clip of the given frames (in order) and objects (by position)."""
        index = np.asarray(frame_index, dtype=int)
        objects = np.asarray(objects, dtype=int)
        return VideoClip(self.frames[index], self._masks(index, objects),
                         [self.track_ids[i] for i in objects], name)


Video = Union[VideoClip, LabelledVideo]
"""Anything clips can be cut from."""


@dataclass
class ObjectPrompt:
    """The first-frame prompt for one object, in pixel coordinates of the original frame."""

    kind: str
    """'points', 'box' or 'mask'."""
    points: Optional[np.ndarray] = None
    """``(P, 2)`` float ``(x, y)`` clicks for kind 'points'."""
    labels: Optional[np.ndarray] = None
    """``(P,)`` int, 1 = foreground click, 0 = background click."""
    box: Optional[np.ndarray] = None
    """``(4,)`` float ``(x0, y0, x1, y1)`` for kind 'box'."""
    mask: Optional[np.ndarray] = None
    """Boolean ``(H, W)`` for kind 'mask'."""

    @property
    def num_prompts(self) -> int:
        """Return the annotation effort: clicks, or 1 for a box or a mask."""
        return int(len(self.points)) if self.kind == 'points' else 1


# ----------------------------------------------------------------------------- prompts


def sample_click(mask: np.ndarray, rng: np.random.Generator) -> Tuple[float, float]:
    """Return a uniformly random ``(x, y)`` pixel centre inside a non-empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError('cannot click inside an empty mask')
    index = int(rng.integers(xs.size))
    return float(xs[index]) + 0.5, float(ys[index]) + 0.5


def center_click(mask: np.ndarray) -> Tuple[float, float]:
    """Return the mask pixel farthest from the mask border (a human's 'middle' click)."""
    if not mask.any():
        raise ValueError('cannot click inside an empty mask')
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x) + 0.5, float(y) + 0.5


def negative_click(mask: np.ndarray, rng: np.random.Generator,
                   margin: int = 8) -> Optional[Tuple[float, float]]:
    """Return a background click near the object (inside its box grown by ``margin``)."""
    box = mask_to_box(mask)
    if box is None:
        return None
    h, w = mask.shape
    x0, y0 = max(0, int(box[0]) - margin), max(0, int(box[1]) - margin)
    x1, y1 = min(w, int(box[2]) + margin), min(h, int(box[3]) + margin)
    ys, xs = np.nonzero(~mask[y0:y1, x0:x1])
    if xs.size == 0:
        return None
    index = int(rng.integers(xs.size))
    return float(xs[index] + x0) + 0.5, float(ys[index] + y0) + 0.5


def jitter_box(box: Sequence[float], rng: np.random.Generator, size: Tuple[int, int],
               noise: float = 0.1, max_pixels: float = 20.0) -> np.ndarray:
    """Return ``box`` with each side moved by N(0, noise * side) clipped to ``max_pixels``.

    This is the box noise of the official SAM/SAM2 training: annotators' boxes are loose
    or tight by a fraction of the object size. The box stays inside the image and valid.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = size
    scale = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0]) * noise
    delta = np.clip(rng.normal(0.0, 1.0, 4) * scale, -max_pixels, max_pixels)
    out = np.array([x0, y0, x1, y1]) + delta
    out[[0, 2]] = np.clip(out[[0, 2]], 0, w)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, h)
    if out[2] - out[0] < 1:
        out[0], out[2] = x0, x1
    if out[3] - out[1] < 1:
        out[1], out[3] = y0, y1
    return out.astype(np.float32)


def sample_prompt(mask: np.ndarray, rng: np.random.Generator,
                  cfg: Mapping[str, Any]) -> ObjectPrompt:
    """Sample one object's prompt from its ground-truth mask.

    ``cfg``: ``probabilities`` ({points, box, mask} weights), ``num_positive``,
    ``max_negative`` (0..max background clicks), ``box_noise``, ``box_noise_max_px``.
    """
    if not mask.any():
        raise ValueError('cannot prompt an object that is absent from the prompt frame')
    probs = dict(cfg.get('probabilities', {'points': 0.5, 'box': 0.5}))
    unknown = set(probs) - set(PROMPT_KINDS)
    if unknown:
        raise ValueError(f'unknown prompt kinds {sorted(unknown)}: use {PROMPT_KINDS}')
    kinds = [k for k in PROMPT_KINDS if probs.get(k, 0) > 0]
    if not kinds:
        raise ValueError('prompt probabilities are all zero')
    weights = np.array([float(probs[k]) for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind == 'box':
        box = jitter_box(mask_to_box(mask), rng, mask.shape, float(cfg.get('box_noise', 0.1)),
                         float(cfg.get('box_noise_max_px', 20.0)))
        return ObjectPrompt('box', box=box)
    if kind == 'mask':
        return ObjectPrompt('mask', mask=mask.copy())
    points = [sample_click(mask, rng) for _ in range(int(cfg.get('num_positive', 1)))]
    labels = [1] * len(points)
    for _ in range(int(rng.integers(int(cfg.get('max_negative', 1)) + 1))):
        neg = negative_click(mask, rng)
        if neg is not None:
            points.append(neg)
            labels.append(0)
    return ObjectPrompt('points', points=np.asarray(points, dtype=np.float32),
                        labels=np.asarray(labels, dtype=np.int64))


def human_prompt(mask: np.ndarray, kind: str) -> ObjectPrompt:
    """Return the deterministic prompt a careful annotator gives: tight box or centre click."""
    if kind == 'box':
        box = mask_to_box(mask)
        if box is None:
            raise ValueError('cannot box an empty mask')
        return ObjectPrompt('box', box=np.asarray(box, dtype=np.float32))
    if kind == 'points':
        return ObjectPrompt('points', points=np.asarray([center_click(mask)], dtype=np.float32),
                            labels=np.ones(1, dtype=np.int64))
    if kind == 'mask':
        return ObjectPrompt('mask', mask=mask.copy())
    raise ValueError(f"unknown prompt kind '{kind}': use {PROMPT_KINDS}")


def add_prompts_to_session(processor: Any, session: Any, frame_index: int,
                           object_ids: Sequence[int], prompts: Sequence[ObjectPrompt],
                           original_size: Tuple[int, int]) -> None:
    """Encode prompts into a ``Sam2VideoInferenceSession`` with the transformers processor.

    Objects sharing a prompt kind go into one call (how the tracker adds them), so the
    session's 'objects with new inputs' list covers all of them.
    """
    if len(object_ids) != len(prompts):
        raise ValueError(f'{len(object_ids)} object ids for {len(prompts)} prompts')
    for kind in PROMPT_KINDS:
        chosen = [(oid, p) for oid, p in zip(object_ids, prompts, strict=True)
                  if p.kind == kind]
        if not chosen:
            continue
        ids = [int(oid) for oid, _ in chosen]
        if kind == 'mask':
            processor.add_inputs_to_inference_session(
                session, frame_idx=frame_index, obj_ids=ids,
                input_masks=[p.mask for _, p in chosen], original_size=original_size)
        elif kind == 'box':
            processor.add_inputs_to_inference_session(
                session, frame_idx=frame_index, obj_ids=ids,
                input_boxes=[[p.box.tolist() for _, p in chosen]], original_size=original_size)
        else:
            # Pad click lists to one length with the processor's pad label so they batch.
            longest = max(len(p.points) for _, p in chosen)
            pad = processor.point_pad_value
            points = [[pt.tolist() for pt in p.points] + [[pad, pad]] * (longest - len(p.points))
                      for _, p in chosen]
            labels = [p.labels.tolist() + [pad] * (longest - len(p.points)) for _, p in chosen]
            processor.add_inputs_to_inference_session(
                session, frame_idx=frame_index, obj_ids=ids, input_points=[points],
                input_labels=[labels], original_size=original_size)
    # The processor marks only the last call's objects as new; all of them are new here.
    session.obj_with_new_inputs = [int(oid) for oid in object_ids]


# ----------------------------------------------------------------------------- clip sources


def clip_from_id_masks(frames: Sequence[np.ndarray], id_masks: Sequence[np.ndarray],
                       track_ids: Optional[Sequence[int]] = None, name: str = '') -> VideoClip:
    """Build a clip from per-frame instance-id label images (0 = background)."""
    if len(frames) != len(id_masks):
        raise ValueError(f'{len(frames)} frames but {len(id_masks)} id masks')
    if track_ids is None:
        track_ids = sorted({int(v) for m in id_masks for v in np.unique(m) if v != 0})
    ids = np.asarray(track_ids, dtype=np.int64)
    stack = np.stack(id_masks).astype(np.int64)
    masks = stack[:, None, :, :] == ids[None, :, None, None]
    return VideoClip(np.stack(frames).astype(np.uint8), masks, [int(t) for t in ids], name)


def sample_subclip(video: Video, rng: np.random.Generator, num_frames: int,
                   max_objects: int, min_area: int = 16, max_stride: int = 1,
                   exit_fraction: float = 0.0, max_prompt_gap: int = 0) -> Optional[VideoClip]:
    """Return a random sub-clip, or None when no start frame shows an object.

    The sub-clip has ``num_frames`` frames ``stride`` apart (``stride`` drawn from
    ``1..max_stride``; larger strides mean more motion per step, so objects also leave the
    image within a short clip and the presence head sees absent targets) and up to
    ``max_objects`` objects visible (>= ``min_area`` pixels) on its first frame.

    ``max_prompt_gap`` > ``stride`` draws the gap between the first (prompted) frame and
    the second from ``stride..max_prompt_gap``: at inference the prompted frame stays in
    the memory bank for the whole stream, so on a long pan its memory shows the object far
    from where it is now; short clips never show such a stale prompt, and a model trained
    only on them keeps pulling its mask back to the prompted position.

    With probability ``exit_fraction`` the clip is drawn among the starts where a visible
    object leaves the image (no pixel left) before the clip ends, and one such object is
    among the chosen: exits are otherwise rare, and without them the object-score head
    learns that a prompted object is always present (falling back to any start when the
    video has no exit).
    """
    num_frames = min(int(num_frames), video.num_frames)
    stride = 1
    if max_stride > 1 and num_frames > 1:
        # Only draw when striding is on, so stride-1 runs keep their exact data order.
        longest = (video.num_frames - 1) // (num_frames - 1)
        stride = int(rng.integers(1, max(1, min(int(max_stride), longest)) + 1))
    gap = stride
    if num_frames > 1 and max_prompt_gap > stride:
        # Likewise only drawn when asked for; the rest of the clip must still fit.
        longest_gap = video.num_frames - 1 - (num_frames - 2) * stride
        gap = int(rng.integers(stride, max(stride, min(int(max_prompt_gap), longest_gap)) + 1))
    offsets = np.asarray([0] + [gap + i * stride for i in range(num_frames - 1)], dtype=int)
    span = int(offsets[-1]) + 1
    # Only draw when exits are asked for, so runs without them keep their exact data order.
    want_exit = exit_fraction > 0 and bool(rng.random() < float(exit_fraction))
    starts = rng.permutation(video.num_frames - span + 1)
    exits = {}
    if want_exit:
        exits = {int(start): _exiting_objects(video, int(start) + offsets, min_area)
                 for start in starts}
        starts = sorted(starts, key=lambda start: not exits[int(start)].size)
    for start in starts:
        visible = np.flatnonzero(video.object_areas[start] >= min_area)
        if visible.size == 0:
            continue
        chosen = np.sort(rng.permutation(visible)[:max_objects])
        exiting = exits.get(int(start), np.zeros(0, dtype=int))
        if exiting.size and not np.isin(chosen, exiting).any():
            chosen = np.sort(np.append(chosen[1:], rng.choice(exiting)))
        return video.subclip(int(start) + offsets, chosen, f'{video.name}@{int(start)}')
    return None


def _exiting_objects(video: Video, index: np.ndarray, min_area: int) -> np.ndarray:
    """Return the objects visible on frame ``index[0]`` with no pixel on a later one."""
    areas = video.object_areas[index]
    return np.flatnonzero((areas[0] >= min_area) & (areas[1:] == 0).any(0))


def clip_from_scenes(scenes: Sequence[Any], track_ids: Sequence[int], name: str) -> VideoClip:
    """Build a clip from synthetic ``Scene`` frames, keeping the given tracks in order."""
    frames = np.stack([scene.image for scene in scenes])
    height, width = frames.shape[1:3]
    masks = np.zeros((len(scenes), len(track_ids), height, width), dtype=bool)
    for t, scene in enumerate(scenes):
        by_id = scene.masks
        for k, track_id in enumerate(track_ids):
            if track_id in by_id:
                masks[t, k] = by_id[track_id]
    return VideoClip(frames, masks, [int(i) for i in track_ids], name)


def synthetic_videos(seed: int, num_videos: int, num_frames: int, width: int, height: int,
                     categories: Sequence[str] = ('apple',),
                     scene: Optional[Mapping[str, Any]] = None,
                     video: Optional[Mapping[str, Any]] = None) -> List[LabelledVideo]:
    """Generate ``num_videos`` seeded synthetic orchard videos in memory.

    ``scene`` holds ``OrchardSceneConfig`` overrides (lists become tuples), ``video`` the
    ``OrchardVideo`` options (``pan_speed``, ``sway_px``, ...). Only tracks of
    ``categories`` that appear in at least one frame become objects.
    """
    from sam_gap_ros.synthetic import OrchardVideo  # numpy/OpenCV only
    from sam_gap_ros.synthetic.config import scene_config_from_mapping

    config = scene_config_from_mapping(scene, width=int(width), height=int(height))
    clips = []
    for index in range(int(num_videos)):
        world = OrchardVideo(int(seed) + index, config, n_frames=int(num_frames),
                             **dict(video or {}))
        scenes = [world[t] for t in range(int(num_frames))]
        seen = sorted({inst.track_id for sc in scenes for inst in sc.instances
                       if inst.category in categories})
        # Scene.labels is the track-ID image the visible instance masks are cut from.
        clips.append(LabelledVideo(np.stack([sc.image for sc in scenes]),
                                   np.stack([sc.labels for sc in scenes]), seen,
                                   f'synthetic_{int(seed) + index}'))
    return clips


def load_video_folder(root: PathLike,
                      categories: Sequence[str] = ('apple',)) -> List[LabelledVideo]:
    """Read every video of a dataset folder written by ``sam_gap_ros.synthetic.cli video``.

    Layout: ``index.json`` (videos, tracks with categories, frames) plus per video
    ``frames/*.png`` and ``masks/*.png`` (uint16 track-ID images), read with the
    generator's own ``read_video_frame``; depth images are not needed. Tracks of other
    categories are left out.
    """
    from sam_gap_ros.synthetic import read_video_frame

    root = Path(root)
    index_path = root / 'index.json'
    if not index_path.is_file():
        raise FileNotFoundError(f"'{root}' is not a video dataset: no index.json")
    index = json.loads(index_path.read_text())
    if not isinstance(index, dict) or not isinstance(index.get('videos'), list):
        raise ValueError(f"'{index_path}' has no 'videos' list")
    clips = []
    for video in index['videos']:
        wanted = [int(t['track_id']) for t in video.get('tracks', [])
                  if t.get('category') in categories]
        frames, id_masks = [], []
        for frame_index in range(len(video['frames'])):
            rgb, labels, _depth = read_video_frame(root, video, frame_index)
            # Checked per frame, naming it: np.stack would only say 'all input arrays must
            # have the same shape' for a resized frame or a mask of another size.
            size = frames[0].shape[:2] if frames else rgb.shape[:2]
            if rgb.shape[:2] != size or labels.shape != size:
                entry = video['frames'][frame_index]
                raise ValueError(
                    f"video '{video.get('name')}' frame {frame_index}: image "
                    f"'{entry.get('image')}' is {rgb.shape[1]}x{rgb.shape[0]} and mask "
                    f"'{entry.get('mask')}' {labels.shape[1]}x{labels.shape[0]}, but every "
                    f'frame and mask of a video must be {size[1]}x{size[0]}')
            frames.append(rgb)
            id_masks.append(labels)
        clips.append(LabelledVideo(np.stack(frames), np.stack(id_masks), wanted,
                                   str(video['name'])))
    return clips


def videos_from_config(data_cfg: Mapping[str, Any], split: str) -> List[LabelledVideo]:
    """Return the videos of ``split`` ('train' or 'val') described by the ``data`` config."""
    source = data_cfg.get('source', 'synthetic')
    categories = tuple(data_cfg.get('categories', ['apple']))
    if source == 'synthetic':
        syn = data_cfg.get('synthetic', {})
        key = 'num_train_videos' if split == 'train' else 'num_val_videos'
        # Validation videos use a disjoint seed range so they are never trained on.
        seed = int(syn.get('seed', 0)) + (0 if split == 'train' else 100_000)
        return synthetic_videos(seed, int(syn.get(key, 4 if split == 'train' else 1)),
                                int(syn.get('num_frames', 8)), int(syn.get('width', 128)),
                                int(syn.get('height', 96)), categories, syn.get('scene'),
                                syn.get('video'))
    if source == 'folder':
        key = 'train_dir' if split == 'train' else 'val_dir'
        if not data_cfg.get(key):
            raise KeyError(f"data.source is 'folder' but data.{key} is not set")
        return load_video_folder(data_cfg[key], categories)
    raise ValueError(f"unknown data.source '{source}': use 'synthetic' or 'folder'")


def iterate_clips(videos: Sequence[Video], rng: np.random.Generator, num_frames: int,
                  max_objects: int, min_area: int = 16, max_stride: int = 1,
                  exit_fraction: float = 0.0, max_prompt_gap: int = 0) -> Iterator[VideoClip]:
    """Yield random training clips forever (raises if no video has a visible object).

    ``max_stride``, ``exit_fraction`` and ``max_prompt_gap``: see ``sample_subclip``.
    """
    if not videos:
        raise ValueError('no training videos')
    while True:
        for _attempt in range(10 * len(videos)):
            clip = sample_subclip(videos[int(rng.integers(len(videos)))], rng, num_frames,
                                  max_objects, min_area, max_stride, exit_fraction,
                                  max_prompt_gap)
            if clip is not None:
                yield clip
                break
        else:
            raise ValueError(f'no video has an object of >= {min_area} pixels to prompt')


def write_clip_index(path: PathLike, clips: Sequence[VideoClip]) -> None:
    """Write a small JSON listing of clips (names, sizes, track ids) for run records."""
    Path(path).write_text(json.dumps([
        {'name': c.name, 'frames': c.num_frames, 'size': list(c.size), 'track_ids': c.track_ids}
        for c in clips], indent=1))


def area_stats(videos: Sequence[Video]) -> Dict[str, float]:
    """Return simple statistics of object areas (for logging what the data looks like)."""
    areas = np.concatenate([v.object_areas.ravel() for v in videos]) if videos \
        else np.zeros(0)
    visible = areas[areas > 0]
    if visible.size == 0:
        return {'objects': 0.0, 'mean_area': 0.0}
    return {'objects': float(visible.size), 'mean_area': float(visible.mean())}
