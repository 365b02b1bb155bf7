"""The SAM2 tracker benchmark runs both sides on the same frames and prints its last line."""

import os
from pathlib import Path
import re
import subprocess
import sys

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_sam2_tracker.py'
LAST_LINE = re.compile(r'ratio_ours_over_official=(\S+) rss_growth_pct=(\S+)')


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # A child process: importing the script sets TQDM_DISABLE for the whole process.
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def test_worker_refuses_a_video_longer_than_its_run(tmp_path):
    # The official predictor propagates every frame of its directory: with more frames
    # there than --frames it would run (and hold) more frames than ours.
    for i in range(3):
        (tmp_path / f'{i}.jpg').write_bytes(b'')
    result = run('--worker', 'official', '--frames', '2', '--objects', '1',
                 '--video-dir', str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert 'holds 3 frames, not --frames 2' in result.stderr


@pytest.mark.slow
def test_quick_run_times_both_sides_on_every_frame():
    result = run('--quick')
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    # The official predictor's progress bar stays off (it is written inside its timing).
    assert 'propagate in video' not in result.stderr
    assert '11 timed frames' in result.stdout
    ratios = re.findall(r'(\d+) objects: .* CPU ratio (\S+)', result.stdout)
    assert [int(count) for count, _ in ratios] == [1, 3]
    match = LAST_LINE.fullmatch(result.stdout.strip().splitlines()[-1])
    assert match is not None
    assert float(match.group(1)) == pytest.approx(max(float(r) for _, r in ratios), abs=6e-4)


@pytest.mark.slow
def test_memory_workers_run_the_same_frames(tmp_path):
    # More latency frames than memory frames: each side's worker still runs exactly
    # --memory-frames frames (the official one used to propagate all latency frames).
    result = run('--image-size', '256', '--threads', '1', '--objects', '1', '--frames', '6',
                 '--memory-frames', '4', '--rss-frames', '20', '--rss-start', '10')
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert 'memory per side over 4 frames' in result.stdout
    for side in ('ours', 'official'):
        assert re.search(rf'1 objects {side} *: peak +\d', result.stdout), side
    assert LAST_LINE.fullmatch(result.stdout.strip().splitlines()[-1]) is not None
