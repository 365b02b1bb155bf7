"""Time the ROS image <-> numpy conversions at camera resolutions.

Run from the repository root:
``python -m benchmarks.bench_image_conversion [--repeats N] [--threads N]``.
Prints the median time per call in milliseconds for each conversion and resolution.
"""

import argparse
import array
import statistics
import time

import cv2
import numpy as np
from sensor_msgs.msg import Image

from sam_gap_ros.image_conversion import (
    compressed_msg_to_numpy,
    compressed_msg_to_rgb,
    image_msg_to_numpy,
    image_msg_to_rgb,
    numpy_to_compressed_msg,
    numpy_to_image_msg,
)

RESOLUTIONS = {'VGA 640x480': (480, 640), 'FHD 1920x1080': (1080, 1920)}


def median_ms(function, repeats):
    """Return the median wall time of ``function()`` in milliseconds, after one warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(samples)


def padded_big_endian_msg(pixels, encoding, padding):
    """Build an Image with row padding and big-endian elements (the slow path)."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(pixels.dtype.newbyteorder('>')).reshape(height, -1).view(np.uint8)
    padded = np.zeros((height, rows.shape[1] + padding), np.uint8)
    padded[:, :rows.shape[1]] = rows
    return Image(height=height, width=width, encoding=encoding, is_bigendian=1,
                 step=padded.shape[1], data=array.array('B', padded.tobytes()))


def cases(height, width):
    """Yield ``(name, callable)`` pairs for one resolution."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), np.uint16)
    for index in range(1, 40):
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        labels[y:y + 40, x:x + 40] = index
    depth = rng.uniform(0.3, 8.0, (height, width)).astype(np.float32)
    rgb_msg = numpy_to_image_msg(rgb, 'rgb8')
    bgr_msg = numpy_to_image_msg(np.ascontiguousarray(rgb[:, :, ::-1]), 'bgr8')
    bgr_padded = padded_big_endian_msg(rgb, 'bgr8', padding=64)
    depth_be = padded_big_endian_msg(depth, '32FC1', padding=12)
    label_png = numpy_to_compressed_msg(labels, 'png')
    overlay_jpeg = numpy_to_compressed_msg(rgb, 'jpeg')
    yield 'image_msg_to_rgb rgb8', lambda: image_msg_to_rgb(rgb_msg)
    yield 'image_msg_to_rgb bgr8', lambda: image_msg_to_rgb(bgr_msg)
    yield 'image_msg_to_rgb bgr8 padded', lambda: image_msg_to_rgb(bgr_padded)
    yield 'image_msg_to_numpy 32FC1 big-endian padded', lambda: image_msg_to_numpy(depth_be)
    yield 'numpy_to_image_msg rgb8', lambda: numpy_to_image_msg(rgb, 'rgb8')
    yield 'numpy_to_image_msg mono16', lambda: numpy_to_image_msg(labels, 'mono16')
    yield 'numpy_to_compressed_msg mono16 png', lambda: numpy_to_compressed_msg(labels, 'png')
    yield 'compressed_msg_to_numpy mono16 png', lambda: compressed_msg_to_numpy(label_png)
    yield 'numpy_to_compressed_msg rgb8 jpeg', lambda: numpy_to_compressed_msg(rgb, 'jpeg')
    yield 'compressed_msg_to_rgb jpeg', lambda: compressed_msg_to_rgb(overlay_jpeg)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--threads', type=int, default=1, help='OpenCV threads')
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    print(f'median of {args.repeats} calls, OpenCV threads={args.threads}')
    for label, (height, width) in RESOLUTIONS.items():
        print(f'\n{label}')
        for name, function in cases(height, width):
            print(f'  {name:<45} {median_ms(function, args.repeats):8.2f} ms')


if __name__ == '__main__':
    main()
