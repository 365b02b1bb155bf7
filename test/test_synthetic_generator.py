"""Single-scene checks of the synthetic orchard generator: ground truth matches the pixels."""

import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from sam_gap_ros.mask_ops import mask_to_box
from sam_gap_ros.synthetic import (apple_phrases, CATEGORIES, generate_scene, NOUN_PHRASES,
                                   OrchardSceneConfig, OrchardVideo)
from sam_gap_ros.synthetic.config import COLOUR_NOUN_PHRASES
from sam_gap_ros.synthetic.render import render_apple

SMALL = OrchardSceneConfig(width=320, height=240)


def _union(masks, shape):
    out = np.zeros(shape, dtype=bool)
    for mask in masks:
        out |= mask
    return out


def _changed(a, b):
    return np.any(a.image != b.image, axis=2)


def test_same_seed_gives_byte_identical_scene_and_other_seed_differs():
    a = generate_scene(11, SMALL)
    b = generate_scene(11, SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.depth_mm.tobytes() == b.depth_mm.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert [i.track_id for i in a.instances] == [i.track_id for i in b.instances]
    for inst_a, inst_b in zip(a.instances, b.instances, strict=True):
        assert np.array_equal(inst_a.mask, inst_b.mask)
        assert inst_a.info == inst_b.info
    c = generate_scene(12, SMALL)
    assert np.mean(a.image != c.image) > 0.5


def test_output_types_and_shapes():
    scene = generate_scene(2, OrchardSceneConfig(width=200, height=120))
    assert scene.image.shape == (120, 200, 3) and scene.image.dtype == np.uint8
    assert scene.depth_mm.shape == (120, 200) and scene.depth_mm.dtype == np.uint16
    assert scene.labels.dtype == np.uint16
    assert scene.instances, 'default config must produce objects'
    for inst in scene.instances:
        assert inst.mask.dtype == bool and inst.mask.shape == (120, 200)
        assert inst.category in {c['name'] for c in CATEGORIES}
        assert inst.noun_phrase in NOUN_PHRASES
        assert set(inst.phrases) <= set(NOUN_PHRASES)


@pytest.mark.parametrize('seed', [0, 5])
def test_visible_apple_masks_are_exactly_the_pixels_apples_changed(seed):
    # Render the same world with and without apples: the pixels that change are what the
    # apples really drew, an independent check of the masks built from sprite geometry.
    video = OrchardVideo(seed, SMALL, n_frames=1, pan_speed=0.0, sway_px=0.0)
    full = video.render(0)
    no_apples = video.render(0, draw_apples=False)
    assert full.image.tobytes() == generate_scene(seed, SMALL).image.tobytes()
    changed = _changed(full, no_apples)
    apples = _union([i.mask for i in full.instances_of('apple')], changed.shape)
    assert apples.sum() > 200
    assert not np.any(changed & ~apples), 'apple pixels drawn outside the visible masks'
    # A visible apple pixel may by chance equal the background colour; almost never.
    assert np.sum(apples & ~changed) <= 0.01 * apples.sum()


def test_amodal_masks_are_the_apples_drawn_without_leaves():
    video = OrchardVideo(4, SMALL, n_frames=1, pan_speed=0.0, sway_px=0.0)
    with_apples = video.render(0, draw_leaves=False)
    without = video.render(0, draw_apples=False, draw_leaves=False)
    changed = _changed(with_apples, without)
    amodal = _union([i.amodal_mask for i in with_apples.instances_of('apple')], changed.shape)
    assert not np.any(changed & ~amodal)
    assert np.sum(amodal & ~changed) <= 0.01 * amodal.sum()


def test_leaf_masks_are_exactly_the_pixels_leaves_changed():
    video = OrchardVideo(6, SMALL, n_frames=1, pan_speed=0.0, sway_px=0.0)
    full = video.render(0)
    no_leaves = video.render(0, draw_leaves=False)
    changed = _changed(full, no_leaves)
    leaves = full.phrase_mask('leaf')
    assert leaves.sum() > 500
    assert not np.any(changed & ~leaves)
    assert np.sum(leaves & ~changed) <= 0.01 * leaves.sum()


def test_instances_partition_labels_without_overlap():
    scene = generate_scene(8, SMALL)
    stack = np.stack([inst.mask for inst in scene.instances])
    assert stack.sum(axis=0).max() == 1, 'two instances claim one pixel'
    assert np.array_equal(stack.any(axis=0), scene.labels > 0)
    for inst in scene.instances:
        assert np.array_equal(scene.labels == inst.track_id, inst.mask)
        assert inst.area == int(inst.mask.sum()) > 0
        assert inst.box == mask_to_box(inst.mask)
    ids = [inst.track_id for inst in scene.instances]
    assert len(ids) == len(set(ids))


def test_occlusion_hides_apples_behind_leaves_and_nearer_apples():
    config = OrchardSceneConfig(width=320, height=240, leaf_occlusion_prob=1.0,
                                cluster_size=(3, 4), n_apples=(12, 16))
    video = OrchardVideo(3, config, n_frames=1, pan_speed=0.0, sway_px=0.0)
    scene = video.render(0)
    apples = scene.instances_of('apple')
    leaves = scene.phrase_mask('leaf')
    by_distance = sorted(apples, key=lambda inst: inst.info.distance_m)
    occluded = 0
    for rank, inst in enumerate(by_distance):
        assert not np.any(inst.mask & ~inst.amodal_mask)
        # Visible = own silhouette minus front leaves minus every nearer apple's silhouette.
        nearer = _union([other.amodal_mask for other in by_distance[:rank]], leaves.shape)
        expected = inst.amodal_mask & ~leaves & ~nearer
        assert np.array_equal(inst.mask, expected)
        if np.any(inst.amodal_mask & (leaves | nearer)):
            assert inst.area < inst.amodal_area
            assert inst.visible_fraction < 1.0
            occluded += 1
    assert occluded >= 3


def test_apple_pixels_have_their_colour_class():
    hue_ok = {
        'red': lambda h: h <= 10 or h >= 168,
        'yellow': lambda h: 14 <= h <= 32,
        'green': lambda h: 33 <= h <= 50,
    }
    seen = set()
    for seed in range(3):
        scene = generate_scene(seed, SMALL)
        hue = cv2.cvtColor(scene.image, cv2.COLOR_RGB2HSV)[..., 0]
        for inst in scene.instances_of('apple'):
            if inst.info.damaged or inst.area < 30:
                continue
            median = float(np.median(hue[inst.mask]))
            assert hue_ok[inst.info.colour](median), (inst, inst.info.colour, median)
            seen.add(inst.info.colour)
    assert seen == {'red', 'green', 'yellow'}


def test_damaged_apples_get_dark_brown_blotches_inside_the_silhouette():
    light = (-0.4, -0.5, 0.77)
    for colour in ('red', 'green', 'yellow'):
        clean = render_apple(np.random.default_rng(1), 20.0, colour, False, 1.0, 0.04, light)
        damaged = render_apple(np.random.default_rng(1), 20.0, colour, True, 1.0, 0.04, light)
        assert np.array_equal(clean.mask, damaged.mask)
        spots = np.any(clean.rgb != damaged.rgb, axis=2)
        assert not np.any(spots & ~clean.mask)
        assert 0.02 * clean.mask.sum() < spots.sum() < 0.6 * clean.mask.sum()
        pixels = damaged.rgb[spots].astype(float)
        # Dark brown: red > green > blue and clearly darker than the healthy skin there.
        assert np.median(pixels[:, 0]) > np.median(pixels[:, 1]) > np.median(pixels[:, 2])
        assert pixels.sum(axis=1).mean() < clean.rgb[spots].astype(float).sum(axis=1).mean()


def test_noun_phrase_rule_and_colour_probabilities():
    config = OrchardSceneConfig(width=240, height=180, colour_probabilities=(0.0, 0.0, 1.0),
                                damage_prob=0.5, n_apples=(15, 20))
    scene = generate_scene(1, config)
    apples = scene.instances_of('apple')
    assert {inst.info.colour for inst in apples} == {'yellow'}
    assert {inst.info.damaged for inst in apples} == {True, False}
    for inst in apples:
        assert (inst.noun_phrase, inst.attributes, inst.phrases) == apple_phrases(
            inst.info.colour, inst.info.damaged)
        expected = 'damaged apple' if inst.info.damaged else 'yellow apple'
        assert inst.noun_phrase == expected
        assert {'apple', 'yellow apple'} <= set(inst.phrases)
        assert ('damaged' in inst.attributes) == inst.info.damaged
    assert apple_phrases('red', True) == ('damaged apple', ('red', 'ripe', 'damaged'),
                                          ('apple', 'ripe red apple', 'damaged apple'))
    assert set(COLOUR_NOUN_PHRASES.values()) < set(NOUN_PHRASES)
    with pytest.raises(ValueError, match='colour'):
        apple_phrases('blue', False)


def test_trunk_can_be_absent_or_present():
    no_trunk = generate_scene(0, OrchardSceneConfig(width=240, height=180, trunk_prob=0.0))
    assert not no_trunk.instances_of('trunk')
    assert 'trunk' in no_trunk.absent_phrases
    assert not no_trunk.phrase_mask('trunk').any()

    config = OrchardSceneConfig(width=240, height=180, trunk_prob=1.0)
    scene = generate_scene(0, config)
    (trunk,) = scene.instances_of('trunk')
    assert 'trunk' not in scene.absent_phrases and trunk.area > 500
    hsv = cv2.cvtColor(scene.image, cv2.COLOR_RGB2HSV)
    assert 5 <= np.median(hsv[..., 0][trunk.mask]) <= 20  # brown hue
    assert np.median(hsv[..., 2][trunk.mask]) < 170
    depth = scene.depth_mm[trunk.mask].astype(float)
    assert depth.max() <= config.trunk_distance_m * 1000
    assert depth.min() >= (config.trunk_distance_m - config.trunk_diameter_m[1]) * 1000


def test_depth_agrees_with_layers_and_apple_size():
    config = OrchardSceneConfig(width=320, height=240, trunk_prob=1.0)
    scene = generate_scene(9, config)
    cam = scene.camera
    assert cam.fx == pytest.approx(160 / math.tan(math.radians(config.hfov_deg) / 2))
    assert cam.matrix.shape == (3, 3) and cam.k[2] == 160.0 and cam.k[5] == 120.0
    depth = scene.depth_mm.astype(float)
    leaves = scene.phrase_mask('leaf')
    assert depth[leaves].max() <= config.leaf_distance_m[1] * 1000
    background = scene.labels == 0
    far = depth[background]
    assert np.all((far == 0) | (far >= config.background_distance_m[0] * 1000))
    checked = 0
    for inst in scene.instances_of('apple'):
        centre_mm = inst.info.distance_m * 1000
        values = depth[inst.mask]
        assert values.max() <= centre_mm + 1
        assert values.min() >= centre_mm - config.apple_radius_m[1] * 1000 - 1
        x0, y0, x1, y1 = mask_to_box(inst.amodal_mask)
        inside = x0 > 0 and y0 > 0 and x1 < config.width and y1 < config.height
        if inside and inst.amodal_area > 50:
            # Pinhole model: radius_px = fx * radius_m / distance (apples are near-round).
            radius_m = math.sqrt(inst.amodal_area / math.pi) * inst.info.distance_m / cam.fx
            assert config.apple_radius_m[0] * 0.9 < radius_m < config.apple_radius_m[1] * 1.2
            checked += 1
    assert checked >= 3
    no_sky = generate_scene(9, OrchardSceneConfig(width=160, height=120, sky_fraction=0.0))
    assert np.all(no_sky.depth_mm > 0), 'without sky every pixel has a depth return'


@pytest.mark.parametrize('kwargs, match', [
    ({'width': 16}, 'at least 32'),
    ({'n_apples': (5, 2)}, 'n_apples'),
    ({'damage_prob': 1.5}, 'damage_prob'),
    ({'colour_probabilities': (0.0, 0.0, 0.0)}, 'colour_probabilities'),
    ({'apple_distance_m': (0.3, 2.0)}, 'ordered'),
    ({'trunk_distance_m': 9.0}, 'ordered'),
    ({'sky_fraction': 0.95}, 'sky_fraction'),
])
def test_bad_config_is_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OrchardSceneConfig(**kwargs)


def test_bad_seed_is_rejected():
    with pytest.raises(ValueError, match='seed'):
        generate_scene(-1, SMALL)
    with pytest.raises(ValueError, match='seed'):
        generate_scene(1.5, SMALL)


def test_generator_imports_neither_torch_nor_rclpy():
    code = ('import sys, sam_gap_ros.synthetic; '
            'print(sorted(m for m in ("torch", "rclpy", "pycocotools") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == '[]'


def test_integer_sizes_are_required():
    with pytest.raises(ValueError, match='width must be an integer'):
        OrchardSceneConfig(width=320.0)
    assert OrchardSceneConfig(height=np.int64(200)).height.__class__ is int
    # Ranges read from YAML/JSON arrive as lists; they are stored as (hashable) tuples.
    assert OrchardSceneConfig(n_apples=[3, 4]).n_apples == (3, 4)
    with pytest.raises(ValueError, match='pair'):
        OrchardSceneConfig(n_apples=5)


def test_brightness_gain_scales_pixels_and_keeps_ground_truth():
    base = generate_scene(3, OrchardSceneConfig(width=160, height=120, brightness=(1.0, 1.0)))
    bright = generate_scene(3, OrchardSceneConfig(width=160, height=120, brightness=(1.5, 1.5)))
    expected = np.clip(base.image.astype(float) * 1.5, 0, 255)
    assert np.abs(bright.image - expected).max() <= 1.0
    assert np.array_equal(bright.labels, base.labels)
    assert np.array_equal(bright.depth_mm, base.depth_mm)


def test_scene_overrides_parse_yaml_and_reject_unknown_fields():
    from sam_gap_ros.synthetic.config import scene_config_from_text
    config = scene_config_from_text('{hfov_deg: 30.0, apple_distance_m: [0.8, 1.0]}',
                                    width=200, height=100)
    assert (config.hfov_deg, config.apple_distance_m, config.width) == (30.0, (0.8, 1.0), 200)
    assert scene_config_from_text('  ', width=64).width == 64
    for text, match in (('{colour: red}', 'unknown scene fields'),
                        ('[1, 2]', 'mapping'), ('{hfov_deg: [', 'YAML'),
                        ('{hfov_deg: -5.0}', 'hfov')):
        with pytest.raises(ValueError, match=match):
            scene_config_from_text(text)


def test_demo_scene_is_the_tiny_models_training_scene():
    """The demo camera shows each tiny model the fruit size it was trained on."""
    from sam_gap_ros.tiny_models import TINY_MODEL_SCENES
    from sam_gap_ros.synthetic.config import scene_config_from_text
    from training.tiny_quality import sam2_scene_config, sam3_scene_config
    for family, trained in (('sam2', sam2_scene_config()), ('sam3', sam3_scene_config())):
        demo = scene_config_from_text(TINY_MODEL_SCENES[family], width=128, height=128)
        assert demo == trained, family
