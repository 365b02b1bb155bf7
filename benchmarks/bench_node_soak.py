"""Segmenter soak: a shift of camera frames and planner calls, the node watched over time.

What an orchard robot does to the segmenter in hours, compressed. The segmenter executable
runs in its own process with ``config/orchard.yaml`` (as ``orchard.launch.py`` starts it),
the ``synthetic_camera`` executable feeds it 640x480 colour, depth and camera_info from a
second process, faster than the tiny CPU model keeps up with (so frames are dropped, as on a
robot), and this process plays the harvest planner and an operator:

* it subscribes to ``~/masks``, ``~/instances`` and ``~/fruit_poses`` all the time, and to
  ``~/overlay`` and ``~/markers`` now and then (RViz opened and closed);
* every ``--action-period`` seconds it makes the next call of a cycle: new concepts through
  the parameter service (sam3, hybrid: a phrase never used before each time, so the text
  embedding cache must stay bounded), an invalid concept set (must be refused), a score
  threshold change, box and point prompts and removals (sam2: some outside the image or
  of unknown IDs, which must be refused), a malformed image on the camera topic,
  ``~/enable`` off and on, ``~/reset``, and a lifecycle deactivate + activate.

Watched:

* the segmenter process, every ``--sample-period`` s from ``/proc``: resident memory
  (RSS), threads and open file descriptors;
* stamp in -> masks out latency of every frame (``latency_ms`` in ``~/instances``);
* frame accounting, at every deactivate: the node's counters must account for every frame
  it took in (``frames_in`` = processed + dropped + malformed + disabled skips + errors +
  out-of-memory skips), or frames were lost silently;
* every call's answer (accepted or refused as expected), and that the node runs throughout
  and exits cleanly on SIGINT.

RSS growth is measured over the second half of the run, after allocator pools and caches
(the text-embedding cache among them) have filled: the median of the last tenth of the run
minus that of the tenth starting at half time, in MiB per hour. Latency drift compares the
median stamp in -> masks out of the first and the last tenth of the frames after warm-up;
the model time of the same frames (``inference_ms``) is compared alike, so that a slower
node can be told from harder frames. The LAST line is ``node_soak rss_mib_per_hour=<f>
latency_p50_drift_pct=<f> model_p50_drift_pct=<f> threads_delta=<int> fds_delta=<int>
unaccounted_frames=<int> errors=<int>``.

    python benchmarks/bench_node_soak.py --quick                 # ~60 s, sam3
    python benchmarks/bench_node_soak.py --mode hybrid --duration 3600 --json soak.json
    # a harvester shift: concepts set once, tracking never reset
    python benchmarks/bench_node_soak.py --mode hybrid --duration 7200 \
        --skip reset,concepts,invalid_concepts
"""

import argparse
import importlib.util
import itertools
import json
import os
from pathlib import Path
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # as for the node: see bench_node_overhead

import numpy as np  # noqa: E402

# Run from a source checkout without an installed/sourced workspace as well.
if importlib.util.find_spec('sam_gap_ros') is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node_processes import (ROOT, start_node, stop_process,  # noqa: E402
                            use_large_image_profile, wait_until)

NAMESPACE = '/soak'
NODE = f'{NAMESPACE}/segmenter'
# Words for concepts never asked before: the node must encode each once and keep its text
# embedding cache bounded however many distinct concepts a shift brings. All name apples,
# so the load on the model stays alike from the first hour to the last.
ADJECTIVES = ('red', 'green', 'yellow', 'ripe', 'unripe', 'damaged', 'bruised', 'small',
              'large', 'shaded', 'sunlit', 'wet', 'dusty', 'spotted', 'half-eaten', 'cracked')
INVALID_CONCEPTS = ([''], ['apple', 'apple ('], ['but not apple'], ['x' * 200])
ACCOUNTED = ('frames_processed', 'frames_dropped', 'bad_input', 'disabled_skips', 'errors',
             'oom_skips')


def _fresh_concepts(counter):
    """Return a concept set with a phrase not used before in this run (``counter``: next int)."""
    n = next(counter)
    round_ = n // len(ADJECTIVES)
    phrase = f'{ADJECTIVES[n % len(ADJECTIVES)]} apple' + (f' {round_}' if round_ else '')
    return ['apple', phrase, f'{phrase} but not leaf']


def _cycle(mode):
    """Return the planner/operator calls of one cycle, in order, for ``mode``."""
    common = ['malformed_image', 'disable', 'enable', 'viewer_join', 'reset', 'viewer_leave',
              'threshold', 'lifecycle']
    if mode == 'sam2':
        prompts = ['box', 'point', 'box', 'remove', 'box_outside', 'remove_unknown']
        return prompts[:3] + common[:3] + prompts[3:] + common[3:]
    concepts = ['concepts', 'invalid_concepts', 'concepts']
    return concepts[:2] + common[:3] + concepts[2:] + common[3:]


def _proc_sample(pid):
    """Return (rss MiB, threads, open fds) of process ``pid`` from /proc."""
    rss_kib = threads = 0
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            if line.startswith('VmRSS:'):
                rss_kib = int(line.split()[1])
            elif line.startswith('Threads:'):
                threads = int(line.split()[1])
    fds = len(os.listdir(f'/proc/{pid}/fd'))
    return rss_kib / 1024.0, threads, fds


def _growth_per_hour(samples, start_s, end_s):
    """RSS change per hour from the tenth of the run at ``start_s`` to the last tenth.

    Medians of each window, so that one sample taken while a frame's buffers were live
    does not read as growth or shrinkage.
    """
    window = (end_s - start_s) / 5.0
    early = [rss for t, rss, *_ in samples if start_s <= t < start_s + window]
    late = [rss for t, rss, *_ in samples if t >= end_s - window]
    if not early or not late or end_s - start_s <= window:
        return 0.0
    hours = (end_s - start_s - window) / 3600.0
    return (statistics.median(late) - statistics.median(early)) / hours


def _tenths(values):
    """Return the first and the last tenth of ``values`` (at least one value each)."""
    tenth = max(1, len(values) // 10)
    return values[:tenth], values[-tenth:]


def _drift(values):
    """Return (median of the first tenth, of the last tenth, change in %)."""
    first, last = (statistics.median(part) for part in _tenths(values))
    return first, last, (last - first) / first * 100.0


def _diagnostic_values(array):
    """Return the segmenter's key/values (ints where they are ints) from a DiagnosticArray."""
    for status in array.status:
        if status.name.endswith('segmenter'):
            values = {}
            for pair in status.values:
                try:
                    values[pair.key] = int(pair.value)
                except ValueError:
                    values[pair.key] = pair.value
            values['message'] = status.message
            return values
    return None


class Planner:
    """The probe: subscribes like a planner and RViz, and calls the node's interfaces."""

    def __init__(self, context, args, width, height):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PointStamped, PolygonStamped, PoseArray
        from lifecycle_msgs.srv import ChangeState
        from rcl_interfaces.srv import SetParameters
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image
        from std_msgs.msg import String, UInt32
        from std_srvs.srv import SetBool, Trigger

        from sam_gap_ros import instances_json

        self.args, self.width, self.height = args, width, height
        self.node = rclpy.create_node('soak_planner', namespace=NAMESPACE, context=context)
        self.qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.documents = []  # (arrival monotonic s, latency_ms, inference_ms, instance IDs)
        self.masks = self.poses = self.overlays = self.markers = 0
        self.diagnostics = None
        self.diagnostics_count = 0
        self.calls = {}  # call -> [as expected, not as expected]
        self.refused_prompts = 0  # prompts and removals the node must refuse (bad_prompts)
        self.random = random.Random(0)
        self.concept_counter = itertools.count()

        def on_instances(msg):
            document = instances_json.loads(msg.data)
            ids = [record['id'] for record in document['instances']]
            self.documents.append((time.monotonic(), document['latency_ms'],
                                   document['inference_ms'], ids))

        def on_diagnostics(msg):
            values = _diagnostic_values(msg)
            if values is not None:
                self.diagnostics = values
                self.diagnostics_count += 1

        sub = self.node.create_subscription
        sub(String, f'{NODE}/instances', on_instances, self.qos)
        sub(Image, f'{NODE}/masks', lambda _: self._tick('masks'), self.qos)
        sub(PoseArray, f'{NODE}/fruit_poses', lambda _: self._tick('poses'), self.qos)
        sub(DiagnosticArray, '/diagnostics', on_diagnostics, 10)
        self.viewer = []
        self.box_pub = self.node.create_publisher(PolygonStamped, f'{NODE}/prompt_box', 10)
        self.point_pub = self.node.create_publisher(PointStamped, f'{NODE}/prompt_point', 10)
        self.remove_pub = self.node.create_publisher(UInt32, f'{NODE}/remove_object', 10)
        self.image_pub = self.node.create_publisher(Image, f'{NAMESPACE}/image', 5)
        client = self.node.create_client
        self.set_parameters = client(SetParameters, f'{NODE}/set_parameters')
        self.reset_client = client(Trigger, f'{NODE}/reset')
        self.enable_client = client(SetBool, f'{NODE}/enable')
        self.change_state = client(ChangeState, f'{NODE}/change_state')
        self.epochs = []  # per activation: the node's counters at its deactivate

    def _tick(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def _record(self, call, ok):
        self.calls.setdefault(call, [0, 0])[0 if ok else 1] += 1

    def _call(self, executor, client, request, timeout_s=30.0):
        future = client.call_async(request)
        deadline = time.monotonic() + timeout_s
        while not future.done() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        if not future.done():
            raise SystemExit(f'{client.srv_name} did not answer within {timeout_s} s')
        return future.result()

    def _set(self, executor, name, value):
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter
        request = SetParameters.Request(
            parameters=[Parameter(name, value=value).to_parameter_msg()])
        return self._call(executor, self.set_parameters, request).results[0]

    def act(self, call, executor, child):
        """Make one planner/operator call and record whether the node answered as it should."""
        from geometry_msgs.msg import Point32, PointStamped, Polygon, PolygonStamped
        from sensor_msgs.msg import Image
        from std_msgs.msg import UInt32
        from std_srvs.srv import SetBool, Trigger
        from visualization_msgs.msg import MarkerArray

        rand = self.random
        if call == 'concepts':
            result = self._set(executor, 'concepts', _fresh_concepts(self.concept_counter))
            self._record(call, result.successful)
        elif call == 'invalid_concepts':
            concepts = INVALID_CONCEPTS[self.calls.get(call, [0, 0])[0] % len(INVALID_CONCEPTS)]
            result = self._set(executor, 'concepts', list(concepts))
            self._record(call, not result.successful and bool(result.reason))
        elif call == 'threshold':
            result = self._set(executor, 'score_threshold',
                               rand.choice((0.25, 0.3, 0.35)) if self.args.mode != 'sam2'
                               else 0.5)
            self._record(call, result.successful)
        elif call in ('box', 'box_outside'):
            if call == 'box':
                x0, y0 = rand.uniform(0, self.width - 120), rand.uniform(0, self.height - 120)
                size = rand.uniform(40, 120)
                corners = (x0, y0, x0 + size, y0 + size)
            else:
                corners = (self.width + 10, 5, self.width + 80, 60)
                self.refused_prompts += 1
            self.box_pub.publish(PolygonStamped(polygon=Polygon(points=[
                Point32(x=float(corners[0]), y=float(corners[1])),
                Point32(x=float(corners[2]), y=float(corners[3]))])))
            self._record(call, True)  # topics have no answer: see bad_prompts
        elif call == 'point':
            msg = PointStamped()
            msg.point.x, msg.point.y = rand.uniform(20, self.width - 20), rand.uniform(
                20, self.height - 20)
            msg.point.z = 1.0
            self.point_pub.publish(msg)
            self._record(call, True)
        elif call in ('remove', 'remove_unknown'):
            known = self.documents[-1][3] if self.documents else []
            object_id = known[0] if call == 'remove' and known else 60000 + rand.randrange(1000)
            self.refused_prompts += object_id not in known
            self.remove_pub.publish(UInt32(data=int(object_id)))
            self._record(call, True)
        elif call == 'malformed_image':
            msg = Image(height=self.height, width=self.width, encoding='rgb8',
                        step=self.width * 3)
            msg.data = bytes(16)  # height * step bytes expected
            msg.header.stamp = self.node.get_clock().now().to_msg()
            self.image_pub.publish(msg)
            self._record(call, True)
        elif call in ('disable', 'enable'):
            response = self._call(executor, self.enable_client,
                                  SetBool.Request(data=call == 'enable'))
            self._record(call, response.success)
        elif call == 'reset':
            response = self._call(executor, self.reset_client, Trigger.Request())
            self._record(call, response.success)
        elif call == 'viewer_join':
            self.viewer = [
                self.node.create_subscription(Image, f'{NODE}/overlay',
                                              lambda _: self._tick('overlays'), self.qos),
                self.node.create_subscription(MarkerArray, f'{NODE}/markers',
                                              lambda _: self._tick('markers'), self.qos)]
            self._record(call, True)
        elif call == 'viewer_leave':
            for subscription in self.viewer:
                self.node.destroy_subscription(subscription)
            self.viewer = []
            self._record(call, True)
        elif call == 'lifecycle':
            self._record(call, self._cycle_lifecycle(executor, child))
        else:
            raise ValueError(f'unknown call {call}')

    def _cycle_lifecycle(self, executor, child):
        """Deactivate, check the node accounted for every frame, activate."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        deactivate = ChangeState.Request()
        deactivate.transition.id = Transition.TRANSITION_DEACTIVATE
        if not self._call(executor, self.change_state, deactivate).success:
            return False
        # The next diagnostics that say 'inactive' hold this activation's final counters:
        # an inactive node takes in no frames.
        seen = self.diagnostics_count
        wait_until(lambda: self.diagnostics_count > seen
                   and self.diagnostics.get('message') == 'inactive', executor, [child],
                   timeout_s=10.0, what='diagnostics of the inactive node')
        self.epochs.append(dict(self.diagnostics))
        activate = ChangeState.Request()
        activate.transition.id = Transition.TRANSITION_ACTIVATE
        return bool(self._call(executor, self.change_state, activate).success)


def _unaccounted(counters):
    """Frames the node took in but did not process, drop, refuse or skip (should be 0)."""
    return counters['frames_in'] - sum(counters[key] for key in ACCOUNTED)


def _print_progress(elapsed_s, samples, planner):
    """One line on stderr: where the run stands, should it stop before its summary."""
    _, rss, threads, fds = samples[-1]
    unaccounted = sum(_unaccounted(epoch) for epoch in planner.epochs)
    not_as_expected = sum(bad for _, bad in planner.calls.values())
    print(f'soak t={elapsed_s:.0f}s rss_mib={rss:.1f} threads={threads} fds={fds} '
          f'documents={len(planner.documents)} activations={len(planner.epochs)} '
          f'unaccounted_frames={unaccounted} calls_not_as_expected={not_as_expected}',
          file=sys.stderr, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='about 60 s in all')
    parser.add_argument('--mode', choices=('sam2', 'sam3', 'hybrid'), default='sam3')
    parser.add_argument('--duration', type=float, default=1800.0, help='seconds of soak')
    parser.add_argument('--warmup', type=float, default=None,
                        help='seconds before latency and resources count (default 10 %%)')
    parser.add_argument('--rate', type=float, default=10.0, help='camera frames per second')
    parser.add_argument('--action-period', type=float, default=3.0,
                        help='seconds between planner/operator calls')
    parser.add_argument('--sample-period', type=float, default=2.0,
                        help='seconds between /proc samples of the segmenter')
    parser.add_argument('--skip', default='',
                        help='comma-separated calls left out of the cycle, e.g. "reset" for '
                             'a shift in which tracking state is never reset (hybrid: tracks '
                             'come and go only by the re-detection rules)')
    parser.add_argument('--progress-period', type=float, default=60.0,
                        help='seconds between progress lines on stderr (a long run that '
                             'stops early still shows how far it got)')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads of the node (0: torch default, as launched)')
    parser.add_argument('--json', type=Path, default=None, help='write the results here')
    args = parser.parse_args(argv)
    skipped = {call for call in args.skip.split(',') if call}
    calls = [call for call in _cycle(args.mode) if call not in skipped]
    if skipped - set(_cycle(args.mode)) or not calls:
        parser.error(f'--skip: calls of {args.mode} mode are {sorted(set(_cycle(args.mode)))}')
    if args.quick:
        args.duration, args.action_period = min(args.duration, 45.0), min(args.action_period, 1.5)
    # Models written for the run (random configs) go with it; nothing is left in /tmp.
    with tempfile.TemporaryDirectory(prefix='bench_soak_') as workdir:
        return _soak(args, calls, skipped, Path(workdir))


def _soak(args, calls, skipped, workdir):
    """Run camera, segmenter and planner for the shift; print and return the exit code."""
    warmup = args.warmup if args.warmup is not None else max(5.0, 0.1 * args.duration)
    width, height = 640, 480

    import rclpy
    from rclpy.context import Context

    from sam_gap_ros.allocator import keep_freed_buffers
    from sam_gap_ros.demo import prepare_models
    from sam_gap_ros.tiny_models import TINY_MODEL_SCENES, TINY_SAM3_THRESHOLDS
    from sam_gap_ros.nodes.ros_utils import make_executor

    keep_freed_buffers()
    use_large_image_profile()
    model_dir, tracker_dir, model_text = prepare_models(args.mode, workdir)
    print(f'models: {model_text}', file=sys.stderr)
    params = {'mode': args.mode, 'model_dir': model_dir, 'tracker_model_dir': tracker_dir,
              'device': 'cpu', 'concepts': "['apple']", **TINY_SAM3_THRESHOLDS}
    config = ROOT / 'config' / 'orchard.yaml'
    scene = TINY_MODEL_SCENES['sam2' if args.mode == 'sam2' else 'sam3']
    context = Context()
    rclpy.init(context=context)
    camera = segmenter = executor = planner = None
    samples = []  # (seconds since start, rss MiB, threads, fds)
    calls_made = []
    started = time.monotonic()
    try:  # from here on, the child processes are stopped whatever happens
        segmenter = start_node('sam_gap_ros.nodes.segmenter', NAMESPACE, params, args.threads,
                               params_file=config)
        camera = start_node('sam_gap_ros.nodes.synthetic_camera', NAMESPACE, {
            'rate_hz': args.rate, 'width': width, 'height': height, 'n_frames': 600,
            # Quoted: the scene is a YAML mapping in a string parameter.
            'scene': f'"{scene}"'}, params_file=config)
        planner = Planner(context, args, width, height)
        executor = make_executor(context=context)
        executor.add_node(planner.node)
        wait_until(lambda: len(planner.documents) > 0, executor, [segmenter, camera],
                   timeout_s=120.0, what='the first ~/instances')
        started = time.monotonic()
        next_action = next_sample = next_progress = started
        cycle = itertools.cycle(calls)
        while time.monotonic() - started < args.duration:
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - started, *_proc_sample(segmenter.pid)))
                next_sample += args.sample_period
            if now >= next_progress:
                _print_progress(now - started, samples, planner)
                next_progress += args.progress_period
            if now >= next_action:
                call = next(cycle)
                planner.act(call, executor, segmenter)
                calls_made.append(call)
                next_action = time.monotonic() + args.action_period
            for child in (segmenter, camera):
                if child.poll() is not None:
                    raise SystemExit(f'{child.args[2]} exited with code {child.returncode} '
                                     f'after {now - started:.0f} s')
            executor.spin_once(timeout_sec=0.02)
        planner.act('lifecycle', executor, segmenter)  # the last activation's counters
        calls_made.append('lifecycle')
        samples.append((time.monotonic() - started, *_proc_sample(segmenter.pid)))
    finally:
        segmenter_code = stop_process(segmenter)
        camera_code = stop_process(camera)
        if executor is not None:
            executor.shutdown()
        if planner is not None:
            planner.node.destroy_node()
        rclpy.shutdown(context=context)

    # Latency and resources after warm-up; RSS growth over the second half of the run.
    timed = [(latency, model, len(ids)) for arrival, latency, model, ids in planner.documents
             if arrival - started >= warmup]
    instances_first, instances_last = (statistics.fmean(t[2] for t in part)
                                       for part in _tenths(timed))
    latency_first, latency_last, latency_drift = _drift([t[0] for t in timed])
    model_first, model_last, model_drift = _drift([t[1] for t in timed])
    warm = [s for s in samples if s[0] >= warmup] or samples
    second_half = [s for s in samples if s[0] >= args.duration / 2] or warm
    unaccounted = [_unaccounted(epoch) for epoch in planner.epochs]
    counters = {key: sum(epoch.get(key, 0) for epoch in planner.epochs)
                for key in ('frames_in', *ACCOUNTED, 'bad_prompts', 'bad_depth',
                            'unpaired_depth')}
    result = {
        'mode': args.mode, 'model': model_text, 'duration_s': round(args.duration, 1),
        'skipped_calls': sorted(skipped),
        'camera_rate_hz': args.rate, 'image_size': [width, height],
        'calls': {call: {'as_expected': ok, 'not_as_expected': bad}
                  for call, (ok, bad) in planner.calls.items()},
        'calls_not_as_expected': sum(bad for _, bad in planner.calls.values()),
        # Every malformed image must be counted as bad input, none dropped unseen.
        'malformed_sent': planner.calls.get('malformed_image', [0, 0])[0],
        'prompts_to_refuse': planner.refused_prompts,
        'activations': len(planner.epochs),
        'counters': counters,
        'unaccounted_frames_per_activation': unaccounted,
        'frames_processed_per_activation': [e['frames_processed'] for e in planner.epochs],
        'documents': len(planner.documents), 'masks': planner.masks, 'poses': planner.poses,
        'overlays': planner.overlays, 'marker_arrays': planner.markers,
        'latency_ms_p50_first_tenth': round(latency_first, 2),
        'latency_ms_p50_last_tenth': round(latency_last, 2),
        'latency_p50_drift_pct': round(latency_drift, 1),
        'latency_ms_p95': round(float(np.percentile([t[0] for t in timed], 95)), 2),
        # The model's own time on the same frames: drift of the content, not of the node.
        'model_ms_p50_first_tenth': round(model_first, 2),
        'model_ms_p50_last_tenth': round(model_last, 2),
        'model_p50_drift_pct': round(model_drift, 1),
        # Instances per frame: the scene loops, so a node that kept stale tracks would
        # report more of them (and spend longer per frame) as the run goes on.
        'instances_per_frame_first_tenth': round(instances_first, 2),
        'instances_per_frame_last_tenth': round(instances_last, 2),
        'max_instance_id': max((max(ids) for *_, ids in planner.documents if ids),
                               default=0),
        'rss_mib_after_warmup': round(warm[0][1], 1),
        'rss_mib_at_half': round(second_half[0][1], 1),
        'rss_mib_end': round(samples[-1][1], 1),
        'rss_mib_max': round(max(s[1] for s in samples), 1),
        'rss_mib_per_hour': round(_growth_per_hour(samples, second_half[0][0],
                                                   samples[-1][0]), 1),
        'threads_after_warmup': warm[0][2], 'threads_end': samples[-1][2],
        'threads_max': max(s[2] for s in samples),
        'fds_after_warmup': warm[0][3], 'fds_end': samples[-1][3],
        'fds_max': max(s[3] for s in samples),
        'segmenter_exit_code': segmenter_code, 'camera_exit_code': camera_code,
        'samples': [[round(v, 1) for v in sample] for sample in samples],
    }
    print(json.dumps({k: v for k, v in result.items() if k != 'samples'}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + '\n')
    print(f"node_soak rss_mib_per_hour={result['rss_mib_per_hour']} "
          f"latency_p50_drift_pct={result['latency_p50_drift_pct']} "
          f"model_p50_drift_pct={result['model_p50_drift_pct']} "
          f"threads_delta={result['threads_end'] - result['threads_after_warmup']} "
          f"fds_delta={result['fds_end'] - result['fds_after_warmup']} "
          f"unaccounted_frames={sum(unaccounted)} errors={counters['errors']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
