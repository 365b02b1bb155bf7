"""`make demo` path: a short run writes summary.json and overlay images."""

import json
from pathlib import Path
import tempfile
import time

import cv2
import numpy as np
import pytest
import torch

from sam_gap_ros import demo


def test_short_demo_run_writes_summary_and_overlays(tmp_path, monkeypatch):
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    output = tmp_path / 'out'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = demo.run_demo(output, duration=4.0, mode='sam2', rate_hz=5.0, width=128,
                                height=96, concepts=['apple'])
    finally:
        torch.set_num_threads(threads)
    # The models it ran stay where the summary says (random stand-ins in the output
    # folder), and no run leaves a folder of its own in /tmp.
    assert (Path(summary['model_dir']) / 'config.json').is_file()
    assert [p.name for p in scratch.iterdir() if not p.name.startswith('torchinductor')] == []
    written = json.loads((output / 'summary.json').read_text())
    assert written == json.loads(json.dumps(summary))
    for key in ('frames_in', 'frames_processed', 'frames_dropped', 'latency_ms_p50',
                'latency_ms_p95', 'instances_per_frame_mean', 'model'):
        assert key in written, key
    assert written['frames_processed'] >= 3
    assert written['frames_in'] == written['frames_processed'] + written['frames_dropped']
    assert written['errors'] == 0 and written['bad_input'] == 0
    assert 'RANDOM' in written['model'] or 'trained' in written['model']
    assert (output / 'overlay_strip.png').is_file()
    assert list(output.glob('overlay_0*.png'))


def test_overlay_files_that_cannot_be_written_are_an_error(tmp_path):
    """cv2.imwrite only returns False: the summary must not list files that do not exist."""
    frames = [np.zeros((8, 10, 3), np.uint8)] * 3
    written = demo._write_outputs(tmp_path, frames, 5.0)
    assert written and all(Path(name).is_file() for name in written)
    with pytest.raises(OSError, match='could not write'):
        demo._write_outputs(tmp_path / 'missing_folder', frames, 5.0)


def test_missing_trained_models_are_replaced_by_random_ones_in_the_given_folder(
        tmp_path, monkeypatch):
    monkeypatch.setattr(demo, 'find_trained_model', lambda name: None)
    folder = tmp_path / 'out' / 'random_models'
    model_dir, tracker_dir, text = demo.prepare_models('hybrid', folder)
    assert Path(model_dir) == folder / 'random-tiny-sam3'
    assert Path(tracker_dir) == folder / 'random-tiny-sam2'
    assert (Path(model_dir) / 'config.json').is_file()
    assert (Path(tracker_dir) / 'config.json').is_file()
    assert text.count('RANDOM') == 2


def test_video_that_cannot_be_written_is_said_and_the_pngs_remain(
        tmp_path, monkeypatch, capsys):
    """An OpenCV without the mp4v encoder: the demo says so and the PNGs show the run."""
    real_fourcc = cv2.VideoWriter_fourcc
    monkeypatch.setattr(cv2, 'VideoWriter_fourcc', lambda *code: real_fourcc(*'ZZZZ'))
    frames = [np.full((8, 10, 3), value, np.uint8) for value in (0, 100, 200)]
    written = demo._write_outputs(tmp_path, frames, 5.0)
    assert not (tmp_path / 'overlay.mp4').exists()
    assert written and all(Path(name).is_file() for name in written)
    assert "could not write" in capsys.readouterr().out


def _short_sam2_run(output: Path, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return demo.run_demo(output, mode='sam2', rate_hz=5.0, width=128, height=96,
                             concepts=['apple'], **kwargs)
    except KeyboardInterrupt:  # raised on, it would end the whole pytest session
        pytest.fail('Ctrl-C escaped run_demo: no summary written')
    finally:
        torch.set_num_threads(threads)


def test_ctrl_c_writes_the_run_so_far_and_no_old_outputs_remain(tmp_path, monkeypatch):
    from sam_gap_ros.nodes import ros_utils

    output = tmp_path / 'out'
    output.mkdir()
    (output / 'summary.json').write_text('{"frames_in": 999}')  # a previous run's
    (output / 'overlay.mp4').write_bytes(b'old video')
    real_make_executor = ros_utils.make_executor

    class CtrlCAfter3s:
        """The demo's executor, with Ctrl-C pressed 3 s into the run."""

        def __init__(self, *args, **kwargs):
            self._executor = real_make_executor(*args, **kwargs)
            self._began = time.monotonic()

        def spin_once(self, timeout_sec=None):
            if time.monotonic() - self._began > 3.0:
                raise KeyboardInterrupt
            self._executor.spin_once(timeout_sec=timeout_sec)

        def __getattr__(self, name):
            return getattr(self._executor, name)

    monkeypatch.setattr(ros_utils, 'make_executor', CtrlCAfter3s)
    summary = _short_sam2_run(output, duration=30.0)
    written = json.loads((output / 'summary.json').read_text())
    assert written == json.loads(json.dumps(summary))
    assert written['interrupted'] is True and written['ran_s'] < 10.0
    assert written['frames_processed'] >= 3
    assert written['frames_in'] == written['frames_processed'] + written['frames_dropped']
    video = output / 'overlay.mp4'
    assert not video.exists() or video.read_bytes() != b'old video'


def test_summary_latency_percentiles_cover_every_frame(tmp_path, monkeypatch):
    """The node keeps its last 200 latencies for /diagnostics; the run's summary needs all."""
    from sam_gap_ros import streaming
    from sam_gap_ros.nodes import segmenter

    samples = {}
    real_add = streaming.LatencyWindow.add

    def add(window, seconds):
        samples.setdefault(id(window), []).append(seconds * 1e3)
        real_add(window, seconds)

    monkeypatch.setattr(streaming.LatencyWindow, 'add', add)
    # A node window shorter than this run, as 200 frames are than a 60 s run at 5 Hz.
    monkeypatch.setattr(segmenter, 'LatencyWindow',
                        lambda size=200: streaming.LatencyWindow(size=3))
    summary = _short_sam2_run(tmp_path / 'out', duration=4.0)
    latency, inference = samples.values()  # the windows fill in this order per frame
    assert len(latency) == summary['frames_processed'] > 3
    assert summary['latency_ms_p50'] == pytest.approx(np.percentile(latency, 50))
    assert summary['latency_ms_p95'] == pytest.approx(np.percentile(latency, 95))
    assert summary['inference_ms_p50'] == pytest.approx(np.percentile(inference, 50))


def test_sam2_boxes_are_added_on_the_frame_they_were_taken_from(tmp_path, monkeypatch):
    """Sent after the first frame, each box went to a later one, off its apple."""
    from sam_gap_ros.nodes.synthetic_camera import SyntheticCameraNode
    from sam_gap_ros.pipeline import SegmentationPipeline

    cameras, boxes, frames = [], [], []
    camera_init = SyntheticCameraNode.__init__

    def keep_camera(self, *args, **kwargs):
        camera_init(self, *args, **kwargs)
        cameras.append(self)

    add_box, process = SegmentationPipeline.add_box, SegmentationPipeline.process

    def record_box(self, box, frame_index=None, image_size=None):
        boxes.append((tuple(box), self.frame_index))  # -1: before any frame
        return add_box(self, box, frame_index, image_size)

    def record_frame(self, rgb, *args, **kwargs):
        frames.append(rgb.copy())
        return process(self, rgb, *args, **kwargs)

    monkeypatch.setattr(SyntheticCameraNode, '__init__', keep_camera)
    monkeypatch.setattr(SegmentationPipeline, 'add_box', record_box)
    monkeypatch.setattr(SegmentationPipeline, 'process', record_frame)
    _short_sam2_run(tmp_path / 'out', duration=3.0)
    first = cameras[0].video[0]
    apples = sorted(first.instances_of('apple'), key=lambda inst: -inst.area)[:3]
    # The three largest apples of the camera's first frame, added before any frame was
    # processed: they attach to the first one processed, which is that frame.
    assert boxes == [(tuple(float(v) for v in inst.box), -1) for inst in apples]
    assert np.array_equal(frames[0], first.image)
