"""The soak benchmark: the segmenter as launched, fed and called for a compressed shift."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_node_soak.py'


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['sam2', 'sam3'])
def test_quick_soak_accounts_for_every_frame_and_call(mode, tmp_path):
    out = tmp_path / 'soak.json'
    scratch = tmp_path / 'tmp'
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--quick', '--mode', mode, '--json', str(out),
         '--progress-period', '10'],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, 'PYTHONUNBUFFERED': '1', 'TMPDIR': str(scratch)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Its model folder goes with the run; torch's shared compile cache may stay.
    assert [p.name for p in scratch.iterdir() if not p.name.startswith('torchinductor')] == []
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith('node_soak rss_mib_per_hour=')
    headline = dict(item.split('=') for item in last.split()[1:])
    report = json.loads(out.read_text())
    print({k: v for k, v in report.items() if k != 'samples'})

    # Every planner/operator call was answered as it should be: valid sets accepted,
    # invalid concept sets refused with a reason, services successful, lifecycle cycled.
    assert report['calls_not_as_expected'] == 0, report['calls']
    expected_calls = {'malformed_image', 'disable', 'enable', 'reset', 'lifecycle',
                      'viewer_join', 'viewer_leave', 'threshold'}
    expected_calls |= ({'box', 'point', 'remove', 'box_outside', 'remove_unknown'}
                       if mode == 'sam2' else {'concepts', 'invalid_concepts'})
    assert set(report['calls']) == expected_calls
    # At each deactivate the node accounted for every frame it took in, and it processed
    # frames in every activation (the worker came back after each activate).
    assert report['activations'] >= 2
    assert report['unaccounted_frames_per_activation'] == [0] * report['activations']
    assert min(report['frames_processed_per_activation']) > 0
    assert headline['unaccounted_frames'] == '0' and headline['errors'] == '0'
    # Each malformed image on the camera topic was counted as such, none dropped unseen.
    assert report['malformed_sent'] > 0
    assert report['counters']['bad_input'] == report['malformed_sent']
    assert report['counters']['errors'] == report['counters']['oom_skips'] == 0
    # Prompts outside the image and removals of unknown IDs were refused, the others taken.
    assert report['counters']['bad_prompts'] == report['prompts_to_refuse']
    if mode == 'sam2':
        assert report['prompts_to_refuse'] >= 2
    # Planner outputs for every processed frame; the viewer's while it watched.
    processed = report['counters']['frames_processed']
    assert processed - 2 <= report['documents'] <= processed
    assert abs(report['masks'] - report['documents']) <= 1
    assert abs(report['poses'] - report['documents']) <= 1
    assert report['overlays'] > 0 and report['marker_arrays'] > 0
    # The resources were sampled throughout, and both nodes exited cleanly on SIGINT.
    assert len(report['samples']) >= 10
    assert report['fds_end'] == report['fds_after_warmup']
    # On a crash the nodes' faulthandler stacks are in the benchmark's stderr (they share it).
    assert report['segmenter_exit_code'] == 0 and report['camera_exit_code'] == 0, \
        result.stderr[-8000:]
    # A progress line every 10 s on stderr, so a long run that stops early shows how far
    # it got; the last one agrees with the summary so far.
    progress = [dict(item.split('=') for item in line.split()[1:])
                for line in result.stderr.splitlines() if line.startswith('soak t=')]
    assert len(progress) >= 4, result.stderr[-3000:]
    times = [float(p['t'].rstrip('s')) for p in progress]
    assert times[0] == 0.0 and times == sorted(set(times))
    assert all(p['unaccounted_frames'] == '0' and p['calls_not_as_expected'] == '0'
               for p in progress)
    assert 0 < int(progress[-1]['documents']) <= report['documents']


def test_skip_names_only_calls_of_the_mode():
    # A typo must not silently run the full cycle: the run stops before it starts anything.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--mode', 'hybrid', '--skip', 'reset,box'],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "calls of hybrid mode are ['concepts'" in result.stderr
