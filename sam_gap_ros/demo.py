"""``make demo``: synthetic camera -> segmenter -> recorder in one process, on CPU.

Runs the three nodes in one rclpy executor for ``--duration`` seconds, then writes to the
output folder an overlay video (``overlay.mp4``), a PNG strip of overlay frames
(``overlay_strip.png`` + ``overlay_XXXX.png``) and ``summary.json`` (frame/latency counts,
instances per frame, model), and prints where. It uses the tiny trained orchard models
(``models/tiny-orchard-sam3`` / ``models/tiny-orchard-sam2`` in the repository or the
installed share directory) when they exist, otherwise tiny random models of the real
architectures, and says which.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from sam_gap_ros.tiny_models import TINY_MODEL_SCENES, TINY_SAM3_THRESHOLDS, TRAINED


def find_trained_model(name: str) -> Optional[Path]:
    """Return the trained tiny model directory from the repository or share dir, if any."""
    candidates = [Path(__file__).resolve().parents[1] / 'models' / name]
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory('sam_gap_ros')) / 'models' / name)
    except (ImportError, LookupError, ValueError, OSError):  # not installed / not sourced
        pass
    for path in candidates:
        if (path / 'config.json').is_file():
            return path
    return None


def prepare_models(mode: str, workdir: Path) -> Tuple[str, str, str]:
    """Return ``(model_dir, tracker_model_dir, description)`` for ``mode``.

    Missing trained models are replaced by tiny random ones saved under ``workdir``.
    """
    descriptions: List[str] = []
    dirs: Dict[str, str] = {}
    for family in (('sam2',) if mode == 'sam2' else ('sam3', 'sam2') if mode == 'hybrid'
                   else ('sam3',)):
        trained = find_trained_model(TRAINED[family])
        if trained is not None:
            dirs[family] = str(trained)
            descriptions.append(f'{family}: trained tiny orchard model {trained}')
            continue
        target = workdir / f'random-tiny-{family}'
        if family == 'sam2':
            from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
            save_tiny_sam2(target, seed=0)
        else:
            from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
            save_tiny_sam3(target, seed=0)
        dirs[family] = str(target)
        descriptions.append(f'{family}: tiny RANDOM config (no trained model found; masks are '
                            'not meaningful)')
    model_dir = dirs['sam2'] if mode == 'sam2' else dirs['sam3']
    return model_dir, dirs.get('sam2', ''), '; '.join(descriptions)


def default_mode() -> str:
    """Return hybrid when the concept engines are installed, otherwise sam2."""
    try:
        import sam_gap_ros.engines.hybrid  # noqa: F401
        import sam_gap_ros.engines.sam3_concepts  # noqa: F401
    except ImportError:
        return 'sam2'
    return 'hybrid'


def write_strip(frames: Sequence[np.ndarray], path: Path, columns: int = 4) -> None:
    """Write RGB frames as one PNG contact sheet."""
    rows = []
    height, width = frames[0].shape[:2]
    blank = np.zeros((height, width, 3), np.uint8)
    for start in range(0, len(frames), columns):
        row = list(frames[start:start + columns])
        row += [blank] * (columns - len(row))
        rows.append(np.concatenate(row, axis=1))
    _write_png(path, np.concatenate(rows, axis=0))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    # cv2.imwrite reports failure (unwritable folder, full disk) only by returning False.
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write '{path}'")


def run_demo(output: Path, duration: float, mode: str, rate_hz: float, width: int, height: int,
             concepts: Sequence[str], seed: int = 0) -> Dict[str, object]:
    """Run the demo and return the summary (also written to ``summary.json``)."""
    from sam_gap_ros.allocator import keep_freed_buffers
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    import torch

    from sam_gap_ros import image_conversion, instances_json
    from sam_gap_ros.nodes.ros_utils import make_executor
    from sam_gap_ros.nodes.segmenter import SegmenterNode
    from sam_gap_ros.nodes.synthetic_camera import SyntheticCameraNode
    from sam_gap_ros.streaming import LatencyWindow

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    output.mkdir(parents=True, exist_ok=True)
    if not os.access(output, os.W_OK):  # say so now, not after the whole run
        raise OSError(f"output folder '{output}' is not writable")
    _clear_old_outputs(output)
    # Random stand-ins (no trained model found) are kept with the outputs, where the
    # summary's model_dir points, instead of a folder in /tmp per run.
    model_dir, tracker_dir, model_text = prepare_models(mode, output / 'random_models')
    print(f'[demo] mode={mode} models: {model_text}', flush=True)

    random_weights = 'RANDOM' in model_text
    keep_freed_buffers()  # as the node executables do: image buffers are reused, not faulted in
    context = Context()
    rclpy.init(context=context)
    namespace = '/demo'
    camera = SyntheticCameraNode(
        context=context, namespace=namespace, parameter_overrides=[
            Parameter('rate_hz', value=float(rate_hz)), Parameter('width', value=width),
            Parameter('height', value=height), Parameter('seed', value=seed),
            Parameter('scene', value='' if random_weights else
                      TINY_MODEL_SCENES['sam2' if mode == 'sam2' else 'sam3'])])
    if random_weights:
        # Random detectors score every query ~0.25: threshold 0 still shows the whole path
        # (masks, IDs, poses, overlay), with arbitrary shapes.
        print('[demo] random weights: score_threshold 0.0, max_instances 5', flush=True)
    overrides = {'mode': mode, 'model_dir': model_dir, 'tracker_model_dir': tracker_dir,
                 'device': 'cpu', 'use_depth': True, 'input_qos': 'reliable',
                 'concepts': list(concepts), 'max_instances': 5 if random_weights else 20,
                 'redetect_every_n': 5}
    overrides.update({'score_threshold': 0.0} if random_weights else TINY_SAM3_THRESHOLDS)
    segmenter = SegmenterNode(
        context=context, namespace=namespace,
        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    if segmenter.pipeline is None:
        raise RuntimeError(f'segmenter failed to configure: {segmenter.last_error}')
    # The node's percentiles cover its last 200 frames (a rolling /diagnostics window); the
    # summary's cover every frame of the run. No frame has arrived yet: nothing is lost.
    run_frames = int(duration * rate_hz) + 10
    segmenter.latency, segmenter.inference = LatencyWindow(run_frames), LatencyWindow(run_frames)
    recorder = rclpy.create_node('recorder', namespace=namespace, context=context)
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
    overlays: List[np.ndarray] = []
    counts: List[int] = []
    recorder.create_subscription(
        Image, f'{namespace}/segmenter/overlay',
        lambda msg: overlays.append(image_conversion.image_msg_to_rgb(msg)), qos)
    recorder.create_subscription(
        String, f'{namespace}/segmenter/instances',
        lambda msg: counts.append(len(instances_json.loads(msg.data)['instances'])), qos)
    executor = make_executor(context=context)
    for node in (segmenter, recorder):
        executor.add_node(node)
    if mode == 'sam2':  # before the camera spins: see _prompt_ground_truth
        _prompt_ground_truth(camera, segmenter, namespace, recorder, executor)
    executor.add_node(camera)
    start = time.monotonic()
    interrupted = False
    try:
        while time.monotonic() - start < duration:
            executor.spin_once(timeout_sec=0.05)
    except KeyboardInterrupt:
        # Ctrl-C ends the run early: what ran until then is still summarised and written.
        interrupted = True
        print('[demo] interrupted: writing the outputs of the run so far', flush=True)
    finally:
        ran_s = time.monotonic() - start  # the run itself, without the teardown below
        # Deactivate first: the frame in flight finishes, waiting ones are counted as dropped.
        segmenter.trigger_deactivate()
        stats = segmenter.stats()
        device = segmenter.pipeline.device if segmenter.pipeline else 'cpu'
        segmenter._teardown()
        executor.shutdown()
        for node in (camera, segmenter, recorder):
            node.destroy_node()
        rclpy.shutdown(context=context)

    files = _write_outputs(output, overlays, rate_hz)
    summary: Dict[str, object] = {
        'frames_in': int(stats['frames_in']),
        'frames_published': int(camera.published),
        'frames_processed': int(stats['frames_processed']),
        'frames_dropped': int(stats['frames_dropped']),
        'latency_ms_p50': stats['latency_ms_p50'],
        'latency_ms_p95': stats['latency_ms_p95'],
        'inference_ms_p50': stats['inference_ms_p50'],
        'instances_per_frame_mean': float(np.mean(counts)) if counts else 0.0,
        'frames_with_instances': int(sum(1 for c in counts if c)),
        'model': model_text,
        'model_dir': model_dir,
        'tracker_model_dir': tracker_dir,
        'mode': mode,
        'concepts': list(concepts) if mode != 'sam2' else [],
        'device': device,
        'image_size': [width, height],
        'camera_rate_hz': rate_hz,
        'duration_s': duration,
        'ran_s': round(ran_s, 2),
        'interrupted': interrupted,
        'bad_input': int(stats['bad_input']),
        'errors': int(stats['errors']),
        'files': files,
    }
    (output / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
    return summary


def _clear_old_outputs(output: Path) -> None:
    """Remove a previous run's outputs from ``output``.

    A run that stops early or cannot write a video must not leave an older summary (listing
    files that are gone) or video beside its own files.
    """
    for old in [*output.glob('overlay_*.png'), output / 'overlay.mp4', output / 'summary.json']:
        old.unlink(missing_ok=True)


def _prompt_ground_truth(camera, segmenter, namespace: str, recorder, executor) -> None:
    """In sam2 mode, prompt the three largest apples of the camera's first frame.

    Sent before the camera spins: the node adds prompts to its latest processed frame, or,
    before the first, to the first. Sent after it (as they were), each box went to a frame
    several on, which the apples had moved from.
    """
    from geometry_msgs.msg import Point32, PolygonStamped

    publisher = recorder.create_publisher(PolygonStamped, f'{namespace}/segmenter/prompt_box',
                                          10)
    apples = sorted(camera.video[0].instances_of('apple'), key=lambda inst: -inst.area)[:3]
    deadline = time.monotonic() + 10.0
    while publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.01)
    for x0, y0, x1, y1 in (inst.box for inst in apples):
        msg = PolygonStamped()
        msg.polygon.points = [Point32(x=float(x0), y=float(y0)),
                              Point32(x=float(x1), y=float(y1))]
        publisher.publish(msg)
    while len(segmenter.pipeline.object_ids) < len(apples) and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.01)
    if len(segmenter.pipeline.object_ids) < len(apples):
        print(f'[demo] only {len(segmenter.pipeline.object_ids)} of {len(apples)} box prompts '
              'reached the segmenter', flush=True)


def _write_outputs(output: Path, overlays: List[np.ndarray], rate_hz: float) -> List[str]:
    files: List[str] = []
    if not overlays:
        return files
    height, width = overlays[0].shape[:2]
    video_path = output / 'overlay.mp4'
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*'mp4v'),
                             max(1.0, float(rate_hz)), (width, height))
    if writer.isOpened():
        for frame in overlays:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        files.append(str(video_path))
    else:  # no mp4v encoder in this OpenCV build: the PNGs below still show the run
        print(f"[demo] could not write '{video_path}' (no mp4v encoder): overlay PNGs only",
              flush=True)
    picks = np.linspace(0, len(overlays) - 1, num=min(8, len(overlays))).round().astype(int)
    chosen = [overlays[i] for i in picks]
    for number, frame in zip(picks, chosen, strict=True):
        path = output / f'overlay_{int(number):04d}.png'
        _write_png(path, frame)
        files.append(str(path))
    strip = output / 'overlay_strip.png'
    write_strip(chosen, strip)
    files.append(str(strip))
    return files


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, run the demo and print where the results are."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--output', type=Path, default=Path('demo_output'))
    parser.add_argument('--duration', type=float, default=20.0, help='seconds to run')
    parser.add_argument('--mode', choices=('sam2', 'sam3', 'hybrid'), default=None,
                        help='default: hybrid when the SAM3 engines are installed, else sam2')
    parser.add_argument('--rate', type=float, default=5.0, help='synthetic camera rate (Hz)')
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--concepts', nargs='+', default=['apple'])
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    mode = args.mode or default_mode()
    summary = run_demo(args.output, args.duration, mode, args.rate, args.width, args.height,
                       args.concepts, args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != 'files'}, indent=2))
    print(f'[demo] wrote {len(summary["files"])} overlay files and summary.json to '
          f'{args.output.resolve()}')
    for path in summary['files']:
        print(f'[demo]   {path}')
    return 130 if summary['interrupted'] else 0  # as a shell reports Ctrl-C


if __name__ == '__main__':
    sys.exit(main())
