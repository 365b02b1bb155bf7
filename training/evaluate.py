"""Compare SAM2 (prompted per object) with SAM3 (given only noun phrases) on a COCO set.

Usage::

    python -m training.evaluate --coco data/val --sam2 runs/sam2.1_tiny/best
        --sam3 runs/sam3_orchard/best --out reports/sam2_vs_sam3
        [--sam2-prompt box|points|box+points]

(one command line).

SAM2 gets the prompts a human would give for every ground-truth instance (its tight box
and/or one click at the mask's interior centre) through ``Sam2Tracker`` on a single frame.
SAM3 gets each noun phrase of the dataset once, through ``Sam3ConceptEngine``.

The ground truth of a phrase is every instance that answers it, as the SAM3 trainer
teaches: an annotation's ``phrases`` (a damaged red apple answers "ripe red apple" as well
as its primary "damaged apple"). A SAM2 mask, prompted once per instance, therefore answers
every evaluated phrase of its instance. Both are scored per phrase and overall (over all
phrase-instance pairs) with

* ``miou``: mean over ground-truth instances of the IoU with its matched prediction
  (one-to-one Hungarian matching on mask IoU among predictions of the same phrase above
  the operating score threshold, the most pairs at IoU >= 0.5 first, then the highest
  total IoU; unmatched instances count 0);
* ``recall``: fraction of instances matched with IoU >= 0.5;
* ``precision``: fraction of kept predictions matched with IoU >= 0.5; a prediction lying
  mostly inside a crowd region (``iscrowd: 1``) of its phrase is neither (COCO's rule);
* ``ap`` / ``ap50``: COCO mask AP (pycocotools) with the phrase as the category, over all
  predictions above ``--ap-score-threshold``;
* annotation effort: prompts per object (distinct instances). SAM2 needs >= 1 per
  instance (a box or a click each), SAM3 one noun phrase per concept for the whole dataset.

Writes ``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` (bar chart) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
import io
import json
from pathlib import Path
import sys
import time
from typing import AbstractSet, Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import torch

from sam_gap_ros.engines.concept_query import MAX_CONCEPTS
from sam_gap_ros.mask_ops import mask_iou_matrix
from training.coco_data import canonical_phrase, CocoInstances, CocoSample, concept_problem
from training.matching import hungarian_match
from training.metrics import mostly_inside
from training.sam2_data import center_click

PathLike = Union[str, Path]
SAM2_PROMPTS = ('box', 'points', 'box+points')
MATCH_IOU = 0.5


@dataclass
class Prediction:
    """One predicted instance mask of a phrase in an image."""

    phrase: str
    mask: np.ndarray
    score: float


@dataclass
class FamilyRun:
    """All predictions of one model family over the dataset, with its annotation effort."""

    name: str
    predictions: List[List[Prediction]] = field(default_factory=list)
    """Per image, in dataset order."""
    prompts: int = 0
    seconds: float = 0.0


def _rle(mask: np.ndarray) -> Dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return rle


# ----------------------------------------------------------------------------- inference


def run_sam2(tracker: Any, dataset: CocoInstances, phrases: Sequence[str], prompt: str,
             max_images: Optional[int] = None) -> FamilyRun:
    """Segment every instance of ``phrases`` with SAM2 from its human-style prompt."""
    if prompt not in SAM2_PROMPTS:
        raise ValueError(f"unknown SAM2 prompt '{prompt}': use one of {SAM2_PROMPTS}")
    run = FamilyRun('SAM2')
    started = time.time()
    wanted = set(phrases)
    for index in range(_count(dataset, max_images)):
        sample = dataset[index]
        keep = [i for i, names in enumerate(sample.phrases) if wanted.intersection(names)]
        preds: List[Prediction] = []
        if keep:
            tracker.reset()
            tracker.track(sample.image)  # stores the frame; prompts apply to it
            kwargs: Dict[str, Any] = {}
            if 'box' in prompt:
                kwargs['boxes'] = sample.boxes[keep].astype(np.float32)
            if 'points' in prompt:
                kwargs['points'] = np.array([[center_click(sample.masks[i])] for i in keep],
                                            dtype=np.float32)
                kwargs['labels'] = np.ones((len(keep), 1), dtype=np.int64)
            ids = tracker.add_objects(**kwargs)
            run.prompts += len(keep) * (2 if prompt == 'box+points' else 1)
            by_id = {obj.object_id: obj for obj in tracker.last_result.objects}
            for obj_id, i in zip(ids, keep, strict=True):
                obj = by_id.get(obj_id)
                if obj is None or not obj.present or not obj.mask.any():
                    continue  # judged absent: no prediction, the instance counts as missed
                score = float(torch.sigmoid(torch.tensor(obj.score)))
                preds += instance_predictions(sample, i, obj.mask, score, wanted)
        run.predictions.append(preds)
    run.seconds = time.time() - started
    return run


def check_sam3_phrases(phrases: Sequence[str]) -> None:
    """Raise ValueError for phrases SAM3 cannot be asked for as one noun phrase each.

    The engine reads ``near`` / ``but not`` as compositions of other phrases and refuses
    what its grammar does not know; either would score something else than the phrase the
    annotations name (``prepare_data`` warns about such phrases as ``not_a_concept``).
    """
    problems = [f"'{phrase}': {why}" for phrase in phrases
                if (why := concept_problem(phrase)) is not None]
    if problems:
        raise ValueError('SAM3 cannot be asked for these phrases as noun phrases (rephrase '
                         'them in the annotations): ' + '; '.join(problems))


def run_sam3(engine: Any, dataset: CocoInstances, phrases: Sequence[str],
             score_threshold: float, max_images: Optional[int] = None) -> FamilyRun:
    """Segment all instances of every phrase with SAM3 given only the phrases."""
    check_sam3_phrases(phrases)
    run = FamilyRun('SAM3')
    started = time.time()
    run.prompts = len(phrases)  # each noun phrase is typed once for the whole dataset
    count = _count(dataset, max_images)
    run.predictions = [[] for _ in range(count)]
    # The engine takes at most MAX_CONCEPTS concepts at once: a dataset with more phrases
    # is run in groups (one backbone pass per group and image).
    for start in range(0, len(phrases), MAX_CONCEPTS):
        group = list(phrases[start:start + MAX_CONCEPTS])
        engine.set_concepts(group)
        for index in range(count):
            detections = engine.detect(dataset[index].image, score_threshold=score_threshold)
            # Detections are keyed by the engine's canonical text of each phrase.
            run.predictions[index] += [
                Prediction(phrase, inst.mask, float(inst.score)) for phrase in group
                for inst in detections.get(canonical_phrase(phrase), [])]
    run.seconds = time.time() - started
    return run


def instance_predictions(sample: CocoSample, index: int, mask: np.ndarray, score: float,
                         phrases: AbstractSet[str]) -> List[Prediction]:
    """Return a mask predicted for instance ``index`` as a prediction of each of its phrases.

    Only the phrases being evaluated count; one prompt found the instance, so its mask
    answers every phrase the instance is a positive for.
    """
    return [Prediction(phrase, mask, score) for phrase in sample.phrases[index]
            if phrase in phrases]


def _count(dataset: CocoInstances, max_images: Optional[int]) -> int:
    return len(dataset) if max_images is None else min(len(dataset), int(max_images))


# ----------------------------------------------------------------------------- scoring


def _match(gt_masks: List[np.ndarray], preds: List[Prediction]) -> Tuple[List[float], Set[int]]:
    """Return each GT's matched IoU (0 if unmatched) and the true-positive predictions.

    The one-to-one assignment has the most pairs at IoU >= ``MATCH_IOU`` and, among those,
    the highest total IoU. On raw IoU alone two weak pairs (0.45 + 0.21) outweigh one hit
    (0.64): a fragment would take a found instance's partner, and adding a prediction
    could lower recall.
    """
    if not gt_masks:
        return [], set()
    if not preds:
        return [0.0] * len(gt_masks), set()
    iou = mask_iou_matrix([p.mask for p in preds], gt_masks)
    # A hit is worth more than any total of IoUs (at most min(P, G)): hits first, then IoU.
    gain = iou + (min(iou.shape) + 1.0) * (iou >= MATCH_IOU)
    pred_idx, gt_idx = hungarian_match(torch.from_numpy(-gain))
    best = [0.0] * len(gt_masks)
    hits: Set[int] = set()
    for p, g in zip(pred_idx.tolist(), gt_idx.tolist(), strict=True):
        best[g] = float(iou[p, g])
        if best[g] >= MATCH_IOU:
            hits.add(p)
    return best, hits


def _inside_crowd(preds: List[Prediction], crowd: np.ndarray) -> Set[int]:
    """Return the predictions lying mostly inside the crowd region (see ``mostly_inside``)."""
    if not crowd.any():
        return set()
    return {i for i, pred in enumerate(preds) if mostly_inside(pred.mask, crowd)}


def _coco_ap(dataset: CocoInstances, run: FamilyRun, phrases: Sequence[str],
             num_images: int) -> Dict[str, Tuple[float, float]]:
    """Return ``{phrase or 'overall': (AP, AP50)}`` from pycocotools' mask evaluation."""
    cat_ids = {p: i + 1 for i, p in enumerate(phrases)}
    images, anns, dets = [], [], []
    for index in range(num_images):
        sample = dataset[index]
        height, width = sample.image.shape[:2]
        images.append({'id': index + 1, 'height': height, 'width': width})
        crowds = zip(sample.crowd_masks if sample.crowd_masks is not None else [],
                     sample.crowd_phrases or [], strict=True)
        regions = [(mask, 1, names) for mask, names in crowds]  # COCO ignore regions
        instances = zip(sample.masks, sample.phrases, strict=True)
        regions += [(mask, 0, names) for mask, names in instances]
        for mask, crowd, names in regions:
            rle = _rle(mask)
            for phrase in names:
                if phrase in cat_ids:
                    anns.append({'id': len(anns) + 1, 'image_id': index + 1,
                                 'category_id': cat_ids[phrase], 'segmentation': rle,
                                 'area': float(mask.sum()), 'iscrowd': crowd,
                                 'bbox': list(mask_utils.toBbox(rle))})
        for pred in run.predictions[index]:
            dets.append({'image_id': index + 1, 'category_id': cat_ids[pred.phrase],
                         'segmentation': _rle(pred.mask), 'score': pred.score})
    result = {p: (0.0, 0.0) for p in phrases}
    result['overall'] = (0.0, 0.0)
    if not anns or not dets:
        return result
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = {'images': images, 'annotations': anns,
                      'categories': [{'id': i, 'name': p} for p, i in cat_ids.items()]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        evaluator = COCOeval(gt, dt, iouType='segm')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]
    precision = evaluator.eval['precision'][:, :, :, 0, -1]
    for phrase, cat in cat_ids.items():
        k = evaluator.params.catIds.index(cat)
        pr = precision[:, :, k]
        if (pr > -1).any():
            result[phrase] = (float(pr[pr > -1].mean()),
                              float(pr[0][pr[0] > -1].mean()) if (pr[0] > -1).any() else 0.0)
    result['overall'] = (max(0.0, float(evaluator.stats[0])), max(0.0, float(evaluator.stats[1])))
    return result


def score_run(dataset: CocoInstances, run: FamilyRun, phrases: Sequence[str],
              score_threshold: float) -> Dict[str, Dict[str, float]]:
    """Return per-phrase and overall metrics of one family's predictions."""
    num_images = len(run.predictions)
    ious: Dict[str, List[float]] = {p: [] for p in phrases}
    true_pos = {p: 0 for p in phrases}
    kept = {p: 0 for p in phrases}
    objects = 0  # distinct instances answering any phrase: what a human prompts once each
    for index in range(num_images):
        sample = dataset[index]
        objects += sum(1 for names in sample.phrases if set(phrases).intersection(names))
        for phrase in phrases:
            gts = list(sample.masks[sample.instances_for(phrase)])
            preds = [q for q in run.predictions[index]
                     if q.phrase == phrase and q.score >= score_threshold]
            matched, hits = _match(gts, preds)
            ignored = _inside_crowd(preds, sample.crowd_mask_for(phrase)) - hits
            ious[phrase] += matched
            true_pos[phrase] += len(hits)
            kept[phrase] += len(preds) - len(ignored)
    ap = _coco_ap(dataset, run, phrases, num_images)
    table: Dict[str, Dict[str, float]] = {}
    for phrase in list(phrases) + ['overall']:
        if phrase == 'overall':
            values = [v for vs in ious.values() for v in vs]
            tp, n_pred = sum(true_pos.values()), sum(kept.values())
        else:
            values, tp, n_pred = ious[phrase], true_pos[phrase], kept[phrase]
        n_gt = len(values)
        table[phrase] = {
            'instances': n_gt,
            'miou': float(np.mean(values)) if values else 0.0,
            'recall': tp / n_gt if n_gt else 0.0,
            'precision': tp / n_pred if n_pred else 0.0,
            'ap': ap[phrase][0],
            'ap50': ap[phrase][1],
        }
    effort = run.prompts / objects if objects else 0.0
    table['overall']['objects'] = objects
    table['overall']['prompts'] = run.prompts
    table['overall']['prompts_per_object'] = effort
    table['overall']['seconds_per_image'] = run.seconds / max(1, num_images)
    return table


# ----------------------------------------------------------------------------- reports


def write_markdown(report: Dict[str, Any], path: PathLike) -> Path:
    """Write the comparison as a Markdown table (one row per phrase and family)."""
    lines = ['# SAM2 (prompted) vs SAM3 (noun phrases)', '',
             f"Dataset: `{report['dataset']}`, {report['num_images']} images, "
             f"SAM2 prompt: {report['sam2_prompt']}, SAM3 score threshold "
             f"{report['score_threshold']}.", '',
             '| concept | model | instances | mIoU | AP | AP50 | recall | precision |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    for phrase in report['phrases'] + ['overall']:
        for family in ('sam2', 'sam3'):
            if family not in report['results']:
                continue
            row = report['results'][family][phrase]
            name = f'**{phrase}**' if phrase == 'overall' else phrase
            lines.append(f"| {name} | {family.upper()} | {row['instances']} | {row['miou']:.3f} "
                         f"| {row['ap']:.3f} | {row['ap50']:.3f} | {row['recall']:.3f} "
                         f"| {row['precision']:.3f} |")
    lines += ['', '| model | prompts | prompts per object | s / image |', '|---|---:|---:|---:|']
    for family, rows in report['results'].items():
        row = rows['overall']
        lines.append(f"| {family.upper()} | {row['prompts']} | {row['prompts_per_object']:.3f} "
                     f"| {row['seconds_per_image']:.3f} |")
    path = Path(path)
    path.write_text('\n'.join(lines) + '\n')
    return path


def write_bar_chart(report: Dict[str, Any], path: PathLike) -> Path:
    """Write grouped bars of mIoU / AP / recall per concept for both families."""
    import matplotlib
    matplotlib.use('Agg')  # no display on robots and CI
    import matplotlib.pyplot as plt

    groups = report['phrases'] + ['overall']
    metrics = ('miou', 'ap', 'recall')
    families = [f for f in ('sam2', 'sam3') if f in report['results']]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 1.6 * len(groups), 4), sharey=True)
    width = 0.8 / max(1, len(families))
    x = np.arange(len(groups))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        for i, family in enumerate(families):
            values = [report['results'][family][g][metric] for g in groups]
            ax.bar(x + (i - (len(families) - 1) / 2) * width, values, width,
                   label=family.upper())
        ax.set_title(metric)
        ax.set_xticks(x)
        ax.set_xticklabels(groups, rotation=30, ha='right', fontsize=8)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(coco_root: PathLike, out_dir: PathLike, *, sam2_dir: Optional[PathLike] = None,
             sam3_dir: Optional[PathLike] = None, ann_file: Optional[PathLike] = None,
             sam2_prompt: str = 'box', phrases: Optional[Sequence[str]] = None,
             max_images: Optional[int] = None, device: str = 'auto',
             score_threshold: float = 0.5, ap_score_threshold: float = 0.05,
             mask_threshold: float = 0.5, sam2_tracker: Any = None,
             sam3_engine: Any = None) -> Dict[str, Any]:
    """Run both families (model dirs, or ready engines for tests) and write the reports.

    Returns the report dict that is also written as ``evaluation.json``.
    """
    dataset = CocoInstances(coco_root, ann_file)
    # The dataset's phrases are canonical (coco_data.canonical_phrase): so are the asked ones.
    phrases = sorted({canonical_phrase(p) for p in phrases}) if phrases \
        else dataset.noun_phrases
    unknown = sorted(set(phrases) - set(dataset.vocabulary))
    if unknown:
        raise ValueError(f'phrases {unknown} do not occur in the dataset '
                         f'(it has {dataset.vocabulary})')
    if sam3_engine is not None or sam3_dir is not None:
        check_sam3_phrases(phrases)  # before a SAM2 run of possibly hours
    if sam2_tracker is None and sam2_dir is not None:
        from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
        sam2_tracker = Sam2Tracker.load(sam2_dir, device=device)
    if sam3_engine is None and sam3_dir is not None:
        from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
        sam3_engine = Sam3ConceptEngine.load(sam3_dir, device=device,
                                             mask_threshold=mask_threshold)
    if sam2_tracker is None and sam3_engine is None:
        raise ValueError('nothing to evaluate: give a SAM2 and/or a SAM3 model')
    results: Dict[str, Any] = {}
    if sam2_tracker is not None:
        run = run_sam2(sam2_tracker, dataset, phrases, sam2_prompt, max_images)
        # SAM2 predicts exactly one mask per prompted object: every one is "kept".
        results['sam2'] = score_run(dataset, run, phrases, 0.0)
    if sam3_engine is not None:
        run = run_sam3(sam3_engine, dataset, phrases, ap_score_threshold, max_images)
        results['sam3'] = score_run(dataset, run, phrases, score_threshold)
    report = {'dataset': str(coco_root), 'num_images': _count(dataset, max_images),
              'phrases': list(phrases), 'sam2_prompt': sam2_prompt,
              'score_threshold': score_threshold, 'ap_score_threshold': ap_score_threshold,
              'sam3_mask_threshold': getattr(sam3_engine, 'mask_threshold', None),
              'match_iou': MATCH_IOU, 'sam2_model': str(sam2_dir) if sam2_dir else None,
              'sam3_model': str(sam3_dir) if sam3_dir else None, 'results': results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'evaluation.json').write_text(json.dumps(report, indent=1))
    write_markdown(report, out / 'evaluation.md')
    write_bar_chart(report, out / 'evaluation.png')
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--coco', required=True, help='COCO dataset folder (images/ + json)')
    parser.add_argument('--ann-file', default=None, help='annotation file relative to --coco')
    parser.add_argument('--sam2', default=None, help='local SAM2 model directory')
    parser.add_argument('--sam3', default=None, help='local SAM3 model directory')
    parser.add_argument('--out', required=True, help='output folder for the reports')
    parser.add_argument('--sam2-prompt', default='box', choices=SAM2_PROMPTS)
    parser.add_argument('--phrases', nargs='*', default=None,
                        help='phrases to evaluate, any the annotations list (default: every '
                        'primary noun phrase of the dataset)')
    parser.add_argument('--max-images', type=int, default=None)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--score-threshold', type=float, default=0.5,
                        help='SAM3 operating point for mIoU / recall / precision')
    parser.add_argument('--ap-score-threshold', type=float, default=0.05,
                        help='lowest SAM3 score kept for AP')
    parser.add_argument('--mask-threshold', type=float, default=0.5,
                        help='SAM3 mask probability cut (the tiny orchard model: 0.35)')
    args = parser.parse_args(argv)
    report = evaluate(args.coco, args.out, sam2_dir=args.sam2, sam3_dir=args.sam3,
                      ann_file=args.ann_file, sam2_prompt=args.sam2_prompt,
                      phrases=args.phrases, max_images=args.max_images, device=args.device,
                      score_threshold=args.score_threshold,
                      ap_score_threshold=args.ap_score_threshold,
                      mask_threshold=args.mask_threshold)
    for family, rows in report['results'].items():
        row = rows['overall']
        print(f"{family}: miou={row['miou']:.4f} ap={row['ap']:.4f} recall={row['recall']:.4f} "
              f"prompts_per_object={row['prompts_per_object']:.3f}")
    print(f'report={Path(args.out) / "evaluation.md"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
