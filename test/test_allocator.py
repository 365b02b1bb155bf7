"""Tests of the process-wide heap settings (in child processes: they are process-wide)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from sam_gap_ros.allocator import keep_freed_buffers, MMAP_THRESHOLD_BYTES

GLIBC = platform.libc_ver()[0] == 'glibc'

# Where glibc put a block: below the program break means the brk heap (kept and reused
# after free), above it a private mmap (returned to the kernel on free). Run in the main
# thread, whose allocations use the main arena, the one that grows with brk.
_PLACEMENT = textwrap.dedent('''
    import ctypes, sys
    from sam_gap_ros.allocator import keep_freed_buffers
    libc = ctypes.CDLL(None)
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.sbrk.argtypes = (ctypes.c_ssize_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    print(keep_freed_buffers())
    for size in map(int, sys.argv[1:]):
        block = libc.malloc(size)
        print('heap' if block < libc.sbrk(0) else 'mmap')
        libc.free(block)
''')


def _placement(*sizes, env=None):
    result = subprocess.run(
        [sys.executable, '-c', _PLACEMENT, *map(str, sizes)], capture_output=True,
        text=True, check=True, env={**os.environ, **(env or {})})
    return result.stdout.split('\n')[:-1]


@pytest.mark.skipif(not GLIBC, reason='the heap settings only apply to glibc')
def test_image_sized_blocks_come_from_the_reusable_heap():
    frame = 1920 * 1080 * 3  # a 1080p rgb8 frame: mmap-ed under glibc's defaults
    reason, *placements = _placement(frame, 2 * MMAP_THRESHOLD_BYTES)
    assert reason == 'None'
    assert placements == ['heap', 'mmap']  # huge blocks still go back to the kernel


@pytest.mark.skipif(not GLIBC, reason='the heap settings only apply to glibc')
def test_a_user_setting_in_the_environment_wins():
    reason, placement = _placement(1920 * 1080 * 3, env={'MALLOC_MMAP_THRESHOLD_': '131072'})
    assert 'MALLOC_MMAP_THRESHOLD_' in reason
    assert placement == 'mmap'  # the user's 128 KiB threshold still applies


@pytest.mark.skipif(not GLIBC, reason='the heap settings only apply to glibc')
def test_a_glibc_tunable_setting_wins_too():
    tunables = 'glibc.malloc.mmap_threshold=131072'
    reason, placement = _placement(1920 * 1080 * 3, env={'GLIBC_TUNABLES': tunables})
    assert 'GLIBC_TUNABLES' in reason
    assert placement == 'mmap'  # the user's 128 KiB threshold still applies


def test_thresholds_must_be_positive():
    with pytest.raises(ValueError, match='positive'):
        keep_freed_buffers(mmap_threshold=0)
    with pytest.raises(ValueError, match='positive'):
        keep_freed_buffers(trim_threshold=-1)
