"""Image transport: publish -> subscriber callback latency of sensor_msgs/Image, side by side.

How long a camera-sized rgb8 image takes from ``publish`` to the subscriber's Python
callback, under the process-wide settings this package ships:

* ``heap``: glibc defaults, or freed image buffers kept for reuse
  (``sam_gap_ros.allocator.keep_freed_buffers``, applied by every node executable);
* ``dds``: Fast DDS's built-in transports, or ``config/fastdds_large_images.xml`` (a
  shared-memory segment that holds whole frames; only with rmw_fastrtps_cpp);
* in one process (publisher and subscriber on one executor, as in
  bench_node_overhead.py) or between two processes (camera driver -> segmenter, the
  deployed topology).

Each case runs in fresh processes, since both settings are fixed per process. Latency is
measured on the shared monotonic clock (the stamp carries the publish time). The printed
ratios compare settings measured in this one run; the LAST line is
``image_transport_ms <case>=<median ms> ...`` for the first image size.

    python benchmarks/bench_image_transport.py --quick
    python benchmarks/bench_image_transport.py --sizes 640x480,1920x1080 --messages 100
"""

import argparse
import importlib.util
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import time

ROOT = Path(__file__).resolve().parents[1]
# Run from a source checkout without an installed/sourced workspace as well.
if importlib.util.find_spec('sam_gap_ros') is None:
    sys.path.insert(0, str(ROOT))
PROFILE = ROOT / 'config' / 'fastdds_large_images.xml'
SKIPPED = 5  # first messages: discovery and first-touch allocations
PERIOD_S = 0.05  # a 20 Hz camera
TIMEOUT_S = 60.0


def _stamp(msg, now_ns):
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 10**9)


def _age_ms(msg):
    sent = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
    return (time.monotonic_ns() - sent) / 1e6


def _worker(args):
    """Run one side (or both) of a case in this process; print the latencies as JSON."""
    if args.heap == 'kept':
        from sam_gap_ros.allocator import keep_freed_buffers
        reason = keep_freed_buffers()
        if reason:
            raise SystemExit(f'heap setting not applied: {reason}')
    import numpy as np
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from sam_gap_ros.image_conversion import numpy_to_image_msg
    from sam_gap_ros.nodes.ros_utils import make_executor

    width, height = (int(v) for v in args.size.split('x'))
    rclpy.init()
    node = rclpy.create_node(f'bench_image_transport_{args.role}')
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    executor = make_executor()
    executor.add_node(node)
    ages = []
    try:
        if args.role in ('sub', 'both'):
            node.create_subscription(Image, args.topic, lambda m: ages.append(_age_ms(m)), qos)
        if args.role in ('pub', 'both'):
            publisher = node.create_publisher(Image, args.topic, qos)
            deadline = time.monotonic() + TIMEOUT_S
            while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
                executor.spin_once(timeout_sec=0.05)
            time.sleep(0.5)  # let discovery finish both ways before timing
            pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
            for _ in range(args.messages):
                msg = numpy_to_image_msg(pixels, 'rgb8')
                _stamp(msg, time.monotonic_ns())
                publisher.publish(msg)
                due = time.monotonic() + PERIOD_S
                while time.monotonic() < due:
                    executor.spin_once(timeout_sec=max(0.0, due - time.monotonic()))
        if args.role == 'sub':
            # Until all arrived, or the stream stopped: a reliable KEEP_LAST(5) writer
            # overwrites samples a too-slow transport has not delivered yet.
            deadline, last = time.monotonic() + TIMEOUT_S, None
            while len(ages) < args.messages and time.monotonic() < deadline:
                count = len(ages)
                executor.spin_once(timeout_sec=0.05)
                if len(ages) != count:
                    last = time.monotonic()
                elif last is not None and time.monotonic() - last > 2.0:
                    break
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    if args.role != 'pub':
        print(json.dumps({'received': len(ages), 'ages_ms': ages}), flush=True)


def _run_case(size, heap, dds, processes, messages, topic):
    env = dict(os.environ)
    if dds == 'profile':
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = str(PROFILE)
    else:
        env.pop('FASTDDS_DEFAULT_PROFILES_FILE', None)
    command = [sys.executable, __file__, '--size', size, '--heap', heap,
               '--messages', str(messages), '--topic', topic]
    # The process that receives: the only one (--role both) or the subscriber of a pair.
    receiver = subprocess.Popen(command + ['--role', 'both' if processes == 1 else 'sub'],
                                env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    try:
        if processes == 2:
            publisher = subprocess.run(command + ['--role', 'pub'], env=env,
                                       capture_output=True, text=True, timeout=TIMEOUT_S * 2)
            if publisher.returncode:
                raise SystemExit(f'publisher failed: {publisher.stderr[-2000:]}')
        output, errors = receiver.communicate(timeout=TIMEOUT_S * 2)
    finally:
        # A failed or hung publisher, or a hung receiver: the receiver would otherwise wait
        # out its own timeout after this process has gone, holding its DDS resources.
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
    if receiver.returncode:
        raise SystemExit(f'case {size} {heap} {dds} failed: {errors[-2000:]}')
    data = json.loads(output.strip().splitlines()[-1])
    ages = data['ages_ms'][SKIPPED:]
    if not ages:
        raise SystemExit(f'case {size} {heap} {dds}: no messages received')
    return {'median_ms': statistics.median(ages), 'received': data['received']}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='640x480 only, fewer messages')
    parser.add_argument('--sizes', default='640x480,1920x1080', help='WxH list')
    parser.add_argument('--messages', type=int, default=None,
                        help='images per case (default 60, --quick 30)')
    # Internal: one side of a case, run by the parent in a fresh process.
    parser.add_argument('--role', choices=('pub', 'sub', 'both'), help=argparse.SUPPRESS)
    parser.add_argument('--size', help=argparse.SUPPRESS)
    parser.add_argument('--heap', choices=('default', 'kept'), help=argparse.SUPPRESS)
    parser.add_argument('--topic', default='bench_image_transport', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        return _worker(args)
    if args.quick:
        args.sizes = args.sizes.split(',')[0]
    if args.messages is None:
        args.messages = 30 if args.quick else 60
    if args.messages <= SKIPPED:
        parser.error(f'--messages must be more than the {SKIPPED} warm-up images')
    fastdds = os.environ.get('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp') == 'rmw_fastrtps_cpp'
    cases = [(1, 'default', 'builtin'), (1, 'kept', 'builtin'),
             (2, 'default', 'builtin'), (2, 'kept', 'builtin')]
    if fastdds:
        cases += [(2, 'default', 'profile'), (2, 'kept', 'profile')]
    else:
        print('not rmw_fastrtps_cpp: the Fast DDS profile cases are skipped', file=sys.stderr)
    first = None  # the medians of the first size, for the last line
    for size in args.sizes.split(','):
        medians = {}
        for index, (processes, heap, dds) in enumerate(cases):
            name = f"{'in' if processes == 1 else 'x'}proc_{dds}_{heap}"
            topic = f'bench_image_transport_{os.getpid()}_{index}'
            result = _run_case(size, heap, dds, processes, args.messages, topic)
            medians[name] = result['median_ms']
            print(f'{size:>10s}  {name:24s} {result["median_ms"]:8.2f} ms  '
                  f'({result["received"]}/{args.messages} received)', flush=True)
        ratios = {'heap_in_process': ('inproc_builtin_default', 'inproc_builtin_kept'),
                  'heap_between_processes': ('xproc_builtin_default', 'xproc_builtin_kept')}
        if fastdds:
            ratios['profile_between_processes'] = ('xproc_builtin_kept', 'xproc_profile_kept')
            ratios['both_between_processes'] = ('xproc_builtin_default', 'xproc_profile_kept')
        for label, (slow, fast) in ratios.items():
            print(f'{size:>10s}  speed-up {label:28s} {medians[slow] / medians[fast]:6.2f}x')
        first = medians if first is None else first
    print('image_transport_ms ' + ' '.join(f'{k}={v:.2f}' for k, v in first.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
