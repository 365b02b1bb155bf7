"""Measure the synthetic orchard generator's speed on one CPU core.

Run from the repository root:
``python -m benchmarks.bench_synthetic [--width 640 --height 480 --frames 120 --seed 0]``.
Prints world build time, video frames per second (image + depth + labels + instance
metadata, then also with every full-frame instance mask built) and single scenes per second.
"""

import argparse
import os
import time

import cv2

from sam_gap_ros.synthetic import generate_scene, OrchardSceneConfig, OrchardVideo


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--frames', type=int, default=120)
    parser.add_argument('--scenes', type=int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--pan-speed', type=float, default=4.0)
    parser.add_argument('--parallax', action='store_true')
    args = parser.parse_args()
    # One core: the target is >= 50 frames/s at 640x480 without help from other cores.
    cv2.setNumThreads(1)
    config = OrchardSceneConfig(width=args.width, height=args.height)
    print(f'synthetic orchard {args.width}x{args.height}, seed {args.seed}, pan '
          f'{args.pan_speed} px/frame, parallax={args.parallax}, '
          f'OMP/BLAS threads={os.environ.get("OMP_NUM_THREADS", "default")}')

    start = time.perf_counter()
    video = OrchardVideo(args.seed, config, n_frames=args.frames, pan_speed=args.pan_speed,
                         parallax=args.parallax)
    build_s = time.perf_counter() - start
    print(f'world build ({len(video.tracks)} tracks): {build_s * 1000:.0f} ms')

    start = time.perf_counter()
    instances = 0
    for frame in video:
        instances += len(frame.instances)
    elapsed = time.perf_counter() - start
    print(f'video frames (image+depth+labels+instances): {args.frames / elapsed:.1f} fps '
          f'({instances / args.frames:.1f} instances/frame)')

    start = time.perf_counter()
    for frame in video:
        for inst in frame.instances:
            inst.mask  # noqa: B018 - materialise the lazily built full-frame mask
    elapsed = time.perf_counter() - start
    print(f'video frames with every full-frame mask built: {args.frames / elapsed:.1f} fps')

    start = time.perf_counter()
    for seed in range(args.scenes):
        generate_scene(args.seed + seed, config)
    elapsed = time.perf_counter() - start
    print(f'single scenes (world built per scene): {args.scenes / elapsed:.1f} scenes/s')


if __name__ == '__main__':
    main()
