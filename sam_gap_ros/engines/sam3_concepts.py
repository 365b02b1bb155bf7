"""SAM3 open-vocabulary concept segmentation of single frames (ROS-free).

``Sam3ConceptEngine`` finds every instance of one or more text concepts in each RGB frame
with transformers' ``Sam3Model``. The work per frame is arranged around SAM3's cost
structure (in the full model the ViT backbone is ~450M parameters at 72x72 tokens, the
CLIP text encoder ~350M, the DETR detector + mask decoder ~30M):

* Text embeddings are computed when the concept set changes (one batched text-encoder
  call for the phrases not yet cached), never per frame.
* The vision backbone runs ONCE per frame; its features are broadcast (``expand``, no
  copy) over all base phrases, and the detector runs batched over the phrases.
* Only detections above ``score_threshold`` are upsampled to full resolution, with the
  processor's own post-processing, best first and only until a phrase has its
  ``max_instances`` non-empty masks. The phrases of compositional concepts are not capped
  in ``segment``: the set logic needs every instance (a ``green apple`` ranked below the
  cap must still exclude its apple, and an excluded apple must not take a slot).

Concepts are plain noun phrases or compositions of them (``apple but not green apple``,
``damaged apple near trunk``); see :mod:`sam_gap_ros.engines.concept_query` for the
grammar, the set logic and the duplicate rule (mask IoU > ``duplicate_iou`` across any two
results: the higher score wins). A detection whose mask is empty at full resolution is not
reported (it has no pixels to draw, track or position).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from transformers import Sam3Config, Sam3Model, Sam3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import (Sam3ImageSegmentationOutput,
                                                    Sam3VisionEncoderOutput)

from sam_gap_ros.engines.concept_query import (base_phrases, ConceptQuery, evaluate_query,
                                               parse_concepts, resolve_duplicates)
from sam_gap_ros.engines.loading import (check_loading_info, check_model_dir, resolve_device,
                                         resolve_dtype)
from sam_gap_ros.engines.tiny_sam3 import build_tiny_processor, tiny_sam3_config
from sam_gap_ros.engines.types import check_rgb_frame, ConceptError, Instance, ModelLoadError
from sam_gap_ros.mask_ops import mask_to_box

logger = logging.getLogger(__name__)

_MODEL_TYPES = ('sam3', 'sam3_video')
# The slow-tokenizer pair that stands in for tokenizer.json (the hub's facebook/sam3 has both).
_SLOW_TOKENIZER_FILES = ('vocab.json', 'merges.txt')
# Phrase embeddings kept beyond the active set, so switching back and forth between concept
# sets does not re-run the text encoder.
_TEXT_CACHE_SIZE = 64
# Queries upsampled at once when a phrase is not capped (bounds the float masks in memory).
_UPSAMPLE_CHUNK = 32


def check_phrase_tokens(tokenizer: Any, phrases: Sequence[str], max_tokens: int) -> None:
    """Raise ConceptError for a phrase longer than the text encoder reads."""
    # verbose=False: the tokenizer's own over-length warning would only repeat this error.
    for phrase, ids in zip(phrases, tokenizer(list(phrases), verbose=False)['input_ids'],
                           strict=True):
        if len(ids) > max_tokens:
            raise ConceptError(f"phrase '{phrase}' is {len(ids)} tokens long; the SAM3 text "
                               f'encoder reads at most {max_tokens} (including start/end)')


def _instance_limit(value: Any) -> int:
    """Return ``max_instances`` as an int >= 1; a fraction is refused, not truncated."""
    if isinstance(value, bool) or not float(value).is_integer() or value < 1:
        raise ValueError(f'max_instances must be a whole number >= 1, got {value!r}')
    return int(value)


def check_concepts_for_model(model_dir: Union[str, Path], concepts: Sequence[str]
                             ) -> List[str]:
    """Check ``concepts`` as ``set_concepts`` would, reading only a SAM3 directory's text files.

    For a caller that has not loaded the model (an unconfigured node): the grammar, and every
    phrase against the directory's tokenizer and text-encoder length. Returns the concepts in
    canonical form; raises ConceptError, or ModelLoadError when the directory has no usable
    config or tokenizer.
    """
    queries = parse_concepts(concepts)
    path = check_model_dir(model_dir, _MODEL_TYPES)
    try:
        tokenizer = Sam3Processor.from_pretrained(path, local_files_only=True).tokenizer
        config = Sam3Config.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # malformed JSON, unknown classes, missing fields
        raise ModelLoadError(f"'{path}' has no usable SAM3 config/tokenizer files: "
                             f'{exc}') from exc
    check_phrase_tokens(tokenizer, base_phrases(queries),
                        int(config.text_config.max_position_embeddings))
    return [q.text for q in queries]


class Sam3ConceptEngine:
    """Segment all instances of text concepts in RGB frames with SAM3 (ROS-free)."""

    def __init__(self, model: Sam3Model, processor: Sam3Processor,
                 device: Union[str, torch.device] = 'cpu',
                 dtype: Union[str, torch.dtype] = 'float32', *, score_threshold: float = 0.5,
                 max_instances: int = 100, mask_threshold: float = 0.5,
                 near_distance_px: float = 20.0, exclusion_iou: float = 0.5,
                 duplicate_iou: float = 0.7, phrase_batch_size: int = 8) -> None:
        """Wrap a loaded ``Sam3Model`` and its ``Sam3Processor``.

        ``mask_threshold`` is the mask probability a pixel needs to belong to an instance
        (0.5 as in transformers' post-processing; a model with under-confident masks may
        be calibrated lower). ``phrase_batch_size`` bounds how many phrases go through the
        detector at once (the mask decoder's activations grow with it); all share the one
        backbone pass. ``exclusion_iou`` must be in (0, 1] (at 0 an instance with no
        overlap at all would be excluded) and ``near_distance_px`` finite and >= 0.
        """
        if phrase_batch_size < 1:
            raise ValueError(f'phrase_batch_size must be >= 1, got {phrase_batch_size}')
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f'mask_threshold must be in (0, 1), got {mask_threshold}')
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f'score_threshold must be in [0, 1), got {score_threshold}')
        max_instances = _instance_limit(max_instances)
        if not 0.0 < exclusion_iou <= 1.0:
            raise ValueError(f'exclusion_iou must be in (0, 1], got {exclusion_iou}')
        if not 0.0 <= duplicate_iou <= 1.0:
            raise ValueError(f'duplicate_iou must be in [0, 1], got {duplicate_iou}')
        # Checked here: otherwise every frame of a 'near' concept would fail (a negative
        # distance in near_any, inf or NaN in the search crop of mask_distances).
        if not 0.0 <= near_distance_px < float('inf'):
            raise ValueError(f'near_distance_px must be finite and >= 0, got {near_distance_px}')
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._model = model.to(device=self._device, dtype=self._dtype).eval()
        self._processor = processor
        config = self._model.config
        size = config.vision_config.backbone_config.image_size
        processor_size = processor.image_processor.size
        if (processor_size['height'], processor_size['width']) != (size, size):
            raise ModelLoadError(f'the processor resizes to {processor_size["height"]}x'
                                 f'{processor_size["width"]} but the model expects {size}x{size}')
        self._image_size = int(size)
        self._max_text_tokens = int(config.text_config.max_position_embeddings)
        self.score_threshold = float(score_threshold)
        self.max_instances = int(max_instances)
        self.mask_threshold = float(mask_threshold)
        self.near_distance_px = float(near_distance_px)
        self.exclusion_iou = float(exclusion_iou)
        self.duplicate_iou = float(duplicate_iou)
        self.phrase_batch_size = int(phrase_batch_size)
        self._text_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        # (queries, phrases, stacked phrase features, stacked attention masks), swapped as one
        # tuple so a frame never sees half of a concept change.
        self._active: Tuple[List[ConceptQuery], List[str], Optional[torch.Tensor],
                            Optional[torch.Tensor]] = ([], [], None, None)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: Union[str, Path], device: Union[str, torch.device] = 'auto',
             dtype: Union[str, torch.dtype] = 'float32', **kwargs) -> Sam3ConceptEngine:
        """Load a local transformers SAM3 directory (no network); raise ModelLoadError.

        Accepts ``sam3`` and ``sam3_video`` (e.g. ``facebook/sam3``) directories; the
        directory must also hold the processor and tokenizer files (``tokenizer.json``, or
        ``vocab.json`` and ``merges.txt``, with as many tokens as the text encoder embeds).
        Weights that leave any model tensor unset (a partial or foreign checkpoint) are
        refused rather than run with random values.
        """
        path = check_model_dir(model_dir, _MODEL_TYPES)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        try:
            processor = Sam3Processor.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # malformed JSON, unknown classes, missing fields
            raise ModelLoadError(f"'{path}' has no usable SAM3 processor/tokenizer files "
                                 f'(processor_config.json, tokenizer.json): {exc}') from exc
        # Without these files transformers still builds a CLIPTokenizer, with a 2-token
        # vocabulary that maps every word to the unknown token: all concepts would embed
        # alike and find nothing.
        if not ((path / 'tokenizer.json').is_file()
                or all((path / name).is_file() for name in _SLOW_TOKENIZER_FILES)):
            raise ModelLoadError(
                f"'{path}' has no tokenizer: it needs tokenizer.json (or vocab.json and "
                'merges.txt); copy them from the checkpoint the weights came from')
        try:
            model, info = Sam3Model.from_pretrained(path, local_files_only=True,
                                                    dtype=torch_dtype, output_loading_info=True)
        except Exception as exc:  # safetensors/torch raise many types; report them all alike
            raise ModelLoadError(f"could not load a SAM3 model from '{path}': {exc}") from exc
        check_loading_info(path, info, 'SAM3')
        # A tokenizer of another model would index the wrong (or no) embedding rows. Not an
        # exact comparison: a checkpoint may pad its embedding table beyond the tokenizer
        # (for faster matmuls); more tokens than rows, or a fraction of them, is wrong.
        vocab_size = model.config.text_config.vocab_size
        if not vocab_size // 2 <= len(processor.tokenizer) <= vocab_size:
            raise ModelLoadError(
                f"the tokenizer in '{path}' has {len(processor.tokenizer)} tokens but the text "
                f'encoder of the model embeds {vocab_size}: its tokenizer files belong to '
                'another model; copy the ones saved with these weights')
        return cls(model, processor, torch_device, torch_dtype, **kwargs)

    @classmethod
    def from_config(cls, config: Optional[Sam3Config] = None,
                    processor: Optional[Sam3Processor] = None,
                    device: Union[str, torch.device] = 'cpu',
                    dtype: Union[str, torch.dtype] = 'float32', seed: int = 0,
                    **kwargs) -> Sam3ConceptEngine:
        """Build an engine with random weights (default: the tiny test architecture)."""
        config = config if config is not None else tiny_sam3_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Sam3Model(config)
        if processor is None:
            processor = build_tiny_processor(config.vision_config.backbone_config.image_size)
        return cls(model, processor, device, dtype, **kwargs)

    # -- properties -------------------------------------------------------------------------
    @property
    def model(self) -> Sam3Model:
        """Return the wrapped ``Sam3Model``."""
        return self._model

    @property
    def processor(self) -> Sam3Processor:
        """Return the ``Sam3Processor``."""
        return self._processor

    @property
    def device(self) -> torch.device:
        """Return the device the model runs on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Return the model's floating-point dtype."""
        return self._dtype

    @property
    def image_size(self) -> int:
        """Return the square side the processor resizes frames to."""
        return self._image_size

    @property
    def concepts(self) -> List[str]:
        """Return the active concepts in canonical form."""
        return [q.text for q in self._active[0]]

    @property
    def queries(self) -> List[ConceptQuery]:
        """Return the active parsed concept queries."""
        return list(self._active[0])

    @property
    def phrases(self) -> List[str]:
        """Return the base phrases the detector runs on each frame."""
        return list(self._active[1])

    # -- concepts ---------------------------------------------------------------------------
    def set_concepts(self, concepts: Sequence[str]) -> List[str]:
        """Replace the concept set and return it in canonical form.

        Invalid input raises ConceptError and leaves the previous concepts active. Text
        embeddings of phrases not yet cached are computed here, in one text-encoder call.
        """
        queries = parse_concepts(concepts)
        phrases = base_phrases(queries)
        missing = [p for p in phrases if p not in self._text_cache]
        if missing:
            self._text_cache.update(self._encode(missing))
        features = torch.stack([self._text_cache[p][0] for p in phrases])
        masks = torch.stack([self._text_cache[p][1] for p in phrases])
        self._active = (queries, phrases, features, masks)
        self._trim_text_cache(phrases)
        logger.debug('concepts %s use phrases %s (%d newly encoded)',
                     [q.text for q in queries], phrases, len(missing))
        return [q.text for q in queries]

    def _encode(self, phrases: List[str]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Run the text encoder once over ``phrases``; return per-phrase features and masks."""
        # Checked before the processor call: it pads to the CLIP context but never truncates,
        # so an over-long phrase would fail there with an opaque ragged-tensor error.
        check_phrase_tokens(self._processor.tokenizer, phrases, self._max_text_tokens)
        tokens = self._processor(text=phrases, return_tensors='pt')
        input_ids = tokens['input_ids'].to(self._device)
        attention_mask = tokens['attention_mask'].to(self._device)
        with torch.inference_mode():
            features = self._model.get_text_features(input_ids=input_ids,
                                                     attention_mask=attention_mask).pooler_output
        return {p: (features[i], attention_mask[i]) for i, p in enumerate(phrases)}

    def _trim_text_cache(self, active: Sequence[str]) -> None:
        excess = len(self._text_cache) - _TEXT_CACHE_SIZE
        if excess <= 0:
            return
        # Dicts keep insertion order: drop the oldest phrases that are not active.
        stale = [p for p in self._text_cache if p not in set(active)][:excess]
        for phrase in stale:
            del self._text_cache[phrase]

    # -- inference --------------------------------------------------------------------------
    def segment(self, frame: np.ndarray, score_threshold: Optional[float] = None,
                max_instances: Optional[int] = None) -> List[Instance]:
        """Return all instances of the active concepts in an RGB uint8 ``(H, W, 3)`` frame.

        Instances have full-resolution boolean masks, tight mask boxes, scores in [0, 1]
        (> ``score_threshold``) and their concept's canonical text; duplicates are resolved
        and at most ``max_instances`` are returned, best score first.
        """
        queries, detections, limit = self._detect(frame, score_threshold, max_instances,
                                                  cap_composed=False)
        found: List[Instance] = []
        for query in queries:
            found += evaluate_query(query, detections, exclusion_iou=self.exclusion_iou,
                                    near_distance_px=self.near_distance_px)
        return resolve_duplicates(found, self.duplicate_iou)[:limit]

    def detect(self, frame: np.ndarray, score_threshold: Optional[float] = None,
               max_instances: Optional[int] = None) -> Dict[str, List[Instance]]:
        """Return the raw detections of every base phrase (before set logic and de-duplication).

        Each phrase keeps its ``max_instances`` best detections above ``score_threshold``
        (queries whose mask is empty at full resolution do not count).
        """
        return self._detect(frame, score_threshold, max_instances)[1]

    def _detect(self, frame: np.ndarray, score_threshold: Optional[float],
                max_instances: Optional[int], cap_composed: bool = True
                ) -> Tuple[List[ConceptQuery], Dict[str, List[Instance]], int]:
        """Run one backbone pass and the batched detector over the active phrases.

        ``cap_composed=False`` keeps every detection of the phrases that compositional
        queries use (their set logic runs before the cap).
        """
        check_rgb_frame(frame)
        threshold = self.score_threshold if score_threshold is None else float(score_threshold)
        limit = _instance_limit(self.max_instances if max_instances is None else max_instances)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f'score_threshold must be in [0, 1), got {threshold}')
        queries, phrases, features, masks = self._active
        if not queries:
            raise ConceptError('no concepts set: call set_concepts() first')
        uncapped = set() if cap_composed else {
            p for q in queries if not q.is_plain for p in q.phrases}
        height, width = frame.shape[:2]
        detections: Dict[str, List[Instance]] = {}
        with torch.inference_mode():
            # Contiguous: torch cannot wrap negative strides (a BGR->RGB ``[..., ::-1]`` view).
            # channels_last: the processor would guess, and read a frame 1 or 3 px high as
            # channels-first.
            pixel_values = self._processor.image_processor(
                images=np.ascontiguousarray(frame), input_data_format='channels_last',
                return_tensors='pt')['pixel_values'].to(self._device, self._dtype)
            vision = self._model.get_vision_features(pixel_values=pixel_values)
            for start in range(0, len(phrases), self.phrase_batch_size):
                stop = min(start + self.phrase_batch_size, len(phrases))
                outputs = self._detector(vision, features[start:stop], masks[start:stop])
                for row, phrase in enumerate(phrases[start:stop]):
                    detections[phrase] = self._instances(
                        outputs, row, phrase, (height, width), threshold,
                        None if phrase in uncapped else limit)
        return queries, detections, limit

    def _detector(self, vision: Sam3VisionEncoderOutput, features: torch.Tensor,
                  masks: torch.Tensor) -> Sam3ImageSegmentationOutput:
        """Run SAM3's detector for a batch of phrases on one image's (broadcast) features."""
        batch = features.shape[0]
        shared = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(h.expand(batch, -1, -1, -1) for h in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(batch, -1, -1, -1)
                                        for p in vision.fpn_position_encoding))
        return self._model(vision_embeds=shared,
                           text_embeds=BaseModelOutputWithPooling(pooler_output=features),
                           attention_mask=masks)

    def _instances(self, outputs: Sam3ImageSegmentationOutput, row: int, phrase: str,
                   size: Tuple[int, int], threshold: float, limit: Optional[int]
                   ) -> List[Instance]:
        """Turn one phrase's raw outputs into full-resolution instances (``limit``: None all)."""
        # Same score as the processor (query probability x presence probability); computed
        # here only to pick the queries worth upsampling to full resolution.
        scores = outputs.pred_logits[row].sigmoid() * outputs.presence_logits[row].sigmoid()
        keep = torch.nonzero(scores > threshold).flatten()
        keep = keep[scores[keep].argsort(descending=True)]
        instances: List[Instance] = []
        # Best first, in chunks: usually the first ``limit`` fill the quota, but a query
        # whose mask is empty at full resolution is not reported and must not take a slot
        # from the next one.
        start = 0
        while start < keep.numel() and (limit is None or len(instances) < limit):
            count = _UPSAMPLE_CHUNK if limit is None else limit - len(instances)
            part, start = keep[start:start + count], start + count
            selected = Sam3ImageSegmentationOutput(
                pred_logits=outputs.pred_logits[row:row + 1, part],
                pred_boxes=outputs.pred_boxes[row:row + 1, part],
                pred_masks=outputs.pred_masks[row:row + 1, part],
                presence_logits=outputs.presence_logits[row:row + 1])
            result = self._processor.post_process_instance_segmentation(
                selected, threshold=threshold, mask_threshold=self.mask_threshold,
                target_sizes=[size])[0]
            for mask, score in zip(result['masks'].bool().cpu().numpy(),
                                   result['scores'].float().cpu().tolist(), strict=True):
                area = int(np.count_nonzero(mask))
                if area:
                    instances.append(Instance(mask=mask, box=mask_to_box(mask),
                                              score=float(score), concept=phrase, area=area))
        return instances


__all__ = ['check_concepts_for_model', 'check_phrase_tokens', 'Sam3ConceptEngine']
