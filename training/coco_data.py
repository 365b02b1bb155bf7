"""COCO instance-segmentation reader shared by the SAM3 trainer and the evaluator.

A dataset is a folder with ``images/`` and a COCO ``annotations.json`` whose instance masks
are polygons or RLE. Every annotation resolves to a *noun phrase*: its own ``noun_phrase``
field, else its category's ``noun_phrase``, else the category name. Keeping the phrase per
annotation (not per category) is what lets "ripe red apple" and "unripe green apple" of one
``apple`` category be distinct text prompts.

An annotation may also list ``phrases``: every phrase it is a positive for (a damaged red
apple answers "apple", "ripe red apple" and "damaged apple"); the primary noun phrase is
always one of them. An image may list ``absent_noun_phrases``: phrases with no instance at
all, the only safe negatives when tiny instances were left unannotated.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
import warnings

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from sam_gap_ros.mask_ops import mask_to_box

PathLike = Union[str, Path]


def resolve_ann_file(root: PathLike, ann_file: Optional[PathLike] = None) -> Path:
    """Return the annotation file path: ``ann_file`` (relative to ``root`` if not absolute)."""
    root = Path(root)
    if ann_file is None:
        return root / 'annotations.json'
    ann_path = Path(ann_file)
    return ann_path if ann_path.is_absolute() else root / ann_path


def load_coco_json(path: PathLike) -> Dict[str, Any]:
    """Load a COCO annotation file, checking the top-level keys it must have."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file '{path}' does not exist")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"annotation file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"annotation file '{path}' must hold a JSON object")
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file '{path}' has no '{key}' list")
    return data


def noun_phrase_of(annotation: Mapping[str, Any],
                   categories: Mapping[int, Mapping[str, Any]],
                   fallback_to_category: bool = True) -> Optional[str]:
    """Return an annotation's noun phrase, or None when none can be resolved.

    Order: the annotation's own ``noun_phrase``, then (with ``fallback_to_category``) the
    category's ``noun_phrase`` and finally the category ``name``.
    """
    phrase = annotation.get('noun_phrase')
    if isinstance(phrase, str) and phrase.strip():
        return ' '.join(phrase.split())
    if not fallback_to_category:
        return None
    category = categories.get(annotation.get('category_id'))
    if category is None:
        return None
    for key in ('noun_phrase', 'name'):
        value = category.get(key)
        if isinstance(value, str) and value.strip():
            return ' '.join(value.split())
    return None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list or RLE (compressed or not) into a boolean ``(H, W)`` mask.

    Raises ValueError for a malformed segmentation (odd coordinate count, fewer than three
    points, non-finite numbers, RLE of another size).
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError('polygon list is empty')
        polygons = []
        for poly in segmentation:
            if not isinstance(poly, (list, tuple)) or not poly:
                raise ValueError('polygon is not a non-empty list of numbers')
            try:
                coords = np.asarray(poly, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f'polygon has non-numeric coordinates: {exc}') from exc
            if coords.ndim != 1 or coords.size % 2 or coords.size < 6:
                raise ValueError(f'polygon needs an even number (>= 6) of coordinates, got '
                                 f'{coords.size}')
            if not np.all(np.isfinite(coords)):
                raise ValueError('polygon has non-finite coordinates')
            polygons.append(coords.tolist())
        rles = mask_utils.frPyObjects(polygons, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and 'counts' in segmentation:
        size = segmentation.get('size')
        if not isinstance(size, (list, tuple)) or [int(v) for v in size] != [height, width]:
            raise ValueError(f'RLE size {size} does not match the image size '
                             f'[{height}, {width}]')
        if isinstance(segmentation['counts'], list):
            if sum(int(c) for c in segmentation['counts']) != height * width:
                raise ValueError('uncompressed RLE counts do not sum to height * width')
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation['counts']
            rle = {'size': [height, width],
                   'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
    else:
        raise ValueError('segmentation is neither a polygon list nor an RLE dict')
    with warnings.catch_warnings():
        # pycocotools 2.0.x trips a numpy-2 copy-keyword DeprecationWarning on every decode.
        warnings.simplefilter('ignore', DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def read_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array ``(H, W, 3)``."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"image '{path}' is missing or unreadable")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass
class CocoSample:
    """One image with all its instances, ready for training or evaluation."""

    image: np.ndarray
    """RGB ``uint8`` array ``(H, W, 3)``."""
    masks: np.ndarray
    """Boolean ``(N, H, W)`` instance masks at full resolution."""
    boxes: np.ndarray
    """``(N, 4)`` float32 ``(x0, y0, x1, y1)`` pixel boxes of the masks (exclusive max)."""
    noun_phrases: List[str]
    """Primary noun phrase of each instance."""
    phrases: List[Tuple[str, ...]]
    """Every phrase each instance is a positive for (primary first)."""
    category_ids: np.ndarray
    """``(N,)`` int64 COCO category ids."""
    annotation_ids: np.ndarray
    """``(N,)`` int64 COCO annotation ids."""
    image_id: int
    file_name: str
    absent_phrases: Optional[List[str]] = None
    """Phrases known to have no instance in the image (None: not recorded)."""

    def __len__(self) -> int:
        """Return the number of instances."""
        return len(self.noun_phrases)

    def instances_for(self, phrase: str) -> List[int]:
        """Return the indices of the instances that are positives for ``phrase``."""
        return [i for i, names in enumerate(self.phrases) if phrase in names]

    def masks_for(self, phrase: str) -> np.ndarray:
        """Return the ``(K, H, W)`` masks of the instances that are positives for ``phrase``."""
        return self.masks[self.instances_for(phrase)]

    @property
    def present_phrases(self) -> List[str]:
        """Return every phrase at least one instance is a positive for, sorted."""
        return sorted({p for names in self.phrases for p in names})


class CocoInstances:
    """Random-access reader of a COCO instance-segmentation dataset.

    ``CocoInstances(root, ann_file)`` with ``ann_file`` relative to ``root`` (default
    ``annotations.json``) and images under ``root/images`` (or wherever ``file_name``
    points relative to ``root``). Crowd annotations are skipped (they mark regions, not
    instances). Malformed data raises ValueError naming the annotation: run
    ``python -m training.prepare_data`` first to get the full list of problems.
    """

    def __init__(self, root: PathLike, ann_file: Optional[PathLike] = None,
                 image_dir: str = 'images', fallback_to_category: bool = True) -> None:
        self.root = Path(root)
        self.ann_path = resolve_ann_file(self.root, ann_file)
        self.image_dir = image_dir
        data = load_coco_json(self.ann_path)
        self.categories: Dict[int, Dict[str, Any]] = {
            int(c['id']): c for c in data['categories']}
        self.images: List[Dict[str, Any]] = sorted(data['images'], key=lambda im: im['id'])
        self._anns: Dict[int, List[Dict[str, Any]]] = {im['id']: [] for im in self.images}
        for ann in data['annotations']:
            if ann.get('iscrowd', 0):
                continue
            if ann.get('image_id') not in self._anns:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image_id "
                                 f"{ann.get('image_id')} in '{self.ann_path}'")
            phrase = noun_phrase_of(ann, self.categories, fallback_to_category)
            if phrase is None:
                raise ValueError(f"annotation {ann.get('id')} in '{self.ann_path}' has no "
                                 'noun_phrase and no category name to fall back on')
            self._anns[ann['image_id']].append(
                dict(ann, noun_phrase=phrase, phrases=_phrase_set(ann, phrase)))
        self.fallback_to_category = fallback_to_category
        listed = data.get('noun_phrases')
        self._listed_phrases = sorted(' '.join(str(p).split()) for p in listed) \
            if isinstance(listed, list) else []

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.images)

    @property
    def image_ids(self) -> List[int]:
        """Return the image ids in dataset order."""
        return [im['id'] for im in self.images]

    @property
    def noun_phrases(self) -> List[str]:
        """Return every distinct primary noun phrase of the dataset, sorted."""
        return sorted({a['noun_phrase'] for anns in self._anns.values() for a in anns})

    @property
    def vocabulary(self) -> List[str]:
        """Return all phrases: primary, per-annotation ``phrases`` and a top-level list."""
        found = {p for anns in self._anns.values() for a in anns for p in a['phrases']}
        return sorted(found | set(self._listed_phrases))

    def present_phrases(self, index: int) -> List[str]:
        """Return the phrases image ``index`` has at least one instance for (no decoding)."""
        return sorted({p for a in self._anns[self.images[index]['id']] for p in a['phrases']})

    def absent_phrases(self, index: int) -> Optional[List[str]]:
        """Return the image's recorded ``absent_noun_phrases`` (None when not recorded)."""
        absent = self.images[index].get('absent_noun_phrases')
        return None if absent is None else sorted(' '.join(str(p).split()) for p in absent)

    def phrases_by_category(self) -> Dict[int, List[str]]:
        """Return, per category id, the sorted distinct noun phrases of its annotations."""
        table: Dict[int, set] = {}
        for anns in self._anns.values():
            for ann in anns:
                table.setdefault(int(ann['category_id']), set()).add(ann['noun_phrase'])
        return {cid: sorted(phrases) for cid, phrases in table.items()}

    def image_path(self, image_info: Mapping[str, Any]) -> Path:
        """Return the file path of an image entry."""
        name = Path(image_info['file_name'])
        if name.is_absolute():
            return name
        direct = self.root / name
        if direct.is_file() or len(name.parts) > 1:
            return direct
        return self.root / self.image_dir / name

    def annotations(self, index: int) -> List[Dict[str, Any]]:
        """Return the (non-crowd) annotations of image ``index`` with resolved noun phrases."""
        return list(self._anns[self.images[index]['id']])

    def __getitem__(self, index: int) -> CocoSample:
        """Return image ``index`` with its decoded instances."""
        if not -len(self) <= index < len(self):
            raise IndexError(f'image index {index} out of range for {len(self)} images')
        info = self.images[index]
        image = read_rgb(self.image_path(info))
        height, width = image.shape[:2]
        if (info.get('height'), info.get('width')) != (height, width):
            raise ValueError(f"image {info['id']} ('{info['file_name']}') is {width}x{height} "
                             f"but the annotations say {info.get('width')}x{info.get('height')}")
        anns = self._anns[info['id']]
        masks = np.zeros((len(anns), height, width), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for i, ann in enumerate(anns):
            try:
                masks[i] = decode_segmentation(ann.get('segmentation'), height, width)
            except ValueError as exc:
                raise ValueError(f"annotation {ann.get('id')} of image {info['id']}: "
                                 f'{exc}') from exc
            box = mask_to_box(masks[i])
            if box is None:
                raise ValueError(f"annotation {ann.get('id')} of image {info['id']} has an "
                                 'empty mask')
            boxes[i] = box
        return CocoSample(
            image=image, masks=masks, boxes=boxes,
            noun_phrases=[a['noun_phrase'] for a in anns],
            phrases=[a['phrases'] for a in anns],
            category_ids=np.asarray([a['category_id'] for a in anns], dtype=np.int64),
            annotation_ids=np.asarray([a.get('id', -1) for a in anns], dtype=np.int64),
            image_id=int(info['id']), file_name=str(info['file_name']),
            absent_phrases=self.absent_phrases(index))


def _phrase_set(annotation: Mapping[str, Any], primary: str) -> Tuple[str, ...]:
    extra = annotation.get('phrases')
    names = [primary]
    if isinstance(extra, (list, tuple)):
        for phrase in extra:
            if isinstance(phrase, str) and phrase.strip():
                clean = ' '.join(phrase.split())
                if clean not in names:
                    names.append(clean)
    return tuple(names)
