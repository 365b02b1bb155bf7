"""Accelerator memory per segmenter node, per mode: weights + peak tensor memory of its frames.

Without a GPU in the development environment, this measures on the CPU what
``torch.cuda.max_memory_allocated`` counts on a GPU: the bytes of every tensor storage the
engines hold, at their peak. It builds the production architectures with random weights
(transformers' default configs: SAM2.1 hiera-tiny at 1024 px, SAM3 at 1008 px; nothing to
download), runs the node's engine calls on synthetic 640x480 orchard frames, and counts every
storage an op creates for as long as it is alive (a ``TorchDispatchMode``, deduplicated by
storage, so views are free). Reported per mode:

* weights: parameters and buffers;
* state: what stays allocated between frames once the SAM2 memory bank is full (memories,
  object pointers, cached features and embeddings);
* peak: the highest live total during the frames (state + the frame's activations);
* node total = weights + peak, i.e. the figure to compare with ``cuda_max_allocated_mib`` in
  ``/diagnostics``.

Not included, because only a GPU has them: the CUDA context (roughly 0.3-1 GiB, driver and
GPU dependent), cuBLAS/cuDNN workspaces, and the caching allocator's reserve above what is
allocated (``cuda_reserved_mib``). With ``--device cuda`` the same run happens on the GPU and
each row adds what CUDA reports: ``cuda_max_allocated_mib`` (to compare with the node total),
``cuda_reserved_mib`` and ``cuda_device_used_mib`` (the whole device, context included: run it
alone on the GPU). The SAM2 engine batches objects by a byte budget that is
larger on CUDA; the CUDA budget is used here so that the batches, and so the activations,
are the ones a GPU would see. Everything runs in float32 (the engines' CPU dtype); with
``dtype: bfloat16`` on a GPU the weights halve and most activations do too.

    python benchmarks/bench_node_memory.py              # production sizes (minutes on CPU)
    python benchmarks/bench_node_memory.py --quick      # shipped tiny models, < 60 s
    python benchmarks/bench_node_memory.py --device cuda  # on a GPU: + what CUDA reports

The LAST line is ``node_memory_mib sam2=<f> sam3=<f> hybrid=<f>`` (weights + peak, MiB).
"""

import argparse
import gc
import importlib.util
import json
import os
from pathlib import Path
import sys
import time
from typing import Any, Callable, Dict, List, Sequence
import weakref

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

if importlib.util.find_spec('sam_gap_ros') is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = float(1 << 20)
CONCEPTS = ('ripe apple', 'damaged apple')
TINY_CONCEPTS = ('ripe red apple', 'unripe green apple')  # what the tiny SAM3 knows


class LiveTensorMemory(TorchDispatchMode):
    """Count the bytes of tensor storages created by ops while the mode is active.

    A storage counts from the op that creates it until its last tensor created by an op is
    freed. Storages that existed before (weights, input frames) and ops that write into
    them (in-place, ``out=``) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: Dict[int, List[int]] = {}  # storage pointer -> [bytes, tracked tensors]
        self._tracked: set = set()  # (storage pointer, id(tensor))
        self.current = 0
        self.peak = 0

    def _release(self, key: int, tensor_id: int) -> None:
        self._tracked.discard((key, tensor_id))
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            self.current -= entry[0]
            del self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None  # storages of the op's inputs, collected only when a new one shows up
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key, id(tensor)) in self._tracked:
                continue
            entry = self._live.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {t.untyped_storage().data_ptr()
                              for t in tree_flatten((args, kwargs))[0]
                              if isinstance(t, torch.Tensor)}
                if key in inputs:
                    continue  # a view of / write into a storage that existed before
                entry = self._live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            self._tracked.add((key, id(tensor)))
            weakref.finalize(tensor, self._release, key, id(tensor))
        return out


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Return the bytes of the parameters and buffers of ``modules`` (shared ones once)."""
    storages = {}
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(step: Callable[[np.ndarray], Any], frames: Sequence[np.ndarray],
            start: Callable[[np.ndarray], Any], device: str = 'cpu') -> Dict[str, float]:
    """Run ``start(frames[0])`` then ``step`` on the other frames; return MiB and seconds.

    On CUDA the row also holds what the GPU itself reports, to set beside the count:
    ``torch.cuda.max_memory_allocated`` (weights included), the caching allocator's reserve,
    and the device's used memory (CUDA context included; other processes' too, if any).
    """
    cuda = torch.device(device).type == 'cuda'
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with LiveTensorMemory() as live:
        began = time.perf_counter()
        start(frames[0])
        for frame in frames[1:]:
            step(frame)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        gc.collect()
        state = live.current
    row = {'state_mib': state / MIB, 'peak_mib': live.peak / MIB,
           'seconds_per_frame': seconds / len(frames)}
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        row.update(cuda_max_allocated_mib=torch.cuda.max_memory_allocated(device) / MIB,
                   cuda_reserved_mib=torch.cuda.memory_reserved(device) / MIB,
                   cuda_device_used_mib=(total - free) / MIB)
    return row


def synthetic_frames(count: int, tiny_scene: bool) -> List[np.ndarray]:
    """Return 640x480 orchard frames (the close-range scene the tiny models know if asked)."""
    from sam_gap_ros.tiny_models import TINY_MODEL_SCENE
    from sam_gap_ros.synthetic.config import scene_config_from_text
    from sam_gap_ros.synthetic.video import OrchardVideo

    config = scene_config_from_text(TINY_MODEL_SCENE if tiny_scene else '', width=640,
                                    height=480)
    video = OrchardVideo(0, config, n_frames=count)
    return [video[i].image for i in range(count)]


def grid_boxes(count: int, width: int = 640, height: int = 480) -> np.ndarray:
    """Return ``count`` 60x60 px boxes spread over the frame (SAM2 prompts)."""
    side = int(np.ceil(np.sqrt(count)))
    xs = np.linspace(40, width - 100, side)
    ys = np.linspace(40, height - 100, side)
    boxes = [(x, y, x + 60, y + 60) for y in ys for x in xs][:count]
    return np.asarray(boxes, dtype=np.float32)


def build_engines(quick: bool, device: str = 'cpu') -> Dict[str, Any]:
    """Return factories of the SAM2 tracker and the SAM3 engine (production or tiny)."""
    from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
    from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine

    if quick:
        from sam_gap_ros.demo import find_trained_model
        from sam_gap_ros.tiny_models import TINY_SAM3_THRESHOLDS, TRAINED

        def sam2() -> Any:
            return Sam2Tracker.load(find_trained_model(TRAINED['sam2']), device=device)

        def sam3() -> Any:
            return Sam3ConceptEngine.load(find_trained_model(TRAINED['sam3']), device=device,
                                          **TINY_SAM3_THRESHOLDS)
        return {'sam2': sam2, 'sam3': sam3}

    from transformers import Sam2VideoConfig, Sam3Config

    from sam_gap_ros.engines.tiny_sam3 import build_tiny_processor

    def sam2() -> Any:
        return Sam2Tracker.from_config(Sam2VideoConfig(), device=device)

    def sam3() -> Any:
        config = Sam3Config()
        return Sam3ConceptEngine.from_config(
            config, processor=build_tiny_processor(config.vision_config.backbone_config
                                                   .image_size), device=device)
    return {'sam2': sam2, 'sam3': sam3}


def as_on_cuda(tracker: Any) -> Any:
    """Give the tracker the object-batch byte budget it uses on CUDA (see module doc)."""
    tracker._BATCH_KEY_BYTES = (type(tracker)._BATCH_KEY_BYTES[1],) * 2
    return tracker


def run_mode(mode: str, factories: Dict[str, Any], frames: Sequence[np.ndarray],
             objects: int, redetect_every_n: int, concepts: Sequence[str],
             device: str = 'cpu') -> Dict[str, float]:
    """Measure one node mode; return its row (MiB).

    The engines are built outside ``torch.inference_mode``, as the node builds them: random
    weights created inside it are inference tensors, for which the SAM2 tracker does not
    keep its per-size position embedding (``_StaticPosEmbedHiera``), and the count would
    miss those 23 MiB of a production node's state. Only the engine calls run inside it.
    """
    from sam_gap_ros.engines.hybrid import HybridTracker

    if mode == 'sam2':
        tracker = as_on_cuda(factories['sam2']())
        weights = weight_bytes(tracker.model)

        def start(frame):
            tracker.track(frame)
            tracker.add_objects(boxes=grid_boxes(objects))
        with torch.inference_mode():
            row = measure(tracker.track, frames, start, device)
        row['objects'] = len(tracker.object_ids)
    elif mode == 'sam3':
        engine = factories['sam3']()
        weights = weight_bytes(engine.model)
        with torch.inference_mode():
            engine.set_concepts(list(concepts))
            row = measure(engine.segment, frames, engine.segment, device)
        row['concepts'] = len(concepts)
    else:
        engine, tracker = factories['sam3'](), as_on_cuda(factories['sam2']())
        hybrid = HybridTracker(engine, tracker, redetect_every_n=redetect_every_n)
        weights = weight_bytes(engine.model, tracker.model)
        with torch.inference_mode():
            hybrid.set_concepts(list(concepts))
            row = measure(hybrid.step, frames, hybrid.step, device)
        row['objects'] = len(tracker.object_ids)
        row['concepts'] = len(concepts)
    row['weights_mib'] = weights / MIB
    row['total_mib'] = row['weights_mib'] + row['peak_mib']
    return row


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='the shipped tiny models instead of production sizes (< 60 s)')
    parser.add_argument('--modes', default='sam2,sam3,hybrid')
    parser.add_argument('--objects', default='1,10',
                        help='SAM2 mode: tracked object counts, one row each')
    parser.add_argument('--frames', type=int, default=9,
                        help='frames per mode (SAM2 memory bank full after 7)')
    parser.add_argument('--redetect-every-n', type=int, default=4, help='hybrid mode')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--device', default='cpu',
                        help='cpu, or cuda / cuda:N to add what the GPU reports (float32)')
    parser.add_argument('--json', type=Path, default=None, help='also write the rows here')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(',') if m]
    unknown = set(modes) - {'sam2', 'sam3', 'hybrid'}
    if unknown:
        parser.error(f'unknown modes {sorted(unknown)}')
    try:
        # Distinct counts: the per-object line divides by the difference of two of them.
        object_counts = sorted({int(n) for n in args.objects.split(',') if n.strip()})
    except ValueError:
        parser.error(f'--objects takes counts separated by commas, got {args.objects!r}')
    if not object_counts or object_counts[0] < 1:
        parser.error(f'--objects needs counts >= 1, got {args.objects!r}')
    factories = build_engines(args.quick, args.device)
    concepts = TINY_CONCEPTS if args.quick else CONCEPTS
    frames = synthetic_frames(args.frames, tiny_scene=args.quick)
    rows, last = {}, {}
    for mode in modes:
        for objects in (object_counts if mode == 'sam2' else [0]):
            name = f'sam2@{objects}' if mode == 'sam2' else mode
            rows[name] = run_mode(mode, factories, frames, objects, args.redetect_every_n,
                                  concepts, args.device)
            gc.collect()  # this mode's models go before the next one loads
            if torch.device(args.device).type == 'cuda':
                torch.cuda.empty_cache()
            last[mode] = rows[name]
            print(f'{name}: ' + ' '.join(f'{k}={v:.1f}' if isinstance(v, float) else f'{k}={v}'
                                         for k, v in rows[name].items()), flush=True)
    if 'sam2' in modes and len(object_counts) > 1:
        low, high = rows[f'sam2@{object_counts[0]}'], rows[f'sam2@{object_counts[-1]}']
        extra = high['objects'] - low['objects']
        state = (high['state_mib'] - low['state_mib']) / extra
        peak = (high['peak_mib'] - low['peak_mib']) / extra
        print(f'sam2 per tracked object: state +{state:.2f} MiB, peak +{peak:.2f} MiB')
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + '\n')
    print('node_memory_mib ' + ' '.join(f'{m}={last[m]["total_mib"]:.1f}' for m in modes))
    return 0


if __name__ == '__main__':
    sys.exit(main())
