"""The memory benchmark's storage counter, and its quick run on the shipped tiny models."""


import pytest
import torch

from bench_script import load_benchmark


@pytest.fixture(scope='module')
def bench():
    return load_benchmark('bench_node_memory')


def test_counter_follows_storages_not_tensors(bench):
    mib = 1 << 20
    existing = torch.zeros(mib // 4)  # 1 MiB that existed before: never counted
    with bench.LiveTensorMemory() as live:
        a = torch.ones(mib // 4)        # +1 MiB
        b = a * 2                       # +1 MiB (peak 2)
        view = b[:10]                   # a view: no new storage
        del a
        assert live.current == mib
        existing.add_(1)                # in-place into an old storage: not counted
        torch.add(b, 1, out=existing)   # out= into an old storage: not counted
        assert live.current == mib
        del b
        assert live.current == mib      # the view keeps b's storage alive
        del view
        assert live.current == 0
        c = torch.ones(3 * mib // 4)    # +3 MiB: the new peak
        del c
    assert live.peak == 3 * mib and live.current == 0


def test_quick_run_reports_every_mode(bench, capsys):
    assert bench.main(['--quick', '--objects', '1,2', '--frames', '3']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split(':')[0]: dict(kv.split('=') for kv in line.split(': ')[1].split())
            for line in lines if line.startswith(('sam2@', 'sam3:', 'hybrid:'))}
    assert set(rows) == {'sam2@1', 'sam2@2', 'sam3', 'hybrid'}
    for row in rows.values():
        assert 0.0 < float(row['state_mib']) <= float(row['peak_mib'])
        assert float(row['total_mib']) == pytest.approx(
            float(row['weights_mib']) + float(row['peak_mib']), abs=0.11)
    assert int(rows['sam2@2']['objects']) == 2
    assert int(rows['hybrid']['objects']) > 0  # the tiny SAM3 found apples for SAM2 to track
    # Weights of the shipped tiny models: SAM2 1.6 M and SAM3 1.2 M float32 parameters.
    assert float(rows['sam2@1']['weights_mib']) == pytest.approx(6.1, abs=0.2)
    assert float(rows['hybrid']['weights_mib']) == pytest.approx(10.7, abs=0.3)
    assert lines[-1].startswith('node_memory_mib sam2=')


def test_engines_are_built_as_the_node_builds_them(bench, monkeypatch, capsys):
    # Random weights built inside torch.inference_mode are inference tensors, and then the
    # tracker recomputes its position embedding every frame instead of keeping it: the
    # production-size count (from_config) missed those 23 MiB of a node's state.
    from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
    from sam_gap_ros.engines.tiny_sam2 import tiny_sam2_video_config

    built = []

    def sam2():
        built.append((torch.is_inference_mode_enabled(),
                      Sam2Tracker.from_config(tiny_sam2_video_config())))
        return built[-1][1]
    monkeypatch.setattr(bench, 'build_engines', lambda quick, device='cpu': {'sam2': sam2})
    assert bench.main(['--modes', 'sam2', '--objects', '1', '--frames', '2']) == 0
    capsys.readouterr()
    [(inference, tracker)] = built
    assert not inference
    assert '_pos_embed_cache' in tracker.model.vision_encoder.backbone.__dict__


def test_object_counts_are_distinct_and_positive(bench, capsys):
    # '1,1' divided by zero in the per-object line, so the last line never came.
    assert bench.main(['--quick', '--modes', 'sam2', '--objects', '1,1', '--frames', '2']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(':')[0] for line in lines if line.startswith('sam2@')] == ['sam2@1']
    assert lines[-1].startswith('node_memory_mib sam2=')
    for bad in ('0', 'one', ','):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(['--quick', '--objects', bad])
        assert exit_info.value.code == 2
    assert '--objects' in capsys.readouterr().err
