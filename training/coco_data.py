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

Phrases are kept in the canonical form the concept engine uses (``normalize_text``:
NFKC, lower-case, single spaces): SAM3's CLIP tokenizer lower-cases anyway, so "Red Apple"
and "red apple" are one prompt, and ``Sam3ConceptEngine`` reports detections under the
canonical text.

Crowd annotations (``iscrowd: 1``) are COCO *ignore* regions: a group of objects annotated as
one region. They are never instance targets, and neither their phrases nor the other phrases
of their category are negatives for that image (the region may well contain them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union
import warnings

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from sam_gap_ros.engines.concept_query import normalize_text, parse_query
from sam_gap_ros.engines.types import ConceptError
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


def canonical_phrase(phrase: str) -> str:
    """Return a phrase as the concept engine and the text encoder see it (see module doc)."""
    # One spelling per prompt: otherwise "Apple" could be drawn as a negative on an image of
    # "apple" instances (the same tokens), and the evaluator would look up SAM3's
    # detections, keyed by the canonical text, under a spelling that never matches.
    return normalize_text(phrase)


def concept_problem(phrase: str) -> Optional[str]:
    """Return why SAM3 cannot be asked for ``phrase`` as one noun phrase, or None.

    The node and ``evaluate`` ask through the concept grammar: a phrase it refuses cannot be
    asked at all, and one with an operator word (``near``, ``but not``) is read as a
    composition of other phrases, not as the phrase the model was trained on.
    """
    try:
        query = parse_query(phrase)
    except ConceptError as exc:
        return str(exc)
    if not query.is_plain:
        return (f"'{query.text}' is read as a composition of {list(query.phrases)}, not as "
                'one noun phrase')
    return None


def noun_phrase_of(annotation: Mapping[str, Any],
                   categories: Mapping[int, Mapping[str, Any]],
                   fallback_to_category: bool = True) -> Optional[str]:
    """Return an annotation's noun phrase, or None when none can be resolved.

    Order: the annotation's own ``noun_phrase``, then (with ``fallback_to_category``) the
    category's ``noun_phrase`` and finally the category ``name``; in canonical form.
    """
    phrase = annotation.get('noun_phrase')
    if isinstance(phrase, str) and phrase.strip():
        return canonical_phrase(phrase)
    if not fallback_to_category:
        return None
    category = categories.get(annotation.get('category_id'))
    if category is None:
        return None
    for key in ('noun_phrase', 'name'):
        value = category.get(key)
        if isinstance(value, str) and value.strip():
            return canonical_phrase(value)
    return None


def compressed_rle_counts(counts: Union[str, bytes]) -> List[int]:
    """Return the run lengths of a COCO compressed RLE string (pycocotools' encoding).

    Each run is a little-endian base-32 number, 5 bits per character (offset 48, bit 5 =
    more characters follow, bit 4 of the last one = negative); runs from the fourth on are
    stored as the difference to the run two before. Raises ValueError for a character
    outside that alphabet, a number cut off at the end or a negative run.
    """
    text = counts.decode('ascii') if isinstance(counts, bytes) else counts
    runs: List[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError('compressed RLE counts end in the middle of a number')
            code = ord(text[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f'compressed RLE counts contain the invalid character '
                                 f'{text[pos]!r}')
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            pos += 1
            shift += 5
            if not more and code & 0x10:
                value -= 1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError(f'compressed RLE run {len(runs)} is negative ({value})')
        runs.append(value)
    return runs


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """Validate a COCO polygon list or RLE (compressed or not); return a compressed RLE.

    Raises ValueError for a malformed segmentation (odd coordinate count, fewer than three
    points, non-finite numbers, RLE of another size, RLE runs that are negative or do not
    sum to ``height * width``). pycocotools checks none of the RLE cases: it decodes a short
    RLE from uninitialised memory and writes a long one past the end of its buffer.
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
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not (isinstance(segmentation, dict) and 'counts' in segmentation):
        raise ValueError('segmentation is neither a polygon list nor an RLE dict')
    size = segmentation.get('size')
    try:
        size_ok = [int(v) for v in size] == [height, width]
    except (TypeError, ValueError):
        size_ok = False
    if not size_ok:
        raise ValueError(f'RLE size {size} does not match the image size [{height}, {width}]')
    counts = segmentation['counts']
    if isinstance(counts, list):
        if not all(isinstance(c, (int, float, np.integer)) and not isinstance(c, bool)
                   and c >= 0 and float(c).is_integer() for c in counts):
            raise ValueError('uncompressed RLE counts must be non-negative integers')
        runs = [int(c) for c in counts]
        kind = 'uncompressed'
    elif isinstance(counts, (str, bytes)):
        try:
            runs = compressed_rle_counts(counts)
        except UnicodeDecodeError as exc:
            raise ValueError(f'compressed RLE counts are not ASCII: {exc}') from exc
        kind = 'compressed'
    else:
        raise ValueError(f'RLE counts must be a list or a string, got {type(counts).__name__}')
    if sum(runs) != height * width:
        raise ValueError(f'{kind} RLE counts sum to {sum(runs)}, not height * width = '
                         f'{height * width}')
    if kind == 'uncompressed':
        return mask_utils.frPyObjects({'size': [height, width], 'counts': runs},
                                      height, width)
    return {'size': [height, width],
            'counts': counts.encode('ascii') if isinstance(counts, str) else counts}


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list or RLE (compressed or not) into a boolean ``(H, W)`` mask.

    Raises ValueError for a malformed segmentation (see :func:`segmentation_to_rle`).
    """
    rle = segmentation_to_rle(segmentation, height, width)
    with warnings.catch_warnings():
        # pycocotools 2.0.x trips a numpy-2 copy-keyword DeprecationWarning on every decode.
        warnings.simplefilter('ignore', DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def read_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array ``(H, W, 3)``."""
    # Pixels as stored, EXIF orientation ignored: COCO annotations (and the validator's
    # width/height) are in stored-pixel coordinates.
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
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
    crowd_masks: Optional[np.ndarray] = None
    """Boolean ``(M, H, W)`` crowd (ignore) regions; None or M = 0 when there are none."""
    crowd_phrases: Optional[List[Tuple[str, ...]]] = None
    """Per crowd region, every phrase it may contain (its own and its category's)."""

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

    @property
    def ignored_phrases(self) -> List[str]:
        """Return every phrase a crowd region may contain (never a negative here), sorted."""
        return sorted({p for names in self.crowd_phrases or [] for p in names})

    def crowd_mask_for(self, phrase: str) -> np.ndarray:
        """Return the boolean ``(H, W)`` union of the crowd regions that may hold ``phrase``."""
        out = np.zeros(self.image.shape[:2], dtype=bool)
        for mask, names in zip(self.crowd_masks if self.crowd_masks is not None else [],
                               self.crowd_phrases or [], strict=True):
            if phrase in names:
                out |= mask
        return out


class CocoInstances:
    """Random-access reader of a COCO instance-segmentation dataset.

    ``CocoInstances(root, ann_file)`` with ``ann_file`` relative to ``root`` (default
    ``annotations.json``) and images under ``root/images`` (or wherever ``file_name``
    points relative to ``root``). Crowd annotations are ignore regions, not instances: they
    are kept apart (``crowd_phrases``, ``CocoSample.crowd_masks``) so that their phrases are
    never drawn as negatives. Malformed data raises ValueError naming the annotation: run
    ``python -m training.prepare_data`` first to get the full list of problems.
    """

    def __init__(self, root: PathLike, ann_file: Optional[PathLike] = None,
                 image_dir: str = 'images', fallback_to_category: bool = True) -> None:
        self.root = Path(root)
        self.ann_path = resolve_ann_file(self.root, ann_file)
        self.image_dir = image_dir
        data = load_coco_json(self.ann_path)
        # A repeated id would be merged silently: one image's annotations drawn on another
        # image's pixels, or a category renamed by its twin. The evaluator reads files that
        # prepare_data never saw, so the reader checks this itself.
        for kind, entries in (('category', data['categories']), ('image', data['images'])):
            counts = Counter(entry.get('id') for entry in entries)
            repeated = sorted((i for i, n in counts.items() if n > 1), key=str)
            if repeated:
                raise ValueError(f"{kind} ids {repeated} appear more than once in "
                                 f"'{self.ann_path}' (run python -m training.prepare_data)")
        self.categories: Dict[int, Dict[str, Any]] = {
            int(c['id']): c for c in data['categories']}
        self.images: List[Dict[str, Any]] = sorted(data['images'], key=lambda im: im['id'])
        self._anns: Dict[int, List[Dict[str, Any]]] = {im['id']: [] for im in self.images}
        self._crowd: Dict[int, List[Dict[str, Any]]] = {im['id']: [] for im in self.images}
        for ann in data['annotations']:
            if ann.get('image_id') not in self._anns:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image_id "
                                 f"{ann.get('image_id')} in '{self.ann_path}'")
            phrase = noun_phrase_of(ann, self.categories, fallback_to_category)
            if ann.get('iscrowd', 0):
                own = _phrase_set(ann, phrase) if phrase is not None else ()
                self._crowd[ann['image_id']].append(dict(ann, phrases=own))
                continue
            if phrase is None:
                raise ValueError(f"annotation {ann.get('id')} in '{self.ann_path}' has no "
                                 'noun_phrase and no category name to fall back on')
            self._anns[ann['image_id']].append(
                dict(ann, noun_phrase=phrase, phrases=_phrase_set(ann, phrase)))
        by_category: Dict[Any, set] = {}
        for anns in self._anns.values():
            for ann in anns:
                by_category.setdefault(ann.get('category_id'), set()).update(ann['phrases'])
        for crowds in self._crowd.values():
            for ann in crowds:
                # A crowd of 'apple' may hold ripe and unripe apples alike: every phrase of
                # its category is possibly present there.
                extra = sorted(by_category.get(ann.get('category_id'), set())
                               - set(ann['phrases']))
                ann['phrases'] = tuple(ann['phrases']) + tuple(extra)
        self.fallback_to_category = fallback_to_category
        listed = data.get('noun_phrases')
        self._listed_phrases = sorted({canonical_phrase(str(p)) for p in listed}) \
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

    def crowd_phrases(self, index: int) -> List[str]:
        """Return the phrases image ``index``'s crowd regions may contain (no decoding)."""
        return sorted({p for a in self._crowd[self.images[index]['id']] for p in a['phrases']})

    def absent_phrases(self, index: int) -> Optional[List[str]]:
        """Return the image's recorded ``absent_noun_phrases`` (None when not recorded)."""
        absent = self.images[index].get('absent_noun_phrases')
        return None if absent is None else sorted({canonical_phrase(str(p)) for p in absent})

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
        masks = _decode_all(anns, height, width, f"of image {info['id']}")
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for i, ann in enumerate(anns):
            box = mask_to_box(masks[i])
            if box is None:
                raise ValueError(f"annotation {ann.get('id')} of image {info['id']} has an "
                                 'empty mask')
            boxes[i] = box
        crowds = self._crowd[info['id']]
        crowd_masks = _decode_all(crowds, height, width, f"of image {info['id']} (crowd)")
        return CocoSample(
            image=image, masks=masks, boxes=boxes,
            noun_phrases=[a['noun_phrase'] for a in anns],
            phrases=[a['phrases'] for a in anns],
            category_ids=np.asarray([a['category_id'] for a in anns], dtype=np.int64),
            annotation_ids=np.asarray([a.get('id', -1) for a in anns], dtype=np.int64),
            image_id=int(info['id']), file_name=str(info['file_name']),
            absent_phrases=self.absent_phrases(index), crowd_masks=crowd_masks,
            crowd_phrases=[a['phrases'] for a in crowds])


def _decode_all(anns: Sequence[Mapping[str, Any]], height: int, width: int,
                where: str) -> np.ndarray:
    """Return the ``(N, H, W)`` boolean masks of ``anns``; errors name the annotation."""
    masks = np.zeros((len(anns), height, width), dtype=bool)
    for i, ann in enumerate(anns):
        try:
            masks[i] = decode_segmentation(ann.get('segmentation'), height, width)
        except ValueError as exc:
            raise ValueError(f"annotation {ann.get('id')} {where}: {exc}") from exc
    return masks


def _phrase_set(annotation: Mapping[str, Any], primary: str) -> Tuple[str, ...]:
    extra = annotation.get('phrases')
    names = [primary]
    if isinstance(extra, (list, tuple)):
        for phrase in extra:
            if isinstance(phrase, str) and phrase.strip():
                clean = canonical_phrase(phrase)
                if clean not in names:
                    names.append(clean)
    return tuple(names)
