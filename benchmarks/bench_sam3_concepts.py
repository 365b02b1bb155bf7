#!/usr/bin/env python3
"""Benchmark the SAM3 concept engine: cached text, shared backbone, hybrid tracking (CPU).

All measurements run side by side in one process on the same synthetic 480x640 frames,
interleaved frame by frame so load from other processes on a shared machine hits every
variant alike; medians of per-frame wall times are reported.

(a) ``Sam3ConceptEngine.segment`` with cached text embeddings vs the naive transformers
    recipe per frame: ``processor(images=frame, text=concept)``, ``model(**inputs)``,
    ``processor.post_process_instance_segmentation`` (tokenises and re-encodes the text
    and runs the backbone every call).
(b) 1 vs 4 concepts per frame: the engine runs the backbone once and the detector batched
    over the 4 phrases; the naive loop calls the model once per concept.
(c) ``HybridTracker`` (SAM3 re-detection every 10 frames, the tiny SAM2 tracker in
    between) vs SAM3 on every frame, same concept, same frames.

Benchmark architecture. Random weights (no checkpoints here), with the cost structure of
the real ``facebook/sam3``: counted with ``torch.utils.flop_counter`` on the real config,
one 1008 px frame costs 5,613 GFLOP in the ViT backbone, 247 GFLOP in the detector (DETR
encoder/decoder + mask decoder) per phrase and 19 GFLOP in the text encoder per phrase,
i.e. backbone : detector : text = 100 : 4.4 : 0.35. The benchmark config (printed
at start, with the measured ratio) keeps that shape at CPU scale: a 224 px ViT with 12
blocks of width 384 (global attention in the last), and a small detector (width 32, one
encoder and one decoder layer, 16 queries) and text encoder. On CPU the small
detector's fixed per-call overhead makes its share somewhat larger than in the real
model, which makes (b) pessimistic. The tracker is the tiny SAM2 architecture (128 px);
its tracking step costs roughly 15% of a SAM3 frame here (both printed). That ratio is
not derived from the real SAM2.1/SAM3 pair, so (c) shows the scheduling effect rather
than a prediction for the real models.

Detections use ``score_threshold=0`` and ``max_instances=4``, so random weights give
every variant the same amount of post-processing (4 instances per phrase: the naive recipe
passes only its 4 best queries to ``post_process_instance_segmentation``, as a caller who
wants 4 instances would, instead of upsampling all 16 to the frame) and the hybrid
up to 4 tracks (fewer where the duplicate rule merges random masks; the count is
printed); SAM2's object-score head is biased so every track is judged present and goes
through memory encoding on every frame (its worst case).

``--quick`` (< 60 s on 2 cores): 3 timed frames for (a)/(b) and a 10-frame hybrid run
(one re-detection), with SAM3-every-frame taken from the same interleaved loop. Its last
line is ``cached_over_naive=<float> four_concepts_over_one=<float>
hybrid_over_every_frame=<float>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from transformers import Sam3Config
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3ImageSegmentationOutput

if __package__ in (None, '') and not any(Path(p, 'sam_gap_ros').is_dir() for p in sys.path):
    # Run as a script from a source checkout: make the package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam_gap_ros.engines.hybrid import HybridTracker  # noqa: E402
from sam_gap_ros.engines.sam2_tracker import Sam2Tracker  # noqa: E402
from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine  # noqa: E402
from sam_gap_ros.engines.tiny_sam2 import tiny_sam2_video_config  # noqa: E402
from sam_gap_ros.engines.tiny_sam3 import tiny_sam3_config  # noqa: E402

REAL_GFLOP = {'backbone': 5613.0, 'detector': 247.0, 'text': 19.4}
CONCEPTS = ['ripe apple', 'damaged apple', 'leaf', 'trunk']
FRAME_SHAPE = (480, 640, 3)
MAX_INSTANCES = 4  # per phrase, for every variant (see the module docstring)


def bench_config() -> Sam3Config:
    """Return the benchmark SAM3 config (backbone-dominated like the real model)."""
    return tiny_sam3_config(image_size=224, vit_hidden_size=384, vit_layers=12, vit_heads=6,
                            window_size=8, hidden_size=32, heads=2, detr_encoder_layers=1,
                            detr_decoder_layers=1, num_queries=16, text_hidden_size=64,
                            text_layers=1, text_heads=2)


def frames(count: int, seed: int = 0) -> List[np.ndarray]:
    """Return ``count`` synthetic camera frames: a textured background with moving fruit."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 120, FRAME_SHAPE, dtype=np.uint8)
    out = []
    for index in range(count):
        frame = base.copy()
        for k in range(5):
            x, y = 80 + 100 * k + 2 * index, 150 + 40 * (k % 2)
            frame[y:y + 50, x:x + 50] = (200, 30 + 30 * k, 40)
        out.append(frame)
    return out


def timed(fn: Callable[..., object], *args: object) -> float:
    """Return the wall time of one call ``fn(*args)`` in milliseconds."""
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000.0


def naive(engine: Sam3ConceptEngine, frame: np.ndarray, concepts: List[str]) -> list:
    """Run the plain transformers recipe: one processor + model call per concept."""
    processor, model = engine.processor, engine.model
    results = []
    with torch.inference_mode():
        for concept in concepts:
            inputs = processor(images=frame, text=concept, return_tensors='pt')
            inputs.pop('original_sizes')
            outputs = top_queries(model(**inputs), MAX_INSTANCES)
            results.append(processor.post_process_instance_segmentation(
                outputs, threshold=0.0, mask_threshold=0.5,
                target_sizes=[frame.shape[:2]])[0])
    return results


def top_queries(outputs: Sam3ImageSegmentationOutput,
                count: int) -> Sam3ImageSegmentationOutput:
    """Return the ``count`` best-scoring queries of a one-image, one-phrase output.

    With ``threshold=0`` and random weights the processor would otherwise upsample every
    query (16) to the frame while the engine upsamples ``max_instances`` (4), and that,
    not the text caching, made most of the cached/naive gap. The score is the processor's
    (query probability x presence probability).
    """
    scores = outputs.pred_logits[0].sigmoid() * outputs.presence_logits[0].sigmoid()
    keep = scores.topk(min(count, scores.numel())).indices
    return Sam3ImageSegmentationOutput(
        pred_logits=outputs.pred_logits[:, keep], pred_boxes=outputs.pred_boxes[:, keep],
        pred_masks=outputs.pred_masks[:, keep], presence_logits=outputs.presence_logits)


def component_times(engine: Sam3ConceptEngine, frame: np.ndarray,
                    repeats: int) -> Dict[str, float]:
    """Return median ms of one backbone pass, one detector pass and one text encoding."""
    model, processor = engine.model, engine.processor
    text = processor(text=['ripe apple'], return_tensors='pt')
    with torch.inference_mode():
        pixel_values = processor.image_processor(images=frame, return_tensors='pt')[
            'pixel_values']
        vision = model.get_vision_features(pixel_values=pixel_values)
        features = model.get_text_features(**text).pooler_output
        times: Dict[str, List[float]] = {'backbone': [], 'detector': [], 'text': []}
        for _ in range(repeats + 1):
            times['backbone'].append(timed(lambda: model.get_vision_features(
                pixel_values=pixel_values)))
            times['detector'].append(timed(lambda: model(
                vision_embeds=vision, text_embeds=BaseModelOutputWithPooling(
                    pooler_output=features), attention_mask=text['attention_mask'])))
            times['text'].append(timed(lambda: model.get_text_features(**text)))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def make_tracker() -> Sam2Tracker:
    """Return the tiny SAM2 tracker with every object judged present."""
    tracker = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=0)
    with torch.no_grad():
        head = tracker.model.mask_decoder.pred_obj_score_head.proj_out
        head.weight.zero_()
        head.bias.fill_(3.0)
    return tracker


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='short run (< 60 s on 2 cores)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (1: stable timings on a shared machine)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timed_frames = 3 if args.quick else 10
    hybrid_frames = 10 if args.quick else 40

    config = bench_config()
    backbone = config.vision_config.backbone_config
    engine = Sam3ConceptEngine.from_config(config, seed=0, score_threshold=0.0,
                                           max_instances=MAX_INSTANCES)
    params = sum(p.numel() for p in engine.model.vision_encoder.parameters()) / 1e6
    print(f'config: {backbone.image_size} px ViT {backbone.num_hidden_layers}x'
          f'{backbone.hidden_size} ({params:.1f}M params), detector width '
          f'{config.detr_encoder_config.hidden_size}, '
          f'{config.detr_decoder_config.num_queries} queries; frames {FRAME_SHAPE[:2]}; '
          f'{args.threads} thread(s)')
    video = frames(max(timed_frames, hybrid_frames) + 1)

    parts = component_times(engine, video[0], 2 if args.quick else 5)
    real = REAL_GFLOP
    print(f"components (ms): backbone {parts['backbone']:.1f}, detector/phrase "
          f"{parts['detector']:.1f}, text/phrase {parts['text']:.1f} -> backbone:detector:text "
          f"= 100:{100 * parts['detector'] / parts['backbone']:.1f}:"
          f"{100 * parts['text'] / parts['backbone']:.2f} (real SAM3 by FLOPs 100:"
          f"{100 * real['detector'] / real['backbone']:.1f}:"
          f"{100 * real['text'] / real['backbone']:.2f})")

    # (a) + (b): interleaved per frame, the first frame is warm-up.
    runs: Dict[str, List[float]] = {'cached_1': [], 'naive_1': [], 'cached_4': [],
                                    'naive_4': []}
    engine_1 = engine
    engine_4 = Sam3ConceptEngine(engine.model, engine.processor, score_threshold=0.0,
                                 max_instances=MAX_INSTANCES)
    engine_1.set_concepts(CONCEPTS[:1])
    engine_4.set_concepts(CONCEPTS)
    for index, frame in enumerate(video[:timed_frames + 1]):
        sample = {
            'cached_1': timed(engine_1.segment, frame),
            'naive_1': timed(naive, engine, frame, CONCEPTS[:1]),
            'cached_4': timed(engine_4.segment, frame),
            'naive_4': timed(naive, engine, frame, CONCEPTS),
        }
        if index:
            for key, value in sample.items():
                runs[key].append(value)
    med = {k: statistics.median(v) for k, v in runs.items()}
    cached_over_naive = med['cached_1'] / med['naive_1']
    four_over_one = med['cached_4'] / med['cached_1']
    naive_four_over_one = med['naive_4'] / med['naive_1']
    print(f"(a) 1 concept, median ms/frame: cached {med['cached_1']:.1f}, naive "
          f"{med['naive_1']:.1f} -> cached/naive {cached_over_naive:.3f}")
    print(f"(b) 4 concepts, median ms/frame: cached {med['cached_4']:.1f} "
          f"({four_over_one:.2f}x one concept, target <= 1.3), naive {med['naive_4']:.1f} "
          f"({naive_four_over_one:.2f}x one concept); cached/naive with 4 concepts "
          f"{med['cached_4'] / med['naive_4']:.3f}")

    # (c): hybrid vs SAM3 every frame, interleaved on the same frames.
    hybrid = HybridTracker(Sam3ConceptEngine(engine.model, engine.processor,
                                             score_threshold=0.0,
                                             max_instances=MAX_INSTANCES),
                           make_tracker(), redetect_every_n=10)
    hybrid.set_concepts(CONCEPTS[:1])
    hybrid.step(video[0])     # warm-up, then restart the stream so frame 0 re-detects
    hybrid.reset()
    hybrid_ms: List[float] = []
    every_ms: List[float] = []
    tracks = 0
    for frame in video[:hybrid_frames]:
        hybrid_ms.append(timed(hybrid.step, frame))
        every_ms.append(timed(engine_1.segment, frame))
        tracks = max(tracks, len(hybrid.track_ids))
    hybrid_over_every = sum(hybrid_ms) / sum(every_ms)
    tracked_only = statistics.median(hybrid_ms[1:10])
    print(f'(c) {hybrid_frames} frames, {tracks} tracks: hybrid mean '
          f'{statistics.mean(hybrid_ms):.1f} ms/frame (re-detection frame {hybrid_ms[0]:.1f}, '
          f'tracking-only median {tracked_only:.1f}), SAM3 every frame mean '
          f'{statistics.mean(every_ms):.1f} -> hybrid/every-frame {hybrid_over_every:.3f}')
    print(f'cached_over_naive={cached_over_naive:.3f} four_concepts_over_one={four_over_one:.3f} '
          f'hybrid_over_every_frame={hybrid_over_every:.3f}')


if __name__ == '__main__':
    main()
