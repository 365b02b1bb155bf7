"""Seeded synthetic orchard data: images, videos, depth and exact ground truth (no torch).

Used by the tests, the ``synthetic_camera`` node and training (COCO for SAM3, videos for SAM2).

Scenes
    ``generate_scene(seed, config=None) -> Scene``: one RGB ``uint8 (H, W, 3)`` image of
    foliage (textured greens, sky patches), an optional trunk with branches (``trunk_prob``),
    shaded apples of three colour classes (some with dark damage blotches) and front leaves
    that occlude apples. ``Scene`` holds ``image``, ``depth_mm`` (``uint16`` millimetres,
    0 = sky/no return), ``labels`` (``uint16`` track-ID image), ``camera``
    (``CameraIntrinsics``) and ``instances``: ``GroundTruthInstance`` with the exact VISIBLE
    boolean ``mask`` (after occlusion), ``box``, ``area``, ``amodal_mask`` (apples, trunk),
    ``track_id``, ``category``, ``noun_phrase``, ``attributes`` and ``phrases``.

Vocabulary
    ``CATEGORIES``: COCO categories apple / leaf / trunk. ``NOUN_PHRASES``: ``'apple'``,
    ``'ripe red apple'``, ``'unripe green apple'``, ``'yellow apple'``, ``'damaged apple'``,
    ``'leaf'``, ``'trunk'``. Rule: each instance has ONE primary ``noun_phrase`` (damaged
    apples: ``'damaged apple'``; other apples: their colour phrase) plus ``attributes``
    (e.g. ``('red', 'ripe', 'damaged')``) and ``phrases``, every vocabulary phrase it is a
    positive for (a damaged red apple: ``'apple'``, ``'ripe red apple'``, ``'damaged apple'``).
    Only the large front leaves are ``'leaf'``; the blurred background foliage is unlabelled.
    ``'trunk'`` covers the trunk and its branches.

Videos
    ``OrchardVideo(seed, config=None, n_frames=60, pan_speed=4.0, pan_speed_y=0.0,
    parallax=False, sway_px=1.5, enter_frame=None)``: indexable/iterable ``Frame``
    (= ``Scene`` with ``index``) of a world larger than the frame seen by a panning camera;
    track IDs are stable over the video (``video.tracks``), apples leave and enter at the
    edges, sway slightly, and ``enter_frame=k`` adds an apple (``video.entering_track_id``)
    first visible at frame ``k``. ``ping_pong_index(tick, n_frames)`` loops a video back
    and forth for an endless camera stream without jumps.

Datasets and CLI
    ``to_coco(scenes)``, ``write_coco_dataset(out_dir, n_images, seed=0, config=None)``
    (``images/*.png`` + ``annotations.json`` with RLE masks and per-annotation
    ``noun_phrase``), ``write_video_dataset(out_dir, n_videos, n_frames, seed=0, ...)``
    (``video_XXX/{frames,masks,depth}/*.png`` + ``index.json``), ``read_video_frame``;
    sample ``i`` of a dataset made with ``seed`` uses ``sample_seed(seed, i)``.
    ``python -m sam_gap_ros.synthetic.cli coco|video ...`` (console script
    ``sam-gap-synthetic``).

Same seed and arguments give byte-identical output.
"""

from sam_gap_ros.synthetic.config import (apple_phrases, CameraIntrinsics, CATEGORIES,
                                          CATEGORY_IDS, COLOURS, NOUN_PHRASES,
                                          OrchardSceneConfig)
from sam_gap_ros.synthetic.dataset import (read_video_frame, sample_seed, to_coco,
                                           write_coco_dataset, write_video_dataset)
from sam_gap_ros.synthetic.video import (Frame, generate_scene, GroundTruthInstance,
                                         OrchardVideo, PAN_REFERENCE_DISTANCE_M,
                                         ping_pong_index, Scene, TrackInfo)

__all__ = ['CATEGORIES', 'CATEGORY_IDS', 'COLOURS', 'CameraIntrinsics', 'Frame',
           'GroundTruthInstance', 'NOUN_PHRASES', 'OrchardSceneConfig', 'OrchardVideo',
           'PAN_REFERENCE_DISTANCE_M', 'Scene', 'TrackInfo', 'apple_phrases', 'generate_scene',
           'ping_pong_index', 'read_video_frame', 'sample_seed', 'to_coco', 'write_coco_dataset',
           'write_video_dataset']
