"""Instances JSON schema, overlay rendering and sam3-mode ID persistence."""

import json

import cv2
import numpy as np
import pytest

from sam_gap_ros import instances_json
from sam_gap_ros.engines.types import PromptError
from sam_gap_ros.instances_json import InstanceRecord
from sam_gap_ros.mask_ops import label_image
from sam_gap_ros.overlay import id_color, render_overlay
from sam_gap_ros.pipeline import IouIdAssigner, PipelineConfig, SegmentationPipeline


def _doc(records):
    return instances_json.build_document(
        records, stamp_sec=12, stamp_nanosec=345, frame_id='cam', width=128, height=96,
        mode='hybrid', model='tiny', frame_index=7, concepts=['apple'])


def test_document_round_trip_and_fields():
    records = [InstanceRecord(3, 'apple', 0.9, (1, 2, 11, 12), 80, (5.5, 6.5), (0.1, -0.2, 1.3)),
               InstanceRecord(5, 'apple', 0.7, (20, 20, 30, 30), 90, (25.0, 25.0), None)]
    text = instances_json.dumps(_doc(records))
    doc = instances_json.loads(text)
    assert doc['schema'] == instances_json.SCHEMA_NAME
    assert doc['version'] == instances_json.SCHEMA_VERSION
    assert doc['header'] == {'stamp': {'sec': 12, 'nanosec': 345}, 'frame_id': 'cam'}
    assert instances_json.document_stamp_ns(doc) == 12_000_000_345
    assert doc['image'] == {'width': 128, 'height': 96}
    assert [i['id'] for i in doc['instances']] == [3, 5]
    assert doc['instances'][0]['position'] == [0.1, -0.2, 1.3]
    assert doc['instances'][0]['pose_index'] == 0
    assert doc['instances'][1]['position'] is None
    assert doc['instances'][1]['pose_index'] is None


def test_inference_time_is_optional_and_validated():
    assert 'inference_ms' not in _doc([])  # optional: version-1 readers need not expect it
    doc = instances_json.build_document(
        [], stamp_sec=0, stamp_nanosec=0, frame_id='cam', width=8, height=8, mode='sam2',
        model='tiny', frame_index=1, inference_ms=12.345678)
    assert instances_json.loads(instances_json.dumps(doc))['inference_ms'] == 12.3457
    for bad in (-1.0, 'fast', True):
        with pytest.raises(ValueError, match='inference_ms'):
            instances_json.validate_document(dict(doc, inference_ms=bad))


def test_latency_is_optional_and_may_be_negative_but_finite():
    assert 'latency_ms' not in _doc([])
    doc = instances_json.build_document(
        [], stamp_sec=0, stamp_nanosec=0, frame_id='cam', width=8, height=8, mode='sam2',
        model='tiny', frame_index=1, latency_ms=-3.25)  # a camera clock running ahead
    assert instances_json.loads(instances_json.dumps(doc))['latency_ms'] == -3.25
    with pytest.raises(ValueError, match='latency_ms'):
        instances_json.build_document(
            [], stamp_sec=0, stamp_nanosec=0, frame_id='cam', width=8, height=8,
            mode='sam2', model='tiny', frame_index=1, latency_ms=float('nan'))
    for bad in ('slow', True, float('inf')):
        with pytest.raises(ValueError, match='latency_ms'):
            instances_json.validate_document(dict(doc, latency_ms=bad))


def test_non_finite_values_are_refused():
    bad = InstanceRecord(1, 'apple', float('nan'), (0, 0, 1, 1), 1, (0.5, 0.5))
    with pytest.raises(ValueError):
        instances_json.dumps(_doc([bad]))


@pytest.mark.parametrize('mutate', [
    lambda d: d.update(version=99),
    lambda d: d.update(schema='other'),
    lambda d: d.pop('instances'),
    lambda d: d['instances'][0].pop('bbox'),
    lambda d: d['instances'][0].update(position=[1.0]),
    # Shapes a hand-written or corrupted document may have: ValueError, not another error.
    lambda d: d.update(version=True),
    lambda d: d.update(version=1.0),
    lambda d: d.update(instances=[1]),
    lambda d: d['instances'][0].update(bbox=None),
    lambda d: d['instances'][0].update(centroid=['a', 'b']),
    lambda d: d.update(header={}),
    lambda d: d['header']['stamp'].update(sec='12'),
    # Documented version-1 fields a reader indexes: present and of their documented type.
    lambda d: d['instances'][0].pop('pose_index'),
    lambda d: d['instances'][0].update(pose_index=0),  # no position: no pose
    lambda d: d['instances'][0].update(id='1'),
    lambda d: d['instances'][0].update(id=0),  # 0 is the ~/masks background
    lambda d: d['instances'][0].update(id=65536),  # not a mono16 value
    lambda d: d['instances'][0].update(area=1.5),
    lambda d: d['instances'][0].update(score='high'),
    lambda d: d.update(image=None),
    lambda d: d.update(frame_index='7'),
])
def test_validation_names_problems(mutate):
    doc = _doc([InstanceRecord(1, 'apple', 0.5, (0, 0, 4, 4), 16, (2.0, 2.0))])
    doc = json.loads(instances_json.dumps(doc))
    mutate(doc)
    with pytest.raises(ValueError):
        instances_json.validate_document(doc)
    with pytest.raises(ValueError):
        instances_json.loads(json.dumps(doc))
    with pytest.raises(ValueError):
        instances_json.loads('{not json')


def test_loads_checks_pose_indices_follow_the_poses_and_ids_are_unique():
    records = [InstanceRecord(1, 'apple', 0.5, (0, 0, 4, 4), 16, (2.0, 2.0), (0.1, 0.2, 1.0)),
               InstanceRecord(2, 'apple', 0.5, (4, 0, 8, 4), 16, (6.0, 2.0)),
               InstanceRecord(3, 'apple', 0.5, (8, 0, 9, 4), 4, (8.0, 2.0), (0.3, 0.2, 1.0))]
    doc = json.loads(instances_json.dumps(_doc(records)))
    assert [i['pose_index'] for i in instances_json.loads(json.dumps(doc))['instances']] == \
        [0, None, 1]
    for mutate in (lambda d: d['instances'][0].update(pose_index=None),  # pose 0 unnamed
                   lambda d: d['instances'][2].update(pose_index=2),  # there is no pose 2
                   lambda d: d['instances'][2].update(pose_index=True),
                   lambda d: d['instances'][2].update(id=1)):  # two instances, one ID
        broken = json.loads(json.dumps(doc))
        mutate(broken)
        with pytest.raises(ValueError, match='pose_index|repeats id'):
            instances_json.loads(json.dumps(broken))


def test_loads_refuses_nan_and_infinity():
    text = instances_json.dumps(_doc([InstanceRecord(1, 'apple', 0.5, (0, 0, 4, 4), 16,
                                                     (2.0, 2.0), (0.1, 0.2, 1.0))]))
    for constant in ('NaN', 'Infinity', '-Infinity'):
        with pytest.raises(ValueError, match=f'{constant} is not a JSON number'):
            instances_json.loads(text.replace('"score":0.5', f'"score":{constant}'))


def test_overlay_label_of_a_fruit_at_the_right_edge_stays_in_the_image():
    rgb = np.zeros((60, 200, 3), dtype=np.uint8)
    mask = np.zeros((60, 200), dtype=bool)
    mask[30:40, 190:200] = True
    record = InstanceRecord(7, 'apple', 0.9, (190, 30, 200, 40), 100, (194.5, 34.5))
    out = render_overlay(rgb, label_image([mask], [7], (60, 200)), [record], alpha=0.5)
    # The label (~50 px wide) ends at the right edge instead of running off the image.
    columns = np.flatnonzero(out[:30].any(axis=(0, 2)))
    assert columns.min() < 160 and columns.max() >= 195


@pytest.mark.parametrize('height, width', [(16, 16), (24, 32), (96, 128), (1080, 8192)])
def test_overlay_labels_are_drawn_whole_inside_the_image_at_any_size(monkeypatch, height,
                                                                     width):
    drawn = []
    put_text = cv2.putText

    def recording_put_text(image, text, origin, font, scale, colour, thickness, line_type):
        drawn.append((text, origin, font, scale, thickness, line_type))
        return put_text(image, text, origin, font, scale, colour, thickness, line_type)

    monkeypatch.setattr(cv2, 'putText', recording_put_text)
    # One-pixel fruit in the corners and the middle.
    corners = [(0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1),
               (width // 2, height // 2)]
    records = [InstanceRecord(i + 1, 'apple', 0.87, (x, y, x + 1, y + 1), 1,
                              (float(x), float(y)), (0.0, 0.0, 1.5))
               for i, (x, y) in enumerate(corners)]
    render_overlay(np.zeros((height, width, 3), dtype=np.uint8),
                   np.zeros((height, width), dtype=np.uint16), records)
    texts = {text for text, *_ in drawn}
    # Too narrow for '1 apple 0.87 1.50m' (74 px at the smallest font): shortened.
    label = {16: '{}', 32: '{} apple'}.get(width, '{} apple 0.87 1.50m')
    assert texts == {label.format(i) for i in range(1, 6)}
    margin = 300
    for text, (x, y), font, scale, thickness, line_type in drawn:
        # Drawn again on a larger canvas: what the image edge would have cut off shows.
        canvas = np.zeros((height + 2 * margin, width + 2 * margin), dtype=np.uint8)
        put_text(canvas, text, (x + margin, y + margin), font, scale, 255, thickness,
                 line_type)
        rows, columns = np.nonzero(canvas)
        assert margin <= rows.min() and rows.max() < margin + height, (text, (x, y))
        assert margin <= columns.min() and columns.max() < margin + width, (text, (x, y))


def test_overlay_colours_exactly_the_labelled_pixels():
    rgb = np.full((96, 128, 3), 40, dtype=np.uint8)
    mask = np.zeros((96, 128), dtype=bool)
    mask[50:70, 60:90] = True
    labels = label_image([mask], [4], (96, 128))
    record = InstanceRecord(4, 'apple', 0.8, (60, 50, 90, 70), int(mask.sum()), (74.5, 59.5))
    out = render_overlay(rgb, labels, [record], alpha=0.5)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    expected = np.round(0.5 * 40 + 0.5 * np.array(id_color(4))).astype(int)
    inner = out[55:65, 65:85].reshape(-1, 3).astype(int)
    assert np.abs(inner - expected).max() <= 1
    assert (out[0:40, 0:50] == 40).all()  # far from mask and text: untouched
    assert (rgb == 40).all()  # input not modified
    with pytest.raises(ValueError):
        render_overlay(rgb, labels[:10], [record])


def test_id_colours_are_stable_and_distinct():
    assert id_color(7) == id_color(7)
    colours = {id_color(i) for i in range(1, 20)}
    assert len(colours) == 19


def box(x):
    """Return a 10x10 px square mask at column ``x`` of a 60x40 frame."""
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, x:x + 10] = True
    return mask


def test_iou_ids_persist_across_frames_and_new_objects_get_new_ids():
    ids = IouIdAssigner(min_iou=0.3)
    first = ids.assign([box(0), box(30)])
    second = ids.assign([box(31), box(1), box(48)])  # swapped order, slight motion, new one
    assert second[0] == first[1] and second[1] == first[0]
    assert second[2] not in first
    ids.reset()
    assert ids.assign([box(0)]) == [1]


def test_a_fruit_of_a_few_pixels_keeps_its_id():
    """Tiny masks can fall between the 4x subsampled grid; they are pooled instead."""
    def speck(row, col, size=2):
        mask = np.zeros((480, 640), dtype=bool)
        mask[row:row + size, col:col + size] = True
        return mask

    ids = IouIdAssigner(min_iou=0.3)
    assert [ids.assign([speck(101, 201)]) for _ in range(3)] == [[1], [1], [1]]
    # ... and two specks in neighbouring cells stay two objects.
    assert ids.assign([speck(101, 201), speck(101, 206)]) == [1, 2]


def test_iou_ids_wrap_after_65535_past_ids_still_live():
    ids = IouIdAssigner(min_iou=0.3)
    assert ids.assign([box(0), box(15)]) == [1, 2]
    ids._next_id = 65535  # as after a long shift of objects coming and going
    # 1 and 2 are still in view: the new IDs wrap past them, none is handed out twice.
    assert ids.assign([box(1), box(30), box(14), box(48)]) == [1, 65535, 2, 3]
    assert ids.assign([box(1), box(30), box(48)]) == [1, 65535, 3]


def test_iou_ids_start_over_when_the_frame_size_changes():
    """sam3 mode keeps no tracker: a new camera resolution must not stop the IDs."""
    ids = IouIdAssigner(min_iou=0.3)
    assert ids.assign([box(0), box(30)]) == [1, 2]
    bigger = np.zeros((48, 72), dtype=bool)
    bigger[10:20, 0:10] = True
    # Masks of another size cannot be compared with the previous frame's: new IDs (the
    # old code's IoU matmul raised on every frame of the new size).
    assert ids.assign([bigger]) == [3]
    assert ids.assign([bigger]) == [3]
    # Same pixel count, other shape (a rotated camera): no matching across either.
    assert ids.assign([np.ones((72, 48), dtype=bool)]) == [4]
    assert ids.assign([]) == []
    assert ids.assign([np.ones((72, 48), dtype=bool)]) == [5]


def test_a_background_point_outside_the_latest_frame_is_refused():
    """A negative coordinate must not index the label image from its far edge."""
    class Tracker:
        object_ids, frame_index, prompts = [7], 3, []

        def add_objects(self, frame_index, object_ids, **prompt):
            self.prompts.append(object_ids)

    pipeline = SegmentationPipeline(PipelineConfig(mode='sam2', model_dir='x'))
    pipeline._engine = pipeline._tracker = tracker = Tracker()
    labels = np.zeros((96, 128), dtype=np.uint16)
    labels[90:, 120:] = 7  # object 7 in the bottom-right corner
    pipeline._last_labels = labels
    for x, y in ((-3.0, -2.0), (130.0, 95.0), (127.0, 96.0)):
        with pytest.raises(PromptError, match='outside the 128x96 image'):
            pipeline.add_point(x, y, positive=False)  # no image_size: the labels' size
    assert tracker.prompts == []
    assert pipeline.add_point(125.5, 93.0, positive=False) == 7
    assert tracker.prompts == [[7]]


def test_config_validation():
    with pytest.raises(ValueError, match='mode'):
        PipelineConfig(mode='yolo', model_dir='x').validate()
    with pytest.raises(ValueError, match='model_dir'):
        PipelineConfig(mode='sam3', model_dir=' ').validate()
    with pytest.raises(ValueError, match='tracker_model_dir'):
        PipelineConfig(mode='hybrid', model_dir='x').validate()
    with pytest.raises(ValueError, match='score_threshold'):
        PipelineConfig(mode='sam3', model_dir='x', score_threshold=1.5).validate()
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match='mask_threshold'):
            PipelineConfig(mode='sam3', model_dir='x', mask_threshold=bad).validate()
