"""Lifecycle ``segmenter`` node: SAM2 / SAM3 / hybrid fruit segmentation on a camera stream.

The node is a thin shell around ``sam_gap_ros.pipeline.SegmentationPipeline``: it converts
messages, pairs depth with colour frames, keeps only the newest frame for a worker thread,
publishes the results stamped with the input header and reports diagnostics. No exception
from input, prompts or inference may stop it: each is logged (throttled) and counted.
"""

from __future__ import annotations

from collections import deque
import math
import sys
import threading
import time
from typing import Any, Deque, Dict, List, Optional, Tuple

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, PointStamped, PolygonStamped, Pose, PoseArray
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String, UInt32
from std_srvs.srv import SetBool, Trigger
from visualization_msgs.msg import Marker, MarkerArray

from sam_gap_ros import image_conversion
from sam_gap_ros import instances_json
from sam_gap_ros.engines.types import ConceptError, PromptError
from sam_gap_ros.geometry import CameraIntrinsics, check_same_view
from sam_gap_ros.nodes.ros_utils import describe, executor_arg, init_node_process, input_qos
from sam_gap_ros.nodes.ros_utils import INPUT_QOS
from sam_gap_ros.nodes.ros_utils import create_node_or_exit, make_executor, spin_node
from sam_gap_ros.nodes.ros_utils import stamp_to_ns
from sam_gap_ros.nodes.ros_utils import stamp_to_sec
from sam_gap_ros.overlay import id_color, render_overlay
from sam_gap_ros.pipeline import check_concepts, FrameResult, is_out_of_memory, memory_stats
from sam_gap_ros.pipeline import MODES
from sam_gap_ros.pipeline import PipelineConfig, release_cached_memory, SegmentationPipeline
from sam_gap_ros.streaming import LatencyWindow, LatestSlot, Paired, RateMeter, StampPairer

THROTTLE_S = 2.0
RECENT_S = 10.0
"""How long skipped or refused frames keep /diagnostics at WARN after the last one."""
DEVICES_HELP = 'auto, cpu, cuda or cuda:N'
IMAGE_TRANSPORTS = ('raw', 'compressed')
DEPTH_TRANSPORTS = ('raw', 'compressedDepth')


def _declare_all(node: LifecycleNode) -> None:
    """Declare every parameter with a descriptor (description, range, read-only)."""
    # Read-only: a change needs a model reload, new subscriptions or a new timer. rclpy
    # refuses them in every state: cleanup + configure reloads with the starting values.
    ro = True
    params: List[Tuple[str, Any, Dict[str, Any]]] = [
        ('mode', 'hybrid', dict(description='sam2 = prompt tracking, sam3 = per-frame concept '
                                'segmentation, hybrid = concept detection + SAM2 tracking',
                                read_only=ro, choices=MODES)),
        ('model_dir', '', dict(description='local transformers model directory: SAM3 for sam3/'
                               'hybrid, SAM2 for sam2 mode', read_only=ro)),
        ('tracker_model_dir', '', dict(description='SAM2 model directory used by hybrid mode',
                                       read_only=ro)),
        ('device', 'auto', dict(description=f'inference device: {DEVICES_HELP}', read_only=ro)),
        ('dtype', 'float32', dict(description='weights/activations dtype (half precision falls '
                                  'back to float32 on CPU)', read_only=ro,
                                  choices=('float32', 'float16', 'bfloat16'))),
        ('engine_path', '', dict(description='TensorRT engine for the vision encoder; empty = '
                                 'PyTorch', read_only=ro)),
        ('concepts', ['apple'], dict(description='concept prompts (sam3/hybrid); compositional '
                                     'queries such as "apple but not green apple" allowed; '
                                     'settable at runtime')),
        ('score_threshold', 0.5, dict(description='minimum detection probability in [0, 1) '
                                      '(sam3/hybrid detections; sam2 reports every prompted '
                                      'object it sees)', float_range=(0.0, 0.999))),
        ('mask_threshold', 0.5, dict(description='mask probability a pixel needs to belong to '
                                     'an instance, in (0, 1) (sam3/hybrid)',
                                     float_range=(0.01, 0.99))),
        ('max_instances', 50, dict(description='maximum instances per frame (sam3/hybrid; '
                                   'sam2 tracks every prompted object)',
                                   int_range=(1, 1000))),
        ('redetect_every_n', 10, dict(description='hybrid: run concept detection every N frames',
                                      int_range=(1, 10000))),
        ('max_object_batch', 0, dict(description='sam2/hybrid: most objects per memory-'
                                     'attention batch, bounds the peak GPU memory; 0 = sized '
                                     'by the tracker', int_range=(0, 1000), read_only=ro)),
        ('box_mask_margin', 0.1, dict(description='sam2: on a box prompt\'s frame the '
                                      'mask is cut to the box grown by this fraction of its '
                                      'size per side; < 0 = SAM2\'s uncut mask',
                                      float_range=(-1.0, 10.0), read_only=ro)),
        ('motion_compensation', True, dict(description='sam2/hybrid: move each object\'s '
                                           'prompted-frame memory with the camera\'s image '
                                           'motion; false = SAM2\'s fixed memory',
                                           read_only=ro)),
        ('motion_gate_margin', 0.25, dict(description='sam2/hybrid: a tracked mask must lie '
                                          'in its last box moved with the camera and grown by '
                                          'this fraction per side, else the object is '
                                          'reported absent; < 0 = no gate',
                                          float_range=(-1.0, 10.0), read_only=ro)),
        ('mask_refine_radius', 1.0, dict(description='sam2/hybrid: snap SAM2 masks to the '
                                         'image\'s colour edges (guided filter, radius in '
                                         'cells of the coarse mask grid); <= 0 = off',
                                         float_range=(-1.0, 10.0), read_only=ro)),
        ('prompt_mirror_union', True, dict(description='sam2: a new object\'s first box/'
                                           'point prompt is also decoded on the mirrored '
                                           'image and its mask is the union of both; false = '
                                           'SAM2\'s single pass', read_only=ro)),
        ('input_qos', 'sensor_data', dict(description='subscription QoS of the inputs',
                                          read_only=ro, choices=INPUT_QOS)),
        ('image_transport', 'raw', dict(description='raw = image (sensor_msgs/Image), '
                                        'compressed = image/compressed', read_only=ro,
                                        choices=IMAGE_TRANSPORTS)),
        ('use_depth', False, dict(description='subscribe to depth (16UC1 mm / 32FC1 m) and '
                                  'camera_info to publish 3D fruit poses', read_only=ro)),
        ('depth_transport', 'raw', dict(description='raw = depth (sensor_msgs/Image), '
                                        'compressedDepth = depth/compressedDepth (PNG, as '
                                        'compressed_depth_image_transport writes it)',
                                        read_only=ro, choices=DEPTH_TRANSPORTS)),
        ('sync_tolerance_s', 0.03, dict(description='max |stamp difference| of a colour/depth '
                                        'pair', float_range=(0.0, 1.0), read_only=ro)),
        ('depth_wait_s', 0.1, dict(description='how long a colour frame waits for its depth '
                                   'before it is processed without', float_range=(0.0, 2.0),
                                   read_only=ro)),
        ('min_depth_pixels', 5, dict(description='valid depth pixels needed inside a mask for a '
                                     '3D position', int_range=(1, 100000), read_only=ro)),
        ('publish_overlay', True, dict(description='publish ~/overlay (only rendered while '
                                       'someone subscribes)')),
        ('publish_markers', True, dict(description='publish ~/markers for RViz')),
        ('overlay_alpha', 0.5, dict(description='mask opacity in ~/overlay',
                                    float_range=(0.0, 1.0))),
        ('max_image_side', image_conversion.MAX_IMAGE_SIDE,
         dict(description='frames (and depth images) with a longer side are refused as '
              'malformed; settable at runtime', int_range=(16, image_conversion.MAX_IMAGE_SIDE))),
        ('stale_image_s', 2.0, dict(description='diagnostics WARN when no image arrived for '
                                    'this long', float_range=(0.1, 60.0))),
        ('diagnostics_period_s', 1.0, dict(description='period of /diagnostics',
                                           float_range=(0.05, 60.0), read_only=ro)),
        ('autostart', True, dict(description='configure and activate on startup (for launch '
                                 'systems without lifecycle autostart)', read_only=ro)),
    ]
    for name, default, options in params:
        node.declare_parameter(name, default, describe(default=default, **options))


class SegmenterNode(LifecycleNode):
    """Lifecycle node wrapping a ``SegmentationPipeline`` (see module docstring)."""

    def __init__(self, node_name: str = 'segmenter', **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        # State first: a parameter refused by _declare_all ends __init__, and rclpy's
        # context cleanup still calls destroy_node (and so _teardown) on this node.
        self.pipeline: Optional[SegmentationPipeline] = None
        self.last_error = ''
        self._enabled = True
        self._active = False
        self._slot: LatestSlot = LatestSlot()
        self._pairer: Optional[StampPairer] = None
        self._depth_subscription: Any = None
        self._pair_lock = threading.Lock()
        self._camera_info: Optional[CameraInfo] = None
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()  # ends the worker thread (cleanup, shutdown)
        # Held by the worker while it takes and processes a frame: deactivate waits on it.
        self._in_flight = threading.Lock()
        # Held by the worker while it publishes a frame and by ~/reset: a frame segmented
        # before a reset is published before the reset returns, or not at all.
        self._output_lock = threading.Lock()
        self._session = 0  # counts ~/reset calls: which tracking session a frame belongs to
        self._entities: List[Any] = []
        self._timers: List[Any] = []
        self._pubs: Dict[str, Any] = {}
        self._stats_lock = threading.Lock()
        self.counters: Dict[str, int] = {}
        self._reset_stats()
        # (stamp ns, frame index, width, height) of recently processed frames, for prompts.
        self._recent: Deque[Tuple[int, int, int, int]] = deque(maxlen=8)
        _declare_all(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # Ctrl-C/SIGTERM shut the context down under a running inference: stop the worker
        # so it does not publish into a dead context.
        self.context.on_shutdown(self._on_context_shutdown)
        # Periodic work runs on steady time, not the node's clock: with use_sim_time that
        # clock stands still before the first /clock and while a bag is paused, and
        # /diagnostics (which then reports 'no image') and the depth wait must go on.
        self._steady_clock = Clock(clock_type=ClockType.STEADY_TIME)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(
            self.get_parameter('diagnostics_period_s').value, self._publish_diagnostics,
            clock=self._steady_clock)
        if self.get_parameter('autostart').value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # -- statistics ------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        with self._stats_lock:
            self.counters = {key: 0 for key in (
                'frames_in', 'frames_processed', 'frames_dropped', 'bad_input', 'bad_depth',
                'bad_prompts', 'oom_skips', 'errors', 'unpaired_depth', 'disabled_skips',
                'frames_aborted', 'zero_stamps', 'instances_with_position',
                'instances_without_position', 'stamp_jumps_back')}
        self._slot = LatestSlot()
        self._in_rate = RateMeter()
        self._out_rate = RateMeter()
        self.latency = LatencyWindow()
        self.inference = LatencyWindow()
        self._last_depth_time: Optional[float] = None
        self._last_counted: Dict[str, float] = {}
        self._active_since = time.monotonic()

    def _count(self, key: str, amount: int = 1) -> None:
        with self._stats_lock:
            self.counters[key] = self.counters.get(key, 0) + amount
            self._last_counted[key] = time.monotonic()

    def _counted_lately(self, key: str, now: float) -> bool:
        """Whether counter ``key`` grew within the last ``RECENT_S`` seconds."""
        return now - self._last_counted.get(key, -math.inf) < RECENT_S

    def stats(self) -> Dict[str, Any]:
        """Return a snapshot of counters, rates and latency percentiles."""
        now = time.monotonic()
        with self._stats_lock:
            snapshot: Dict[str, Any] = dict(self.counters)
            pairer = self._pairer  # cleanup folds its counts in and clears it under the lock
        # The counters hold what a cleaned-up pairer had counted (see _teardown).
        for key, value in _pairer_counts(pairer).items():
            snapshot[key] += value
        snapshot['frames_dropped'] += self._slot.dropped + snapshot['frames_aborted']
        snapshot['input_rate_hz'] = self._in_rate.rate(now)
        snapshot['processed_rate_hz'] = self._out_rate.rate(now)
        snapshot['latency_ms_p50'] = self.latency.percentile_ms(50)
        snapshot['latency_ms_p95'] = self.latency.percentile_ms(95)
        snapshot['inference_ms_p50'] = self.inference.percentile_ms(50)
        return snapshot

    def _warn(self, counter: str, message: str) -> None:
        self._count(counter)
        self.get_logger().warning(message, throttle_duration_sec=THROTTLE_S)

    # -- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate parameters, load the model and create the ROS interfaces."""
        param = self._param
        config = PipelineConfig(
            mode=param('mode'), model_dir=param('model_dir'),
            tracker_model_dir=param('tracker_model_dir'), device=param('device'),
            dtype=param('dtype'), engine_path=param('engine_path'),
            concepts=list(param('concepts')), score_threshold=param('score_threshold'),
            mask_threshold=param('mask_threshold'), max_instances=param('max_instances'),
            redetect_every_n=param('redetect_every_n'),
            min_depth_pixels=param('min_depth_pixels'),
            max_object_batch=param('max_object_batch'),
            box_mask_margin=param('box_mask_margin'),
            motion_compensation=param('motion_compensation'),
            motion_gate_margin=param('motion_gate_margin'),
            mask_refine_radius=param('mask_refine_radius'),
            prompt_mirror_union=param('prompt_mirror_union'))
        try:
            input_qos(param('input_qos'))
            for name, allowed in (('image_transport', IMAGE_TRANSPORTS),
                                  ('depth_transport', DEPTH_TRANSPORTS)):
                if param(name) not in allowed:
                    raise ValueError(f"{name} '{param(name)}' is not one of "
                                     f'{", ".join(allowed)}')
            pipeline = SegmentationPipeline(config, logger=self.get_logger())
            pipeline.load()
        except Exception as exc:  # noqa: BLE001 - every load failure must leave us unconfigured
            self.last_error = f'configure failed: {exc}'
            self.get_logger().error(f'{self.last_error} (node stays unconfigured)')
            return TransitionCallbackReturn.FAILURE
        self.pipeline = pipeline
        self.last_error = ''
        if config.engine_path:
            self.get_logger().info(f'TensorRT engine: {pipeline.tensorrt_status}')
        self._create_interfaces()
        self.get_logger().info(
            f'configured: mode={config.mode} model={pipeline.model_name} '
            f'device={pipeline.device} concepts={pipeline.concepts}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start the inference worker."""
        self._reset_stats()
        with self._pair_lock:
            if self._pairer is not None:
                self._pairer = StampPairer(self._pairer.tolerance, self._pairer.max_wait)
        self._active = True
        if self._worker is None:  # after configure; deactivate only parks it
            self._stop.clear()
            self._worker = threading.Thread(target=self._work, name='segmenter-worker',
                                            daemon=True)
            self._worker.start()
        self.get_logger().info('active: processing frames')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Pause processing and free cached accelerator memory."""
        self._pause_worker()
        self._clear_markers()
        release_cached_memory()
        self.get_logger().info('inactive: processing paused')
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unload the model and destroy the ROS interfaces."""
        self._teardown()
        self.get_logger().info('cleaned up: model unloaded')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop everything on shutdown from any state."""
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Recover to unconfigured after an error in a transition."""
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _teardown(self) -> None:
        self._stop_worker()
        self._clear_markers()
        for entity in self._entities:
            self._destroy(entity)
        for timer in self._timers:
            self.destroy_timer(timer)
        self._entities, self._timers, self._pubs = [], [], {}
        with self._stats_lock:
            # Kept until the next activate restarts the counters: /diagnostics goes on
            # showing them, and frames_dropped must not fall (nor the accounting break).
            for key, value in _pairer_counts(self._pairer).items():
                self.counters[key] += value
            self._pairer = None
        self._depth_subscription = None
        self._camera_info = None
        if self.pipeline is not None:
            self.pipeline.unload()
        self.pipeline = None

    def destroy_node(self) -> None:
        """End the worker thread and unload the model, then destroy the node.

        Without this, a node destroyed between activate and cleanup (by a process that
        embeds it, a test) kept its worker thread polling and, through it, itself and its
        model in memory until rclpy shut down.
        """
        self._teardown()
        super().destroy_node()

    def _destroy(self, entity: Any) -> None:
        for destroy in (self.destroy_subscription, self.destroy_publisher,
                        self.destroy_service):
            try:
                if destroy(entity):
                    return
            except (TypeError, AttributeError):
                continue

    def _on_context_shutdown(self) -> None:
        self._active = False
        self._stop.set()
        self._slot.close()

    def _pause_worker(self) -> None:
        """Stop taking frames and wait for the one in flight; the worker thread stays.

        Parked, not ended: with a new worker thread per activation, ~40 deactivate/activate
        cycles grew the node's resident memory by ~450 MiB, as each thread that ran the
        model left freed memory behind in malloc arenas (flat with MALLOC_ARENA_MAX=2;
        benchmarks/bench_node_soak.py).
        """
        self._active = False
        self._slot.close()  # wakes the worker's take
        if self._worker is not threading.current_thread():
            with self._in_flight:  # the frame in flight, if any, is finished and counted
                pass
        # Whatever was still waiting is dropped (and counted): nothing is silently lost.
        self._slot.clear()
        self._slot.reopen()
        with self._pair_lock:
            if self._pairer is not None:
                self._pairer.clear()

    def _stop_worker(self) -> None:
        """Pause processing and end the worker thread (cleanup, shutdown)."""
        self._stop.set()
        self._pause_worker()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30.0)
        self._worker = None

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    # -- interfaces ------------------------------------------------------------------------
    def _create_interfaces(self) -> None:
        qos = input_qos(self._param('input_qos'))
        sub = self.create_subscription
        if self._param('image_transport') == 'compressed':
            self._entities.append(sub(CompressedImage, 'image/compressed', self._on_image, qos))
        else:
            self._entities.append(sub(Image, 'image', self._on_image, qos))
        if self._param('use_depth'):
            self._pairer = StampPairer(self._param('sync_tolerance_s'),
                                       self._param('depth_wait_s'))
            # Recorded bags often hold only compressedDepth: read it without a republisher.
            self._depth_subscription = (
                sub(CompressedImage, 'depth/compressedDepth', self._on_depth, qos)
                if self._param('depth_transport') == 'compressedDepth'
                else sub(Image, 'depth', self._on_depth, qos))
            self._entities.append(self._depth_subscription)
            self._entities.append(sub(CameraInfo, 'camera_info', self._on_camera_info, qos))
            self._timers.append(self.create_timer(0.02, self._poll_pairer,
                                                  clock=self._steady_clock))
        self._entities.append(sub(PolygonStamped, '~/prompt_box', self._on_prompt_box, 10))
        self._entities.append(sub(PointStamped, '~/prompt_point', self._on_prompt_point, 10))
        self._entities.append(sub(UInt32, '~/remove_object', self._on_remove_object, 10))
        self._entities.append(self.create_service(Trigger, '~/reset', self._on_reset))
        self._entities.append(self.create_service(SetBool, '~/enable', self._on_enable))
        for key, msg_type, topic in (
                ('masks', Image, '~/masks'), ('instances', String, '~/instances'),
                ('poses', PoseArray, '~/fruit_poses'), ('overlay', Image, '~/overlay'),
                ('markers', MarkerArray, '~/markers')):
            self._pubs[key] = self.create_publisher(msg_type, topic, 5)
            self._entities.append(self._pubs[key])

    # -- input callbacks: store only, never block ------------------------------------------
    def _on_image(self, msg: Any) -> None:
        if not self._active:
            return
        now = time.monotonic()
        self._count('frames_in')
        self._in_rate.tick(now)
        # Header and size checks here (microseconds), not only in the worker: a malformed
        # frame must be counted as such, not dropped behind the next good one, and must not
        # take the slot from a good frame.
        check = (image_conversion.check_rgb_compressed_msg if isinstance(msg, CompressedImage)
                 else image_conversion.check_rgb_image_msg)
        try:
            check(msg, max_side=int(self._param('max_image_side')))
        except (ValueError, TypeError) as exc:
            self._warn('bad_input', f'dropping malformed image: {exc}')
            return
        stamp = msg.header.stamp
        if stamp.sec == 0 and stamp.nanosec == 0:
            # Processed all the same, but its outputs cannot be placed in time (TF lookups
            # fail); depth stamped 0 too pairs by arrival, stamped depth never pairs.
            self._warn('zero_stamps', 'image header stamp is 0: the camera driver does not '
                       'stamp its frames; outputs carry the same stamp')
        pairer = self._pairer  # read once: cleanup may reset it from another thread
        if pairer is None:
            self._slot.put(Paired(stamp_to_sec(stamp), (msg, now), None))
            return
        self._pair(pairer, True, stamp_to_sec(stamp), (msg, now), now)

    def _on_depth(self, msg: Any) -> None:
        pairer = self._pairer
        if not self._active or pairer is None:
            return
        now = time.monotonic()
        self._last_depth_time = now
        self._pair(pairer, False, stamp_to_sec(msg.header.stamp), msg, now)

    def _pair(self, pairer: StampPairer, colour: bool, stamp: float, item: Any,
              now: float) -> None:
        """Offer a colour or depth item to ``pairer``; queue the frames that makes ready."""
        with self._pair_lock:
            jumps = pairer.time_jumps
            add = pairer.add_primary if colour else pairer.add_secondary
            ready = add(stamp, item, now)
            jumped = pairer.time_jumps != jumps
        if jumped:
            self.get_logger().warning(
                f'image/depth stamps went back by more than {pairer.max_jump:g} s (a bag '
                'played in a loop, a restarted clock?): depth pairing starts over',
                throttle_duration_sec=THROTTLE_S)
        self._deliver(ready)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        # Intrinsics are static for a camera, so the newest camera_info serves every frame.
        self._camera_info = msg

    def _poll_pairer(self) -> None:
        pairer = self._pairer
        if not self._active or pairer is None:
            return
        with self._pair_lock:
            ready = pairer.poll(time.monotonic())
        self._deliver(ready)

    def _deliver(self, ready: List[Paired]) -> None:
        # In stamp order: the slot keeps the newest and counts every older one as dropped.
        for pair in ready:
            self._slot.put(pair)

    # -- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._active:
                self._stop.wait(0.05)  # parked while inactive
                continue
            with self._in_flight:
                item = self._slot.take(timeout=0.2)
                if item is not None:
                    self._handle(item)
            if not self.context.ok():
                return

    def _handle(self, item: Paired) -> None:
        """Process one frame, or count why not: every frame taken is accounted for."""
        if not self._active:
            self._count('frames_aborted')  # taken just as processing stopped
            return
        if not self._enabled:
            self._count('disabled_skips')
            return
        try:
            self._process(item)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any frame
            if not self._active or not self.context.ok():
                # Deactivated or shutting down: the frame's outputs have nowhere to go.
                self._count('frames_aborted')
            elif is_out_of_memory(exc):
                release_cached_memory()
                self._warn('oom_skips', f'out of memory during inference, frame skipped: '
                           f'{exc}')
            else:
                self._count('errors')
                self.get_logger().error(f'frame failed: {type(exc).__name__}: {exc}',
                                        throttle_duration_sec=THROTTLE_S)

    def _process(self, item: Paired) -> None:
        msg, received = item.primary
        max_side = int(self._param('max_image_side'))
        try:
            if isinstance(msg, CompressedImage):
                rgb = image_conversion.compressed_msg_to_rgb(msg, max_side=max_side)
            else:
                # The message was deserialized for this node alone and is never written, so
                # an rgb8 frame is read in place (a frame-sized copy less on the hot path).
                rgb = image_conversion.image_msg_to_rgb(msg, max_side=max_side, copy=False)
        except (ValueError, TypeError) as exc:
            self._warn('bad_input', f'dropping malformed image: {exc}')
            return
        depth, encoding, intrinsics = self._depth_inputs(item.secondary, rgb.shape[:2])
        pipeline = self.pipeline
        if pipeline is None:  # cleaned up meanwhile
            self._count('frames_aborted')
            return
        session = self._session
        result = pipeline.process(rgb, depth, encoding, intrinsics)
        for reason in result.refused_prompts:
            self._warn('bad_prompts', f'prompt sent before the first frame refused: {reason}')
        if depth is not None:
            self._count_positions(result)
        with self._output_lock:
            if not self._active or self._session != session:
                # Deactivated, shutting down or reset during inference: publish nothing (a
                # reset's caller must not get the old session's IDs after it returned), but
                # account for the frame so frames_in == processed + dropped still holds.
                self._count('frames_aborted')
                return
            if not self._enabled:  # ~/enable false during inference
                self._count('disabled_skips')
                return
            self._publish(msg.header, rgb, result, pipeline)
            done = time.monotonic()
            self._count('frames_processed')
            self._out_rate.tick(done)
            self.latency.add(done - received)
            self.inference.add(result.inference_s)
            height, width = rgb.shape[:2]
            self._recent.append((stamp_to_ns(msg.header.stamp), result.frame_index, width,
                                 height))

    def _count_positions(self, result: FrameResult) -> None:
        """Count the instances of a frame with depth that did or did not get a 3D position."""
        without = sum(1 for record in result.records if record.position is None)
        if len(result.records) > without:
            self._count('instances_with_position', len(result.records) - without)
        if without:
            # Holes (0, NaN) are normal in depth images; a fruit with too few valid pixels
            # (out of range, sunlight, a depth image not aligned to colour) has no pose.
            self._count('instances_without_position', without)
            self.get_logger().warning(
                f'{without} of {len(result.records)} instances had fewer than '
                f"{self._param('min_depth_pixels')} valid depth pixels (not 0/NaN) in their "
                'mask: no 3D position', throttle_duration_sec=THROTTLE_S)

    def _depth_inputs(self, depth_msg: Any, shape: Tuple[int, int]
                      ) -> Tuple[Any, str, Optional[CameraIntrinsics]]:
        if depth_msg is None:
            return None, '16UC1', None
        info = self._camera_info
        if info is None:
            self._warn('bad_depth', 'depth received but no camera_info yet: no 3D poses')
            return None, '16UC1', None
        try:
            max_side = int(self._param('max_image_side'))
            if isinstance(depth_msg, CompressedImage):
                depth, encoding = image_conversion.decode_compressed_msg(depth_msg, max_side)
            else:
                depth = image_conversion.image_msg_to_numpy(depth_msg, max_side=max_side)
                encoding = depth_msg.encoding
            if encoding not in ('16UC1', 'mono16', '32FC1'):
                raise ValueError(f"depth encoding '{encoding}' is not 16UC1 or 32FC1")
            intrinsics = _camera_intrinsics(info, shape)
            image_size = (shape[1], shape[0])
            check_same_view('depth', (depth.shape[1], depth.shape[0]), image_size)
            check_same_view('camera_info', (intrinsics.width, intrinsics.height), image_size)
        except (ValueError, TypeError) as exc:
            self._warn('bad_depth', f'ignoring bad depth/camera_info: {exc}')
            return None, '16UC1', None
        return depth, encoding, intrinsics

    # -- outputs ---------------------------------------------------------------------------
    def _publish(self, header: Any, rgb: Any, result: FrameResult,
                 pipeline: SegmentationPipeline) -> None:
        pubs = self._pubs
        if not pubs:
            return
        height, width = result.labels.shape
        # ~/masks first: it is what latency is measured on. The other outputs are built only
        # while someone subscribes (RViz markers and the overlay are often unwatched on a
        # robot), which also frees the GIL sooner for in-process subscribers.
        pubs['masks'].publish(image_conversion.numpy_to_image_msg(result.labels, 'mono16',
                                                                  header))
        # Stamp in -> masks out, on the node's clock (the camera's stamps share it on a robot
        # with synchronised clocks; with use_sim_time both are the bag's time), read as soon
        # as the publish call returns.
        # Left out where either time is unset: a sim clock before the first /clock reads 0,
        # as does an unstamped frame, and their difference is the time since 1970.
        now_ns, stamp_ns = self.get_clock().now().nanoseconds, stamp_to_ns(header.stamp)
        latency_ms = (now_ns - stamp_ns) / 1e6 if now_ns and stamp_ns else None
        if pubs['instances'].get_subscription_count() > 0:
            document = instances_json.build_document(
                result.records, stamp_sec=header.stamp.sec, stamp_nanosec=header.stamp.nanosec,
                frame_id=header.frame_id, width=width, height=height,
                mode=pipeline.config.mode, model=pipeline.model_name,
                frame_index=result.frame_index, concepts=result.concepts,
                inference_ms=result.inference_s * 1e3, latency_ms=latency_ms)
            pubs['instances'].publish(String(data=instances_json.dumps(document)))
        if pubs['poses'].get_subscription_count() > 0:
            poses = PoseArray(header=header)
            for record in result.records:
                if record.position is not None:
                    pose = Pose()
                    pose.position = Point(x=record.position[0], y=record.position[1],
                                          z=record.position[2])
                    pose.orientation.w = 1.0
                    poses.poses.append(pose)
            pubs['poses'].publish(poses)
        if self._param('publish_markers') and pubs['markers'].get_subscription_count() > 0:
            pubs['markers'].publish(self._markers(header, result, pipeline))
        overlay_pub = pubs['overlay']
        if self._param('publish_overlay') and overlay_pub.get_subscription_count() > 0:
            overlay = render_overlay(rgb, result.labels, result.records,
                                     float(self._param('overlay_alpha')))
            overlay_pub.publish(image_conversion.numpy_to_image_msg(overlay, 'rgb8', header))

    def _markers(self, header: Any, result: FrameResult,
                 pipeline: SegmentationPipeline) -> MarkerArray:
        markers = MarkerArray()
        clear = Marker(header=header, action=Marker.DELETEALL)
        markers.markers.append(clear)
        fx = self._focal_length_px(result.labels.shape)
        for record in result.records:
            if record.position is None:
                continue
            x, y, z = record.position
            r, g, b = (c / 255.0 for c in id_color(record.instance_id))
            # Equivalent-circle diameter of the mask, back-projected at the fruit's depth.
            diameter = 0.08
            if fx is not None:
                diameter = max(0.01, 2.0 * math.sqrt(record.area / math.pi) * z / fx)
            sphere = Marker(header=header, ns='fruit', id=int(record.instance_id),
                            type=Marker.SPHERE, action=Marker.ADD)
            sphere.pose.position = Point(x=x, y=y, z=z)
            sphere.pose.orientation.w = 1.0
            sphere.scale.x = sphere.scale.y = sphere.scale.z = diameter
            sphere.color.r, sphere.color.g, sphere.color.b, sphere.color.a = r, g, b, 0.8
            text = Marker(header=header, ns='labels', id=int(record.instance_id),
                          type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                          text=f'{record.instance_id} {record.label}')
            text.pose.position = Point(x=x, y=y - diameter, z=z)
            text.pose.orientation.w = 1.0
            text.scale.z = max(0.03, diameter / 2)
            text.color.r = text.color.g = text.color.b = text.color.a = 1.0
            markers.markers.extend([sphere, text])
        return markers

    def _clear_markers(self) -> None:
        """Delete every marker in RViz: its instances end here, and no frame may follow.

        RViz keeps a marker until it is deleted (they have no lifetime: a slow model would
        make them flicker), and each frame's array begins with DELETEALL; but after a
        reset, a deactivate or a cleanup no frame comes to replace the last one's fruit.
        """
        publisher = self._pubs.get('markers')
        if (publisher is None or not self.context.ok()
                or publisher.get_subscription_count() == 0):
            return
        clear = Marker(action=Marker.DELETEALL)
        clear.header.stamp = self.get_clock().now().to_msg()
        publisher.publish(MarkerArray(markers=[clear]))

    def _focal_length_px(self, shape: Tuple[int, int]) -> Optional[float]:
        """Return fx at the colour image's resolution (camera_info may have another)."""
        info = self._camera_info
        if info is None:
            return None
        height, width = shape
        try:
            return _camera_intrinsics(info, shape).scaled_to(width, height).fx
        except ValueError:
            return None

    # -- prompts and services --------------------------------------------------------------
    def _prompt_image_size(self, stamp: Any) -> Optional[Tuple[int, int]]:
        """Return the (width, height) prompts are checked against; log stale prompt stamps.

        The tracker holds the features of the latest processed frame only, so every prompt
        applies there; a prompt stamped for an older frame is applied with a note, since the
        fruit has usually not moved much in a few frames.
        """
        if not self._recent:
            return None
        latest_ns, _, width, height = self._recent[-1]
        wanted = stamp_to_ns(stamp)
        if wanted and wanted != latest_ns:
            age = (latest_ns - wanted) * 1e-9
            self.get_logger().info(f'prompt stamp is {age:+.3f} s from the latest processed '
                                   'frame; applying it to the latest frame',
                                   throttle_duration_sec=THROTTLE_S)
        return width, height

    def _on_prompt_box(self, msg: PolygonStamped) -> None:
        try:
            if len(msg.polygon.points) != 2:
                raise PromptError(f'box prompt needs exactly 2 corner points, got '
                                  f'{len(msg.polygon.points)}')
            a, b = msg.polygon.points
            size = self._prompt_image_size(msg.header.stamp)
            object_id = self._require_pipeline().add_box((a.x, a.y, b.x, b.y), None, size)
        except Exception as exc:  # noqa: BLE001 - no prompt may stop the node
            self._prompt_failed('box prompt', exc)
            return
        self.get_logger().info(f'box prompt added object {object_id}')

    def _on_prompt_point(self, msg: PointStamped) -> None:
        try:
            if msg.point.z not in (0.0, 1.0):
                raise PromptError(f'point label z must be 1 (foreground) or 0 (background), '
                                  f'got {msg.point.z}')
            size = self._prompt_image_size(msg.header.stamp)
            foreground = msg.point.z == 1.0
            object_id = self._require_pipeline().add_point(
                msg.point.x, msg.point.y, foreground, None, size)
        except Exception as exc:  # noqa: BLE001 - no prompt may stop the node
            self._prompt_failed('point prompt', exc)
            return
        self.get_logger().info(f'point prompt added object {object_id}' if foreground
                               else f'background point corrected object {object_id}')

    def _on_remove_object(self, msg: UInt32) -> None:
        try:
            self._require_pipeline().remove_object(int(msg.data))
        except Exception as exc:  # noqa: BLE001 - no prompt may stop the node
            self._prompt_failed(f'remove_object {msg.data}', exc)
            return
        self.get_logger().info(f'removed object {msg.data}')

    def _prompt_failed(self, what: str, exc: Exception) -> None:
        """Count and log a prompt that was refused (invalid) or failed in the model.

        A valid prompt runs the SAM2 decoder in this callback, which can run out of GPU
        memory or fail like any inference; raised from a subscription callback, that would
        end the executor's spin and with it the node.
        """
        if isinstance(exc, (PromptError, ValueError, KeyError)):
            self._warn('bad_prompts', f'{what} refused: {exc}')
            return
        if is_out_of_memory(exc):
            release_cached_memory()
        self._count('bad_prompts')
        self.get_logger().error(f'{what} failed: {type(exc).__name__}: {exc}',
                                throttle_duration_sec=THROTTLE_S)

    def _require_pipeline(self) -> SegmentationPipeline:
        pipeline = self.pipeline
        if pipeline is None:
            raise PromptError('node is not configured')
        return pipeline

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Any:
        try:
            with self._output_lock:
                # A frame being published goes out first; one segmented before the reset
                # but not yet published never does (frames_aborted): its IDs belong to the
                # tracking session this reset ends.
                self._require_pipeline().reset()
                self._session += 1
                self._slot.clear()
                self._recent.clear()
                self._clear_markers()
        except Exception as exc:  # noqa: BLE001 - report every failure to the caller
            response.success, response.message = False, str(exc)
            return response
        response.success, response.message = True, 'tracking state reset'
        return response

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> Any:
        with self._output_lock:
            # Under the lock: a frame in inference now is not published after this returns,
            # and its markers would outlive the ones deleted here.
            self._enabled = bool(request.data)
            if not self._enabled:
                self._clear_markers()
        response.success = True
        response.message = 'processing enabled' if self._enabled else 'processing disabled'
        self.get_logger().info(response.message)
        return response

    @property
    def enabled(self) -> bool:
        """Whether frames are processed while active (``~/enable``)."""
        return self._enabled

    # -- parameters ------------------------------------------------------------------------
    def _on_set_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """Apply runtime changes all or none: a refused one undoes those applied before it.

        ``set_parameters_atomically`` hands over several at once; ROS keeps every old value
        when the result is unsuccessful, so the pipeline must too.
        """
        pipeline = self.pipeline
        applied: List[str] = []
        try:
            for param in params:
                self._apply_parameter(pipeline, param.name, param.value)
                applied.append(param.name)
        except Exception as exc:  # noqa: BLE001 - raised here, it would end the node's spin
            # Not only invalid values: a new concept runs the text encoder, which can run
            # out of GPU memory like any inference. The old value then stays, refused.
            if is_out_of_memory(exc):
                release_cached_memory()
            for name in reversed(applied):  # the current values are still the old ones
                try:
                    self._apply_parameter(pipeline, name, self.get_parameter(name).value)
                except Exception as undo_exc:  # noqa: BLE001 - accepted before
                    self.get_logger().error(f"could not restore '{name}': {undo_exc}")
            reason = (str(exc) if isinstance(exc, (ConceptError, ValueError, TypeError))
                      else f'{type(exc).__name__}: {exc}')
            self.get_logger().warning(f'parameter change refused: {reason}')
            return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _apply_parameter(self, pipeline: Optional[SegmentationPipeline], name: str,
                         value: Any) -> None:
        """Hand one runtime-changeable parameter to the pipeline (validated there)."""
        if name == 'concepts':
            concepts = [str(c) for c in (value or [])]
            if pipeline is not None:
                accepted = pipeline.set_concepts(concepts)
                self.get_logger().info(f'concepts set to {accepted}')
            else:
                # Checked now against the model directory's tokenizer, so configure does not
                # fail later on a phrase too long for the text encoder.
                check_concepts(self._param('mode'), self._param('model_dir'), concepts)
        elif pipeline is None:
            return
        elif name == 'score_threshold':
            pipeline.set_score_threshold(float(value))
        elif name == 'mask_threshold':
            pipeline.set_mask_threshold(float(value))
        elif name == 'max_instances':
            pipeline.set_max_instances(int(value))
        elif name == 'redetect_every_n':
            pipeline.set_redetect_every_n(int(value))

    # -- diagnostics -----------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        try:
            self._diag_pub.publish(self.diagnostics())
        except Exception as exc:  # noqa: BLE001 - diagnostics must never take the node down
            self.get_logger().error(f'diagnostics failed: {exc}', throttle_duration_sec=10.0)

    def _depth_silence(self, now: float) -> float:
        """Seconds without depth while depth is paired (0 when depth is not used)."""
        if self._pairer is None:
            return 0.0
        last = self._last_depth_time
        return now - (last if last is not None else self._active_since)

    def _depth_topic(self) -> str:
        subscription = self._depth_subscription
        return subscription.topic_name if subscription is not None else 'depth'

    def diagnostics(self) -> DiagnosticArray:
        """Return the current DiagnosticArray (also published periodically)."""
        now = time.monotonic()
        stats = self.stats()
        pipeline = self.pipeline
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: segmenter',
                                  hardware_id=(pipeline.device or '') if pipeline else '')
        level, message = DiagnosticStatus.OK, 'processing'
        stale = float(self._param('stale_image_s'))
        if pipeline is None:
            level, message = DiagnosticStatus.WARN, 'unconfigured'
            if self.last_error:
                level, message = DiagnosticStatus.ERROR, self.last_error
        elif not self._active:
            message = 'inactive'
        elif not self._enabled:
            message = 'disabled via ~/enable'
        else:
            last = self._last_counted.get('frames_in')  # the latest image received
            since = now - (last if last is not None else self._active_since)
            depth_since = self._depth_silence(now)
            if since > stale:
                level = DiagnosticStatus.WARN
                message = f'no image for {since:.1f} s'
            elif depth_since > stale:
                # Images but no depth: every frame goes out without 3D poses. Usually the
                # depth topic is not remapped to the camera's depth aligned to colour.
                level = DiagnosticStatus.WARN
                message = (f"no depth for {depth_since:.1f} s on '{self._depth_topic()}' "
                           '(use_depth is on): no 3D poses')
                self.get_logger().warning(f'{message}; remap depth to the depth image '
                                          'aligned to the colour camera',
                                          throttle_duration_sec=THROTTLE_S)
            elif self._counted_lately('oom_skips', now) or self._counted_lately('errors', now):
                # Recent, not cumulative: the counters keep the history, the level the now.
                level = DiagnosticStatus.WARN
                message = f'frames skipped in the last {RECENT_S:g} s (see counters)'
            elif (self._counted_lately('bad_input', now)
                  and not self._counted_lately('frames_processed', now)):
                # Images arrive (so not stale) but every one is refused: wrong encoding or
                # size; the log says which.
                level = DiagnosticStatus.WARN
                message = (f'every image of the last {RECENT_S:g} s was refused (bad_input): '
                           'see the log for why')
            elif (self._counted_lately('instances_without_position', now)
                  and not self._counted_lately('instances_with_position', now)):
                # Depth arrives, but no fruit gets a 3D position: the planner has no poses.
                level = DiagnosticStatus.WARN
                message = (f'no instance of the last {RECENT_S:g} s had valid depth in its '
                           'mask (0/NaN: out of range, or depth not aligned to colour)')
            elif (str(pipeline.config.engine_path).strip()
                  and pipeline.tensorrt_status.startswith('pytorch')):
                # Running, but at PyTorch speed where an engine was asked for: the frame
                # rate a planner was tuned for may not be reached.
                level = DiagnosticStatus.WARN
                message = f'engine_path not in use: {pipeline.tensorrt_status}'
        status.level, status.message = level, message
        values: Dict[str, Any] = {
            'mode': self._param('mode'),
            'model': pipeline.model_name if pipeline else self._param('model_dir'),
            'device': pipeline.device if pipeline else self._param('device'),
            'tensorrt': pipeline.tensorrt_status if pipeline else 'n/a',
            'active_concepts': ', '.join(pipeline.concepts) if pipeline else '',
            'enabled': self._enabled,
        }
        values.update(stats)
        if pipeline is not None:
            values.update(memory_stats(pipeline.device))
        for key, value in values.items():
            if isinstance(value, float):
                value = f'{value:.2f}'
            status.values.append(KeyValue(key=key, value='' if value is None else str(value)))
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        return array


def _pairer_counts(pairer: Optional[StampPairer]) -> Dict[str, int]:
    """Return what ``pairer`` counted, under the names of the node's counters."""
    if pairer is None:
        return {}
    return {'frames_dropped': pairer.dropped, 'unpaired_depth': pairer.unpaired,
            'stamp_jumps_back': pairer.time_jumps}


def _camera_intrinsics(info: CameraInfo, shape: Tuple[int, int]) -> CameraIntrinsics:
    """Return the intrinsics of the image camera_info describes (its binning and ROI applied).

    A camera_info without a size is the image's.
    """
    roi = info.roi
    return CameraIntrinsics.from_camera_info(
        list(info.k), info.width or shape[1], info.height or shape[0],
        binning=(info.binning_x, info.binning_y),
        roi=(roi.x_offset, roi.y_offset, roi.width, roi.height))


def main(args: Optional[List[str]] = None) -> None:
    """Run the segmenter node until shutdown."""
    args = sys.argv if args is None else args
    executor_kind = executor_arg(args, 'segmenter')
    init_node_process(args, 'segmenter')
    node = create_node_or_exit(SegmenterNode, 'segmenter')
    spin_node(node, make_executor(executor_kind), on_stop=node._stop_worker)


if __name__ == '__main__':
    main(sys.argv)
