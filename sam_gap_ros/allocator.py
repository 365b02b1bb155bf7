"""Process-wide heap settings for nodes that move camera-sized buffers.

Every image message crosses several buffers of its own size on its way through rclpy and
the middleware (Python array, C message, serialized payload, and back on the receiving
side). With glibc's defaults, buffers above 128 KiB are ``mmap``-ed and handed back to
the kernel when freed, and the top of the heap is trimmed at 128 KiB, so each of them
page-faults in fresh zeroed memory on every frame. Keeping freed buffers for reuse,
measured by benchmarks/bench_image_transport.py on the CPU machine this project is
developed on (rgb8 frames at 20 Hz, median publish -> callback):

* in one process: 1.44 -> 0.86 ms at 640x480, 8.4 -> 5.3 ms at 1920x1080;
* between two processes over shared memory (config/fastdds_large_images.xml):
  2.2 -> 1.4 ms at 640x480, 11.9 -> 7.0 ms at 1920x1080.

The cost is resident memory: up to ``trim_threshold`` of freed heap stays mapped. The
settings only apply to glibc; a user's own ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` environment variable wins over them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# mallopt() parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc's own ceiling for its dynamic mmap threshold on 64-bit systems (4 MiB *
# sizeof(long)): buffers up to here, a 4K rgb8 frame (~25 MiB) included, come from the heap.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# glibc's dynamic rule keeps twice the mmap threshold before trimming the heap.
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES

USER_ENV_VARIABLES = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
_TUNABLE_NAMES = ('mmap_threshold', 'trim_threshold')  # as glibc.malloc.<name> in GLIBC_TUNABLES


def keep_freed_buffers(mmap_threshold: int = MMAP_THRESHOLD_BYTES,
                       trim_threshold: int = TRIM_THRESHOLD_BYTES) -> Optional[str]:
    """Make glibc reuse freed image-sized buffers instead of returning them to the kernel.

    Call once, early in a node's ``main``. Returns None when the settings were applied,
    otherwise the reason they were not (not glibc, or the user set them already).
    """
    if mmap_threshold <= 0 or trim_threshold <= 0:
        raise ValueError(f'thresholds must be positive, got mmap={mmap_threshold} '
                         f'trim={trim_threshold}')
    user_set = [name for name in USER_ENV_VARIABLES if name in os.environ]
    # The glibc >= 2.26 way of setting the same thresholds.
    tunables = os.environ.get('GLIBC_TUNABLES', '')
    if any(f'glibc.malloc.{name}' in tunables for name in _TUNABLE_NAMES):
        user_set.append('GLIBC_TUNABLES')
    if user_set:
        return f'left to the environment ({", ".join(user_set)} set)'
    if platform.libc_ver()[0] != 'glibc':
        return 'not a glibc system'
    libc = ctypes.CDLL(ctypes.util.find_library('c') or None)
    mallopt = getattr(libc, 'mallopt', None)
    if mallopt is None:
        return 'libc has no mallopt'
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    if not (mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
            and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))):
        return 'mallopt refused the thresholds'
    return None
