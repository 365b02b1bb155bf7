"""SAM2-vs-SAM3 evaluation: scoring checks and an end-to-end run on tiny real models."""

import json
import shutil

import cv2
import numpy as np
from pycocotools import mask as mask_utils
import pytest

from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
from sam_gap_ros.synthetic import OrchardSceneConfig, write_coco_dataset
from training import evaluate
from training.coco_data import CocoInstances

SCENE = OrchardSceneConfig(width=96, height=64, n_apples=(2, 3), cluster_size=(1, 1),
                           hfov_deg=30.0, apple_radius_m=(0.045, 0.055), n_front_leaves=(0, 1))


@pytest.fixture(scope='module')
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco')
    write_coco_dataset(root, 1, seed=3, config=SCENE, min_area=10)
    return root


def _run_from(dataset, predict, phrases):
    """Build a SAM2-style run: one mask per instance, given under each of its phrases."""
    run = evaluate.FamilyRun('test', prompts=7)
    sample = dataset[0]
    run.predictions.append([
        pred for i, mask in enumerate(sample.masks)
        for pred in evaluate.instance_predictions(sample, i, predict(mask), 0.9, set(phrases))])
    return run


def test_scoring_perfect_half_and_missing_predictions(coco_dir):
    dataset = CocoInstances(coco_dir)
    phrases = dataset.noun_phrases
    n_objects = len(dataset[0])
    perfect = evaluate.score_run(dataset, _run_from(dataset, lambda m: m, phrases), phrases, 0.5)
    overall = perfect['overall']
    assert overall['objects'] == n_objects
    assert overall['instances'] == sum(perfect[p]['instances'] for p in phrases) >= n_objects
    assert overall['miou'] == pytest.approx(1.0)
    assert overall['recall'] == 1.0 and overall['precision'] == 1.0
    assert overall['ap'] == pytest.approx(1.0) and overall['ap50'] == pytest.approx(1.0)
    assert overall['prompts'] == 7
    assert overall['prompts_per_object'] == pytest.approx(7 / n_objects)

    def top_rows(mask):
        # keep the upper half of each mask's rows: IoU = kept area / full area
        rows = np.flatnonzero(mask.any(1))
        cut = rows[0] + (len(rows) + 1) // 2
        out = mask.copy()
        out[cut:] = False
        return out

    sample = dataset[0]
    expected = np.mean([top_rows(sample.masks[i]).sum() / sample.masks[i].sum()
                        for p in phrases for i in sample.instances_for(p)])
    half = evaluate.score_run(dataset, _run_from(dataset, top_rows, phrases), phrases, 0.5)
    assert half['overall']['miou'] == pytest.approx(expected)

    # Predictions below the operating threshold are not kept: nothing is found.
    missed = evaluate.score_run(dataset, _run_from(dataset, lambda m: m, phrases), phrases,
                                0.95)
    assert missed['overall']['recall'] == 0.0 and missed['overall']['miou'] == 0.0


def test_a_phrase_is_answered_by_every_instance_listing_it(coco_dir):
    """A damaged red apple answers 'ripe red apple' and 'apple' too, as SAM3 is trained."""
    dataset = CocoInstances(coco_dir)
    sample = dataset[0]
    phrases = dataset.vocabulary
    assert any(len(names) > 1 for names in sample.phrases)  # the case under test
    # What a perfect SAM3 returns for each phrase: exactly the instances that answer it.
    oracle = evaluate.FamilyRun('oracle', prompts=len(phrases))
    oracle.predictions.append([evaluate.Prediction(p, mask, 0.9)
                               for p in phrases for mask in sample.masks_for(p)])

    table = evaluate.score_run(dataset, oracle, phrases, 0.5)

    apples = sum('apple' in names for names in sample.phrases)
    assert apples >= 2 and table['apple']['instances'] == apples
    for phrase in phrases:
        if table[phrase]['instances']:
            assert table[phrase]['precision'] == table[phrase]['recall'] == 1.0, phrase
            assert table[phrase]['ap'] == pytest.approx(1.0), phrase
    assert table['overall']['ap'] == pytest.approx(1.0)
    # SAM2 prompted once per instance scores the same on the same ground truth.
    sam2_style = evaluate.score_run(dataset, _run_from(dataset, lambda m: m, phrases), phrases,
                                    0.5)
    for phrase in phrases + ['overall']:
        for key in ('instances', 'miou', 'recall', 'precision', 'ap'):
            assert sam2_style[phrase][key] == pytest.approx(table[phrase][key]), (phrase, key)


def test_evaluate_end_to_end_with_tiny_models(coco_dir, tmp_path):
    sam2_dir = save_tiny_sam2(tmp_path / 'sam2', image_size=64)
    sam3_dir = save_tiny_sam3(tmp_path / 'sam3')
    out = tmp_path / 'report'
    code = evaluate.main(['--coco', str(coco_dir), '--sam2', str(sam2_dir), '--sam3',
                          str(sam3_dir), '--out', str(out), '--device', 'cpu',
                          '--sam2-prompt', 'box+points', '--ap-score-threshold', '0.0',
                          '--mask-threshold', '0.45'])
    assert code == 0
    report = json.loads((out / 'evaluation.json').read_text())
    assert report['sam3_mask_threshold'] == 0.45
    phrases = CocoInstances(coco_dir).noun_phrases
    assert report['phrases'] == phrases
    n_objects = report['results']['sam2']['overall']['objects']
    assert n_objects == len(CocoInstances(coco_dir)[0])
    # Annotation effort: a box and a click per instance vs one phrase per concept.
    assert report['results']['sam2']['overall']['prompts'] == 2 * n_objects
    assert report['results']['sam3']['overall']['prompts'] == len(phrases)
    for family in ('sam2', 'sam3'):
        for phrase in phrases + ['overall']:
            row = report['results'][family][phrase]
            for key in ('miou', 'ap', 'ap50', 'recall', 'precision'):
                assert 0.0 <= row[key] <= 1.0
    markdown = (out / 'evaluation.md').read_text()
    assert '| concept | model | instances | mIoU | AP | AP50 | recall | precision |' in markdown
    assert all(f'| {p} | SAM3 |' in markdown for p in phrases)
    chart = cv2.imread(str(out / 'evaluation.png'))
    assert chart is not None and chart.shape[0] > 100 and chart.shape[1] > 300


def test_evaluate_rejects_bad_requests(coco_dir, tmp_path):
    with pytest.raises(ValueError, match='nothing to evaluate'):
        evaluate.evaluate(coco_dir, tmp_path)
    with pytest.raises(ValueError, match='do not occur'):
        evaluate.evaluate(coco_dir, tmp_path, phrases=['pear'], sam2_dir=tmp_path)
    # 'apple' is no primary noun phrase, but annotations list it: it can be evaluated (this
    # call gets past the phrase check and fails on the empty model folder instead).
    with pytest.raises(Exception) as error:
        evaluate.evaluate(coco_dir, tmp_path, phrases=['apple'], sam2_dir=tmp_path)
    assert 'do not occur' not in str(error.value)


def test_predictions_on_a_crowd_region_are_neither_true_nor_false(coco_dir, tmp_path):
    """Treat crowd regions as COCO does: finding the apples of a group costs nothing."""
    crowd_dir = tmp_path / 'crowd'
    shutil.copytree(coco_dir, crowd_dir)
    annotations = json.loads((crowd_dir / 'annotations.json').read_text())
    first_apple = next(a for a in annotations['annotations'] if 'apple' in a['phrases'])
    first_apple['iscrowd'] = 1
    (crowd_dir / 'annotations.json').write_text(json.dumps(annotations))
    dataset = CocoInstances(crowd_dir)
    sample = dataset[0]
    phrases = dataset.vocabulary
    (crowd,) = sample.crowd_masks
    # A perfect detector also returns the crowd region under each phrase it may hold.
    oracle = evaluate.FamilyRun('oracle', prompts=len(phrases))
    oracle.predictions.append(
        [evaluate.Prediction(p, mask, 0.9) for p in phrases for mask in sample.masks_for(p)]
        + [evaluate.Prediction(p, crowd, 0.9) for p in phrases if sample.crowd_mask_for(p).any()])

    table = evaluate.score_run(dataset, oracle, phrases, 0.5)

    assert table['apple']['instances'] == sum('apple' in n for n in sample.phrases) >= 1
    assert table['overall']['precision'] == 1.0 and table['overall']['recall'] == 1.0
    assert table['overall']['ap'] == pytest.approx(1.0)


def _rewrite_phrases(src, dst, rewrite):
    shutil.copytree(src, dst)
    annotations = json.loads((dst / 'annotations.json').read_text())
    for ann in annotations['annotations']:
        rewrite(ann)
    (dst / 'annotations.json').write_text(json.dumps(annotations))
    return CocoInstances(dst)


@pytest.fixture(scope='module')
def sam3_engine(tmp_path_factory):
    return Sam3ConceptEngine.load(save_tiny_sam3(tmp_path_factory.mktemp('sam3')), device='cpu')


def test_sam3_finds_phrases_written_with_capitals(coco_dir, tmp_path, sam3_engine):
    """The engine reports detections under canonical (lower-case) text, as the data is."""
    def title(ann):
        ann['noun_phrase'] = ann['noun_phrase'].title()
        ann['phrases'] = [p.title() for p in ann['phrases']]

    dataset = _rewrite_phrases(coco_dir, tmp_path / 'capitals', title)
    plain = CocoInstances(coco_dir)
    run = evaluate.run_sam3(sam3_engine, dataset, dataset.noun_phrases, 0.0)
    expected = evaluate.run_sam3(sam3_engine, plain, plain.noun_phrases, 0.0)
    assert len(expected.predictions[0]) > 0
    assert [(p.phrase, p.score) for p in run.predictions[0]] == \
        [(p.phrase, p.score) for p in expected.predictions[0]]


def test_sam3_evaluates_more_phrases_than_one_concept_set_holds(coco_dir, tmp_path,
                                                                sam3_engine):
    words = ['red', 'green', 'yellow', 'brown', 'dark', 'pale', 'small', 'large', 'round',
             'young', 'old', 'ripe', 'unripe', 'rotten', 'bruised', 'cracked', 'healthy']

    def many(ann):
        ann['phrases'] = ann['phrases'] + [f'{w} fruit' for w in words]

    dataset = _rewrite_phrases(coco_dir, tmp_path / 'many', many)
    phrases = dataset.vocabulary
    assert len(phrases) > 20
    run = evaluate.run_sam3(sam3_engine, dataset, phrases, 0.0)
    assert run.prompts == len(phrases)
    assert {p.phrase for p in run.predictions[0]} == set(phrases)
    # Each group's detections are those of the phrases asked on their own.
    alone = evaluate.run_sam3(sam3_engine, dataset, phrases[-2:], 0.0)
    grouped = [p for p in run.predictions[0] if p.phrase in phrases[-2:]]
    assert [p.phrase for p in grouped] == [p.phrase for p in alone.predictions[0]]
    assert [p.score for p in grouped] == pytest.approx([p.score for p in alone.predictions[0]],
                                                       abs=1e-5)


def _strip_dataset(root, spans, width=200, height=10):
    """Write a one-image COCO set of 'apple' instances, each the columns ``[c0, c1)``."""
    (root / 'images').mkdir(parents=True)
    cv2.imwrite(str(root / 'images' / 'strips.png'), np.zeros((height, width, 3), np.uint8))
    anns = []
    for i, (c0, c1) in enumerate(spans):
        mask = np.zeros((height, width), np.uint8)
        mask[:, c0:c1] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        anns.append({'id': i + 1, 'image_id': 1, 'category_id': 1, 'iscrowd': 0,
                     'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()},
                     'area': float(mask.sum()), 'bbox': [c0, 0, c1 - c0, height]})
    (root / 'annotations.json').write_text(json.dumps({
        'images': [{'id': 1, 'file_name': 'strips.png', 'width': width, 'height': height}],
        'annotations': anns, 'categories': [{'id': 1, 'name': 'apple'}]}))
    return CocoInstances(root)


def test_a_hit_is_not_traded_for_two_weak_pairs(tmp_path):
    """Matching keeps a prediction's hit rather than maximising the raw IoU total."""
    dataset = _strip_dataset(tmp_path / 'strips', [(0, 100), (100, 200)])  # touching apples
    wide = np.zeros((10, 200), bool)
    wide[:, 10:140] = True  # IoU 0.64 with the first apple, 0.21 with the second
    fragment = np.zeros((10, 200), bool)
    fragment[:, 0:45] = True  # IoU 0.45 with the first apple
    run = evaluate.FamilyRun('test')
    run.predictions.append([evaluate.Prediction('apple', wide, 0.9)])
    alone = evaluate.score_run(dataset, run, ['apple'], 0.5)['apple']
    run.predictions[0].append(evaluate.Prediction('apple', fragment, 0.8))
    both = evaluate.score_run(dataset, run, ['apple'], 0.5)['apple']
    # The fragment is a false positive; it must not undo the wide mask's hit (recall 0).
    assert alone['recall'] == both['recall'] == 0.5
    assert both['precision'] == 0.5
    assert both['miou'] == pytest.approx(alone['miou']) == pytest.approx(90 / 140 / 2)


def test_phrases_sam3_would_read_as_compositions_are_refused_before_any_run(
        coco_dir, tmp_path, sam3_engine):
    def near(ann):
        ann['phrases'] = ann['phrases'] + ['apple near trunk']

    dataset = _rewrite_phrases(coco_dir, tmp_path / 'near', near)
    with pytest.raises(ValueError, match="'apple near trunk': .* composition of"):
        evaluate.run_sam3(sam3_engine, dataset, ['apple near trunk'], 0.0)

    class NoSam2:
        def track(self, *args, **kwargs):
            raise AssertionError('SAM2 ran before the phrases were checked')

    with pytest.raises(ValueError, match='cannot be asked for these phrases'):
        evaluate.evaluate(tmp_path / 'near', tmp_path / 'out', phrases=['apple near trunk'],
                          sam2_tracker=NoSam2(), sam3_engine=sam3_engine)
