"""Dataset validation, noun-phrase filling, splitting and the COCO reader."""

import copy
import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
import pytest

from training.coco_data import (CocoInstances, compressed_rle_counts, decode_segmentation,
                                noun_phrase_of)
from training.finetune_sam3 import choose_phrases
from training.prepare_data import ISSUE_KINDS, main, split_dataset, validate_dataset

SIZE = 32


def _square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


def _good_dataset():
    """Return a clean 6-image dataset description (annotations use several formats)."""
    images, anns = [], []
    for i in range(6):
        images.append({'id': i + 1, 'file_name': f'im{i}.png', 'width': SIZE, 'height': SIZE})
        anns.append({'id': 10 * i + 1, 'image_id': i + 1, 'category_id': 1,
                     'segmentation': _square(2, 2, 12, 12), 'iscrowd': 0,
                     'attributes': {'ripeness': 'ripe', 'colour': 'red'},
                     'noun_phrase': 'ripe red apple'})
        mask = np.zeros((SIZE, SIZE), bool)
        mask[20:28, 16:30] = True
        anns.append({'id': 10 * i + 2, 'image_id': i + 1, 'category_id': 2,
                     'segmentation': _rle(mask), 'iscrowd': 0})
    categories = [{'id': 1, 'name': 'apple'}, {'id': 2, 'name': 'leaf'}]
    return {'images': images, 'annotations': anns, 'categories': categories}


def _write(root: Path, data, skip_images=(), sizes=None):
    (root / 'images').mkdir(parents=True, exist_ok=True)
    for info in data['images']:
        if info['file_name'] in skip_images:
            continue
        h, w = (sizes or {}).get(info['file_name'], (SIZE, SIZE))
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 2] = 200  # BGR on disk: red channel
        cv2.imwrite(str(root / 'images' / info['file_name']), image)
    (root / 'annotations.json').write_text(json.dumps(data))
    return root


def _counts(root, **kwargs):
    report, _ = validate_dataset(str(root), **kwargs)
    return report.counts()


def test_clean_dataset_has_no_issues_and_fills_phrases(tmp_path):
    _write(tmp_path, _good_dataset())
    report, filled = validate_dataset(str(tmp_path))
    assert report.ok, report.summary()
    phrases = {a['id']: a['noun_phrase'] for a in filled['annotations']}
    assert phrases[1] == 'ripe red apple'   # own phrase kept
    assert phrases[2] == 'leaf'             # filled from the category name


@pytest.mark.parametrize('defect, kind', [
    ('missing_image', 'missing_image'),
    ('unreadable_image', 'unreadable_image'),
    ('size_mismatch', 'image_size_mismatch'),
    ('duplicate_image', 'duplicate_image_id'),
    ('duplicate_category', 'duplicate_category_id'),
    ('unknown_image', 'unknown_image_id'),
    ('unknown_category', 'unknown_category'),
    ('odd_polygon', 'bad_polygon'),
    ('short_polygon', 'bad_polygon'),
    ('outside_polygon', 'bad_polygon'),
    ('nan_polygon', 'bad_polygon'),
    ('rle_size', 'bad_rle'),
    ('rle_counts', 'bad_rle'),
    ('empty_polygon', 'empty_mask'),
    ('empty_rle', 'empty_mask'),
    ('nameless_category', 'missing_noun_phrase'),
])
def test_each_defect_class_is_reported(tmp_path, defect, kind):
    data = _good_dataset()
    skip, sizes = (), None
    ann = data['annotations'][0]
    if defect == 'missing_image':
        skip = ('im0.png',)
    elif defect == 'unreadable_image':
        _write(tmp_path, data)
        (tmp_path / 'images' / 'im0.png').write_bytes(b'not a png at all')
    elif defect == 'size_mismatch':
        sizes = {'im0.png': (SIZE, SIZE + 8)}
    elif defect == 'duplicate_image':
        data['images'].append(dict(data['images'][0]))
    elif defect == 'duplicate_category':
        data['categories'].append({'id': 1, 'name': 'pear'})
    elif defect == 'unknown_image':
        ann['image_id'] = 999
    elif defect == 'unknown_category':
        ann['category_id'] = 7
    elif defect == 'odd_polygon':
        ann['segmentation'] = [[1, 1, 5, 1, 5]]
    elif defect == 'short_polygon':
        ann['segmentation'] = [[1, 1, 5, 5]]
    elif defect == 'outside_polygon':
        ann['segmentation'] = _square(2, 2, 90, 12)
    elif defect == 'nan_polygon':
        ann['segmentation'] = [[1, 1, 5, 1, float('nan'), 5]]
    elif defect == 'rle_size':
        ann['segmentation'] = _rle(np.ones((SIZE + 1, SIZE), bool))
    elif defect == 'rle_counts':
        ann['segmentation'] = {'size': [SIZE, SIZE], 'counts': [5, 7]}
    elif defect == 'empty_polygon':
        ann['segmentation'] = [[4, 4, 4, 4, 4, 4]]
    elif defect == 'empty_rle':
        ann['segmentation'] = _rle(np.zeros((SIZE, SIZE), bool))
    elif defect == 'nameless_category':
        data['categories'][1]['name'] = ''
    if defect != 'unreadable_image':
        _write(tmp_path, data, skip_images=skip, sizes=sizes)
    counts = _counts(tmp_path)
    assert kind in counts, counts
    assert counts[kind] >= 1
    assert set(counts) <= set(ISSUE_KINDS)
    # The CLI lists it with its count and refuses to write anything.
    assert main([str(tmp_path), '--split', '0.5']) == 1
    assert not (tmp_path / 'annotations_train.json').exists()


def test_counts_are_per_problem(tmp_path):
    data = _good_dataset()
    for ann in data['annotations'][:3]:
        ann['segmentation'] = [[1, 1, 5]]
    _write(tmp_path, data, skip_images=('im4.png', 'im5.png'))
    counts = _counts(tmp_path)
    assert counts['bad_polygon'] == 3
    assert counts['missing_image'] == 2


def test_strict_mode_reports_annotations_without_own_phrase(tmp_path):
    _write(tmp_path, _good_dataset())
    counts = _counts(tmp_path, strict_noun_phrases=True)
    assert counts == {'missing_noun_phrase': 6}  # the six leaves rely on the category name


def test_attribute_map_builds_phrases_and_reports_missing_attributes(tmp_path):
    data = _good_dataset()
    for ann in data['annotations']:
        ann.pop('noun_phrase', None)
    data['annotations'][2]['attributes'] = {'ripeness': 'unripe', 'colour': 'green'}
    data['annotations'][4]['attributes'] = {'ripeness': 'ripe'}  # no colour
    _write(tmp_path, data)
    amap = tmp_path / 'map.yaml'
    amap.write_text("apple: '{ripeness} {colour} apple'\n")
    report, filled = validate_dataset(str(tmp_path), attribute_map={
        'apple': '{ripeness} {colour} apple'})
    assert report.counts() == {'missing_noun_phrase': 1}
    phrases = {a['id']: a.get('noun_phrase') for a in filled['annotations']}
    assert phrases[1] == 'ripe red apple'
    assert phrases[11] == 'unripe green apple'
    assert phrases[21] is None
    assert phrases[2] == 'leaf'
    assert main([str(tmp_path), '--attribute-map', str(amap), '--split', '0.5']) == 1
    # Dropping the one bad annotation explicitly lets the split go ahead.
    assert main([str(tmp_path), '--attribute-map', str(amap), '--split', '0.5',
                 '--drop-invalid']) == 0
    train = json.loads((tmp_path / 'annotations_train.json').read_text())
    val = json.loads((tmp_path / 'annotations_val.json').read_text())
    kept = train['annotations'] + val['annotations']
    assert len(kept) == 11 and all(a['noun_phrase'] for a in kept)
    assert 21 not in {a['id'] for a in kept}


def test_split_is_reproducible_disjoint_and_complete(tmp_path):
    data = _good_dataset()
    data['images'] += [dict(im, id=im['id'] + 100) for im in data['images']]
    train, val = split_dataset(data, 0.75, seed=0)
    again_train, _ = split_dataset(copy.deepcopy(data), 0.75, seed=0)
    shuffled = dict(data, images=list(reversed(data['images'])))
    order_train, _ = split_dataset(shuffled, 0.75, seed=0)
    ids = lambda part: sorted(im['id'] for im in part['images'])  # noqa: E731
    assert ids(train) == ids(again_train) == ids(order_train)
    assert len(ids(train)) == 9 and len(ids(val)) == 3
    assert not set(ids(train)) & set(ids(val))
    assert set(ids(train)) | set(ids(val)) == {im['id'] for im in data['images']}
    other = [ids(split_dataset(data, 0.75, seed=s)[0]) for s in range(1, 6)]
    assert any(o != ids(train) for o in other)
    for part in (train, val):
        assert {a['image_id'] for a in part['annotations']} <= set(ids(part))
    with pytest.raises(ValueError):
        split_dataset(data, 1.0)


def test_cli_writes_split_files(tmp_path, capsys):
    _write(tmp_path, _good_dataset())
    out = tmp_path / 'out'
    assert main([str(tmp_path), '--split', '0.5', '--seed', '3', '--out-dir', str(out)]) == 0
    train = json.loads((out / 'annotations_train.json').read_text())
    val = json.loads((out / 'annotations_val.json').read_text())
    assert len(train['images']) == 3 and len(val['images']) == 3
    assert all(a['noun_phrase'] for a in train['annotations'] + val['annotations'])
    assert 'no problems found' in capsys.readouterr().out


def test_reader_decodes_polygons_and_rle_with_per_annotation_phrases(tmp_path):
    data = _good_dataset()
    data['annotations'][2]['noun_phrase'] = 'unripe green apple'
    _write(tmp_path, data)
    dataset = CocoInstances(tmp_path, 'annotations.json')
    assert len(dataset) == 6
    sample = dataset[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape == (SIZE, SIZE, 3)
    assert sample.image[0, 0].tolist() == [200, 0, 0]  # RGB, not BGR
    assert sample.masks.dtype == bool and sample.masks.shape == (2, SIZE, SIZE)
    assert sample.noun_phrases == ['ripe red apple', 'leaf']
    assert sample.boxes[1].tolist() == [16, 20, 30, 28]
    assert sample.masks[1].sum() == 8 * 14
    assert sample.masks[0][5, 5] and not sample.masks[0][20, 20]
    # Same category, different phrases: both are distinct prompts of the dataset.
    assert dataset.noun_phrases == ['leaf', 'ripe red apple', 'unripe green apple']
    assert dataset.phrases_by_category()[1] == ['ripe red apple', 'unripe green apple']
    assert dataset[1].noun_phrases[0] == 'unripe green apple'
    assert sample.masks_for('leaf').shape == (1, SIZE, SIZE)


def test_reader_raises_on_broken_annotations(tmp_path):
    data = _good_dataset()
    data['annotations'][0]['segmentation'] = _rle(np.zeros((SIZE, SIZE), bool))
    _write(tmp_path, data)
    with pytest.raises(ValueError, match='empty mask'):
        CocoInstances(tmp_path)[0]
    with pytest.raises(IndexError):
        CocoInstances(tmp_path)[6]


def test_phrases_are_canonical_so_case_variants_are_one_prompt(tmp_path):
    """Spellings 'Ripe Red Apple' and 'ripe red apple' are one prompt (CLIP lower-cases)."""
    data = _good_dataset()
    data['annotations'][0]['noun_phrase'] = 'Ripe  Red Apple'
    data['annotations'][1]['phrases'] = ['LEAF', 'Green Leaf']
    data['categories'][1]['name'] = 'Leaf'
    data['images'][1]['absent_noun_phrases'] = ['Unripe Green Apple']
    _write(tmp_path, data)
    dataset = CocoInstances(tmp_path)
    assert dataset.vocabulary == ['green leaf', 'leaf', 'ripe red apple']
    assert dataset[0].noun_phrases == ['ripe red apple', 'leaf']
    assert dataset.absent_phrases(1) == ['unripe green apple']
    # No spelling of a phrase on the image is ever drawn as a negative for it.
    present = dataset.present_phrases(0)
    for seed in range(20):
        phrases = choose_phrases(dataset[0].noun_phrases, present, dataset.vocabulary, 3, None,
                                 np.random.default_rng(seed))
        assert phrases == present, phrases
    _, filled = validate_dataset(str(tmp_path))
    assert filled['annotations'][0]['noun_phrase'] == 'ripe red apple'


def test_reader_refuses_duplicate_image_and_category_ids(tmp_path):
    """Duplicates would merge silently: annotations on another image's pixels, renamed."""
    data = _good_dataset()
    data['images'].append(dict(data['images'][0], file_name='im1.png'))
    _write(tmp_path, data)
    with pytest.raises(ValueError, match=r'image ids \[1\] appear more than once'):
        CocoInstances(tmp_path)
    data = _good_dataset()
    data['categories'].append({'id': 1, 'name': 'pear'})
    _write(tmp_path, data)
    with pytest.raises(ValueError, match=r'category ids \[1\] appear more than once'):
        CocoInstances(tmp_path)


def test_drop_invalid_drops_exactly_the_listed_items(tmp_path, capsys):
    data = _good_dataset()
    anns = data['annotations']
    anns[3]['id'] = anns[0]['id']         # merged datasets: a valid twin of a bad one
    anns[0]['segmentation'] = [[1, 1, 5, 5]]
    del anns[5]['id']                     # a bad annotation without an id
    anns[5]['segmentation'] = {'size': [SIZE, SIZE], 'counts': [5, 7]}
    data['categories'].append({'id': 3, 'name': 'pear'})
    data['categories'].append({'id': 3, 'name': 'plum'})
    anns.append(dict(anns[1], id=99, category_id=3))
    _write(tmp_path, data)
    assert main([str(tmp_path), '--drop-invalid']) == 0
    out = json.loads((tmp_path / 'annotations_prepared.json').read_text())
    kept = [a for a in data['annotations']
            if a is not anns[0] and a is not anns[5] and a['category_id'] != 3]
    assert [a.get('id') for a in out['annotations']] == [a.get('id') for a in kept]
    assert [c['id'] for c in out['categories']] == [1, 2]
    assert 'dropped 0 image(s), 3 annotation(s) and 2 category(ies)' in capsys.readouterr().out
    # What was written passes the check the trainer runs at startup.
    report, _ = validate_dataset(str(tmp_path), 'annotations_prepared.json')
    assert report.ok, report.summary()
    assert len(CocoInstances(tmp_path, 'annotations_prepared.json')) == 6


def test_noun_phrase_resolution_order():
    categories = {1: {'id': 1, 'name': 'apple', 'noun_phrase': 'red apple'}, 2: {'id': 2}}
    assert noun_phrase_of({'category_id': 1, 'noun_phrase': ' ripe  apple '}, categories) == \
        'ripe apple'
    assert noun_phrase_of({'category_id': 1}, categories) == 'red apple'
    assert noun_phrase_of({'category_id': 1}, categories, fallback_to_category=False) is None
    assert noun_phrase_of({'category_id': 2}, categories) is None


def test_decode_segmentation_formats_agree():
    mask = np.zeros((SIZE, SIZE), bool)
    mask[3:9, 4:20] = True
    rle = _rle(mask)
    uncompressed = {'size': [SIZE, SIZE],
                    'counts': [int(c) for c in _uncompressed_counts(mask)]}
    assert (decode_segmentation(rle, SIZE, SIZE) == mask).all()
    assert (decode_segmentation(uncompressed, SIZE, SIZE) == mask).all()
    polygon = decode_segmentation(_square(4, 3, 20, 9), SIZE, SIZE)
    assert abs(int(polygon.sum()) - int(mask.sum())) <= 2 * (16 + 6)


def _uncompressed_counts(mask):
    flat = mask.T.reshape(-1).astype(np.uint8)  # COCO RLE is column-major
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def _compressed(counts, height=SIZE, width=SIZE):
    """Return a compressed RLE string of arbitrary run lengths (pycocotools checks none)."""
    rle = mask_utils.frPyObjects({'size': [height, width], 'counts': counts}, height, width)
    return rle['counts'].decode('ascii')


@pytest.mark.parametrize('counts, why', [
    (_compressed([0, 10]), 'sum to 10,'),                       # short: uninitialised memory
    (_compressed([0, 4 * SIZE * SIZE], 2 * SIZE, 2 * SIZE), 'sum to 4096,'),  # long: overflow
    ('0;!', 'invalid character'),
    ('0;P', 'middle of a number'),
    ([SIZE * SIZE + 5, -5], 'non-negative'),
])
def test_rle_counts_must_cover_the_image_exactly(tmp_path, capsys, counts, why):
    segmentation = {'size': [SIZE, SIZE], 'counts': counts}
    with pytest.raises(ValueError, match=why):
        decode_segmentation(segmentation, SIZE, SIZE)
    data = _good_dataset()
    data['annotations'][1]['segmentation'] = segmentation
    _write(tmp_path, data)
    report, _ = validate_dataset(str(tmp_path))
    assert report.counts() == {'bad_rle': 1}
    assert report.issues['bad_rle'][0].startswith('annotation 2 (image 1)')
    assert report.bad_annotation_ids == {2}
    assert main([str(tmp_path), '--check-only']) == 1
    assert 'bad_rle: 1' in capsys.readouterr().out
    with pytest.raises(ValueError, match='annotation 2 of image 1'):
        CocoInstances(tmp_path)[0]


def test_compressed_rle_counts_round_trip_with_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(50):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((height, width)) < (0.0 if trial % 7 == 0 else rng.random())
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert compressed_rle_counts(rle['counts']) == _uncompressed_counts(mask)
        assert (decode_segmentation(dict(rle, counts=rle['counts'].decode('ascii')), height,
                                    width) == mask).all()


def test_crowd_regions_are_validated_but_may_be_empty_and_phraseless(tmp_path):
    data = _good_dataset()
    data['categories'].append({'id': 3, 'name': ''})
    data['annotations'] += [
        {'id': 900, 'image_id': 1, 'category_id': 3, 'iscrowd': 1,
         'segmentation': _rle(np.zeros((SIZE, SIZE), bool))},
        {'id': 901, 'image_id': 2, 'category_id': 1, 'iscrowd': 1,
         'segmentation': {'size': [SIZE, SIZE], 'counts': _compressed([0, 10])}}]
    _write(tmp_path, data)
    report, _ = validate_dataset(str(tmp_path))
    assert report.counts() == {'bad_rle': 1}, report.summary()
    assert report.issues['bad_rle'][0].startswith('crowd annotation 901 (image 2)')


def test_phrases_the_concept_grammar_cannot_ask_for_are_warned(tmp_path, capsys):
    data = _good_dataset()
    data['annotations'][0]['noun_phrase'] = 'apple, ripe'              # refused
    data['annotations'][2]['phrases'] = ['apple near trunk']            # a composition
    data['images'][3]['absent_noun_phrases'] = ['pear but not apple']   # a composition
    _write(tmp_path, data)
    report, _ = validate_dataset(str(tmp_path))
    assert report.ok, report.summary()  # trainable as they are
    warned = report.warnings['not_a_concept']
    assert len(warned) == 3
    assert "phrase 'apple near trunk': 'apple near trunk' is read as a composition of " \
        "['apple', 'trunk']" in warned[0]
    assert "phrase 'apple, ripe': concept 'apple, ripe': unsupported character ','" in warned[1]
    assert warned[2].startswith("phrase 'pear but not apple'")
    assert main([str(tmp_path)]) == 0
    assert 'warning not_a_concept: 3' in capsys.readouterr().out
    # The plain phrases of a clean dataset give no warning.
    _write(tmp_path, _good_dataset())
    assert validate_dataset(str(tmp_path))[0].warnings == {}


def test_exif_orientation_is_ignored_when_reading_and_reported(tmp_path):
    # A phone photo: 40x24 pixels stored, EXIF says "rotate 90 degrees to display".
    from PIL import Image
    data = _good_dataset()
    data['images'][0].update(file_name='phone.jpg', width=40, height=24)
    data['annotations'][1]['segmentation'] = _square(2, 2, 12, 12)
    _write(tmp_path, data)
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red in stored-pixel coordinates
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / 'images' / 'phone.jpg', exif=exif.tobytes(),
                                 quality=95)
    report, _ = validate_dataset(str(tmp_path))
    assert report.ok, report.summary()
    assert list(report.warnings) == ['exif_orientation']
    assert "image 1: '" in report.warnings['exif_orientation'][0]
    assert 'warning exif_orientation: 1' in report.summary()
    # The reader sees the same stored pixels the annotations and the validator refer to.
    sample = CocoInstances(tmp_path)[0]
    assert sample.image.shape == (24, 40, 3)
    assert sample.image[12, 5, 0] > 200 and sample.image[12, 35, 0] < 50
