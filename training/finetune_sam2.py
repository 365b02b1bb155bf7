"""Fine-tune a transformers ``Sam2VideoModel`` on orchard videos.

Usage::

    python -m training.finetune_sam2 --config training/configs/smoke_sam2.yaml
    python -m training.finetune_sam2 --config training/configs/sam2.1_tiny.yaml

Add ``--resume runs/sam2.1_tiny/last`` to continue an interrupted run exactly,
``--overwrite`` to replace an earlier run in the same output directory, and
``--set key=value`` to override any config value.

Each training example is a clip of ``T`` frames with up to ``K`` objects. The first frame
gets a prompt per object sampled from its ground truth (clicks, jittered box or mask); the
remaining frames are tracked through SAM2's memory (memory encoder, memory attention,
object pointers). The forward pass walks the clip with the model's own per-frame routine
(``_run_single_frame_inference``) and memory encoder (``_batch_encode_memories``) on a real
``Sam2VideoInferenceSession``, i.e. the code ``Sam2VideoModel.forward`` runs at inference,
but outside its ``torch.inference_mode`` so gradients flow through the memory path.

Losses follow the official SAM2 recipe: per object and frame, focal + dice on the best of
the multimask outputs (the one with the lowest combined loss), IoU-prediction regression on
all outputs, and object-score BCE; weights 20 / 1 / 1 / 1 by default.

The last line printed is ``loss_drop_pct=<float> checkpoint=<path>``.
"""

from __future__ import annotations

from contextlib import contextmanager
import json
import sys
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from sam_gap_ros.engines.loading import check_loading_info, check_model_dir
from sam_gap_ros.engines.scene_motion import SceneMotion, shift_memory
from training import common, losses
from training.metrics import video_j_and_f
from training.sam2_data import (add_prompts_to_session, human_prompt, iterate_clips,
                                LabelledVideo, sample_prompt, VideoClip, videos_from_config)

SAM2_MODEL_TYPES = ('sam2_video',)

BEST_METRIC = 'j_and_f'
"""The :func:`validate` metric that picks ``best/`` (fixed, so it cannot be misspelt)."""

CONFIG_SCHEMA: Dict[str, Any] = {
    'seed': 0, 'device': 'auto', 'precision': 'fp32', 'num_threads': None, 'cpu_kernels': None,
    'output_dir': 'runs/sam2', 'tensorboard': True,
    'model': {'pretrained_dir': None, 'tiny': common.OPEN},
    'freeze': [],
    'data': {'source': 'synthetic', 'categories': ['apple'], 'clip_frames': 3,
             'val_clip_frames': None, 'max_objects': 3, 'min_area': 16, 'clip_stride': 1,
             'exit_fraction': 0.0, 'max_prompt_gap': 0, 'train_dir': None, 'val_dir': None,
             'synthetic': {'seed': 0, 'num_train_videos': 4, 'num_val_videos': 1,
                           'num_frames': 8, 'width': 128, 'height': 96,
                           'scene': common.OPEN, 'video': common.OPEN}},
    'prompts': {'probabilities': {'points': 0.5, 'box': 0.5, 'mask': 0.0},
                'num_positive': 1, 'max_negative': 1, 'box_noise': 0.1,
                'box_noise_max_px': 20.0},
    'val_prompt': 'box',
    'loss': {'focal': 20.0, 'dice': 1.0, 'iou': 1.0, 'object_score': 1.0, 'iou_kind': 'l1',
             'supervise_all_iou': True, 'focal_alpha': 0.25, 'focal_gamma': 2.0},
    'optim': common.OPTIM_SCHEMA,
    'schedule': common.SCHEDULE_SCHEMA,
    'train': {'steps': None, 'stop_at_step': 0, 'grad_accumulation': 1, 'clip_grad_norm': 1.0,
              'eval_every': 0, 'checkpoint_every': 0, 'eval_at_start': False,
              'loss_window': 5, 'motion_compensation': False},
}
"""Every config key the SAM2 trainer reads, with its default (None: none or required).

Keys outside it are rejected (a misspelt key would otherwise silently do nothing);
:data:`training.common.OPEN` sections take any keys (checked where they are used).
"""


# ----------------------------------------------------------------------------- model


def build_model(model_cfg: Mapping[str, Any]) -> Tuple[torch.nn.Module, Any]:
    """Return ``(Sam2VideoModel, Sam2VideoProcessor)`` from a local dir or the tiny config."""
    from transformers import Sam2VideoModel, Sam2VideoProcessor

    pretrained = model_cfg.get('pretrained_dir')
    if pretrained:
        path = check_model_dir(pretrained, SAM2_MODEL_TYPES)
        model, info = Sam2VideoModel.from_pretrained(path, local_files_only=True,
                                                     output_loading_info=True)
        # transformers only logs missing tensors and initialises them at random; fine-tuning
        # would then save those random values as trained weights.
        check_loading_info(path, info, 'SAM2 video')
        processor = Sam2VideoProcessor.from_pretrained(path, local_files_only=True)
        return model, processor
    tiny = model_cfg.get('tiny')
    if tiny is None:
        raise KeyError('model config needs pretrained_dir (local SAM2 directory) or tiny: {...}')
    from sam_gap_ros.engines.tiny_sam2 import build_sam2_video_processor, build_tiny_sam2
    tiny = dict(tiny)
    seed = int(tiny.pop('seed', 0))
    model = build_tiny_sam2(seed=seed, **tiny)
    tie_prompt_positional_encoding(model)
    return model, build_sam2_video_processor(model.config.image_size)


def tie_prompt_positional_encoding(model: torch.nn.Module) -> None:
    """Give the prompt encoder the image's random Fourier positional basis.

    In SAM2 one positional-encoding layer encodes both the image grid and the prompt
    coordinates, which is what lets the decoder relate a click to an image location.
    transformers keeps two buffers (equal in released checkpoints) but draws them
    independently for a randomly initialised model, and a model trained from scratch that
    way learns to ignore its prompts. The buffer is saved with the weights, so trained
    checkpoints keep the tie.
    """
    source = model.shared_image_embedding.positional_embedding
    model.prompt_encoder.shared_embedding.positional_embedding.copy_(source)


@contextmanager
def capture_decoder_outputs(model: torch.nn.Module) -> Iterator[List[Tuple[torch.Tensor, ...]]]:
    """Record every mask-decoder output (all multimask logits, IoU scores, object scores).

    ``_single_frame_forward`` keeps only the best multimask output; the official training
    loss needs all of them, so they are taken from the decoder itself.
    """
    records: List[Tuple[torch.Tensor, ...]] = []
    handle = model.mask_decoder.register_forward_hook(
        lambda _module, _inputs, output: records.append(output))
    try:
        yield records
    finally:
        handle.remove()


@contextmanager
def conditioning_memory_follows_camera(model: torch.nn.Module, session: Any,
                                       num_frames: int) -> Iterator[None]:
    """Move the prompted frames' memories with the camera while tracking a clip.

    The training counterpart of ``Sam2Tracker(motion_compensation=True)``: the camera's
    image motion is estimated on the session's frames (``SceneMotion``) and, whenever a
    frame reads its memory, each conditioning-frame memory (temporal position 0) is moved
    by the motion since its frame (``shift_memory``, differentiable). Recent memories are
    read as stored.
    """
    motion = SceneMotion()
    offsets = [motion.update_pixels(session.get_frame(i)) for i in range(num_frames)]
    gather = type(model)._gather_memory_frame_outputs
    grid = model.backbone_feature_sizes[-1]
    image_size = int(model.config.image_size)

    def gather_moved(inference_session: Any, obj_idx: int, frame_idx: int,
                     track_in_reverse_time: bool = False) -> list:
        positions = gather(model, inference_session, obj_idx, frame_idx, track_in_reverse_time)
        origins = {id(entry): idx for idx, entry in
                   inference_session.output_dict_per_obj[obj_idx]['cond_frame_outputs'].items()}
        moved = []
        for temporal, entry in positions:
            if temporal == 0 and entry is not None and id(entry) in origins:
                origin = offsets[origins[id(entry)]]
                shift = (offsets[frame_idx][0] - origin[0], offsets[frame_idx][1] - origin[1])
                entry = dict(entry, maskmem_features=shift_memory(
                    entry['maskmem_features'], shift, grid, image_size))
            moved.append((temporal, entry))
        return moved

    model._gather_memory_frame_outputs = gather_moved  # this instance only
    try:
        yield
    finally:
        del model._gather_memory_frame_outputs


def forward_clip(model: torch.nn.Module, session: Any, object_ids: Sequence[int],
                 num_frames: int, motion_compensation: bool = False
                 ) -> List[Dict[str, torch.Tensor]]:
    """Run the prompted first frame and track the rest; return per-frame decoder outputs.

    Each frame's dict holds ``multimask_logits`` ``(K, M, h, w)``, ``iou_scores`` ``(K, M)``,
    ``object_score_logits`` ``(K,)`` and ``supervised`` ``(K,)`` (False where a mask prompt
    was copied to the output, which has nothing to learn). ``motion_compensation`` moves
    the prompted frame's memory with the camera, as the tracker does at inference
    (``conditioning_memory_follows_camera``).
    """
    if motion_compensation:
        with conditioning_memory_follows_camera(model, session, num_frames):
            return forward_clip(model, session, object_ids, num_frames)
    frames = []
    with capture_decoder_outputs(model) as records:
        for frame_idx in range(num_frames):
            is_cond = frame_idx == 0
            obj_indices, high_res, scores_for_mem, from_prompt = [], [], [], []
            logits, ious, scores, supervised = [], [], [], []
            for obj_id in object_ids:
                obj_idx = session.obj_id_to_idx(obj_id)
                point_inputs = session.point_inputs_per_obj[obj_idx].get(frame_idx)
                mask_inputs = session.mask_inputs_per_obj[obj_idx].get(frame_idx)
                if is_cond and point_inputs is None and mask_inputs is None:
                    raise ValueError(f'object {obj_id} has no prompt on the first frame')
                records.clear()
                out = model._run_single_frame_inference(
                    inference_session=session, frame_idx=frame_idx, obj_idx=obj_idx,
                    batch_size=1, is_init_cond_frame=is_cond, point_inputs=point_inputs,
                    mask_inputs=mask_inputs, reverse=False, streaming=False)
                session.store_output(obj_idx, frame_idx, output_value=out,
                                     is_conditioning_frame=is_cond)
                multimask, iou, _tokens, obj_score = records[-1]
                if mask_inputs is not None:
                    # Mask prompts are used as the output (no decoder prediction); presence is
                    # "mask non-empty", the same rule the model applies in _use_mask_as_output.
                    present = mask_inputs.flatten(1).gt(0).any(1).to(out['high_res_masks'].dtype)
                    obj_score = (20.0 * present - 10.0).view(1, 1, 1)
                obj_indices.append(obj_idx)
                high_res.append(out['high_res_masks'])
                scores_for_mem.append(obj_score)
                from_prompt.append(point_inputs is not None or mask_inputs is not None)
                logits.append(multimask[0, 0])
                ious.append(iou[0, 0])
                scores.append(obj_score.reshape(-1)[0])
                supervised.append(mask_inputs is None)
            model._batch_encode_memories(
                inference_session=session, frame_idx=frame_idx,
                objects_needing_memory_encoding=obj_indices,
                high_res_masks_for_memory=high_res,
                object_score_logits_for_memory=scores_for_mem,
                is_mask_from_pts_per_obj=from_prompt)
            frames.append({
                'multimask_logits': _stack_padded(logits),
                'iou_scores': _stack_padded(ious),
                'object_score_logits': torch.stack(scores),
                'supervised': torch.tensor(supervised),
            })
    return frames


def _stack_padded(items: Sequence[torch.Tensor]) -> torch.Tensor:
    # Objects tracked with a single-mask output (e.g. box prompts) have M=1 while clicked
    # ones have M=3; repeat the single output so all stack (the min over copies is the same).
    width = max(x.shape[0] for x in items)
    return torch.stack([x if x.shape[0] == width else x[:1].expand(width, *x.shape[1:])
                        for x in items])


def resize_masks(masks: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """Resize boolean ``(..., H, W)`` masks to the model's square input (antialiased, >= 0.5).

    Same rule the processor applies to mask prompts, so targets and prompts agree.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(masks)).to(device=device, dtype=torch.float32)
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    resized = F.interpolate(flat, size=(size, size), mode='bilinear', align_corners=False,
                            antialias=True)
    return (resized >= 0.5).float().reshape(*lead, size, size)


def clip_loss(frames: Sequence[Mapping[str, torch.Tensor]], targets: torch.Tensor,
              loss_cfg: Mapping[str, Any]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Return the weighted SAM2 loss of a clip and its unweighted terms.

    ``targets`` is ``(T, K, S, S)`` float. Mask and IoU terms average over supervised
    (frame, object) pairs where the object is present; object-score BCE over all
    supervised pairs (absent objects must score low).
    """
    weights = {'mask_focal': float(loss_cfg.get('focal', 20.0)),
               'mask_dice': float(loss_cfg.get('dice', 1.0)),
               'iou': float(loss_cfg.get('iou', 1.0)),
               'object_score': float(loss_cfg.get('object_score', 1.0))}
    iou_kind = str(loss_cfg.get('iou_kind', 'l1'))
    all_iou = bool(loss_cfg.get('supervise_all_iou', True))
    alpha = float(loss_cfg.get('focal_alpha', 0.25))
    gamma = float(loss_cfg.get('focal_gamma', 2.0))
    size = targets.shape[-1]
    sums = {name: targets.new_zeros(()) for name in weights}
    n_mask, n_score = 0, 0
    for t, frame in enumerate(frames):
        sup = frame['supervised'].to(targets.device)
        if not sup.any():
            continue
        target = targets[t]
        present = target.flatten(1).any(1)
        logits = frame['multimask_logits'].float()
        k, m = logits.shape[:2]
        up = F.interpolate(logits, size=(size, size), mode='bilinear', align_corners=False)
        expanded = target[:, None].expand(-1, m, -1, -1)
        focal = losses.sigmoid_focal_loss(up.flatten(0, 1), expanded.flatten(0, 1), alpha,
                                          gamma, reduction='none').view(k, m)
        dice = losses.dice_loss(up.flatten(0, 1), expanded.flatten(0, 1),
                                reduction='none').view(k, m)
        best = torch.argmin(weights['mask_focal'] * focal + weights['mask_dice'] * dice, dim=1)
        rows = torch.arange(k, device=up.device)
        iou_pred = frame['iou_scores'].float()
        if all_iou:
            iou_err = losses.iou_prediction_loss(iou_pred.flatten(), up.flatten(0, 1),
                                                 expanded.flatten(0, 1), iou_kind,
                                                 reduction='none').view(k, m).mean(1)
        else:
            iou_err = losses.iou_prediction_loss(iou_pred[rows, best], up[rows, best], target,
                                                 iou_kind, reduction='none')
        use = sup & present
        sums['mask_focal'] = sums['mask_focal'] + focal[rows, best][use].sum()
        sums['mask_dice'] = sums['mask_dice'] + dice[rows, best][use].sum()
        sums['iou'] = sums['iou'] + iou_err[use].sum()
        n_mask += int(use.sum())
        score = losses.object_score_loss(frame['object_score_logits'].float(),
                                         present.float(), reduction='none')
        sums['object_score'] = sums['object_score'] + score[sup].sum()
        n_score += int(sup.sum())
    if n_score == 0:
        raise ValueError('clip has no supervised frame (every object was mask-prompted and '
                         'the clip has a single frame)')
    terms = {name: sums[name] / max(1, n_mask if name != 'object_score' else n_score)
             for name in weights}
    return losses.weighted_sum(terms, weights), terms


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def predict_video(model: torch.nn.Module, processor: Any, clip: VideoClip, prompt_kind: str,
                  device: torch.device) -> np.ndarray:
    """Track ``clip`` from human prompts on frame 0 with the model's inference path.

    Returns boolean ``(T, K, H, W)`` masks at the clip's resolution.
    """
    height, width = clip.size
    session = processor.init_video_session(video=list(clip.frames), inference_device=device)
    prompts = [human_prompt(clip.masks[0, k], prompt_kind) for k in range(clip.num_objects)]
    add_prompts_to_session(processor, session, 0, clip.track_ids, prompts, (height, width))
    result = np.zeros(clip.masks.shape, dtype=bool)
    for out in model.propagate_in_video_iterator(session, start_frame_idx=0):
        masks = processor.post_process_masks([out.pred_masks.float().cpu()],
                                             original_sizes=[[height, width]], binarize=True)[0]
        present = (out.object_score_logits.reshape(-1) > 0).cpu().numpy()
        frame_masks = masks[:, 0].numpy().astype(bool)
        frame_masks[~present] = False
        result[out.frame_idx] = frame_masks
    return result


def validate(model: torch.nn.Module, processor: Any, clips: Sequence[VideoClip],
             prompt_kind: str, device: torch.device) -> Tuple[Dict[str, float], Dict[str, list]]:
    """Return mIoU / J / F / J&F over the validation clips and sample frames for a PNG."""
    was_training = model.training
    model.eval()
    try:
        preds, trues = [], []
        samples: Dict[str, list] = {'images': [], 'pred': [], 'true': [], 'titles': []}
        for index, clip in enumerate(clips):
            pred = predict_video(model, processor, clip, prompt_kind, device)
            preds.extend(pred)
            trues.extend(clip.masks)
            if index == 0:
                for t in sorted({0, clip.num_frames // 2, clip.num_frames - 1}):
                    samples['images'].append(clip.frames[t])
                    samples['pred'].append(pred[t])
                    samples['true'].append(clip.masks[t])
                    samples['titles'].append(f'{clip.name} frame {t}')
        scores = video_j_and_f(preds, trues)
        # mIoU counts only (frame, object) pairs where the object is really there.
        ious = [float(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
                for pf, tf in zip(preds, trues, strict=True)
                for p, t in zip(pf, tf, strict=True) if t.any()]
        scores['miou'] = float(np.mean(ious)) if ious else 0.0
        return scores, samples
    finally:
        model.train(was_training)


def validation_clips(videos: Sequence[Union[VideoClip, LabelledVideo]], num_frames: int,
                     max_objects: int, min_area: int) -> List[VideoClip]:
    """Return fixed validation clips: each video's first frames and objects visible there."""
    clips = []
    for video in videos:
        keep = np.flatnonzero(video.object_areas[0] >= min_area)[:max_objects]
        if keep.size == 0:
            continue
        t = min(num_frames, video.num_frames)
        clips.append(video.subclip(np.arange(t), keep, video.name))
    if not clips:
        raise ValueError('no validation video has a visible object on its first frame')
    return clips


# ----------------------------------------------------------------------------- training


def _data_rng_state(rng: np.random.Generator) -> Dict[str, Any]:
    return rng.bit_generator.state


def train(cfg: Mapping[str, Any], resume: Optional[str] = None,
          verbose: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """Run fine-tuning as configured; return a summary (losses, metrics, checkpoint paths).

    A fresh run (no ``resume``) refuses an ``output_dir`` holding an earlier run unless
    ``overwrite``, which deletes that run's checkpoints, eval PNGs and TensorBoard logs.
    """
    common.check_config(cfg, CONFIG_SCHEMA)
    cfg = common.deep_copy_config(cfg)
    n_steps = common.train_steps(cfg)  # no default: every SAM2 config gives it
    train_cfg = cfg.get('train', {})
    seed = int(cfg.get('seed', 0))
    common.seed_everything(seed)
    device = common.training_device(cfg)
    warning = common.check_cpu_kernels(cfg, device)
    if warning:
        print(f'warning: {warning}', file=sys.stderr)
    precision = str(cfg.get('precision', 'fp32'))
    # Before anything is written: a fresh run must neither replace an earlier run's best/
    # and last/ unasked nor mix its PNGs and TensorBoard events with it.
    output_dir = common.claim_output_dir(cfg.get('output_dir', 'runs/sam2'), resume, overwrite,
                                         config=cfg)

    model, processor = build_model(cfg['model'])
    model.to(device).train()
    n_frozen, n_trainable = common.apply_freezing(model, cfg.get('freeze', []) or [])
    optimizer = common.build_optimizer(model, cfg['optim'])
    scheduler = common.build_scheduler(optimizer, dict(cfg.get('schedule', {}),
                                                       total_steps=n_steps))
    stepper = common.GradientStepper(model, optimizer, scheduler,
                                     int(train_cfg.get('grad_accumulation', 1)),
                                     train_cfg.get('clip_grad_norm', 1.0), device, precision)
    data_cfg = cfg.get('data', {})
    prompt_cfg = cfg.get('prompts', {})
    num_frames = int(data_cfg.get('clip_frames', 3))
    max_objects = int(data_cfg.get('max_objects', 3))
    min_area = int(data_cfg.get('min_area', 16))
    train_videos = videos_from_config(data_cfg, 'train')
    val_clips = validation_clips(videos_from_config(data_cfg, 'val'),
                                 int(data_cfg.get('val_clip_frames', num_frames)),
                                 max_objects, min_area)
    # Only once model, freezing and data are set up: a config.json left by a run that
    # failed there made the next fresh run refuse the directory as an earlier run's.
    (output_dir / 'config.json').write_text(json.dumps(cfg, indent=1, default=str))
    data_rng = np.random.default_rng(seed)
    manager = common.CheckpointManager(output_dir, metric=BEST_METRIC, mode='max')
    logger = common.ScalarLogger(output_dir / 'tensorboard' if cfg.get('tensorboard', True)
                                 else None)

    step, step_losses = 0, []
    run_id = common.new_run_id()
    metrics: Dict[str, float] = {}
    if resume:
        info = common.load_checkpoint(resume, model, optimizer, scheduler, stepper)
        step = info['step']
        data_rng.bit_generator.state = info['extra']['data_rng']
        step_losses = list(info['extra'].get('losses', []))
        run_id = info['extra'].get(common.RUN_ID) or run_id
        # The checkpoint's own evaluation, so resuming a finished run keeps it in the summary.
        metrics = {k: v for k, v in info['metrics'].items() if k != 'loss'}
        if verbose:
            print(f'resumed from {resume} at step {step}', file=sys.stderr)
    clips = iterate_clips(train_videos, data_rng, num_frames, max_objects, min_area,
                          int(data_cfg.get('clip_stride', 1)),
                          float(data_cfg.get('exit_fraction', 0.0)),
                          int(data_cfg.get('max_prompt_gap', 0)))
    eval_every = int(train_cfg.get('eval_every', 0)) or n_steps
    ckpt_every = int(train_cfg.get('checkpoint_every', 0)) or eval_every
    stop_at = int(train_cfg.get('stop_at_step', 0)) or n_steps
    # Training clips only: validation runs transformers' own inference loop.
    motion_compensation = bool(train_cfg.get('motion_compensation', False))
    accumulation = stepper.accumulation_steps
    image_size = int(model.config.image_size)
    if verbose:
        print(f'model: {n_trainable:,} trainable / {n_frozen:,} frozen parameters; '
              f'{len(train_videos)} train videos, {len(val_clips)} val clips; device {device}',
              file=sys.stderr)
    if step == 0 and train_cfg.get('eval_at_start', False):
        # Score the starting weights (e.g. released SAM2.1) so best/ is never worse.
        metrics, samples = validate(model, processor, val_clips,
                                    str(cfg.get('val_prompt', 'box')), device)
        logger.log(metrics, 0, 'val')
        common.save_mask_comparison(output_dir / 'eval' / 'step_000000.png', samples['images'],
                                    samples['pred'], samples['true'], samples['titles'])
        manager.save(model, optimizer, scheduler, 0, metrics=metrics,
                     extra={'data_rng': _data_rng_state(data_rng), 'losses': [],
                            **common.run_identity(run_id, cfg)},
                     stepper=stepper, processor=processor)
        if verbose:
            shown = ' '.join(f'{k}={v:.4f}' for k, v in sorted(metrics.items()))
            print(f'step 0 (starting weights): {shown}', file=sys.stderr)
    bar = common.progress_bar(n_steps, 'sam2 fine-tune', initial=step,
                              disable=None if verbose else True)
    started = time.time()
    while step < min(n_steps, stop_at):
        # The lr this step trains with: the stepper moves the schedule on after the update.
        step_lr = optimizer.param_groups[0]['lr']
        micro_losses, micro_terms = [], []
        for _ in range(accumulation):
            clip = next(clips)
            prompts = [sample_prompt(clip.masks[0, k], data_rng, prompt_cfg)
                       for k in range(clip.num_objects)]
            session = processor.init_video_session(
                video=list(clip.frames), inference_device=device,
                max_vision_features_cache_size=clip.num_frames)
            add_prompts_to_session(processor, session, 0, clip.track_ids, prompts, clip.size)
            targets = resize_masks(clip.masks, image_size, device)
            with common.amp_context(device, precision):
                frames = forward_clip(model, session, clip.track_ids, clip.num_frames,
                                      motion_compensation=motion_compensation)
            loss, terms = clip_loss(frames, targets, cfg.get('loss', {}))
            stepper.backward(loss)
            micro_losses.append(float(loss.detach()))
            micro_terms.append(losses.detach_terms(terms))
        step += 1
        step_loss = float(np.mean(micro_losses))
        step_losses.append(step_loss)
        scalars = {'loss': step_loss, 'lr': step_lr}
        for name in micro_terms[0]:
            scalars[name] = float(np.mean([t[name] for t in micro_terms]))
        if stepper.last_grad_norm is not None:
            scalars['grad_norm'] = stepper.last_grad_norm
        if device.type == 'cuda':
            # Peak memory is what decides batch size / clip length on a given GPU.
            scalars['gpu_peak_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        logger.log(scalars, step, 'train')
        bar.update(1)
        bar.set_postfix(loss=f'{step_loss:.3f}')
        is_last = step >= min(n_steps, stop_at)
        evaluated = step % eval_every == 0 or is_last
        if evaluated:
            metrics, samples = validate(model, processor, val_clips,
                                        str(cfg.get('val_prompt', 'box')), device)
            logger.log(metrics, step, 'val')
            common.save_mask_comparison(output_dir / 'eval' / f'step_{step:06d}.png',
                                        samples['images'], samples['pred'], samples['true'],
                                        samples['titles'])
            if verbose:
                shown = ' '.join(f'{k}={v:.4f}' for k, v in sorted(metrics.items()))
                print(f'step {step}: loss={step_loss:.4f} {shown}', file=sys.stderr)
        # Every evaluation is saved, and only with its own step's metrics: best/ must hold
        # the weights that were scored, not later ones labelled with an earlier score.
        if evaluated or step % ckpt_every == 0:
            manager.save(model, optimizer, scheduler, step,
                         metrics=dict(metrics if evaluated else {}, loss=step_loss),
                         extra={'data_rng': _data_rng_state(data_rng), 'losses': step_losses,
                                **common.run_identity(run_id, cfg)},
                         stepper=stepper, processor=processor)
    bar.close()
    logger.close()
    window = int(train_cfg.get('loss_window', 5))
    drop = common.loss_drop_pct(step_losses, window) if len(step_losses) >= 2 else 0.0
    summary = {'steps': step, 'losses': step_losses, 'loss_drop_pct': drop, 'metrics': metrics,
               'checkpoint': str(manager.last_dir), 'best_checkpoint': str(manager.best_dir),
               'seconds': time.time() - started}
    (output_dir / 'summary.json').write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point."""
    parser = common.build_arg_parser('Fine-tune SAM2 (transformers Sam2VideoModel).')
    parser.add_argument('--quiet', action='store_true', help='no progress bar or step logs')
    args = parser.parse_args(argv)
    try:
        cfg = common.load_config(args.config, args.overrides, CONFIG_SCHEMA)
        if args.output_dir:
            cfg['output_dir'] = args.output_dir
        common.train_steps(cfg)  # before anything is written or loaded
        common.claim_output_dir(cfg.get('output_dir', 'runs/sam2'), args.resume,
                                args.overwrite, config=cfg)
    except (OSError, KeyError, ValueError) as exc:
        parser.exit(2, f'error: {exc}\n')
    torch.set_num_threads(int(cfg.get('num_threads') or torch.get_num_threads()))
    summary = train(cfg, resume=args.resume, verbose=not args.quiet, overwrite=args.overwrite)
    print(f"loss_drop_pct={summary['loss_drop_pct']:.2f} checkpoint={summary['checkpoint']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
