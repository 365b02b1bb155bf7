"""Command line for writing synthetic orchard datasets.

Examples::

    python -m sam_gap_ros.synthetic.cli coco --out data/coco --n 100 --seed 0
    python -m sam_gap_ros.synthetic.cli video --out data/videos --n-videos 2 --frames 60 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from sam_gap_ros.synthetic.config import OrchardSceneConfig
from sam_gap_ros.synthetic.dataset import write_coco_dataset, write_video_dataset


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be in [0, 1], got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``sam-gap-synthetic``."""
    parser = argparse.ArgumentParser(
        prog='sam-gap-synthetic', description='Write seeded synthetic orchard datasets.')
    commands = parser.add_subparsers(dest='command', required=True)
    coco = commands.add_parser('coco', help='images + COCO annotations.json (RLE masks, '
                                            'noun_phrase per annotation)')
    coco.add_argument('--n', type=_positive_int, required=True, help='number of images')
    coco.add_argument('--min-area', type=_positive_int, default=1,
                      help='leave out instances smaller than this many pixels')
    video = commands.add_parser('video', help='videos: frames, uint16 track-ID masks, depth '
                                              'and index.json')
    video.add_argument('--n-videos', type=_positive_int, required=True)
    video.add_argument('--frames', type=_positive_int, required=True, help='frames per video')
    video.add_argument('--pan-speed', type=float, default=4.0, help='pixels per frame')
    video.add_argument('--parallax', action='store_true',
                       help='near layers move faster than far ones (camera translating)')
    video.add_argument('--sway-px', type=float, default=1.5)
    for sub in (coco, video):
        sub.add_argument('--out', required=True, help='output directory (created)')
        sub.add_argument('--seed', type=_non_negative_int, default=0)
        sub.add_argument('--width', type=_positive_int, default=640)
        sub.add_argument('--height', type=_positive_int, default=480)
        sub.add_argument('--trunk-prob', type=_probability, default=None,
                         help='probability that a trunk is present (default from config)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; return the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        extra = {} if args.trunk_prob is None else {'trunk_prob': args.trunk_prob}
        config = OrchardSceneConfig(width=args.width, height=args.height, **extra)
        start = time.perf_counter()
        if args.command == 'coco':
            path = write_coco_dataset(args.out, args.n, seed=args.seed, config=config,
                                      min_area=args.min_area)
            count = f'{args.n} images'
        else:
            path = write_video_dataset(args.out, args.n_videos, args.frames, seed=args.seed,
                                       config=config, pan_speed=args.pan_speed,
                                       parallax=args.parallax, sway_px=args.sway_px)
            count = f'{args.n_videos} videos x {args.frames} frames'
    except (ValueError, OSError) as error:
        print(f'sam-gap-synthetic: error: {error}', file=sys.stderr)
        return 1
    print(f'wrote {count} in {time.perf_counter() - start:.1f} s: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
