"""`make demo` path: a short run writes summary.json and overlay images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_gap_ros import demo


def test_short_demo_run_writes_summary_and_overlays(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = demo.run_demo(tmp_path, duration=4.0, mode='sam2', rate_hz=5.0, width=128,
                                height=96, concepts=['apple'])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((tmp_path / 'summary.json').read_text())
    assert written == json.loads(json.dumps(summary))
    for key in ('frames_in', 'frames_processed', 'frames_dropped', 'latency_ms_p50',
                'latency_ms_p95', 'instances_per_frame_mean', 'model'):
        assert key in written, key
    assert written['frames_processed'] >= 3
    assert written['frames_in'] == written['frames_processed'] + written['frames_dropped']
    assert written['errors'] == 0 and written['bad_input'] == 0
    assert 'RANDOM' in written['model'] or 'trained' in written['model']
    assert (tmp_path / 'overlay_strip.png').is_file()
    assert list(tmp_path.glob('overlay_0*.png'))


def test_overlay_files_that_cannot_be_written_are_an_error(tmp_path):
    """cv2.imwrite only returns False: the summary must not list files that do not exist."""
    frames = [np.zeros((8, 10, 3), np.uint8)] * 3
    written = demo._write_outputs(tmp_path, frames, 5.0)
    assert written and all(Path(name).is_file() for name in written)
    with pytest.raises(OSError, match='could not write'):
        demo._write_outputs(tmp_path / 'missing_folder', frames, 5.0)
