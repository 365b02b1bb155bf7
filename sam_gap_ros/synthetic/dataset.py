"""COCO image datasets and track-labelled video datasets written from the orchard generator.

COCO layout (``write_coco_dataset``)::

    out_dir/images/000000.png ...
    out_dir/annotations.json    # COCO instances + noun_phrase/attributes/phrases/track_id

Video layout (``write_video_dataset``)::

    out_dir/index.json                    # videos, cameras, tracks, per-frame objects
    out_dir/video_000/frames/000000.png   # RGB
    out_dir/video_000/masks/000000.png    # uint16 track-ID label image (0 = background)
    out_dir/video_000/depth/000000.png    # uint16 depth in millimetres (0 = no return)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from sam_gap_ros.synthetic.config import (CATEGORIES, CATEGORY_IDS, NOUN_PHRASES,
                                          OrchardSceneConfig)
from sam_gap_ros.synthetic.video import generate_scene, OrchardVideo, Scene

COCO_FORMAT = 'sam_gap_ros.synthetic.coco/1'
VIDEO_FORMAT = 'sam_gap_ros.synthetic.video/1'

PathLike = Union[str, Path]


def sample_seed(seed: int, index: int) -> int:
    """Return the seed of sample ``index`` of a dataset made with ``seed`` (stable, spread)."""
    if seed < 0 or index < 0:
        raise ValueError(f'seed and index must be >= 0, got seed={seed}, index={index}')
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _bbox_xywh(box: Tuple[float, float, float, float]) -> List[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _rle(mask: np.ndarray) -> Dict[str, object]:
    # Imported here: only COCO export needs pycocotools, not the synthetic camera node,
    # and package.xml does not make robots install it.
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode('ascii')}


def _image_entries(scene: Scene, image_id: int, file_name: str, min_area: int,
                   first_annotation_id: int) -> Tuple[Dict[str, object], List[Dict[str, object]]]:
    height, width = scene.labels.shape
    image = {'id': image_id, 'file_name': file_name, 'width': width, 'height': height,
             'seed': scene.seed, 'absent_noun_phrases': list(scene.absent_phrases),
             'camera': scene.camera.to_dict()}
    annotations = []
    for inst in scene.instances:
        if inst.area < min_area:
            continue
        annotations.append({
            'id': first_annotation_id + len(annotations), 'image_id': image_id,
            'category_id': CATEGORY_IDS[inst.category], 'segmentation': _rle(inst.mask),
            'area': int(inst.area), 'bbox': _bbox_xywh(inst.box), 'iscrowd': 0,
            'noun_phrase': inst.noun_phrase, 'attributes': list(inst.attributes),
            'phrases': list(inst.phrases), 'track_id': inst.track_id,
            'visible_fraction': round(inst.visible_fraction, 4)})
    return image, annotations


def _coco(images: List[Dict[str, object]], annotations: List[Dict[str, object]],
          info: Optional[Dict[str, object]]) -> Dict[str, object]:
    return {'info': dict(info or {}, format=COCO_FORMAT), 'images': images,
            'annotations': annotations, 'categories': [dict(c) for c in CATEGORIES],
            'noun_phrases': list(NOUN_PHRASES)}


def to_coco(scenes: Iterable[Scene], file_names: Optional[Sequence[str]] = None,
            min_area: int = 1, info: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Return a COCO instances dict (compressed RLE masks) for ``scenes``.

    Image ``i`` gets id ``i + 1`` and file name ``file_names[i]`` (default ``%06d.png``);
    each annotation carries ``noun_phrase``, ``attributes``, ``phrases``, ``track_id`` and
    ``visible_fraction`` besides the COCO fields. Images list ``seed`` and
    ``absent_noun_phrases`` (vocabulary phrases with no instance at all, even a tiny one).
    Instances smaller than ``min_area`` pixels are left out of the annotations.
    """
    if min_area < 1:
        raise ValueError(f'min_area must be >= 1, got {min_area}')
    images, annotations = [], []
    for i, scene in enumerate(scenes):
        if file_names is not None and i >= len(file_names):
            raise ValueError(f'only {len(file_names)} file names for more scenes')
        name = file_names[i] if file_names is not None else f'{i:06d}.png'
        image, anns = _image_entries(scene, i + 1, name, min_area, len(annotations) + 1)
        images.append(image)
        annotations.extend(anns)
    if file_names is not None and len(file_names) != len(images):
        raise ValueError(f'{len(file_names)} file names for {len(images)} scenes')
    return _coco(images, annotations, info)


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f'could not write {path}')


def _read_png(path: Path, rgb: bool) -> np.ndarray:
    flags = cv2.IMREAD_COLOR if rgb else cv2.IMREAD_UNCHANGED
    array = cv2.imread(str(path), flags)
    if array is None:
        raise OSError(f'could not read image {path}')
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if rgb else array


def _config_dict(config: OrchardSceneConfig) -> Dict[str, object]:
    return dataclasses.asdict(config)


def write_coco_dataset(out_dir: PathLike, n_images: int, seed: int = 0,
                       config: Optional[OrchardSceneConfig] = None,
                       min_area: int = 1) -> Path:
    """Write ``n_images`` scenes as PNGs plus ``annotations.json``; return the JSON path.

    Image ``i`` is ``generate_scene(sample_seed(seed, i), config)`` (its seed is stored).
    """
    if n_images < 1:
        raise ValueError(f'n_images must be >= 1, got {n_images}')
    if min_area < 1:
        raise ValueError(f'min_area must be >= 1, got {min_area}')
    config = config if config is not None else OrchardSceneConfig()
    out = Path(out_dir)
    (out / 'images').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        scene = generate_scene(sample_seed(seed, i), config)
        name = f'images/{i:06d}.png'
        _write_png(out / name, scene.image)
        image, anns = _image_entries(scene, i + 1, name, min_area, len(annotations) + 1)
        images.append(image)
        annotations.extend(anns)
    coco = _coco(images, annotations, {'seed': seed, 'config': _config_dict(config)})
    path = out / 'annotations.json'
    path.write_text(json.dumps(coco))
    return path


def write_video_dataset(out_dir: PathLike, n_videos: int, n_frames: int, seed: int = 0,
                        config: Optional[OrchardSceneConfig] = None, pan_speed: float = 4.0,
                        parallax: bool = False, sway_px: float = 1.5) -> Path:
    """Write ``n_videos`` panning videos (frames, uint16 ID masks, depth) + ``index.json``.

    Video ``v`` is ``OrchardVideo(sample_seed(seed, v), config, n_frames, pan_speed, ...)``.
    Returns the path of ``index.json``.
    """
    if n_videos < 1:
        raise ValueError(f'n_videos must be >= 1, got {n_videos}')
    config = config if config is not None else OrchardSceneConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    videos = []
    for v in range(n_videos):
        video = OrchardVideo(sample_seed(seed, v), config, n_frames=n_frames,
                             pan_speed=pan_speed, parallax=parallax, sway_px=sway_px)
        name = f'video_{v:03d}'
        for sub in ('frames', 'masks', 'depth'):
            (out / name / sub).mkdir(parents=True, exist_ok=True)
        frames = []
        for frame in video:
            stem = f'{frame.index:06d}.png'
            paths = {sub: f'{name}/{sub}/{stem}' for sub in ('frames', 'masks', 'depth')}
            _write_png(out / paths['frames'], frame.image)
            _write_png(out / paths['masks'], frame.labels)
            _write_png(out / paths['depth'], frame.depth_mm)
            frames.append({'index': frame.index, 'image': paths['frames'],
                           'mask': paths['masks'], 'depth': paths['depth'],
                           'objects': [{'track_id': inst.track_id, 'area': inst.area,
                                        'bbox': _bbox_xywh(inst.box)}
                                       for inst in frame.instances]})
        videos.append({'name': name, 'seed': video.seed, 'n_frames': n_frames,
                       'width': config.width, 'height': config.height,
                       'pan_speed': pan_speed, 'parallax': parallax,
                       'camera': video.camera.to_dict(),
                       'tracks': [info.to_dict() for _, info in sorted(video.tracks.items())],
                       'frames': frames})
    index = {'format': VIDEO_FORMAT, 'seed': seed, 'config': _config_dict(config),
             'categories': [dict(c) for c in CATEGORIES], 'noun_phrases': list(NOUN_PHRASES),
             'videos': videos}
    path = out / 'index.json'
    path.write_text(json.dumps(index))
    return path


def read_video_frame(dataset_dir: PathLike, video: Dict[str, object], frame_index: int
                     ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Return ``(rgb uint8, labels uint16, depth_mm uint16)`` of one frame of ``index.json``.

    Depth is None for a frame that lists none: a dataset of another source (or converted
    without depth) needs only images and masks for training.
    """
    frames = video['frames']
    if not 0 <= frame_index < len(frames):
        raise IndexError(f'frame {frame_index} outside 0..{len(frames) - 1} of {video["name"]}')
    entry = frames[frame_index]
    root = Path(dataset_dir)
    labels = _read_png(root / entry['mask'], rgb=False)
    if labels.dtype != np.uint16:
        raise ValueError(f'{entry["mask"]} must be a 16-bit PNG (track IDs)')
    depth = None
    if entry.get('depth') is not None:
        depth = _read_png(root / entry['depth'], rgb=False)
        if depth.dtype != np.uint16:
            raise ValueError(f'{entry["depth"]} must be a 16-bit PNG (millimetres)')
    return _read_png(root / entry['image'], rgb=True), labels, depth
