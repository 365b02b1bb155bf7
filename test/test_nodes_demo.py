"""`make demo` path: a short run writes summary.json and overlay images."""

import json
from pathlib import Path
import tempfile

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
