"""Quality of the shipped tiny orchard models on held-out synthetic data (inference only).

Usage::

    python benchmarks/quality_tiny_models.py [--quick] [--json OUT.json]

Loads ``models/tiny-orchard-sam3`` and ``models/tiny-orchard-sam2`` and measures, with the
metrics of ``training.tiny_quality`` (documented there): SAM3 concept mIoU / recall on
"ripe red apple" vs "unripe green apple" and the absent-concept rate ("trunk" on trunk-free
scenes), SAM2 per-apple tracking mIoU over 60-frame pans from one box prompt, and hybrid
(SAM3 + SAM2) ID switches per 10 tracks. ``--quick`` (< 60 s on 2 CPU cores) uses fewer
scenes and one clip. The LAST line printed is ``sam3_miou=<float> sam3_recall=<float>
sam2_track_miou=<float> hybrid_id_switches_per_10=<float>`` (one line).
"""

import argparse
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam_gap_ros.engines.hybrid import HybridTracker  # noqa: E402
from sam_gap_ros.engines.sam2_tracker import Sam2Tracker  # noqa: E402
from training import tiny_quality as quality  # noqa: E402


def main() -> int:
    """Run the evaluation and print the metrics; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='20 scenes and 1 clip (< 60 s)')
    parser.add_argument('--json', type=Path, default=None, help='also write the metrics here')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quality.check_held_out()
    scene_seeds = quality.SCENE_SEEDS[:20] if args.quick else quality.SCENE_SEEDS
    clip_seeds = quality.CLIP_SEEDS[:1] if args.quick else quality.CLIP_SEEDS
    started = time.perf_counter()
    engines = quality.load_engines()
    concepts = quality.evaluate_concepts(engines['sam3'], scene_seeds)
    sam3_s = time.perf_counter() - started
    tracks = quality.evaluate_tracking(engines['sam2'], clip_seeds)
    prompt_seeds = quality.PROMPT_SEEDS[:10] if args.quick else quality.PROMPT_SEEDS
    prompted = quality.evaluate_prompted_frames(engines['sam2'], prompt_seeds)
    sam2_s = time.perf_counter() - started - sam3_s
    hybrid = HybridTracker(engines['sam3'], Sam2Tracker.load(quality.SAM2_DIR, device='cpu'),
                           redetect_every_n=quality.REDETECT_EVERY)
    hybrid_scores = quality.evaluate_hybrid(hybrid, clip_seeds)
    total_s = time.perf_counter() - started
    metrics = {
        'sam3_miou': concepts.miou, 'sam3_recall': concepts.recall,
        'sam3_precision': concepts.precision,
        'sam3_absent_concept_clean_rate': concepts.absent_clean_rate,
        'sam3_concept_found_when_present_rate': concepts.present_found_rate,
        'sam3_instances': concepts.num_truth, 'sam3_scenes': len(scene_seeds),
        'sam2_track_miou': tracks.track_miou,
        'sam2_min_apple_miou': min(tracks.per_apple_miou.values(), default=0.0),
        'sam2_apples': len(tracks.per_apple_miou),
        'sam2_new_object_miou': min(tracks.new_object_miou, default=0.0),
        'sam2_left_frames': tracks.left_frames,
        'sam2_left_reported_present': tracks.left_reported_present,
        'sam2_disturbance_min_iou': tracks.disturbance_min_iou,
        'sam2_prompted_frame_miou': float(np.mean(prompted)) if prompted else 0.0,
        'sam2_prompted_apples': len(prompted),
        'hybrid_id_switches': hybrid_scores.switches, 'hybrid_tracks': hybrid_scores.tracks,
        'hybrid_id_switches_per_10': hybrid_scores.switches_per_10,
        'hybrid_coverage': hybrid_scores.coverage,
        'seconds_sam3': sam3_s, 'seconds_sam2': sam2_s, 'seconds_total': total_s,
    }
    for name, value in metrics.items():
        print(f'{name}: {value:.4f}' if isinstance(value, float) else f'{name}: {value}')
    if args.json is not None:
        args.json.write_text(json.dumps(metrics, indent=1))
    print(quality.summary_line(concepts, tracks, hybrid_scores))
    return 0


if __name__ == '__main__':
    sys.exit(main())
