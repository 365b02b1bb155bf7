"""benchmarks/full_size_models.py: random production-size model directories that load."""

import pytest

from bench_script import load_benchmark

full_size_models = load_benchmark('full_size_models')


def test_sam2_is_the_released_hiera_tiny_and_its_directory_loads(tmp_path):
    from sam_gap_ros.engines.sam2_tracker import Sam2Tracker

    path = full_size_models.save_full_size('sam2', tmp_path / 'sam2')
    tracker = Sam2Tracker.load(path, device='cpu')
    assert tracker.model.config.image_size == 1024
    # SAM2.1-hiera-tiny: 38.9M parameters.
    assert sum(p.numel() for p in tracker.model.parameters()) == pytest.approx(38.9e6, rel=0.02)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match='family'):
        full_size_models.build_full_size('sam4')
