"""ROS-free segmentation pipeline behind the ``segmenter`` node.

``SegmentationPipeline`` builds the engine for one mode (``sam2`` prompt tracking, ``sam3``
per-frame concept segmentation, ``hybrid`` concept detection + SAM2 tracking) from local
model directories and turns one RGB frame (+ optional depth and intrinsics) into a
``FrameResult``: the uint16 instance-label image, instance records and 3D positions. The
node only converts messages and manages threads; everything testable without ROS is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import importlib
import logging
import math
from pathlib import Path
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from sam_gap_ros.engines.concept_query import parse_concepts
from sam_gap_ros.engines.types import ConceptError, Instance, ModelLoadError, PromptError
from sam_gap_ros.geometry import align_depth, CameraIntrinsics, depth_to_meters
from sam_gap_ros.geometry import instance_position
from sam_gap_ros.instances_json import InstanceRecord
from sam_gap_ros.mask_ops import Box, label_image, mask_centroid, mask_iou_matrix
from sam_gap_ros.mask_ops import next_label_id

MODES = ('sam2', 'sam3', 'hybrid')
_ID_STRIDE = 4
_ID_MIN_SAMPLES = 4  # below this many grid samples a mask is pooled, not subsampled
_LOG = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Everything needed to build and run one pipeline; validated by ``validate``."""

    mode: str = 'hybrid'
    model_dir: str = ''
    """SAM3 model directory in sam3/hybrid mode, SAM2 model directory in sam2 mode."""
    tracker_model_dir: str = ''
    """SAM2 model directory for the hybrid tracker."""
    device: str = 'auto'
    dtype: str = 'float32'
    engine_path: str = ''
    concepts: Sequence[str] = ('apple',)
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    """Mask probability a pixel needs to belong to a SAM3 instance (sam3/hybrid)."""
    max_instances: int = 50
    redetect_every_n: int = 10
    min_depth_pixels: int = 5
    track_iou: float = 0.3
    """Minimum mask IoU to keep an ID between frames in sam3 mode."""
    max_object_batch: int = 0
    """SAM2 objects run through memory attention together (sam2/hybrid); 0 = as many as the
    tracker's byte budget allows. Each object of a batch adds about 137 MiB of float32
    activations at 1024 px (DEVELOPERS.md), so this bounds the peak memory."""
    box_mask_margin: float = 0.1
    """On a box prompt's frame, cut the SAM2 mask to the box grown by this fraction of its
    size per side (box prompts, sam2 mode); < 0 keeps SAM2's uncut mask."""
    motion_compensation: bool = True
    """sam2/hybrid: move each object's prompted-frame memory with the camera's image motion
    (``engines.scene_motion``); False keeps SAM2's fixed memory."""
    motion_gate_margin: float = 0.25
    """sam2/hybrid: a tracked mask must lie (at least half) in the object's last box, moved
    by the camera motion and grown by this fraction per side, or the object is reported
    absent; < 0 = no gate."""
    mask_refine_radius: float = 1.0
    """sam2/hybrid: snap SAM2 masks (published and memorised) to the frame's colour edges
    with a guided filter of this radius in cells of the decoder's coarse mask grid
    (``engines.mask_refinement``); <= 0 = SAM2's bilinearly upsampled masks."""
    prompt_mirror_union: bool = True
    """sam2: a new object's first box/point prompt is also decoded on the frame mirrored
    left-right and its mask is the union of both; False = SAM2's single pass."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.mode not in MODES:
            raise ValueError(f"mode '{self.mode}' is not one of {MODES}")
        if not 0.0 <= float(self.score_threshold) < 1.0:
            raise ValueError(f'score_threshold {self.score_threshold} is outside [0, 1)')
        if not 0.0 < float(self.mask_threshold) < 1.0:
            raise ValueError(f'mask_threshold {self.mask_threshold} is outside (0, 1)')
        if int(self.max_instances) < 1:
            raise ValueError(f'max_instances {self.max_instances} must be >= 1')
        if int(self.redetect_every_n) < 1:
            raise ValueError(f'redetect_every_n {self.redetect_every_n} must be >= 1')
        if int(self.min_depth_pixels) < 1:
            raise ValueError(f'min_depth_pixels {self.min_depth_pixels} must be >= 1')
        if int(self.max_object_batch) < 0:
            raise ValueError(f'max_object_batch {self.max_object_batch} must be >= 0 '
                             '(0 = no cap)')
        # Tracker rule sizes, each at most 10; a ROS parameter cannot be None, so the value
        # named in the message switches the rule off.
        for name, off in (('box_mask_margin', '< 0 = no cut'),
                          ('motion_gate_margin', '< 0 = no gate'),
                          ('mask_refine_radius', '<= 0 = no refinement')):
            value = getattr(self, name)
            if float(value) > 10.0:
                raise ValueError(f'{name} {value} must be <= 10 ({off})')
        if not str(self.model_dir).strip():
            raise ValueError('model_dir is empty: set it to a local model directory')
        if self.mode == 'hybrid' and not str(self.tracker_model_dir).strip():
            raise ValueError('hybrid mode needs tracker_model_dir (a SAM2 model directory)')


@dataclass
class FrameResult:
    """Everything the node publishes for one frame."""

    frame_index: int
    labels: np.ndarray
    """uint16 (H, W) instance-label image, 0 = background, value = instance ID."""
    records: List[InstanceRecord] = field(default_factory=list)
    masks: List[np.ndarray] = field(default_factory=list)
    """Boolean masks in the same order as ``records``."""
    inference_s: float = 0.0
    refused_prompts: List[str] = field(default_factory=list)
    """Why prompts queued for this frame (sent before the first frame) were refused."""
    concepts: List[str] = field(default_factory=list)
    """The concepts this frame was segmented with (a later change does not relabel it)."""

    @property
    def positions(self) -> List[Optional[Tuple[float, float, float]]]:
        """Return each record's camera-frame position in metres (None without depth)."""
        return [record.position for record in self.records]


def is_out_of_memory(exc: BaseException) -> bool:
    """Return whether ``exc`` is a (CUDA) out-of-memory error worth skipping a frame for."""
    import torch
    oom = getattr(torch.cuda, 'OutOfMemoryError', None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and 'out of memory' in str(exc).lower()


def release_cached_memory() -> None:
    """Return cached CUDA blocks to the driver (no-op without CUDA)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_stats(device: Optional[str]) -> Dict[str, float]:
    """Return process RSS and, on CUDA, allocated/reserved memory in MiB."""
    import psutil
    import torch
    stats = {'rss_mib': psutil.Process().memory_info().rss / 2**20}
    if device and device.startswith('cuda') and torch.cuda.is_available():
        dev = torch.device(device)
        stats['cuda_allocated_mib'] = torch.cuda.memory_allocated(dev) / 2**20
        stats['cuda_reserved_mib'] = torch.cuda.memory_reserved(dev) / 2**20
        stats['cuda_max_allocated_mib'] = torch.cuda.max_memory_allocated(dev) / 2**20
    return stats


_NO_CONCEPTS_IN_SAM2 = 'concepts are not used in sam2 mode (prompt objects instead)'


def check_concepts(mode: str, model_dir: str, concepts: Sequence[str]) -> List[str]:
    """Check ``concepts`` for a pipeline whose model is not loaded; return them canonical.

    Raises ConceptError as the loaded pipeline would: the grammar, and each phrase against
    the tokenizer of the SAM3 directory ``model_dir`` (too many tokens for its text
    encoder). Where that directory is unusable only the grammar is checked: ``load`` reports
    the directory.
    """
    if mode == 'sam2':
        raise ConceptError(_NO_CONCEPTS_IN_SAM2)
    from sam_gap_ros.engines.sam3_concepts import check_concepts_for_model
    try:
        return check_concepts_for_model(model_dir, concepts)
    except ModelLoadError:
        return [query.text for query in parse_concepts(concepts)]


def _id_grid(mask: np.ndarray) -> np.ndarray:
    """Return ``mask`` on the 4x coarser grid the ID matching compares.

    Matching needs only approximate IoU, and a 4x subsampled grid is 16x cheaper. A fruit
    of a few pixels can fall between the samples, though: it would have IoU 0 with itself
    and get a new ID every frame. Such a mask is max-pooled instead (any pixel of a cell).
    """
    sampled = np.ascontiguousarray(mask[::_ID_STRIDE, ::_ID_STRIDE])
    if np.count_nonzero(sampled) >= _ID_MIN_SAMPLES:
        return sampled
    height, width = sampled.shape
    # INTER_AREA averages each cell's pixels, so a cell is > 0 where any pixel is set (255,
    # not 1: an average of 1/16 would round to 0).
    pooled = cv2.resize(mask.astype(np.uint8) * 255, (width, height),
                        interpolation=cv2.INTER_AREA)
    return pooled > 0


class IouIdAssigner:
    """Give per-frame detections IDs that persist while masks overlap between frames.

    Used in sam3 mode, where the engine returns per-frame detections without identities;
    Hungarian matching on mask IoU against the previous frame is cheap next to inference.
    """

    def __init__(self, min_iou: float = 0.3) -> None:
        self.min_iou = float(min_iou)
        self._prev_masks: List[np.ndarray] = []
        self._prev_ids: List[int] = []
        self._prev_shape: Optional[Tuple[int, ...]] = None
        self._next_id = 1

    def assign(self, masks: Sequence[np.ndarray]) -> List[int]:
        """Return one ID per mask, reusing the previous frame's IDs for matched masks.

        Masks of another size than the previous frame's (the camera changed resolution)
        match nothing: their grids cannot be compared, so every mask gets a new ID.
        """
        ids: List[Optional[int]] = [None] * len(masks)
        small = [_id_grid(m) for m in masks]
        shape = tuple(masks[0].shape) if len(masks) else self._prev_shape
        if small and self._prev_masks and shape == self._prev_shape:
            iou = mask_iou_matrix(small, self._prev_masks)
            rows, cols = linear_sum_assignment(-iou)
            for row, col in zip(rows, cols, strict=True):
                if iou[row, col] >= self.min_iou:
                    ids[row] = self._prev_ids[col]
        taken = {i for i in ids if i is not None}
        for index, value in enumerate(ids):
            if value is None:
                ids[index] = next_label_id(self._next_id, taken)
                taken.add(ids[index])
                self._next_id = ids[index] + 1
        self._prev_masks = small
        self._prev_ids = [int(i) for i in ids]
        self._prev_shape = shape
        return [int(i) for i in ids]

    def reset(self) -> None:
        """Forget all identities."""
        self._prev_masks, self._prev_ids, self._next_id = [], [], 1
        self._prev_shape = None


class SegmentationPipeline:
    """Build the engine for a mode and process frames into ``FrameResult`` objects.

    All public methods are serialised by one lock, so the node's parameter callbacks and
    prompt subscriptions can run while its worker thread is inside ``process``.
    """

    def __init__(self, config: PipelineConfig, logger: Any = None) -> None:
        config.validate()
        self._logger = logger if logger is not None else _LOG
        self.config = replace(config, concepts=list(config.concepts))
        self._lock = threading.RLock()
        self._engine: Any = None
        self._tracker: Any = None
        self._ids = IouIdAssigner(config.track_iou)
        self._frame_index = -1
        self._next_object_id = 1
        self._pending_prompts: List[Dict[str, Any]] = []
        self._last_labels: Optional[np.ndarray] = None
        """The latest frame's label image (sam2 mode): what a background point corrects."""
        self._image_size: Optional[Tuple[int, int]] = None
        self.device: Optional[str] = None
        self._tensorrt_at_load = 'not requested'

    # -- lifecycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model(s); raise ModelLoadError / ValueError with a clear reason."""
        from sam_gap_ros.engines.loading import resolve_device
        with self._lock:
            cfg = self.config
            device = resolve_device(cfg.device)
            self.device = str(device)
            if cfg.mode == 'sam2':
                self._tracker = self._load_tracker(cfg.model_dir, device)
                self._engine = self._tracker
            else:
                concept_engine = self._load_concepts(cfg.model_dir, device)
                try:
                    concept_engine.set_concepts(list(cfg.concepts))
                except ConceptError as exc:
                    raise ValueError(f'invalid concepts {list(cfg.concepts)}: {exc}') from exc
                if cfg.mode == 'sam3':
                    self._engine = concept_engine
                else:
                    from sam_gap_ros.engines.hybrid import HybridTracker
                    self._tracker = self._load_tracker(cfg.tracker_model_dir, device)
                    self._engine = HybridTracker(concept_engine, self._tracker,
                                                 redetect_every_n=int(cfg.redetect_every_n))
            self._tensorrt_at_load = self._install_tensorrt()
            self._frame_index = -1

    def _load_tracker(self, model_dir: str, device: Any) -> Any:
        from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
        cap = int(self.config.max_object_batch)
        margin = float(self.config.box_mask_margin)
        gate = float(self.config.motion_gate_margin)
        refine = float(self.config.mask_refine_radius)
        # ROS parameters cannot be None: a negative value switches a rule off.
        return Sam2Tracker.load(model_dir, device=device, dtype=self.config.dtype,
                                max_object_batch=cap or None,
                                box_mask_margin=margin if margin >= 0 else None,
                                motion_compensation=bool(self.config.motion_compensation),
                                motion_gate_margin=gate if gate >= 0 else None,
                                mask_refine_radius=refine if refine > 0 else None,
                                prompt_mirror_union=bool(self.config.prompt_mirror_union))

    def _load_concepts(self, model_dir: str, device: Any) -> Any:
        from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
        engine = Sam3ConceptEngine.load(model_dir, device=device, dtype=self.config.dtype)
        engine.score_threshold = float(self.config.score_threshold)
        engine.mask_threshold = float(self.config.mask_threshold)
        engine.max_instances = int(self.config.max_instances)
        return engine

    def _install_tensorrt(self) -> str:
        """Hand ``engine_path`` to the TensorRT runtime when that module provides it."""
        path = str(self.config.engine_path).strip()
        if not path:
            return 'not requested'
        try:
            runtime = importlib.import_module('sam_gap_ros.tensorrt.runtime')
        except ImportError as exc:
            return f'unavailable ({exc}); using PyTorch'
        install = getattr(runtime, 'install', None)
        if install is None:
            return 'unavailable (sam_gap_ros.tensorrt.runtime has no install()); using PyTorch'
        try:
            choice = install(self._engine, path, logger=self._logger)
        except Exception as exc:  # noqa: BLE001 - any TensorRT failure falls back to PyTorch
            return f'failed ({exc}); using PyTorch'
        backend = getattr(choice, 'backend', 'unknown')
        reason = getattr(choice, 'reason', '')
        return f'{backend}: {reason}' if reason else str(backend)

    @property
    def tensorrt_status(self) -> str:
        """Return the vision-encoder backend in use now and why (shown in /diagnostics)."""
        # An engine that installed fine can drop to PyTorch later (engine error, frame of
        # another size), so the load-time choice is only valid while the runtime says so.
        # No lock: /diagnostics must not wait for a frame, and this only reads attributes.
        engine = self._engine
        if engine is None or not str(self.config.engine_path).strip():
            return self._tensorrt_at_load
        try:
            runtime = importlib.import_module('sam_gap_ros.tensorrt.runtime')
            live = runtime.runtime_fallback(engine)
        except Exception:  # noqa: BLE001 - diagnostics must never raise
            return self._tensorrt_at_load
        return f'pytorch: {live}' if live else self._tensorrt_at_load

    @property
    def loaded(self) -> bool:
        """Whether a model is loaded."""
        return self._engine is not None

    def unload(self) -> None:
        """Drop the model(s) and free cached accelerator memory."""
        with self._lock:
            self._engine = None
            self._tracker = None
            self._pending_prompts.clear()
            self._last_labels = None
            self._ids.reset()
            self._frame_index = -1
        release_cached_memory()

    @property
    def model_name(self) -> str:
        """Short model description for diagnostics and the instances document."""
        names = [Path(self.config.model_dir).name or str(self.config.model_dir)]
        if self.config.mode == 'hybrid':
            names.append(Path(self.config.tracker_model_dir).name)
        return '+'.join(names)

    @property
    def frame_index(self) -> int:
        """Index of the last processed frame (-1 before the first)."""
        return self._frame_index

    # -- runtime settings ------------------------------------------------------------------
    @property
    def concepts(self) -> List[str]:
        """Active concept strings (empty in sam2 mode)."""
        return [] if self.config.mode == 'sam2' else list(self.config.concepts)

    def set_concepts(self, concepts: Sequence[str]) -> List[str]:
        """Replace the concept set; raise ConceptError and keep the old set when invalid."""
        concepts = [str(c) for c in concepts]
        with self._lock:
            if self._engine is None:
                accepted = check_concepts(self.config.mode, self.config.model_dir, concepts)
                self.config.concepts = accepted
                return accepted
            if self.config.mode == 'sam2':
                raise ConceptError(_NO_CONCEPTS_IN_SAM2)
            accepted = list(self._engine.set_concepts(concepts))
            self.config.concepts = accepted
            return accepted

    def set_score_threshold(self, value: float) -> None:
        """Change the detection score threshold (sam3/hybrid)."""
        if not 0.0 <= value < 1.0:
            raise ValueError(f'score_threshold {value} is outside [0, 1)')
        with self._lock:
            self.config.score_threshold = float(value)
            self._set_on_concept_engine('score_threshold', float(value))

    def set_mask_threshold(self, value: float) -> None:
        """Change the mask probability threshold of SAM3 instances (sam3/hybrid)."""
        if not 0.0 < value < 1.0:
            raise ValueError(f'mask_threshold {value} is outside (0, 1)')
        with self._lock:
            self.config.mask_threshold = float(value)
            self._set_on_concept_engine('mask_threshold', float(value))

    def set_max_instances(self, value: int) -> None:
        """Change the maximum number of instances per frame (sam3/hybrid)."""
        if value < 1:
            raise ValueError(f'max_instances {value} must be >= 1')
        with self._lock:
            self.config.max_instances = int(value)
            self._set_on_concept_engine('max_instances', int(value))

    def set_redetect_every_n(self, value: int) -> None:
        """Change how often hybrid mode re-runs concept detection."""
        if value < 1:
            raise ValueError(f'redetect_every_n {value} must be >= 1')
        with self._lock:
            self.config.redetect_every_n = int(value)
            if self.config.mode == 'hybrid' and self._engine is not None:
                self._engine.redetect_every_n = int(value)

    def _set_on_concept_engine(self, name: str, value: Any) -> None:
        if self._engine is None or self.config.mode == 'sam2':
            return
        target = self._engine
        if self.config.mode == 'hybrid':
            target = getattr(self._engine, 'concept_engine', None)
        if target is not None:
            setattr(target, name, value)

    # -- SAM2 prompts ----------------------------------------------------------------------
    def add_box(self, box: Sequence[float], frame_index: Optional[int] = None,
                image_size: Optional[Tuple[int, int]] = None) -> int:
        """Add a box-prompted object (sam2 mode); return its new object ID.

        ``box`` is ``(x0, y0, x1, y1)`` in pixels; ``image_size`` is ``(width, height)`` of
        the frame it is checked against (None: checked when the frame comes).
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        _check_in_image([(x0, y0), (x1, y1)], image_size)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise PromptError(f'box {box} is empty (needs >= 1 px width and height)')
        return self._add_prompt({'boxes': [[x0, y0, x1, y1]]}, frame_index)

    def add_point(self, x: float, y: float, positive: bool = True,
                  frame_index: Optional[int] = None,
                  image_size: Optional[Tuple[int, int]] = None) -> int:
        """Apply a point prompt (sam2 mode); return the ID of the object it applies to.

        A foreground point seeds a new object. A background point corrects the object shown
        under it in the latest label image: SAM2 re-predicts that object from its memory
        with the point excluded (e.g. a leaf the mask ran onto). A background point alone
        cannot seed an object, so one on no object is refused. ``image_size`` is
        ``(width, height)``, as for ``add_box``.
        """
        x, y = float(x), float(y)
        _check_in_image([(x, y)], image_size, pixel=True)
        prompt = {'points': [[[x, y]]], 'labels': [[1 if positive else 0]]}
        if positive:
            return self._add_prompt(prompt, frame_index)
        with self._lock:
            self._require_sam2_tracker()
            labels = self._last_labels
            if labels is None:
                raise PromptError('a background point corrects the object under it, and no '
                                  'frame has been segmented yet')
            height, width = labels.shape
            # The label image is the frame the point applies to: without this check (no
            # image_size given) a negative coordinate would index from the far edge.
            _check_in_image([(x, y)], (width, height), pixel=True)
            object_id = int(labels[int(y), int(x)])
            if object_id not in self._tracker.object_ids:
                raise PromptError(f'background point ({x:.1f}, {y:.1f}) lies on no tracked '
                                  'object: nothing to correct (a new object needs a '
                                  'foreground point, z = 1, or a box)')
            self._tracker.add_objects(frame_index, object_ids=[object_id], **prompt)
            return object_id

    def _require_sam2_tracker(self) -> None:
        if self.config.mode != 'sam2':
            raise PromptError(f'prompts need mode sam2 (current mode {self.config.mode})')
        if self._tracker is None:
            raise PromptError('no model loaded')

    def _add_prompt(self, prompt: Dict[str, Any], frame_index: Optional[int]) -> int:
        with self._lock:
            self._require_sam2_tracker()
            known = [int(i) for i in self._tracker.object_ids]
            known += [i for p in self._pending_prompts for i in p['object_ids']]
            object_id = next_label_id(self._next_object_id, set(known))
            if self._tracker.frame_index < 0:
                # The tracker needs a frame to attach a prompt to: keep it for the first frame.
                self._pending_prompts.append(dict(prompt, object_ids=[object_id]))
            else:
                self._tracker.add_objects(frame_index, object_ids=[object_id], **prompt)
            self._next_object_id = object_id + 1
            return object_id

    def remove_object(self, object_id: int) -> None:
        """Remove a prompted object (sam2 mode); raise PromptError for an unknown ID."""
        with self._lock:
            if self.config.mode != 'sam2':
                # Hybrid tracks are owned by the re-detection logic; sam3 has no tracks.
                raise PromptError(f'remove_object needs mode sam2 (current mode '
                                  f'{self.config.mode})')
            if self._tracker is None:
                raise PromptError('no model loaded')
            pending = [p for p in self._pending_prompts if object_id in p['object_ids']]
            if pending:
                self._pending_prompts.remove(pending[0])
                return
            self._tracker.remove_object(int(object_id))

    @property
    def object_ids(self) -> List[int]:
        """Return the IDs of the objects tracked now (sam2 prompts or hybrid tracks)."""
        with self._lock:
            if self.config.mode == 'hybrid' and self._engine is not None:
                return [int(i) for i in self._engine.track_ids]
            if self._tracker is None:
                return []
            pending = [i for p in self._pending_prompts for i in p['object_ids']]
            return [int(i) for i in self._tracker.object_ids] + pending

    def reset(self) -> None:
        """Forget all tracked objects and identities; keep the model and concepts."""
        with self._lock:
            if self.config.mode == 'hybrid' and self._engine is not None:
                self._engine.reset()  # also resets its SAM2 tracker
            elif self._tracker is not None:
                self._tracker.reset()
            self._ids.reset()
            self._pending_prompts.clear()
            self._last_labels = None
            self._frame_index = -1

    # -- processing ------------------------------------------------------------------------
    def process(self, rgb: np.ndarray, depth: Optional[np.ndarray] = None,
                depth_encoding: str = '16UC1',
                intrinsics: Optional[CameraIntrinsics] = None) -> FrameResult:
        """Segment one RGB uint8 (H, W, 3) frame; add 3D positions when depth is given."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f'frame must be RGB uint8 (H, W, 3), got {rgb.shape} {rgb.dtype}')
        height, width = rgb.shape[:2]
        depth_m = None
        if depth is not None:
            depth_m = align_depth(depth_to_meters(depth, depth_encoding), (height, width))
        with self._lock:
            if self._engine is None:
                raise RuntimeError('pipeline is not loaded')
            if self._image_size not in (None, (height, width)) and self.config.mode != 'sam3':
                # Tracker memories and prompts are tied to one resolution: start over.
                self._logger.warning(f'input size changed from {self._image_size} to '
                                     f'{(height, width)}: tracking state reset')
                # Prompts still waiting for a first frame (sent before it or after ~/reset)
                # belong to no session yet: they go to this frame, checked against its size,
                # instead of vanishing after their IDs were handed out.
                pending = list(self._pending_prompts)
                self.reset()
                self._pending_prompts = pending
            self._image_size = (height, width)
            start = time.perf_counter()
            refused: List[str] = []
            found = self._run(rgb, refused)
            inference_s = time.perf_counter() - start
            self._frame_index += 1
            frame_index = self._frame_index
            concepts = self.concepts
        records = [self._record(item, depth_m, intrinsics) for item in found]
        masks = [item.mask for item in found]
        # The boxes bound each mask: paint only there, not over the whole frame.
        labels = label_image(masks, [item.object_id for item in found], (height, width),
                             [item.score for item in found],
                             boxes=[item.box for item in found])
        if self.config.mode == 'sam2':
            with self._lock:
                # Not when a reset landed while the label image was painted: its objects
                # are gone, and a background point must not find them.
                if self._frame_index == frame_index:
                    self._last_labels = labels  # never written after this: kept as is
        return FrameResult(frame_index, labels, records, masks, inference_s, refused, concepts)

    def _record(self, item: _Found, depth_m: Optional[np.ndarray],
                intrinsics: Optional[CameraIntrinsics]) -> InstanceRecord:
        """Describe one mask; pixel statistics run on its box crop (masks are mostly empty)."""
        x0, y0, x1, y1 = (int(v) for v in item.box)
        cx, cy = mask_centroid(item.mask[y0:y1, x0:x1])
        position = None
        if depth_m is not None and intrinsics is not None:
            position = instance_position(item.mask, depth_m, intrinsics,
                                         int(self.config.min_depth_pixels),
                                         crop_box=(x0, y0, x1, y1))
        return InstanceRecord(item.object_id, item.label, item.score, item.box, item.area,
                              (cx + x0, cy + y0), position)

    def _run(self, rgb: np.ndarray, refused: List[str]) -> List[_Found]:
        """Run the engine; return its non-empty instances with their label-image IDs."""
        mode = self.config.mode
        if mode == 'sam2':
            result = self._track_sam2(rgb, refused)
            return [_Found(o.object_id, 'object', _sigmoid(o.score), o.mask, o.box, o.area)
                    for o in result.objects if o.present and o.area > 0]
        if mode == 'sam3':
            instances = [i for i in self._engine.segment(rgb) if i.area > 0]
            ids = self._ids.assign([i.mask for i in instances])
        else:
            instances = [i for i in self._engine.step(rgb) if i.area > 0]
            ids = [_require_id(i) for i in instances]
        return [_Found(object_id, i.concept, float(i.score), i.mask, i.box, i.area)
                for object_id, i in zip(ids, instances, strict=True)]

    def _track_sam2(self, rgb: np.ndarray, refused: List[str]) -> Any:
        result = self._tracker.track(rgb)
        if self._pending_prompts:
            # Prompts that arrived before the first frame attach to this one; the tracker
            # applies them on the cached features and updates its last result. Their
            # coordinates could not be checked against an image then: one that does not
            # fit this frame is refused alone, and the frame still goes out.
            pending, self._pending_prompts = self._pending_prompts, []
            for prompt in pending:
                try:
                    self._tracker.add_objects(None, **prompt)
                except PromptError as exc:
                    refused.append(f"object {prompt['object_ids'][0]}: {exc}")
            result = self._tracker.last_result
        return result


class _Found(NamedTuple):
    """One non-empty instance an engine returned, with its label-image ID.

    ``box`` and ``area`` are the engine's own (``mask_to_box`` and the pixel count of
    ``mask``, computed where the mask was made), so they are not computed twice.
    """

    object_id: int
    label: str
    score: float
    mask: np.ndarray
    box: Box
    area: int


def _require_id(instance: Instance) -> int:
    if instance.instance_id is None:
        raise RuntimeError('hybrid engine returned an instance without instance_id')
    return int(instance.instance_id)


def _sigmoid(logit: float) -> float:
    logit = float(logit)
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


def _check_in_image(points: Sequence[Tuple[float, float]],
                    image_size: Optional[Tuple[int, int]], pixel: bool = False) -> None:
    """Refuse non-finite or out-of-image prompt coordinates.

    Box corners may lie on the far edge (x = width); a ``pixel`` (a point prompt) must be
    inside the image, x < width, as the tracker requires.
    """
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise PromptError(f'prompt coordinate ({x}, {y}) is not finite')
        if image_size is not None:
            width, height = image_size
            inside = (0 <= x < width and 0 <= y < height) if pixel else \
                (0 <= x <= width and 0 <= y <= height)
            if not inside:
                raise PromptError(f'prompt point ({x:.1f}, {y:.1f}) lies outside the '
                                  f'{width}x{height} image')


__all__ = ['FrameResult', 'IouIdAssigner', 'MODES', 'ModelLoadError', 'PipelineConfig',
           'SegmentationPipeline', 'check_concepts', 'is_out_of_memory', 'memory_stats',
           'release_cached_memory']
