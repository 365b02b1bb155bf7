"""How to run the tiny orchard models shipped in ``models/``: their scene and operating point.

Constants only (no numpy, torch or rclpy), so that the launch file can read them as well as
the demo, the benchmarks and the quality tests.
"""

TRAINED = {'sam3': 'tiny-orchard-sam3', 'sam2': 'tiny-orchard-sam2'}
"""Directory name of each shipped tiny model under ``models/`` (and the share directory)."""

# The scene statistics each tiny orchard model was trained on (data.synthetic.scene of
# training/configs/tiny_orchard_sam2.yaml and tiny_orchard_sam3.yaml; a test keeps them
# equal). They only know apples of the size seen in training, which these narrow fields
# of view at 0.8-1.0 m give; the default 69 deg camera would show far smaller fruit.
TINY_MODEL_SCENE = ('{n_apples: [2, 4], cluster_size: [1, 2], apple_distance_m: [0.8, 1.0], '
                    'apple_radius_m: [0.035, 0.055], hfov_deg: 15.0, n_front_leaves: [0, 1], '
                    'leaf_occlusion_prob: 0.15}')
"""``synthetic_camera`` ``scene`` parameter that shows the tiny models what they know."""

# Both models learned the same close-range scene, so hybrid mode (SAM3 detections tracked
# by SAM2 on one camera) shows each of them the apple size it knows.
TINY_MODEL_SCENES = {'sam2': TINY_MODEL_SCENE, 'sam3': TINY_MODEL_SCENE}
"""Camera scene per model family; hybrid mode detects with SAM3 and so uses its scene."""

# Operating point of the tiny SAM3 (docs/tiny_models.md): detection score 0.3 and a mask
# threshold of 0.35, the recall maximum on 120 validation scenes (its masks are under-
# confident: 0.71 recall at transformers' 0.5). The quality tests use the same values.
TINY_SAM3_THRESHOLDS = {'score_threshold': 0.3, 'mask_threshold': 0.35}
"""Segmenter parameters for the shipped tiny SAM3 (sam3 and hybrid modes)."""
