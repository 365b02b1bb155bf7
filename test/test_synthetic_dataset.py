"""COCO and video dataset export of the synthetic generator, and its command line."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
from pycocotools.coco import COCO
import pytest

from sam_gap_ros.synthetic import (generate_scene, NOUN_PHRASES, OrchardSceneConfig,
                                   OrchardVideo, read_video_frame, to_coco, write_coco_dataset,
                                   write_video_dataset)
from sam_gap_ros.synthetic.cli import main
from sam_gap_ros.synthetic.dataset import sample_seed

CONFIG = OrchardSceneConfig(width=160, height=120)
# pycocotools' decode passes copy=False to numpy 2 internally; not ours to fix.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')


def test_coco_dataset_loads_with_pycocotools_and_masks_round_trip(tmp_path):
    path = write_coco_dataset(tmp_path, 3, seed=4, config=CONFIG)
    coco = COCO(str(path))
    assert {c['name'] for c in coco.loadCats(coco.getCatIds())} == {'apple', 'leaf', 'trunk'}
    data = json.loads(path.read_text())
    assert data['noun_phrases'] == list(NOUN_PHRASES)
    assert data['info']['config']['width'] == 160
    assert len(coco.getImgIds()) == 3
    for image in coco.loadImgs(coco.getImgIds()):
        assert image['seed'] == sample_seed(4, image['id'] - 1)
        scene = generate_scene(image['seed'], CONFIG)
        written = cv2.cvtColor(cv2.imread(str(tmp_path / image['file_name'])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(written, scene.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))
        assert len(anns) == len(scene.instances)
        by_track = {inst.track_id: inst for inst in scene.instances}
        for ann in anns:
            inst = by_track[ann['track_id']]
            assert np.array_equal(coco.annToMask(ann).astype(bool), inst.mask)
            assert ann['noun_phrase'] == inst.noun_phrase and ann['noun_phrase'] in NOUN_PHRASES
            assert coco.loadCats(ann['category_id'])[0]['name'] == inst.category
            assert ann['area'] == inst.area
            x0, y0, x1, y1 = inst.box
            assert ann['bbox'] == [x0, y0, x1 - x0, y1 - y0]
        present = {p for ann in anns for p in ann['phrases']}
        assert set(image['absent_noun_phrases']) == set(NOUN_PHRASES) - present


def test_to_coco_filters_small_instances_and_validates_names():
    scenes = [generate_scene(s, CONFIG) for s in (1, 2)]
    full = to_coco(scenes)
    filtered = to_coco(scenes, min_area=50)
    small = [a for a in full['annotations'] if a['area'] < 50]
    assert small, 'tiny configs always produce some small instances'
    assert len(filtered['annotations']) == len(full['annotations']) - len(small)
    assert all(a['area'] >= 50 for a in filtered['annotations'])
    assert [a['id'] for a in filtered['annotations']] == list(
        range(1, len(filtered['annotations']) + 1))
    assert [i['file_name'] for i in full['images']] == ['000000.png', '000001.png']
    with pytest.raises(ValueError, match='file names'):
        to_coco(scenes, file_names=['a.png'])
    with pytest.raises(ValueError, match='min_area'):
        to_coco(scenes, min_area=0)


def test_video_dataset_round_trips_frames_masks_and_depth(tmp_path):
    path = write_video_dataset(tmp_path, 2, 3, seed=6, config=CONFIG, pan_speed=5.0)
    index = json.loads(path.read_text())
    assert [v['name'] for v in index['videos']] == ['video_000', 'video_001']
    entry = index['videos'][1]
    video = OrchardVideo(sample_seed(6, 1), CONFIG, n_frames=3, pan_speed=5.0)
    assert entry['seed'] == video.seed
    assert {t['track_id']: t['noun_phrase'] for t in entry['tracks']} == {
        tid: info.noun_phrase for tid, info in video.tracks.items()}
    for frame in video:
        rgb, labels, depth = read_video_frame(tmp_path, entry, frame.index)
        assert np.array_equal(rgb, frame.image)
        assert labels.dtype == np.uint16 and np.array_equal(labels, frame.labels)
        assert depth.dtype == np.uint16 and np.array_equal(depth, frame.depth_mm)
        objects = entry['frames'][frame.index]['objects']
        assert sorted(o['track_id'] for o in objects) == sorted(
            int(v) for v in np.unique(labels) if v)
    with pytest.raises(IndexError):
        read_video_frame(tmp_path, entry, 3)


def test_cli_writes_both_datasets(tmp_path, capsys):
    coco_dir, video_dir = tmp_path / 'coco', tmp_path / 'video'
    assert main(['coco', '--out', str(coco_dir), '--n', '2', '--seed', '3', '--width', '96',
                 '--height', '64', '--trunk-prob', '0']) == 0
    data = json.loads((coco_dir / 'annotations.json').read_text())
    assert len(data['images']) == 2 and data['images'][0]['width'] == 96
    assert all(a['noun_phrase'] != 'trunk' for a in data['annotations'])
    assert sorted(os.listdir(coco_dir / 'images')) == ['000000.png', '000001.png']
    assert main(['video', '--out', str(video_dir), '--n-videos', '1', '--frames', '2',
                 '--width', '96', '--height', '64', '--parallax']) == 0
    index = json.loads((video_dir / 'index.json').read_text())
    assert index['videos'][0]['parallax'] is True
    assert sorted(os.listdir(video_dir / 'video_000' / 'masks')) == ['000000.png', '000001.png']
    assert 'wrote' in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['coco', '--out', str(tmp_path), '--n', '0'])
    assert exit_info.value.code == 2
    assert main(['coco', '--out', str(tmp_path), '--n', '1', '--width', '8']) == 1
    assert 'at least 32' in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'sam_gap_ros.synthetic.cli', 'coco', '--out', str(tmp_path),
         '--n', '1', '--width', '64', '--height', '48'],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'annotations.json').is_file()
