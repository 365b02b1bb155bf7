"""Validate a COCO instance-segmentation dataset, fill noun phrases and split train/val.

Usage::

    python -m training.prepare_data DATASET_DIR [--ann annotations.json]
        [--attribute-map map.yaml] [--split 0.8 --seed 0] [--out-dir DIR]
        [--strict-noun-phrases] [--drop-invalid] [--check-only]

Every problem is listed with its count (and examples) and makes the exit status non-zero;
nothing is written then, unless ``--drop-invalid`` is given, in which case the listed
annotations/images are removed explicitly and the report says how many.

Noun phrases (what SAM3 is prompted with) are resolved per annotation: an existing
``noun_phrase`` wins; else an attribute-map template for the category, filled from the
annotation's ``attributes`` (e.g. ``apple: '{ripeness} {color} apple'``); else the
category's ``noun_phrase`` or ``name``. With ``--strict-noun-phrases`` only explicit
annotation phrases count, and every annotation without one is reported.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
import json
from pathlib import Path
import string
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import yaml

from training.coco_data import (canonical_phrase, concept_problem, load_coco_json,
                                noun_phrase_of, resolve_ann_file, segmentation_to_rle)

ISSUE_KINDS = (
    'duplicate_image_id', 'duplicate_category_id', 'missing_image', 'unreadable_image',
    'image_size_mismatch', 'unknown_image_id', 'unknown_category', 'bad_polygon', 'bad_rle',
    'empty_mask', 'missing_noun_phrase',
)
"""Every defect class the validator reports, in report order."""

WARNING_KINDS = ('exif_orientation', 'not_a_concept')
"""Things worth knowing that do not make the dataset invalid (listed, exit status 0)."""

EXIF_ORIENTATION_TAG = 0x0112


@dataclass
class ValidationReport:
    """Problems found in a dataset, grouped by kind, plus the offending ids."""

    num_images: int = 0
    num_annotations: int = 0
    issues: Dict[str, List[str]] = field(default_factory=dict)
    bad_image_ids: Set[Any] = field(default_factory=set)
    bad_annotation_ids: Set[Any] = field(default_factory=set)
    bad_annotation_indices: Set[int] = field(default_factory=set)
    """Positions in the ``annotations`` list: what ``drop_invalid`` drops (ids may repeat
    or be missing, so they cannot say which annotation was meant)."""
    bad_category_ids: Set[Any] = field(default_factory=set)
    warnings: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, kind: str, message: str, image_id: Any = None,
            annotation_id: Any = None, annotation_index: Optional[int] = None,
            category_id: Any = None) -> None:
        """Record one problem of ``kind`` (one of ISSUE_KINDS) and what it makes invalid."""
        if kind not in ISSUE_KINDS:
            raise ValueError(f"unknown issue kind '{kind}'")
        self.issues.setdefault(kind, []).append(message)
        if annotation_index is not None:
            self.bad_annotation_indices.add(annotation_index)
        if category_id is not None:
            self.bad_category_ids.add(category_id)
        if annotation_id is not None:
            self.bad_annotation_ids.add(annotation_id)
        elif image_id is not None and annotation_index is None:
            self.bad_image_ids.add(image_id)

    def warn(self, kind: str, message: str) -> None:
        """Record one warning of ``kind`` (one of WARNING_KINDS); it does not affect ``ok``."""
        if kind not in WARNING_KINDS:
            raise ValueError(f"unknown warning kind '{kind}'")
        self.warnings.setdefault(kind, []).append(message)

    @property
    def ok(self) -> bool:
        """Return True when no problem was found."""
        return not self.issues

    def counts(self) -> Dict[str, int]:
        """Return the number of problems per kind (kinds without problems omitted)."""
        return {kind: len(self.issues[kind]) for kind in ISSUE_KINDS if kind in self.issues}

    def summary(self, max_examples: int = 5) -> str:
        """Return a human-readable report with counts and a few examples per kind."""
        lines = [f'{self.num_images} images, {self.num_annotations} annotations']
        if self.ok:
            lines.append('no problems found')
        for kind, count in self.counts().items():
            lines.append(f'  {kind}: {count}')
            for message in self.issues[kind][:max_examples]:
                lines.append(f'      - {message}')
            if count > max_examples:
                lines.append(f'      ... and {count - max_examples} more')
        for kind in WARNING_KINDS:
            messages = self.warnings.get(kind, [])
            if messages:
                lines.append(f'  warning {kind}: {len(messages)}')
                lines.extend(f'      - {m}' for m in messages[:max_examples])
                if len(messages) > max_examples:
                    lines.append(f'      ... and {len(messages) - max_examples} more')
        return '\n'.join(lines)


def load_attribute_map(path: Optional[str]) -> Dict[str, str]:
    """Load a YAML map ``category name -> noun-phrase template`` (``{attr}`` placeholders)."""
    if path is None:
        return {}
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"attribute map '{path}' must map category names to template strings")
    for name, template in data.items():
        try:
            list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"attribute map '{path}': bad template for '{name}': {exc}") from exc
    return data


def _template_phrase(template: str, annotation: Mapping[str, Any]) -> Tuple[Optional[str], str]:
    """Fill a template from an annotation's ``attributes`` (or top-level fields)."""
    attributes = annotation.get('attributes') or {}
    values = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        value = attributes.get(name, annotation.get(name)) if isinstance(attributes, dict) \
            else annotation.get(name)
        if value is None or not str(value).strip():
            return None, f"attribute '{name}' needed by template '{template}' is missing"
        values[name] = str(value).strip()
    return canonical_phrase(template.format(**values)), ''


def fill_noun_phrases(data: Dict[str, Any], attribute_map: Mapping[str, str],
                      report: ValidationReport, strict: bool = False,
                      overwrite: bool = False) -> Dict[str, Any]:
    """Return a copy of ``data`` where every resolvable annotation carries ``noun_phrase``.

    Annotations whose phrase cannot be resolved are reported as ``missing_noun_phrase``.
    """
    data = copy.deepcopy(data)
    categories = {c.get('id'): c for c in data['categories']}
    for position, ann in enumerate(data['annotations']):
        if ann.get('iscrowd', 0):
            continue
        has_own = isinstance(ann.get('noun_phrase'), str) and ann['noun_phrase'].strip()
        if has_own and not overwrite:
            ann['noun_phrase'] = canonical_phrase(ann['noun_phrase'])
            continue
        where = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
        if strict:
            report.add('missing_noun_phrase', f'{where}: no noun_phrase field',
                       annotation_id=ann.get('id'),
                       annotation_index=position)
            continue
        category = categories.get(ann.get('category_id'))
        phrase, why = None, 'its category has no name'
        if category is not None and category.get('name') in attribute_map:
            phrase, why = _template_phrase(attribute_map[category['name']], ann)
        elif category is not None:
            stripped = {k: v for k, v in ann.items() if k != 'noun_phrase'}
            phrase = noun_phrase_of(stripped, categories)
        else:
            why = f"category_id {ann.get('category_id')} is unknown"
        if phrase is None:
            report.add('missing_noun_phrase', f'{where}: {why}', annotation_id=ann.get('id'),
                       annotation_index=position)
        else:
            ann['noun_phrase'] = phrase
    return data


def _image_path(root: Path, image_dir: str, file_name: str) -> Path:
    name = Path(file_name)
    if name.is_absolute():
        return name
    direct = root / name
    if direct.is_file() or len(name.parts) > 1:
        return direct
    return root / image_dir / name


def validate_dataset(root: str, ann_file: Optional[str] = None,
                     attribute_map: Optional[Mapping[str, str]] = None,
                     image_dir: str = 'images', strict_noun_phrases: bool = False,
                     overwrite_noun_phrases: bool = False
                     ) -> Tuple[ValidationReport, Dict[str, Any]]:
    """Check a dataset and return the report and the annotations with noun phrases filled."""
    root_path = Path(root)
    data = load_coco_json(resolve_ann_file(root_path, ann_file))
    report = ValidationReport(num_images=len(data['images']),
                              num_annotations=len(data['annotations']))
    images: Dict[Any, Dict[str, Any]] = {}
    for info in data['images']:
        if info.get('id') in images:
            report.add('duplicate_image_id', f"image id {info.get('id')} appears twice",
                       image_id=info.get('id'))
            continue
        images[info.get('id')] = info
        path = _image_path(root_path, image_dir, str(info.get('file_name', '')))
        if not path.is_file():
            report.add('missing_image', f"image {info.get('id')}: '{path}' does not exist",
                       image_id=info.get('id'))
            continue
        try:
            # The header only: PIL's size is the stored pixel grid (EXIF orientation not
            # applied), which is what the reader decodes and what annotations refer to.
            with Image.open(path) as handle:
                width, height = handle.size
                orientation = handle.getexif().get(EXIF_ORIENTATION_TAG, 1)
        except OSError as exc:
            report.add('unreadable_image', f"image {info.get('id')}: '{path}': {exc}",
                       image_id=info.get('id'))
            continue
        if (info.get('width'), info.get('height')) != (width, height):
            report.add('image_size_mismatch',
                       f"image {info.get('id')}: file is {width}x{height}, annotations say "
                       f"{info.get('width')}x{info.get('height')}", image_id=info.get('id'))
        if orientation not in (None, 1):
            report.warn('exif_orientation',
                        f"image {info.get('id')}: '{path}' has EXIF orientation {orientation}; "
                        'training and evaluation use the stored pixels, unrotated (COCO '
                        'convention), so the annotations must be in those coordinates too')
    category_ids: Set[Any] = set()
    for category in data['categories']:
        if category.get('id') in category_ids:
            report.add('duplicate_category_id',
                       f"category id {category.get('id')} appears twice",
                       category_id=category.get('id'))
        category_ids.add(category.get('id'))
    for position, ann in enumerate(data['annotations']):
        where = f"annotation {ann.get('id')} (image {ann.get('image_id')})"
        info = images.get(ann.get('image_id'))
        if info is None:
            report.add('unknown_image_id', f'{where}: no such image',
                       annotation_id=ann.get('id'),
                       annotation_index=position)
            continue
        if ann.get('category_id') not in category_ids:
            report.add('unknown_category', f"{where}: category_id {ann.get('category_id')} "
                       'is not in categories', annotation_id=ann.get('id'),
                       annotation_index=position)
        crowd = bool(ann.get('iscrowd', 0))
        if crowd:
            where = f"crowd {where}"
        segmentation = ann.get('segmentation')
        kind = 'bad_polygon' if isinstance(segmentation, list) else 'bad_rle'
        try:
            height, width = int(info['height']), int(info['width'])
            # Validated as RLE, not decoded: cheap enough to run at every training start.
            rle = segmentation_to_rle(segmentation, height, width)
        except (KeyError, TypeError, ValueError) as exc:
            report.add(kind, f'{where}: {exc}', annotation_id=ann.get('id'),
                       annotation_index=position)
            continue
        if crowd:
            continue  # an ignore region: may be empty, needs no phrase of its own
        if kind == 'bad_polygon':
            coords = np.concatenate([np.asarray(p, dtype=np.float64) for p in segmentation])
            xs, ys = coords[0::2], coords[1::2]
            # One pixel of slack: polygon vertices often sit on the image border.
            if xs.min() < -1 or ys.min() < -1 or xs.max() > width + 1 or ys.max() > height + 1:
                report.add('bad_polygon', f'{where}: polygon lies outside the {width}x{height} '
                           'image', annotation_id=ann.get('id'), annotation_index=position)
                continue
        if not int(mask_utils.area(rle)):
            report.add('empty_mask', f'{where}: mask has no pixels',
                       annotation_id=ann.get('id'), annotation_index=position)
    filled = fill_noun_phrases(data, attribute_map or {}, report, strict=strict_noun_phrases,
                               overwrite=overwrite_noun_phrases)
    for phrase in _phrases(filled):
        problem = concept_problem(phrase)
        if problem:
            # Trainable as it is; only asking for it afterwards goes through the grammar.
            report.warn('not_a_concept', f"phrase '{phrase}': {problem}; the segmenter node "
                        'and evaluate cannot ask for it as trained: rephrase it')
    return report, filled


def _phrases(data: Mapping[str, Any]) -> List[str]:
    """Return the distinct phrases of the annotations, absent lists and file list, sorted."""
    phrases: Set[str] = set()
    for ann in data['annotations']:
        for phrase in [ann.get('noun_phrase')] + list(ann.get('phrases') or []):
            if isinstance(phrase, str) and phrase.strip():
                phrases.add(canonical_phrase(phrase))
    for info in data['images']:
        phrases.update(canonical_phrase(str(p)) for p in info.get('absent_noun_phrases') or [])
    phrases.update(canonical_phrase(str(p)) for p in data.get('noun_phrases') or [])
    return sorted(phrases)


def drop_invalid(data: Dict[str, Any], report: ValidationReport) -> Dict[str, Any]:
    """Return a copy without the images, annotations and categories the report lists as bad.

    Annotations go by position, not id: ids may repeat (merged datasets) or be missing. A
    duplicated category id is ambiguous, so both entries and its annotations go.
    """
    data = copy.deepcopy(data)
    seen: Set[Any] = set()
    images = []
    for info in data['images']:
        if info.get('id') in report.bad_image_ids or info.get('id') in seen:
            continue
        seen.add(info.get('id'))
        images.append(info)
    data['images'] = images
    data['categories'] = [c for c in data['categories']
                          if c.get('id') not in report.bad_category_ids]
    data['annotations'] = [
        ann for position, ann in enumerate(data['annotations'])
        if position not in report.bad_annotation_indices and ann.get('image_id') in seen
        and ann.get('category_id') not in report.bad_category_ids]
    return data


def split_dataset(data: Dict[str, Any], train_fraction: float,
                  seed: int = 0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Split by image into train/val, reproducibly for a given seed (independent of order)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f'--split must be in (0, 1), got {train_fraction}')
    ids = sorted(info['id'] for info in data['images'])
    if len(ids) < 2:
        raise ValueError(f'cannot split {len(ids)} image(s) into train and val')
    order = np.random.default_rng(seed).permutation(len(ids))
    num_train = min(max(int(round(train_fraction * len(ids))), 1), len(ids) - 1)
    train_ids = {ids[i] for i in order[:num_train]}

    def subset(keep: Set[Any]) -> Dict[str, Any]:
        part = {k: v for k, v in data.items() if k not in ('images', 'annotations')}
        part['images'] = [im for im in data['images'] if im['id'] in keep]
        part['annotations'] = [a for a in data['annotations'] if a['image_id'] in keep]
        return part

    return subset(train_ids), subset(set(ids) - train_ids)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog='python -m training.prepare_data', description=__doc__.split('\n')[0])
    parser.add_argument('root', help='dataset folder (with images/ and the annotation file)')
    parser.add_argument('--ann', default=None, help='annotation file (default annotations.json)')
    parser.add_argument('--image-dir', default='images')
    parser.add_argument('--attribute-map', default=None,
                        help="YAML: category name -> template, e.g. apple: '{ripeness} apple'")
    parser.add_argument('--split', type=float, default=None,
                        help='train fraction; writes annotations_train/val.json')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', default=None, help='where to write (default: root)')
    parser.add_argument('--strict-noun-phrases', action='store_true',
                        help='require an explicit noun_phrase on every annotation')
    parser.add_argument('--overwrite-noun-phrases', action='store_true',
                        help='recompute noun phrases even where annotations have one')
    parser.add_argument('--drop-invalid', action='store_true',
                        help='write the data without the reported images/annotations')
    parser.add_argument('--check-only', action='store_true', help='validate, write nothing')
    parser.add_argument('--max-examples', type=int, default=5)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the validator/splitter; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        attribute_map = load_attribute_map(args.attribute_map)
        report, data = validate_dataset(
            args.root, args.ann, attribute_map, args.image_dir,
            strict_noun_phrases=args.strict_noun_phrases,
            overwrite_noun_phrases=args.overwrite_noun_phrases)
    except (OSError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(report.summary(args.max_examples))
    if not report.ok and not args.drop_invalid:
        print(f'dataset has {sum(report.counts().values())} problem(s); nothing written '
              '(fix them, or pass --drop-invalid to drop the listed items)', file=sys.stderr)
        return 1
    if not report.ok:
        before = {key: len(data[key]) for key in ('images', 'annotations', 'categories')}
        data = drop_invalid(data, report)
        print(f"dropped {before['images'] - len(data['images'])} image(s), "
              f"{before['annotations'] - len(data['annotations'])} annotation(s) and "
              f"{before['categories'] - len(data['categories'])} category(ies) as requested")
    if args.check_only:
        return 0
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.root)
    if args.split is None:
        _write_json(out_dir / 'annotations_prepared.json', data)
        print(f"wrote {out_dir / 'annotations_prepared.json'}")
        return 0
    try:
        train, val = split_dataset(data, args.split, args.seed)
    except ValueError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    _write_json(out_dir / 'annotations_train.json', train)
    _write_json(out_dir / 'annotations_val.json', val)
    print(f"wrote {out_dir / 'annotations_train.json'} ({len(train['images'])} images) and "
          f"{out_dir / 'annotations_val.json'} ({len(val['images'])} images)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
