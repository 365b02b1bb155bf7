"""Fine-tune SAM3 (transformers ``Sam3Model``) for text-prompted detection + segmentation.

Usage::

    python -m training.finetune_sam3 --config training/configs/sam3.yaml [--set k=v ...]
        [--resume OUTPUT/last | --overwrite] [--output-dir DIR]

Per image, the prompts are the noun phrases of its annotations (each annotation's own
``noun_phrase``, the category name only as fallback) plus negative phrases sampled from the
rest of the dataset (target: no instance, presence 0). Queries are matched to instances with
the Hungarian matcher of ``training.matching`` (class 2 / box L1 5 / GIoU 2 + mask costs) and
trained with the official SAM3 loss weights: classification focal 20, presence 20, box L1 5,
GIoU 2, mask focal 200, dice 10. Batch size is one image (all its prompts), with gradient
accumulation.

Guards against the known failure modes of the official trainer:

* the starting checkpoint is evaluated on the validation set *before* training and is a
  candidate for ``best/``, so fine-tuning can never hand back a worse model than it got;
  before/after metrics are printed side by side at the end;
* freezing presets (``heads_only``, ``decoder``, ``detector``,
  ``detector+last_n_backbone_blocks``, ``all``); the text encoder stays frozen unless asked,
  and an optional retention check evaluates held-out attribute phrases before and after;
* memory: activation checkpointing, a frozen backbone whose features are cached per image,
  configurable resolution, and a printed peak-memory estimate before training starts.

The last line printed is ``loss_drop_pct=<float> checkpoint=<best model dir>``; that
directory holds the model and processor and loads with ``Sam3ConceptEngine.load()``.
"""

from __future__ import annotations

from collections import OrderedDict
import dataclasses
from dataclasses import dataclass
import functools
import json
import math
from pathlib import Path
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Sam3Config, Sam3Model, Sam3Processor
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import (inverse_sigmoid, Sam3DetrDecoderLayer,
                                                    Sam3DetrEncoderLayer,
                                                    Sam3VisionEncoderOutput)

from sam_gap_ros.engines.loading import check_loading_info, check_model_dir
from sam_gap_ros.engines.sam3_concepts import check_phrase_tokens
from sam_gap_ros.mask_ops import mask_iou_matrix
from training import common
from training.coco_data import canonical_phrase, CocoInstances, CocoSample
from training.losses import (box_cxcywh_to_xyxy, box_iou, box_l1_loss, box_xyxy_to_cxcywh,
                             detach_terms, dice_loss, giou_loss, object_score_loss,
                             sigmoid_focal_loss, weighted_sum)
from training.matching import match_predictions, match_to_anchors, MatchWeights
from training.metrics import mostly_inside
from training.prepare_data import split_dataset, validate_dataset

LOSS_WEIGHTS = {'loss_ce': 20.0, 'loss_presence': 20.0, 'loss_bbox': 5.0, 'loss_giou': 2.0,
                'loss_mask': 200.0, 'loss_dice': 10.0,
                'aux_ce': 20.0, 'aux_bbox': 5.0, 'aux_giou': 2.0}
"""Official SAM3 loss weights (box L1 5 + GIoU 2, class 20 + presence 20, focal 200 + dice 10);
the ``aux_*`` terms (earlier decoder layers, summed) get the weights of their main terms."""

FREEZE_PRESETS = ('heads_only', 'decoder', 'detector', 'detector+last_n_backbone_blocks', 'all')

EVAL_METRICS = ('val_loss', 'precision', 'recall', 'f1', 'mean_iou', 'presence_acc')
"""What :meth:`Sam3FineTuner.evaluate` returns: the choices of ``eval.metric``."""

CONFIG_SCHEMA: Dict[str, Any] = {
    'seed': 0, 'device': 'auto', 'precision': 'bf16', 'num_threads': None,
    'output_dir': 'runs/sam3', 'tensorboard': True,
    'model': {'pretrained_dir': None, 'tiny': common.OPEN, 'image_size': None},
    'freeze': {'preset': 'detector', 'last_n_backbone_blocks': 0, 'train_text_encoder': False,
               'extra_patterns': []},
    'data': {'root': None, 'train_ann': 'annotations_train.json',
             'val_ann': 'annotations_val.json',
             'synthetic': {'n_images': 16, 'seed': 0, 'val_fraction': 0.25, 'min_area': 1,
                           'scene': common.OPEN},
             'negatives_per_image': 2, 'max_positive_phrases': None,
             'secondary_phrases_as_prompts': True},
    'loss': {'weights': dict(LOSS_WEIGHTS, loss_semantic=0.0), 'focal_alpha': 0.25,
             'focal_gamma': 2.0, 'mask_loss_size': None, 'aux_layers': False,
             'class_loss': 'focal', 'pos_weight': 10.0, 'iabce_alpha': 0.25},
    'matcher': dict({'assign': 'predictions'},
                    **{f.name: f.default for f in dataclasses.fields(MatchWeights)}),
    'optim': common.OPTIM_SCHEMA,
    'schedule': dict(common.SCHEDULE_SCHEMA, total_steps=None),
    'train': {'steps': 100, 'stop_at_step': 0, 'grad_accumulation': 1, 'clip_grad_norm': None,
              'activation_checkpointing': False, 'cache_frozen_features': True,
              'cache_max_images': 256, 'cache_device': 'cpu', 'eval_every': 0,
              'checkpoint_every': 0, 'log_every': 10, 'loss_window': None},
    'eval': {'metric': 'f1', 'mode': None, 'score_threshold': 0.5, 'mask_threshold': 0.5,
             'negatives_per_image': 2, 'max_images': None, 'retention_phrases': [],
             'retention_tolerance': 0.05},
}
"""Every config key the SAM3 trainer reads, with its default (None: none or derived).

Keys outside it are rejected (a misspelt key would otherwise silently do nothing);
:data:`training.common.OPEN` sections take any keys (checked where they are used).
"""

_TRAINABLE_BY_PRESET = {
    'heads_only': ['dot_product_scoring', 'detr_decoder.box_head', 'detr_decoder.presence_head',
                   'mask_decoder.mask_embedder', 'mask_decoder.instance_projection',
                   'mask_decoder.semantic_projection'],
    'decoder': ['dot_product_scoring', 'detr_decoder', 'mask_decoder'],
    'detector': ['dot_product_scoring', 'detr_decoder', 'mask_decoder', 'detr_encoder',
                 'geometry_encoder', 'text_projection'],
    'all': ['dot_product_scoring', 'detr_decoder', 'mask_decoder', 'detr_encoder',
            'geometry_encoder', 'text_projection', 'vision_encoder'],
}


# ----------------------------------------------------------------------------- freezing


def sam3_trainable_prefixes(model: Sam3Model, preset: str, last_n_blocks: int = 0,
                            train_text_encoder: bool = False) -> List[str]:
    """Return the module prefixes a freezing preset leaves trainable."""
    if preset not in FREEZE_PRESETS:
        raise ValueError(f"unknown freeze preset '{preset}': use one of {FREEZE_PRESETS}")
    if preset == 'detector+last_n_backbone_blocks':
        num_layers = len(model.vision_encoder.backbone.layers)
        if not 1 <= int(last_n_blocks) <= num_layers:
            raise ValueError(f'last_n_backbone_blocks must be in [1, {num_layers}], got '
                             f'{last_n_blocks}')
        prefixes = list(_TRAINABLE_BY_PRESET['detector']) + ['vision_encoder.neck'] + [
            f'vision_encoder.backbone.layers.{i}'
            for i in range(num_layers - int(last_n_blocks), num_layers)]
    else:
        prefixes = list(_TRAINABLE_BY_PRESET[preset])
    if train_text_encoder:
        prefixes.append('text_encoder')
    return prefixes


def _frozen_prefixes(module: torch.nn.Module, prefix: str, trainable: Sequence[str]) -> List[str]:
    """Return the fewest module/parameter names covering everything not under ``trainable``."""
    if any(prefix == t or prefix.startswith(t + '.') for t in trainable):
        return []
    if prefix and not any(t.startswith(prefix + '.') for t in trainable):
        return [prefix] if any(True for _ in module.parameters()) else []
    frozen = []
    for name, _ in module.named_parameters(recurse=False):
        full = f'{prefix}.{name}' if prefix else name
        if full not in trainable:
            frozen.append(full)
    for name, child in module.named_children():
        frozen.extend(_frozen_prefixes(child, f'{prefix}.{name}' if prefix else name, trainable))
    return frozen


def apply_sam3_freezing(model: Sam3Model, preset: str, last_n_blocks: int = 0,
                        train_text_encoder: bool = False,
                        extra_patterns: Sequence[str] = ()) -> Tuple[int, int]:
    """Freeze ``model`` per preset (+ extra patterns); return ``(n_frozen, n_trainable)``."""
    for param in model.parameters():
        param.requires_grad_(True)
    trainable = sam3_trainable_prefixes(model, preset, last_n_blocks, train_text_encoder)
    patterns = _frozen_prefixes(model, '', trainable) + list(extra_patterns)
    if not patterns:
        n = sum(p.numel() for p in model.parameters())
        return 0, n
    return common.apply_freezing(model, patterns)


def module_is_frozen(module: torch.nn.Module) -> bool:
    """Return True when no parameter of ``module`` requires a gradient."""
    return not any(p.requires_grad for p in module.parameters())


# ----------------------------------------------------------------------------- memory


def enable_activation_checkpointing(model: Sam3Model) -> int:
    """Recompute ViT and DETR encoder/decoder layers in backward; return the layer count.

    ``Sam3Model`` does not declare ``supports_gradient_checkpointing``, so the ViT layers
    (``GradientCheckpointingLayer``) are switched on directly and the DETR layers wrapped.
    """
    func = functools.partial(checkpoint, use_reentrant=False)
    count = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = func
            count += 1
        elif isinstance(module, (Sam3DetrEncoderLayer, Sam3DetrDecoderLayer)):
            original = module.forward

            def wrapped(*args, _original=original, _module=module, **kwargs):
                if _module.training and torch.is_grad_enabled():
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
                return _original(*args, **kwargs)

            module.forward = wrapped
            count += 1
    return count


# Activation elements autograd keeps per unit (the model's own weights, which autograd
# also holds for backward, are not activations: they are counted once as 'weights'),
# measured with benchmarks/bench_sam3_finetune_memory.py on the full-width architecture
# (fp32, SDPA): a ViT layer keeps ~17.4 x tokens x hidden, a DETR encoder / decoder layer
# ~24.3 / ~39.9 x tokens x hidden per prompt, the mask decoder + loss ~5.4 x mask_pixels x
# hidden per prompt, and the patch embedding + FPN neck ~4.7 x mask_pixels x fpn_hidden per
# image.
_VIT_LAYER, _ENC_LAYER, _DEC_LAYER, _MASK_HEAD, _NECK = 17.4, 24.3, 39.9, 5.4, 4.7


def _any_trainable(*modules: torch.nn.Module) -> bool:
    return any(not module_is_frozen(m) for m in modules)


def estimate_peak_memory(model: Sam3Model, image_size: int, num_prompts: int,
                         precision: str = 'bf16', activation_checkpointing: bool = False,
                         mask_loss_size: Optional[int] = None,
                         max_targets: int = 30) -> Dict[str, float]:
    """Return an estimated GiB breakdown of the training peak on a GPU (batch = 1 image).

    Weights (fp32), gradients + AdamW state of the trainable parameters, and the
    activations autograd keeps, from per-layer costs measured on CPU with
    ``benchmarks/bench_sam3_finetune_memory.py`` and scaled to this model's sizes. Modules
    with nothing trainable at or before them keep no activations. An estimate, not a GPU
    measurement: compare with ``torch.cuda.max_memory_allocated`` on your card.
    """
    gib = float(1 << 30)
    # bf16/fp16 autocast halves most saved tensors; norms/softmax statistics stay fp32.
    act_bytes = 4.0 if str(precision).lower() in ('fp32', 'float32', 'none', 'off') else 2.2
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    vit = cfg.vision_config.backbone_config
    patch = vit.patch_size if isinstance(vit.patch_size, int) else vit.patch_size[0]
    tokens = (image_size // patch) ** 2
    mask_pixels = (4 * (image_size // patch)) ** 2
    hidden = cfg.detr_encoder_config.hidden_size
    layers = model.vision_encoder.backbone.layers
    first_trainable = next((i for i, layer in enumerate(layers)
                            if not module_is_frozen(layer)), None)
    layer_elems = _VIT_LAYER * tokens * vit.hidden_size
    vision_trainable = _any_trainable(model.vision_encoder)
    if first_trainable is None:
        vit_act = 0.0
    elif activation_checkpointing:
        vit_act = tokens * vit.hidden_size * (len(layers) - first_trainable) + layer_elems
    else:
        vit_act = layer_elems * (len(layers) - first_trainable)
    if vision_trainable:
        vit_act += _NECK * mask_pixels * cfg.vision_config.fpn_hidden_size
    upstream = vision_trainable or _any_trainable(model.text_projection, model.geometry_encoder)
    enc_saved = upstream or _any_trainable(model.detr_encoder)
    dec_saved = enc_saved or _any_trainable(*model.detr_decoder.layers)
    n_enc, n_dec = cfg.detr_encoder_config.num_layers, cfg.detr_decoder_config.num_layers
    if activation_checkpointing:
        enc_elems = tokens * hidden * (n_enc + _ENC_LAYER)
        dec_elems = tokens * hidden * (n_dec + _DEC_LAYER)
    else:
        enc_elems = _ENC_LAYER * tokens * hidden * n_enc
        dec_elems = _DEC_LAYER * tokens * hidden * n_dec
    detr_act = num_prompts * ((enc_elems if enc_saved else 0.0)
                              + (dec_elems if dec_saved else 0.0))
    mask_full = dec_saved or _any_trainable(model.mask_decoder.pixel_decoder)
    # Frozen pixel decoder: only the per-query mask embedding product is kept.
    mask_act = num_prompts * mask_pixels * hidden * (_MASK_HEAD if mask_full else 1.0)
    loss_side = mask_loss_size or image_size
    loss_act = max_targets * loss_side ** 2 * 3
    parts = {
        'weights': total * 4 / gib,
        'gradients+adamw': trainable * 12 / gib,
        'vit_activations': vit_act * act_bytes / gib,
        'detr_activations': detr_act * act_bytes / gib,
        'mask_activations': mask_act * act_bytes / gib,
        'mask_loss': loss_act * 4 / gib,
        # A frozen ViT still needs one layer's activations transiently (no_grad forward).
        'transient': (0.0 if first_trainable is not None else layer_elems * act_bytes / 4) / gib,
        'cuda_context': 0.8,
    }
    parts['total'] = sum(parts.values()) * 1.1  # allocator fragmentation
    return parts


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptTargets:
    """The text prompts for one image and, per prompt, its ground-truth instances."""

    phrases: List[str]
    masks: List[torch.Tensor]
    """Per prompt: ``(T, S, S)`` float masks at the loss resolution (T = 0 for negatives)."""
    boxes: List[torch.Tensor]
    """Per prompt: ``(T, 4)`` normalised ``(x0, y0, x1, y1)`` boxes."""

    @property
    def positive(self) -> List[bool]:
        """Return, per prompt, whether it has at least one instance."""
        return [m.shape[0] > 0 for m in self.masks]


def choose_phrases(primary: Sequence[str], present: Sequence[str], vocabulary: Sequence[str],
                   num_negatives: int, max_positives: Optional[int], rng: np.random.Generator,
                   absent: Optional[Sequence[str]] = None,
                   secondary_prompts: bool = True,
                   ignored: Optional[Sequence[str]] = None) -> List[str]:
    """Return an image's positive phrases plus sampled negatives (deterministic per rng).

    ``primary`` are the instances' own noun phrases and ``present`` every phrase some
    instance answers to (primary + per-annotation ``phrases``); positives are ``present``
    (or only ``primary`` without ``secondary_prompts``). Negatives are vocabulary phrases
    no instance answers to, restricted to the image's recorded ``absent`` phrases when
    given, so "unripe green apple" is a hard negative on an image with only ripe apples.
    ``ignored`` phrases (those a crowd region may contain) are never negatives.
    """
    positives = sorted(set(present) if secondary_prompts else set(primary))
    if max_positives is not None and len(positives) > int(max_positives):
        keep = rng.choice(len(positives), size=int(max_positives), replace=False)
        positives = [positives[i] for i in sorted(keep)]
    unrestricted = set(vocabulary) - set(present) - set(primary) - set(ignored or ())
    candidates = unrestricted & set(absent) if absent is not None else unrestricted
    if not positives and not candidates:
        # An image without instances needs at least one prompt; an empty absent list
        # cannot be right for it, so fall back to the whole vocabulary.
        candidates = unrestricted
    candidates = sorted(candidates)
    count = min(int(num_negatives), len(candidates))
    negatives = []
    if count:
        negatives = [candidates[i] for i in sorted(rng.choice(len(candidates), count, False))]
    return positives + negatives


def build_targets(sample: CocoSample, phrases: Sequence[str], size: int) -> PromptTargets:
    """Return per-phrase targets: masks resized to ``size`` x ``size`` and normalised boxes."""
    height, width = sample.image.shape[:2]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    all_masks = torch.from_numpy(sample.masks)
    masks, boxes = [], []
    for phrase in phrases:
        keep = sample.instances_for(phrase)
        if not keep:
            masks.append(torch.zeros(0, size, size))
            boxes.append(torch.zeros(0, 4))
            continue
        selected = all_masks[keep].float()[:, None]
        # 'area' keeps thin/small instances that nearest-neighbour subsampling can miss.
        resized = F.interpolate(selected, size=(size, size), mode='area')[:, 0]
        masks.append((resized >= 0.5).float())
        boxes.append(torch.from_numpy(sample.boxes[keep]).float() / scale)
    return PromptTargets(list(phrases), masks, boxes)


# ----------------------------------------------------------------------------- model io


def load_sam3(model_dir: str, image_size: Optional[int] = None,
              device: Optional[torch.device] = None) -> Tuple[Sam3Model, Sam3Processor]:
    """Load ``Sam3Model`` + ``Sam3Processor`` from a local directory, optionally resized.

    A different ``image_size`` (a multiple of the patch size) rebuilds the size-dependent
    RoPE tables; position embeddings are tiled by the model itself.
    """
    path = check_model_dir(model_dir, ['sam3', 'sam3_video'])
    config = Sam3Config.from_pretrained(path, local_files_only=True)
    if getattr(config, 'detector_config', None) is not None:
        config = config.detector_config
    processor = Sam3Processor.from_pretrained(path, local_files_only=True)
    if image_size is not None:
        patch = config.vision_config.backbone_config.patch_size
        if image_size % patch:
            raise ValueError(f'image_size {image_size} must be a multiple of the patch size '
                             f'{patch}')
        config.vision_config.backbone_config.image_size = int(image_size)
        processor.image_processor.size = {'height': int(image_size), 'width': int(image_size)}
        processor.target_size = int(image_size)
    model, info = Sam3Model.from_pretrained(path, config=config, local_files_only=True,
                                            output_loading_info=True)
    # transformers only logs missing tensors and initialises them at random; fine-tuning
    # would then save those random values as trained weights.
    check_loading_info(path, info, 'SAM3')
    size = config.vision_config.backbone_config.image_size
    processor_size = processor.image_processor.size
    if (processor_size['height'], processor_size['width']) != (size, size):
        raise ValueError(f'processor resizes to {processor_size} but the model expects {size}')
    if device is not None:
        model.to(device)
    return model, processor


# ----------------------------------------------------------------------------- trainer


class Sam3FineTuner:
    """Everything one SAM3 fine-tuning run needs: model, data, losses, evaluation, loop."""

    def __init__(self, cfg: Mapping[str, Any], output_dir: Optional[str] = None) -> None:
        common.check_config(cfg, CONFIG_SCHEMA)
        self.cfg = common.deep_copy_config(cfg)
        self.ecfg = self.cfg.get('eval') or {}
        # Checked before anything slow: a typo here used to surface only after training,
        # when best/ had never been written.
        self.metric, self.mode = _metric_and_mode(self.ecfg)
        dcfg = self.cfg.get('data') or {}
        if dcfg.get('root') is not None:
            # Every image and annotation is checked now, not at the step that first reads it
            # (a missing image used to stop the run there, and again on --resume).
            for ann in _ann_files(dcfg):
                check_dataset(dcfg['root'], ann)
        self.output_dir = Path(output_dir or self.cfg.get('output_dir', 'runs/sam3'))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.seed = int(self.cfg.get('seed', 0))
        if self.cfg.get('num_threads'):
            torch.set_num_threads(int(self.cfg['num_threads']))
        common.seed_everything(self.seed)
        self.device = common.training_device(self.cfg)
        mcfg = self.cfg.get('model', {})
        tcfg = self.cfg.get('train', {})
        self.tcfg = tcfg
        self.precision = str(self.cfg.get('precision', 'bf16'))
        model_dir = self._model_dir(mcfg)
        self.model, self.processor = load_sam3(model_dir, mcfg.get('image_size'), self.device)
        self.image_size = int(self.model.config.vision_config.backbone_config.image_size)
        fcfg = self.cfg.get('freeze', {})
        self.n_frozen, self.n_trainable = apply_sam3_freezing(
            self.model, str(fcfg.get('preset', 'detector')),
            int(fcfg.get('last_n_backbone_blocks', 0)),
            bool(fcfg.get('train_text_encoder', False)), fcfg.get('extra_patterns', []) or [])
        self.vision_frozen = module_is_frozen(self.model.vision_encoder)
        self.text_frozen = module_is_frozen(self.model.text_encoder)
        self.checkpointed_layers = 0
        if tcfg.get('activation_checkpointing', False):
            self.checkpointed_layers = enable_activation_checkpointing(self.model)
        self.cache_features = bool(tcfg.get('cache_frozen_features', True)) and self.vision_frozen
        self.cache_max_images = int(tcfg.get('cache_max_images', 256))
        self.cache_device = torch.device(str(tcfg.get('cache_device', 'cpu')))
        self._vision_cache: OrderedDict[Tuple[str, int], Tuple] = OrderedDict()
        self._text_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.dcfg = dcfg
        self.train_set, self.val_set = self._datasets(dcfg)
        self.secondary_prompts = bool(dcfg.get('secondary_phrases_as_prompts', True))
        self.all_phrases = sorted(set(self.train_set.vocabulary) | set(self.val_set.vocabulary))
        if not self.all_phrases:
            raise ValueError('the dataset has no noun phrases at all: nothing to prompt with')
        # Checked before the first step: the processor pads but never truncates, so a phrase
        # longer than the text encoder reads would stop the run at the first batch drawing
        # it, with an opaque 'activate truncation' error.
        check_phrase_tokens(self.processor.tokenizer, self.all_phrases,
                            int(self.model.config.text_config.max_position_embeddings))
        lcfg = self.cfg.get('loss', {})
        self.loss_weights = dict(LOSS_WEIGHTS)
        self.loss_weights.update({k: float(v) for k, v in (lcfg.get('weights') or {}).items()})
        self.focal_alpha = float(lcfg.get('focal_alpha', 0.25))
        self.focal_gamma = float(lcfg.get('focal_gamma', 2.0))
        self.mask_loss_size = int(lcfg.get('mask_loss_size') or self.image_size)
        matcher_cfg = dict(self.cfg.get('matcher') or {})
        # Which query answers for which instance: 'predictions' (official Hungarian matching
        # on the predicted class/boxes/masks) or 'anchors' (nearest reference box; see
        # training.matching.match_to_anchors). The rest of matcher: are cost weights.
        self.assign = str(matcher_cfg.pop('assign', 'predictions'))
        if self.assign not in ('predictions', 'anchors'):
            raise ValueError(f"matcher.assign must be 'predictions' or 'anchors', "
                             f'got {self.assign!r}')
        self.match_weights = MatchWeights(**matcher_cfg)
        # Earlier decoder layers predict no masks: they are matched on class + boxes only.
        self.box_match_weights = dataclasses.replace(self.match_weights, cost_mask=0.0,
                                                     cost_dice=0.0)
        self.aux_loss = bool(lcfg.get('aux_layers', False))
        # Dense supervision of the mask decoder's semantic head (the union of a prompt's
        # instances), as in SAM3's own recipe; off unless it has a weight.
        self.semantic_loss = float(self.loss_weights.get('loss_semantic', 0.0)) > 0.0
        # Classification loss of the matched queries: 'focal' (binary focal, alpha/gamma
        # above) or 'iabce' (the official SAM3 IoU-aware BCE); see _class_term.
        self.class_loss = str(lcfg.get('class_loss', 'focal'))
        if self.class_loss not in ('focal', 'iabce'):
            raise ValueError(f"loss.class_loss must be 'focal' or 'iabce', "
                             f'got {self.class_loss!r}')
        self.pos_weight = float(lcfg.get('pos_weight', 10.0))
        self.iabce_alpha = float(lcfg.get('iabce_alpha', 0.25))
        self._captured: Dict[str, torch.Tensor] = {}
        if self.aux_loss:
            self._hooks = [
                self.model.dot_product_scoring.register_forward_hook(self._capture('logits')),
                self.model.detr_decoder.box_head.register_forward_hook(self._capture('offsets'))]

    # -------------------------------------------------------------- setup helpers

    def _capture(self, name: str):
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # box_head also runs per layer inside the decoder on 3-D inputs; the model's
            # final call over all layers is the 4-D one (layers, batch, queries, 4).
            if output.dim() == 4:
                self._captured[name] = output
        return hook

    def _model_dir(self, mcfg: Mapping[str, Any]) -> str:
        if mcfg.get('pretrained_dir'):
            return str(mcfg['pretrained_dir'])
        tiny = mcfg.get('tiny')
        if tiny is None:
            raise ValueError("config 'model' needs 'pretrained_dir' (a local SAM3 directory) "
                             "or 'tiny' (build the tiny test architecture)")
        from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
        directory = self.output_dir / 'initial_tiny_model'
        kwargs = {k: v for k, v in dict(tiny).items() if k != 'seed'}
        save_tiny_sam3(directory, seed=int(tiny.get('seed', 0)), **kwargs)
        return str(directory)

    def _datasets(self, dcfg: Mapping[str, Any]) -> Tuple[CocoInstances, CocoInstances]:
        root = dcfg.get('root')
        synthetic = dcfg.get('synthetic')
        if root is None and synthetic is not None:
            root = str(self.output_dir / 'synthetic_data')
            write_synthetic_dataset(root, synthetic)
            # A cached dataset is reused as is: check it like a configured one.
            for ann in _ann_files(dcfg):
                check_dataset(root, ann)
        if root is None:
            raise ValueError("config 'data' needs 'root' (a COCO dataset folder) or 'synthetic'")
        train_ann, val_ann = _ann_files(dcfg)
        train = CocoInstances(root, train_ann)
        val = CocoInstances(root, val_ann)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f'need at least one train and one val image, got {len(train)} / '
                             f'{len(val)} (run python -m training.prepare_data --split ...)')
        return train, val

    # -------------------------------------------------------------- features

    def _pixel_values(self, image: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=image, return_tensors='pt')
        return inputs['pixel_values'].to(self.device)

    def vision_features(self, key: Tuple[str, int], image: np.ndarray) -> Sam3VisionEncoderOutput:
        """Return the (batch 1) vision features of an image, cached when the encoder is frozen."""
        if self.cache_features and key in self._vision_cache:
            self._vision_cache.move_to_end(key)
            hidden, pos = self._vision_cache[key]
            return Sam3VisionEncoderOutput(
                fpn_hidden_states=tuple(h.to(self.device, non_blocking=True) for h in hidden),
                fpn_position_encoding=tuple(p.to(self.device, non_blocking=True) for p in pos))
        pixel_values = self._pixel_values(image)
        with common.amp_context(self.device, self.precision):
            if self.vision_frozen:
                with torch.no_grad():
                    out = self.model.get_vision_features(pixel_values=pixel_values)
            else:
                out = self.model.get_vision_features(pixel_values=pixel_values)
        if self.cache_features:
            # Kept off the GPU: ~56 MB per image in bf16 at 1008 px.
            self._vision_cache[key] = (
                tuple(h.detach().to(self.cache_device) for h in out.fpn_hidden_states),
                tuple(p.detach().to(self.cache_device) for p in out.fpn_position_encoding))
            while len(self._vision_cache) > self.cache_max_images:
                self._vision_cache.popitem(last=False)
        return out

    def text_inputs(self, phrases: Sequence[str]) -> Tuple[Any, torch.Tensor]:
        """Return ``(text_embeds, attention_mask)`` for the phrases (frozen encoder cached)."""
        tokens = self.processor(text=list(phrases), return_tensors='pt')
        input_ids = tokens['input_ids'].to(self.device)
        attention_mask = tokens['attention_mask'].to(self.device)
        if self.text_frozen:
            missing = [i for i, p in enumerate(phrases) if p not in self._text_cache]
            if missing:
                with torch.no_grad():
                    hidden = self.model.text_encoder(
                        input_ids=input_ids[missing], attention_mask=attention_mask[missing],
                        return_dict=True).last_hidden_state
                for row, index in enumerate(missing):
                    self._text_cache[phrases[index]] = hidden[row].detach()
            hidden = torch.stack([self._text_cache[p] for p in phrases])
        else:
            hidden = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                             return_dict=True).last_hidden_state
        pooled = self.model.text_projection(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden,
                                          pooler_output=pooled), attention_mask

    def forward(self, key: Tuple[str, int], sample: CocoSample, phrases: Sequence[str]):
        """Run the detector on one image for all ``phrases`` (one batch row per phrase)."""
        vision = self.vision_features(key, sample.image)
        batch = len(phrases)
        expanded = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(h.expand(batch, *h.shape[1:])
                                    for h in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(batch, *p.shape[1:])
                                        for p in vision.fpn_position_encoding))
        text_embeds, attention_mask = self.text_inputs(phrases)
        with common.amp_context(self.device, self.precision):
            return self.model(vision_embeds=expanded, text_embeds=text_embeds,
                              attention_mask=attention_mask)

    # -------------------------------------------------------------- loss

    def _detection_terms(self, logits: torch.Tensor, boxes: torch.Tensor,
                         targets: PromptTargets, num_boxes: int,
                         masks: Optional[torch.Tensor] = None,
                         anchors: Optional[torch.Tensor] = None) -> Optional[Tuple]:
        """Match each positive prompt's queries; return ce/L1/GIoU (+ matched masks) or None.

        ``anchors`` (``(B, Q, 4)`` xyxy reference boxes) switch to anchor assignment.
        """
        device = logits.device
        weights = self.match_weights if masks is not None else self.box_match_weights
        ce_terms, src_boxes, tgt_boxes, src_masks, tgt_masks = [], [], [], [], []
        for row, (tmask, tbox) in enumerate(zip(targets.masks, targets.boxes, strict=True)):
            if tmask.shape[0] == 0:
                continue
            if anchors is not None:
                query_idx, target_idx = match_to_anchors(anchors[row], tbox)
            else:
                query_idx, target_idx = match_predictions(
                    logits[row], boxes[row], tbox, weights,
                    None if masks is None else masks[row], tmask)
            query_idx, target_idx = query_idx.to(device), target_idx.to(device)
            # Classification is only supervised for prompts with instances: on negative
            # prompts the presence head carries the "absent" signal (official SAM3 rule).
            ce_terms.append(self._class_term(logits[row], boxes[row], tbox, query_idx,
                                             target_idx))
            src_boxes.append(boxes[row][query_idx])
            tgt_boxes.append(tbox[target_idx])
            if masks is not None:
                src_masks.append(masks[row][query_idx])
                tgt_masks.append(tmask[target_idx])
        if not ce_terms:
            return None
        src_b, tgt_b = torch.cat(src_boxes), torch.cat(tgt_boxes)
        bbox = box_l1_loss(box_xyxy_to_cxcywh(src_b), box_xyxy_to_cxcywh(tgt_b),
                           reduction='sum') / num_boxes
        giou = giou_loss(src_b, tgt_b, reduction='sum') / num_boxes
        matched = (torch.cat(src_masks), torch.cat(tgt_masks)) if masks is not None else None
        return torch.stack(ce_terms).mean(), bbox, giou, matched

    def _class_term(self, logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor,
                    query_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Return one prompt's classification loss, averaged over its ``Q`` queries.

        ``focal``: binary focal loss, target 1 for the matched queries. ``iabce`` (official
        SAM3 ``IABCEMdetr``): matched queries get BCE against the soft target
        ``p ** alpha * IoU ** (1 - alpha)`` (``p`` their detached score, IoU of their box with
        the matched instance) weighted by ``pos_weight``; the others BCE against 0 scaled by
        ``p ** gamma``. Why it matters: with focal alpha 0.25 the few positives (1-4 of the
        queries) weigh ~60x less than in the official loss, and a tiny detector trained from
        scratch settles on one constant score for every query.
        """
        labels = torch.zeros_like(logits)
        labels[query_idx] = 1.0
        if self.class_loss == 'focal':
            return sigmoid_focal_loss(logits[None], labels[None], self.focal_alpha,
                                      self.focal_gamma, reduction='sum')
        prob = logits.sigmoid()
        with torch.no_grad():
            iou = box_iou(boxes[query_idx].float(), target_boxes[target_idx].float()).diagonal()
            soft = (prob[query_idx].float() ** self.iabce_alpha
                    * iou ** (1.0 - self.iabce_alpha)).clamp(min=0.01)
            targets = labels.clone()
            targets[query_idx] = soft.to(targets.dtype)
        # One BCE serves both: unmatched queries have target 0 in ``targets`` as well.
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
        weight = labels * self.pos_weight + (1 - labels) * prob ** self.focal_gamma
        return (bce * weight).mean()

    def decoder_layer_outputs(self, outputs: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Return ``(logits, xyxy boxes)`` of every DETR decoder layer (last = final output).

        ``Sam3Model`` computes them for all layers but returns only the last; the hooks on
        ``dot_product_scoring`` and ``box_head`` keep the rest for deep supervision.
        """
        logits_all = self._captured.get('logits')
        offsets = self._captured.get('offsets')
        reference = outputs.decoder_reference_boxes
        if logits_all is None or offsets is None or reference is None or reference.dim() != 4:
            raise RuntimeError('decoder-layer outputs were not captured: aux losses need the '
                               'dot_product_scoring and box_head hooks')
        boxes_all = box_cxcywh_to_xyxy((inverse_sigmoid(reference) + offsets).sigmoid())
        return [(logits_all[layer, ..., 0].float(), boxes_all[layer].float())
                for layer in range(reference.shape[0])]

    def compute_losses(self, outputs: Any, targets: PromptTargets) -> Dict[str, torch.Tensor]:
        """Return the unweighted loss terms for one image's prompts.

        With ``loss.aux_layers`` the class and box losses are also applied to every earlier
        DETR decoder layer, each matched separately (official SAM3 / DETR deep supervision).
        """
        logits = outputs.pred_logits.float()
        boxes = outputs.pred_boxes.float()
        masks = outputs.pred_masks.float()
        presence = outputs.presence_logits.float()
        num_boxes = max(1, sum(int(m.shape[0]) for m in targets.masks))
        # Move the targets once: every decoder layer is matched against them.
        targets = PromptTargets(targets.phrases, [m.to(logits.device) for m in targets.masks],
                                [b.to(logits.device) for b in targets.boxes])
        present = torch.tensor([[1.0 if p else 0.0] for p in targets.positive],
                               device=logits.device)
        terms = {'loss_presence': object_score_loss(presence, present)}
        if self.semantic_loss:
            terms['loss_semantic'] = self.semantic_term(outputs.semantic_seg, targets)
        zero = logits.sum() * 0.0
        names = ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_mask', 'loss_dice')
        if self.aux_loss:
            names += ('aux_ce', 'aux_bbox', 'aux_giou')
        anchors = None
        if self.assign == 'anchors':
            # Layer 0's reference boxes are the queries' own (learned) anchors.
            anchors = box_cxcywh_to_xyxy(outputs.decoder_reference_boxes[0].float()).detach()
        main = self._detection_terms(logits, boxes, targets, num_boxes, masks, anchors)
        if main is None:
            terms.update({name: zero for name in names})
            return terms
        terms['loss_ce'], terms['loss_bbox'], terms['loss_giou'], (src_m, tgt_m) = main
        if src_m.shape[-1] != tgt_m.shape[-1]:
            src_m = F.interpolate(src_m[:, None], size=tgt_m.shape[-2:], mode='bilinear',
                                  align_corners=False)[:, 0]
        terms['loss_mask'] = sigmoid_focal_loss(src_m, tgt_m, self.focal_alpha, self.focal_gamma,
                                                reduction='sum') / num_boxes
        terms['loss_dice'] = dice_loss(src_m, tgt_m, reduction='sum') / num_boxes
        if self.aux_loss:
            aux = [self._detection_terms(layer_logits, layer_boxes, targets, num_boxes,
                                         anchors=anchors)
                   for layer_logits, layer_boxes in self.decoder_layer_outputs(outputs)[:-1]]
            for index, name in enumerate(('aux_ce', 'aux_bbox', 'aux_giou')):
                terms[name] = sum((a[index] for a in aux if a is not None), zero)
        return terms

    @staticmethod
    def semantic_term(semantic_seg: torch.Tensor, targets: PromptTargets) -> torch.Tensor:
        """Return BCE + dice of each prompt's semantic map against its instances' union.

        Negative prompts have an empty union, so the head learns to stay off for them too.
        """
        size = targets.masks[0].shape[-2:]
        union = torch.stack([m.amax(0) if m.shape[0] else m.new_zeros(size)
                             for m in targets.masks])
        logits = semantic_seg.float()[:, 0]
        if logits.shape[-2:] != union.shape[-2:]:
            logits = F.interpolate(logits[:, None], size=union.shape[-2:], mode='bilinear',
                                   align_corners=False)[:, 0]
        return (F.binary_cross_entropy_with_logits(logits, union)
                + dice_loss(logits, union, reduction='mean'))

    def total_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the weighted sum of the loss terms."""
        return weighted_sum(terms, self.loss_weights)

    # -------------------------------------------------------------- data order

    def train_item(self, step: int, micro: int) -> Tuple[int, List[str]]:
        """Return ``(image index, phrases)`` for a micro-batch; a pure function of the step.

        Deriving the data order from ``(seed, step)`` instead of a running RNG makes a
        resumed run see exactly the images and negatives the uninterrupted run would.
        """
        accumulation = int(self.tcfg.get('grad_accumulation', 1))
        position = step * accumulation + micro
        usable = self.train_indices
        epoch, offset = divmod(position, len(usable))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(usable))
        index = usable[int(order[offset])]
        rng = np.random.default_rng([self.seed, position, 1])
        primary = [a['noun_phrase'] for a in self.train_set.annotations(index)]
        phrases = choose_phrases(
            primary, self.train_set.present_phrases(index), self.all_phrases,
            int(self.dcfg.get('negatives_per_image', 2)), self.dcfg.get('max_positive_phrases'),
            rng, self.train_set.absent_phrases(index), self.secondary_prompts,
            self.train_set.crowd_phrases(index))
        return index, phrases

    @functools.cached_property
    def train_indices(self) -> List[int]:
        """Return the training images that get at least one prompt, in dataset order.

        Every image, unless it has no instance and every phrase of the vocabulary may be
        in its crowd regions: it has neither a positive nor a safe negative.
        """
        usable = []
        for index in range(len(self.train_set)):
            present = self.train_set.present_phrases(index)
            ignored = set(self.train_set.crowd_phrases(index))
            if present or set(self.all_phrases) - ignored:
                usable.append(index)
        if not usable:
            raise ValueError('no training image has an instance or a phrase that is safe to '
                             'use as a negative (all are covered by crowd regions)')
        return usable

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, dataset: CocoInstances, phrase_filter: Optional[Set[str]] = None,
                 png_path: Optional[Path] = None) -> Dict[str, float]:
        """Return validation metrics: loss, instance P/R/F1 at mask IoU 0.5, presence accuracy.

        With ``phrase_filter`` only those phrases are prompted (present ones as positives,
        absent ones as negatives): the attribute-retention check.
        """
        was_training = self.model.training
        self.model.eval()
        threshold = float(self.ecfg.get('score_threshold', 0.5))
        mask_threshold = float(self.ecfg.get('mask_threshold', 0.5))
        num_negatives = int(self.ecfg.get('negatives_per_image', 2))
        max_images = self.ecfg.get('max_images')
        count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
        losses, tp, fp, fn, ious, presence_hits, prompts = [], 0, 0, 0, [], 0, 0
        png_rows: Tuple[list, list, list, list] = ([], [], [], [])
        for index in range(count):
            sample = dataset[index]
            if phrase_filter is not None:
                phrases = sorted(phrase_filter)
            else:
                rng = np.random.default_rng([self.seed, index, 2])
                phrases = choose_phrases(sample.noun_phrases, sample.present_phrases,
                                         self.all_phrases, num_negatives, None, rng,
                                         sample.absent_phrases, self.secondary_prompts,
                                         sample.ignored_phrases)
            if not phrases:
                continue
            targets = build_targets(sample, phrases, self.mask_loss_size)
            outputs = self.forward(('val', index) if phrase_filter is None else ('ret', index),
                                   sample, phrases)
            losses.append(float(self.total_loss(self.compute_losses(outputs, targets))))
            height, width = sample.image.shape[:2]
            results = self.processor.post_process_instance_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold,
                target_sizes=[(height, width)] * len(phrases))
            presence = outputs.presence_logits.float().sigmoid()[:, 0].cpu().numpy()
            for row, phrase in enumerate(phrases):
                truth = sample.masks_for(phrase)
                pred = results[row]['masks'].bool().cpu().numpy()
                prompts += 1
                presence_hits += int((presence[row] > 0.5) == (len(truth) > 0))
                crowd = sample.crowd_mask_for(phrase) if sample.ignored_phrases else None
                matched, ignored = _count_matches(pred, results[row]['scores'].cpu().numpy(),
                                                  truth, crowd)
                tp += len(matched)
                fp += len(pred) - len(matched) - ignored
                fn += len(truth) - len(matched)
                ious.extend(matched)
                if png_path is not None and len(truth) and len(png_rows[0]) < 4:
                    png_rows[0].append(sample.image)
                    png_rows[1].append(pred.any(0) if len(pred)
                                       else np.zeros((height, width), bool))
                    png_rows[2].append(truth.any(0))
                    png_rows[3].append(f'{phrase} (img {sample.image_id})')
        if png_path is not None and png_rows[0]:
            common.save_mask_comparison(png_path, png_rows[0], png_rows[1], png_rows[2],
                                        png_rows[3])
        if was_training:
            self.model.train()
        precision = tp / max(1, tp + fp)
        recall = tp / max(1, tp + fn)
        f1 = 2 * precision * recall / max(1e-9, precision + recall)
        return {'val_loss': float(np.mean(losses)) if losses else float('nan'),
                'precision': precision, 'recall': recall, 'f1': f1,
                'mean_iou': float(np.mean(ious)) if ious else 0.0,
                'presence_acc': presence_hits / max(1, prompts)}

    # -------------------------------------------------------------- training

    def _png_path(self, step: int) -> Path:
        return self.output_dir / 'eval' / f'step_{step:06d}.png'

    def _save(self, manager: common.CheckpointManager, optimizer, scheduler, stepper, step: int,
              metrics: Mapping[str, float], extra: Mapping[str, Any]) -> Dict[str, Path]:
        extra = dict(extra, **common.run_identity(self.run_id, self.cfg))
        saved = manager.save(self.model, optimizer, scheduler, step, metrics, extra, stepper)
        for path in saved.values():
            # The engines load model and processor from one directory.
            self.processor.save_pretrained(path)
        return saved

    def train(self, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
        """Run the training loop; return a summary (losses, metrics, checkpoint paths).

        A fresh run (no ``resume``) refuses an ``output_dir`` holding an earlier run unless
        ``overwrite``, which deletes that run's checkpoints, eval PNGs and TensorBoard logs.
        """
        # Before anything is written: a fresh run must neither compete with an earlier
        # run's best/ nor mix its PNGs and TensorBoard events with it.
        common.claim_output_dir(self.output_dir, resume, overwrite, config=self.cfg)
        self.run_id = common.new_run_id()  # a resumed run keeps its own (below)
        steps = common.train_steps(self.cfg, CONFIG_SCHEMA['train']['steps'])
        stop_at = int(self.tcfg.get('stop_at_step', 0)) or steps
        accumulation = int(self.tcfg.get('grad_accumulation', 1))
        ocfg = dict(self.cfg.get('optim', {'lr': 1e-4}))
        scfg = dict(self.cfg.get('schedule', {}))
        scfg.setdefault('total_steps', steps)
        optimizer = common.build_optimizer(self.model, ocfg)
        scheduler = common.build_scheduler(optimizer, scfg)
        stepper = common.GradientStepper(self.model, optimizer, scheduler, accumulation,
                                         self.tcfg.get('clip_grad_norm'), self.device,
                                         self.precision)
        manager = common.CheckpointManager(self.output_dir, self.metric, self.mode)
        logger = common.ScalarLogger(self.output_dir / 'tensorboard'
                                     if self.cfg.get('tensorboard', True) else None)
        retention = self.ecfg.get('retention_phrases') or []
        # Compared with the data's phrases, which are canonical (coco_data.canonical_phrase).
        retention_set = {canonical_phrase(str(p)) for p in retention}
        unknown = sorted(retention_set - set(self.all_phrases))
        if unknown:
            print(f'note: retention phrases {unknown} never occur in the data: they are '
                  'checked as negatives only', flush=True)
        start_step, history, before, retention_before = 0, [], None, None
        if resume:
            state = common.load_checkpoint(resume, self.model, optimizer, scheduler, stepper)
            start_step = state['step']
            extra = state['extra']
            history = list(extra.get('loss_history', []))
            before = extra.get('metrics_before')
            retention_before = extra.get('retention_before')
            self.run_id = extra.get(common.RUN_ID) or self.run_id
            print(f'resumed from {resume} at step {start_step}', flush=True)
        self._print_setup(steps, accumulation)
        if before is None:
            before = self.evaluate(self.val_set, png_path=self._png_path(0))
            if retention_set:
                retention_before = self.evaluate(self.val_set, retention_set)
            print('validation before training: ' + _format_metrics(before), flush=True)
            # The untouched model competes for best/: fine-tuning can only replace it by
            # beating it on the validation metric.
            self._save(manager, optimizer, scheduler, stepper, 0, before,
                       {'loss_history': [], 'metrics_before': before,
                        'retention_before': retention_before})
        eval_every = int(self.tcfg.get('eval_every', 0)) or steps
        save_every = int(self.tcfg.get('checkpoint_every', 0)) or eval_every
        log_every = int(self.tcfg.get('log_every', 10))
        self.model.train()
        bar = common.progress_bar(steps, 'sam3 fine-tune', initial=start_step)
        last_metrics: Dict[str, float] = dict(before)
        if resume and state['metrics'].get(self.metric) is not None:
            # The checkpoint's own evaluation: a resumed finished run reports it as "last".
            last_metrics = dict(state['metrics'])
        started = time.monotonic()
        for step in range(start_step, min(stop_at, steps)):
            step_terms: Dict[str, float] = {}
            step_loss = 0.0
            # The lr this step trains with: the stepper moves the schedule on after the update.
            step_lr = optimizer.param_groups[0]['lr']
            for micro in range(accumulation):
                index, phrases = self.train_item(step, micro)
                sample = self.train_set[index]
                targets = build_targets(sample, phrases, self.mask_loss_size)
                outputs = self.forward(('train', index), sample, phrases)
                terms = self.compute_losses(outputs, targets)
                loss = self.total_loss(terms)
                stepper.backward(loss)
                step_loss += float(loss.detach()) / accumulation
                for name, value in detach_terms(terms).items():
                    step_terms[name] = step_terms.get(name, 0.0) + value / accumulation
            history.append(step_loss)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f'{step_loss:.3f}')
            if done % log_every == 0 or done == steps:
                scalars = dict(step_terms, loss=step_loss, lr=step_lr)
                if stepper.last_grad_norm is not None:
                    scalars['grad_norm'] = stepper.last_grad_norm
                if self.device.type == 'cuda':
                    scalars['gpu_peak_gib'] = torch.cuda.max_memory_allocated(self.device) / 2**30
                logger.log(scalars, done, 'train')
            final = done == min(stop_at, steps)
            evaluated = done % eval_every == 0 or final
            if evaluated:
                last_metrics = self.evaluate(self.val_set, png_path=self._png_path(done))
                logger.log(last_metrics, done, 'val')
            # Every evaluation is saved (best/ can only take weights that were scored), and
            # a checkpoint between evaluations carries no metrics.
            if evaluated or done % save_every == 0:
                metrics = last_metrics if evaluated else {}
                self._save(manager, optimizer, scheduler, stepper, done, metrics,
                           {'loss_history': history, 'metrics_before': before,
                            'retention_before': retention_before})
        bar.close()
        logger.close()
        elapsed = time.monotonic() - started
        best_state = json.loads((manager.best_dir / common.TRAINER_STATE).read_text())
        best_metrics = best_state.get('metrics', {})
        print(f'trained {min(stop_at, steps) - start_step} step(s) in {elapsed:.1f} s',
              flush=True)
        print(_side_by_side(before, last_metrics, best_metrics, int(best_state['step'])),
              flush=True)
        summary: Dict[str, Any] = {
            'loss_history': history, 'metrics_before': before, 'metrics_last': last_metrics,
            'metrics_best': best_metrics, 'best_step': int(best_state['step']),
            'best_dir': str(manager.best_dir), 'last_dir': str(manager.last_dir)}
        if retention_set:
            retention_after = self.evaluate(self.val_set, retention_set)
            summary['retention_before'] = retention_before
            summary['retention_after'] = retention_after
            print(_retention_report(retention_before, retention_after,
                                    float(self.ecfg.get('retention_tolerance', 0.05))),
                  flush=True)
        window = int(self.tcfg.get('loss_window', max(1, min(10, len(history) // 5))))
        # One loss has no drop: 0, as the SAM2 trainer reports it (NaN made main() exit 1,
        # the status of a diverged run).
        summary['loss_drop_pct'] = (common.loss_drop_pct(history, window)
                                    if len(history) >= 2 else 0.0)
        return summary

    def _print_setup(self, steps: int, accumulation: int) -> None:
        total = self.n_frozen + self.n_trainable
        vision_state = ('trained' if all(p.requires_grad for p in
                                         self.model.vision_encoder.parameters())
                        else 'partly trained')
        num_prompts = (int(self.dcfg.get('max_positive_phrases') or 4)
                       + int(self.dcfg.get('negatives_per_image', 2)))
        memory = estimate_peak_memory(
            self.model, self.image_size, num_prompts, self.precision,
            self.checkpointed_layers > 0, self.mask_loss_size)
        print(f'SAM3 fine-tuning on {self.device}: {len(self.train_set)} train / '
              f'{len(self.val_set)} val images, {len(self.all_phrases)} noun phrases, '
              f'{steps} steps x {accumulation} image(s)', flush=True)
        print(f'trainable parameters: {self.n_trainable:,} of {total:,} '
              f"(preset {self.cfg.get('freeze', {}).get('preset', 'detector')}, text encoder "
              f"{'frozen' if self.text_frozen else 'trained'}, vision encoder "
              f"{'frozen' if self.vision_frozen else vision_state}"
              f"{', features cached' if self.cache_features else ''}"
              f'{f", activation checkpointing on {self.checkpointed_layers} layers" if self.checkpointed_layers else ""})',  # noqa: E501
              flush=True)
        detail = ', '.join(f'{k} {v:.2f}' for k, v in memory.items() if k != 'total')
        print(f"estimated GPU peak memory at {self.image_size} px, ~{num_prompts} prompts/image: "
              f"{memory['total']:.1f} GiB ({detail})", flush=True)


def _count_matches(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray,
                   crowd: Optional[np.ndarray] = None) -> Tuple[List[float], int]:
    """Greedily match predictions (by score) to truths at IoU >= 0.5.

    Returns the matched IoUs and how many unmatched predictions lie (at least half of
    their pixels) inside the ``crowd`` region: COCO ignores those instead of counting
    them as false positives.
    """
    unmatched = list(range(len(pred)))
    matched = []
    if len(pred) and len(truth):
        iou = mask_iou_matrix(list(pred), list(truth))
        used: Set[int] = set()
        for p in np.argsort(-scores, kind='stable'):
            candidates = [(iou[p, t], t) for t in range(len(truth)) if t not in used]
            if not candidates:
                break
            best, t = max(candidates)
            if best >= 0.5:
                used.add(t)
                matched.append(float(best))
                unmatched.remove(int(p))
    ignored = 0
    if crowd is not None and crowd.any():
        ignored = sum(mostly_inside(pred[p], crowd) for p in unmatched)
    return matched, ignored


def _metric_and_mode(ecfg: Mapping[str, Any]) -> Tuple[str, str]:
    """Return the validated ``eval.metric`` and ``eval.mode`` (min for val_loss, else max)."""
    metric = str(ecfg.get('metric') or 'f1')
    if metric not in EVAL_METRICS:
        raise ValueError(f"eval.metric '{metric}' is not a validation metric"
                         f'{common.did_you_mean(metric, EVAL_METRICS)}: use one of '
                         f'{list(EVAL_METRICS)}')
    mode = str(ecfg.get('mode') or ('min' if metric == 'val_loss' else 'max'))
    if mode not in ('min', 'max'):
        raise ValueError(f"eval.mode must be 'min' or 'max', got '{mode}'")
    return metric, mode


def _ann_files(dcfg: Mapping[str, Any]) -> Tuple[str, str]:
    """Return the configured train and val annotation files."""
    return (str(dcfg.get('train_ann') or 'annotations_train.json'),
            str(dcfg.get('val_ann') or 'annotations_val.json'))


def check_dataset(root: str, ann_file: str) -> None:
    """Validate a COCO annotation file and its images once, before training starts.

    The same checks as ``python -m training.prepare_data`` (image files and sizes,
    segmentations, phrases), without decoding images or masks; raises ValueError with
    the report, so a bad file fails now instead of at the step that first reads it.
    """
    report, _ = validate_dataset(str(root), ann_file)
    for kind, messages in report.warnings.items():
        print(f"warning: {len(messages)} {kind} in '{ann_file}': {messages[0]}", flush=True)
    if not report.ok:
        raise ValueError(
            f"dataset '{root}' ({ann_file}) failed validation:\n{report.summary()}\n"
            f'fix it, or drop the listed items with: python -m training.prepare_data {root} '
            f'--ann {ann_file} --drop-invalid')


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ', '.join(f'{k}={v:.4f}' for k, v in metrics.items())


def _side_by_side(before: Mapping[str, float], last: Mapping[str, float],
                  best: Mapping[str, float], best_step: int) -> str:
    rows = [f"{'metric':<14}{'before':>12}{'last':>12}{f'best@{best_step}':>14}"]
    for key in before:
        values = [before.get(key), last.get(key), best.get(key)]
        cells = ''.join(f'{v:>12.4f}' if v is not None else f"{'-':>12}" for v in values[:2])
        cells += f'{values[2]:>14.4f}' if values[2] is not None else f"{'-':>14}"
        rows.append(f'{key:<14}{cells}')
    if best_step == 0:
        rows.append('best checkpoint is the starting model: fine-tuning did not beat it on '
                    'the validation metric')
    return '\n'.join(rows)


def _retention_report(before: Mapping[str, float], after: Mapping[str, float],
                      tolerance: float) -> str:
    drop = before['f1'] - after['f1']
    presence_drop = before['presence_acc'] - after['presence_acc']
    verdict = ('OK' if max(drop, presence_drop) <= tolerance
               else 'WARNING: attribute phrases degraded')
    return (f"retention check on held-out phrases: f1 {before['f1']:.4f} -> {after['f1']:.4f}, "
            f"presence_acc {before['presence_acc']:.4f} -> {after['presence_acc']:.4f} "
            f'[{verdict}]')


def write_synthetic_dataset(root: str, spec: Mapping[str, Any]) -> None:
    """Write the seeded synthetic orchard dataset with a validated train/val split to ``root``.

    ``spec``: ``n_images``, ``seed``, ``val_fraction`` (default 0.25), ``min_area`` and
    ``scene`` (``OrchardSceneConfig`` fields, e.g. ``width``/``height``). Rewritten only when
    the spec changed, so reruns and resumed runs see the same data.
    """
    from sam_gap_ros.synthetic import write_coco_dataset
    from sam_gap_ros.synthetic.config import scene_config_from_mapping
    root_path = Path(root)
    marker = root_path / 'synthetic_spec.json'
    if marker.is_file() and json.loads(marker.read_text()) == _json_clean(spec):
        return
    write_coco_dataset(root_path, int(spec.get('n_images', 16)), seed=int(spec.get('seed', 0)),
                       config=scene_config_from_mapping(spec.get('scene')),
                       min_area=int(spec.get('min_area', 1)))
    report, data = validate_dataset(str(root_path))
    if not report.ok:
        raise ValueError('the synthetic dataset failed validation:\n' + report.summary())
    train, val = split_dataset(data, 1.0 - float(spec.get('val_fraction', 0.25)),
                               int(spec.get('seed', 0)))
    (root_path / 'annotations_train.json').write_text(json.dumps(train))
    (root_path / 'annotations_val.json').write_text(json.dumps(val))
    marker.write_text(json.dumps(_json_clean(spec)))


def _json_clean(value: Any) -> Any:
    return json.loads(json.dumps(value))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run fine-tuning from the command line; return the exit status."""
    parser = common.build_arg_parser('Fine-tune SAM3 on a COCO dataset with noun phrases.')
    args = parser.parse_args(argv)
    try:
        cfg = common.load_config(args.config, args.overrides, CONFIG_SCHEMA)
        _metric_and_mode(cfg.get('eval') or {})
        common.train_steps(cfg, CONFIG_SCHEMA['train']['steps'])
        # Checked before the model loads (minutes for the full SAM3); train() checks again.
        common.claim_output_dir(args.output_dir or cfg.get('output_dir', 'runs/sam3'),
                                args.resume, args.overwrite, config=cfg)
    except (OSError, KeyError, ValueError) as exc:
        parser.exit(2, f'error: {exc}\n')
    trainer = Sam3FineTuner(cfg, args.output_dir)
    summary = trainer.train(resume=args.resume, overwrite=args.overwrite)
    drop = summary['loss_drop_pct']
    print(f"loss_drop_pct={drop:.2f} checkpoint={summary['best_dir']}", flush=True)
    return 0 if math.isfinite(drop) else 1


if __name__ == '__main__':
    sys.exit(main())
