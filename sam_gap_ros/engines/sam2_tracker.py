"""SAM2 streaming tracker: endless camera streams with a bounded memory bank.

Built on transformers' ``Sam2VideoModel`` and its streaming ``Sam2VideoInferenceSession``
(the session is created with ``processor.init_video_session`` without a video, and each
frame is added with an explicit frame index). The per-frame step reuses the model's own
memory-selection, memory-attention, SAM-head and memory-encoder code, with four changes
that an endless robot stream needs:

* All tracked objects that share a memory layout run through memory attention and the
  SAM head as ONE batch (transformers and the official ``sam2`` loop over objects).
* Objects can be added at any frame without touching the memory of the others; a new
  object's prompt memory is encoded on its own, so existing tracks continue bit for bit.
* Objects judged absent (object-score logit <= 0) are reported with ``present=False`` and
  an all-False mask, and that frame is NOT written into their memory bank.
* After every frame the session is pruned to what the next frame, or a re-prompt on the
  current one, can read: the current frame, the conditioning (prompted) frames, the mask
  memories of the last ``num_maskmem`` frames and the object pointers of the last
  ``max_object_pointers_in_encoder`` frames (pointer-only entries, a few hundred bytes
  each); at most ``max_conditioning_frames`` prompted frames are kept per object.
  Nothing grows with stream length.

A box prompt also bounds its object on that frame: the mask (output and the memory the
object starts from) is cut to the box grown by ``box_mask_margin`` of its size per side.
SAM2 itself does not cut, and a small decoder lets the first mask spill onto a touching
fruit of the same colour, which the track then follows as part of the object (on the tiny
orchard model: box-prompted mIoU 0.58 -> 0.68, docs/tiny_models.md). ``None`` keeps
SAM2's rule.

The camera's image motion (``scene_motion``: phase correlation between consecutive model
inputs) is used twice. ``motion_compensation`` moves each object's prompted-frame memory,
which stays in the bank for the whole track, by the motion since its frame, so it lines
up with the current view instead of pulling the mask back to where the fruit was. The
motion gate (``motion_gate_margin``) cuts each tracked mask to the object's last box moved
by that motion and grown by the margin; a mask with less than half of its pixels inside
has jumped to another fruit or spread over the view, and the object is reported absent
(not memorised) until a mask shows up in the moving box again. On the tiny orchard model:
track mIoU 0.54 -> 0.63 with weights trained on SAM2's fixed memory (0.67 with weights
trained on the moved one, ``finetune_sam2`` ``train.motion_compensation``), and apples
that left reported absent on all frames instead of none. ``False`` / ``None`` keep SAM2's
rules.

The decoder predicts masks on a grid 4x coarser than the model input, so upsampled masks
have blocky borders; ``mask_refine_radius`` (``mask_refinement``: a colour guided filter
with a window of that many grid cells) snaps the published masks and the memorised ones
onto the frame's colour edges. Tiny orchard model: track mIoU 0.670 -> 0.703, prompted
frames 0.692 -> 0.715. ``None`` / 0 keep SAM2's bilinear masks.

A new object's first box or point prompt is also decoded on the frame mirrored left-right
(``prompt_mirror_union``), and its mask is the union of both (per-pixel maximum of the
logits). A small decoder finds the lit side of a fruit better than its shaded side; in
the mirror image the light comes from the other side, so the two passes miss different
parts. The first mask matters for the whole track, which reads it from memory on every
frame. It costs one extra image-encoder pass on a frame with a new box/point prompt,
nothing on other frames. Tiny orchard model: prompted frames 0.715 -> 0.782, track mIoU
0.703 -> 0.752 (docs/tiny_models.md). ``False`` keeps SAM2's single pass.

Each prompted object may be re-prompted later (``object_ids=[existing id]``): that adds a
conditioning frame, or, with ``replace_conditioning=True``, replaces the object's earlier
ones (re-anchoring on a fresh mask when the old prompts no longer describe the view).
Assigned IDs count up from 1 and are not reused (not even after ``reset``) until 65535
have been handed out; they are mono16 label values, so they then start again at 1,
skipping IDs still live (``mask_ops.next_label_id``).
Absent objects keep ``score`` (the logit) and get ``box=None``, ``area=0``. On CUDA
with ``dtype='bfloat16'``/``'float16'`` the model runs in that dtype under autocast;
on CPU everything is float32 (deterministic for a fixed seed).

Prompt timing (``add_objects(frame_index=...)``): exactly two frames accept prompts,

* the latest tracked frame ``frame_index`` (the default): the prompt is applied at once
  on that frame's cached features, and ``last_result`` is updated so the new object
  appears in the current result;
* the next frame ``frame_index + 1``: the prompt waits and is applied when that frame is
  passed to ``track``. An object has at most one waiting prompt: a later prompt for it,
  on either frame, replaces the waiting one.

Older frames have been dropped from the session (bounded memory) and later frames do not
exist yet, so both raise ``PromptError``. Prompts need the image size, so at least one
frame must have been tracked first (``track`` with no objects only stores the frame).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam2VideoConfig, Sam2VideoModel, Sam2VideoProcessor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.sam2 import modeling_sam2
from transformers.models.sam2_video import modeling_sam2_video

from sam_gap_ros.engines.loading import (check_loading_info, check_model_dir, resolve_device,
                                         resolve_dtype)
from sam_gap_ros.engines.mask_refinement import refine_probabilities, refinement_radius
from sam_gap_ros.engines.scene_motion import (gate_to_moved_boxes, inside_boxes, logits_boxes,
                                              moved_box, SceneMotion, shift_memory)
from sam_gap_ros.engines.tiny_sam2 import build_sam2_video_processor
from sam_gap_ros.engines.types import (check_rgb_frame, ModelLoadError, PromptError,
                                       TrackedObject, TrackResult)
from sam_gap_ros.mask_ops import mask_to_box, MAX_LABEL_ID, next_label_id

logger = logging.getLogger(__name__)

_MODEL_TYPES = ('sam2_video',)
_PROCESSOR_FILES = ('processor_config.json', 'preprocessor_config.json',
                    'video_preprocessor_config.json')
# Value transformers writes into the mask logits of objects judged absent.
_NO_OBJ_SCORE = -1024.0
# Share of a tracked mask that must lie in its motion-gate box for the object to count as
# still there (below: it jumped to another fruit or spread over the view).
_GATE_MIN_KEPT = 0.5
# Per-frame output entries the next frames read; masks are converted to numpy at once and
# every other entry (high-res logits, multimask logits) is dropped before storing.
_KEPT_OUTPUT_KEYS = ('object_pointer', 'object_score_logits', 'maskmem_features',
                     'maskmem_pos_enc')

ArrayLike = Union[np.ndarray, Sequence]


class _HieraAttention(modeling_sam2.Sam2MultiScaleAttention):
    """Hiera attention without transformers' unused explicit attention matrix.

    ``Sam2MultiScaleAttention.forward`` (transformers 5.24) computes a scaled
    ``query @ key`` product and its softmax, then discards them and calls the fused
    attention kernel; dropping that dead work makes the image encoder about 7% faster on
    CPU with bit-identical outputs (checked by test_sam2_tracker).
    """

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(hidden_states), **kwargs))

    def attend(self, qkv: torch.Tensor, **kwargs) -> torch.Tensor:
        """Return the attention output (before ``proj``) of projected ``(B, H, W, 3C)`` qkv."""
        batch_size, height, width, _ = qkv.shape
        qkv = qkv.reshape(batch_size, height * width, 3, self.num_attention_heads, -1)
        query, key, value = torch.unbind(qkv, 2)
        if self.query_stride:
            query = modeling_sam2.do_pool(
                query.reshape(batch_size, height, width, -1), self.query_stride)
            height, width = query.shape[1:3]
            query = query.reshape(batch_size, height * width, self.num_attention_heads, -1)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_sam2.eager_attention_forward)
        output, _ = attention(self, query.transpose(1, 2), key.transpose(1, 2),
                              value.transpose(1, 2), attention_mask=None,
                              is_causal=self.is_causal, scaling=self.scale, **kwargs)
        return output.reshape(batch_size, height, width, -1)


class _UnpaddedWindowHieraBlock(modeling_sam2.Sam2MultiScaleBlock):
    """Hiera block that runs its linear layers on the real tokens only, not on the padding.

    A windowed block pads its feature map to a multiple of the window size (hiera-tiny's
    14 x 14 windows on a 64 x 64 map at 1024 px, on a 16 x 16 map at 256 px) and then runs
    the ``qkv`` and ``proj`` linears on every padded token, although padding is zeros
    after the first layer norm, whose ``qkv`` rows are just the bias, and the padded
    outputs are cropped away. Here ``qkv`` runs on the real tokens and the padding gets the
    bias (where padding is at least ``_QKV_UNPADDED_FROM`` of the map); ``proj`` runs after
    the crop. Attention still sees the same padded windows, so the outputs are those of
    transformers (and of the official code): bit-identical in test_sam2_tracker. Measured
    on one CPU thread, hiera-tiny's image encoder: 11.5 % faster at 256 px, 4 % at 512 px,
    within noise at 1024 px. Blocks without padding, with query pooling or with a channel
    change run transformers' forward.
    """

    # Computing qkv before partitioning moves 3x the channels through the padding and
    # window copies; measured on CPU it pays off from 1.5x padded tokens (hiera-tiny: 3.1x
    # at 256 px, 1.7x at 512 px, 1.2x at 1024 px, where only ``proj`` skips the padding).
    _QKV_UNPADDED_FROM = 1.5

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        window = self.window_size
        batch, height, width, _ = hidden_states.shape
        if (window == 0 or self.query_stride or self.dim != self.dim_out
                or not (height % window or width % window)):
            return super().forward(hidden_states, **kwargs)
        attn = self.attn
        normed = self.layer_norm1(hidden_states)
        padded_hw = (height + (-height) % window, width + (-width) % window)
        if padded_hw[0] * padded_hw[1] >= self._QKV_UNPADDED_FROM * height * width:
            qkv = attn.qkv(normed)
            if attn.qkv.bias is None:
                padded = qkv.new_zeros(batch, *padded_hw, qkv.shape[-1])
            else:
                # In qkv's dtype: under autocast the linear's output is half precision.
                padded = attn.qkv.bias.to(qkv.dtype).expand(batch, *padded_hw, -1).clone()
            padded[:, :height, :width] = qkv
            windows, _ = modeling_sam2.window_partition(padded, window)
        else:
            windows = attn.qkv(modeling_sam2.window_partition(normed, window)[0])
        # attn is a _HieraAttention: use_inference_modules swaps both classes together.
        output = modeling_sam2.window_unpartition(attn.attend(windows, **kwargs), window,
                                                  padded_hw, (height, width))
        hidden_states = hidden_states + attn.proj(output)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class _StaticPosEmbedHiera(modeling_sam2.Sam2HieraDetModel):
    """Hiera backbone that interpolates its position embedding once per input size.

    transformers (5.24) resizes the learned embedding with a bicubic interpolation on
    every frame although it depends only on the weights and the (fixed) input size; that
    is about 0.5-1.5% of a hiera-tiny frame on CPU. The cache key holds the parameters'
    version counters, so an in-place weight update recomputes it. Inference tensors (a
    model built or loaded inside ``torch.inference_mode``) have no version counter and can
    still be overwritten in place there, so for them nothing is cached.
    """

    def _get_pos_embed(self, hw: Tuple[int, int]) -> torch.Tensor:
        if self.pos_embed.is_inference() or self.pos_embed_window.is_inference():
            return super()._get_pos_embed(hw)
        key = (tuple(int(x) for x in hw), self.pos_embed.device, self.pos_embed.dtype,
               self.pos_embed._version, self.pos_embed_window._version)
        cached = self.__dict__.get('_pos_embed_cache')
        if cached is None or cached[0] != key:
            cached = (key, super()._get_pos_embed(hw))
            self.__dict__['_pos_embed_cache'] = cached
        return cached[1]


class _StaticSinePositionEmbedding(modeling_sam2.Sam2SinePositionEmbedding):
    """Sine position embedding of the vision neck, cached per feature-map shape.

    transformers memoises it with ``lru_cache(maxsize=1)`` but calls it for every FPN
    level in turn, so each call evicts the previous shape and every frame recomputes all
    of them (the sin/cos/cat work is about 1% of a hiera-tiny frame on CPU). The
    embedding has no weights: it depends only on shape, device and dtype.
    """

    _MAX_SHAPES = 8

    def forward(self, shape: torch.Size, device, dtype: torch.dtype,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            return super().forward(shape, device, dtype, mask)
        cache = self.__dict__.setdefault('_shape_cache', {})
        key = (tuple(shape), str(device), dtype)
        if key not in cache:
            if len(cache) >= self._MAX_SHAPES:
                cache.clear()
            cache[key] = super().forward(shape, device, dtype)
        return cache[key]


def _rotary_2d(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               repeat_freqs_k: bool, num_k_exclude_rope: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``apply_rotary_pos_emb_2d`` of transformers as one complex multiplication.

    transformers rotates pairs as ``x * cos + rotate_pairwise(x) * sin`` (negation, stack,
    two products and a sum, each a full-size temporary) and materialises ``cos``/``sin``
    repeated over every memory frame; for the memory keys (memory frames x tokens) that is
    most of the element-wise work of the memory attention. The pair ``(x0, x1)`` rotated by
    angle ``a`` is the complex product ``(x0 + i x1) * (cos a + i sin a)``, as the
    official SAM2 code computes it: the same products and sums (bit-identical on our CPUs,
    checked by test_sam2_tracker), one pass, with the frequencies broadcast over frames.
    ONNX has no complex type: an exporter of the memory attention must trace transformers'
    own module, not this inference swap.
    """
    freqs = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    pairs = query.float().reshape(*query.shape[:-1], -1, 2)
    q_embed = torch.view_as_real(torch.view_as_complex(pairs) * freqs).flatten(-2)
    rotated = key.shape[-2] - num_k_exclude_rope
    if rotated == 0:
        return q_embed.type_as(query), key
    k_rot = key[..., :rotated, :].float()
    if repeat_freqs_k and rotated != query.shape[-2]:
        frames = rotated // query.shape[-2]
        k_rot = k_rot.reshape(*k_rot.shape[:-2], frames, query.shape[-2], k_rot.shape[-1])
        freqs = freqs.unsqueeze(-3)
    k_pairs = torch.view_as_complex(k_rot.reshape(*k_rot.shape[:-1], -1, 2))
    k_embed = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    k_embed[..., :rotated, :] = torch.view_as_real(k_pairs * freqs).reshape(
        *key.shape[:-2], rotated, key.shape[-1])
    k_embed[..., rotated:, :] = key[..., rotated:, :]
    return q_embed.type_as(query), k_embed


class _RoPEAttention(modeling_sam2_video.Sam2VideoRoPEAttention):
    """RoPE attention of the memory attention with ``_rotary_2d`` (same result, less memory)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                num_k_exclude_rope: int = 0, **kwargs):
        if self.training:
            return super().forward(query, key, value, position_embeddings,
                                   num_k_exclude_rope, **kwargs)
        batch_size, point_batch_size = query.shape[:2]
        new_shape = (batch_size * point_batch_size, -1, self.num_attention_heads, self.head_dim)
        query = self.q_proj(query).view(*new_shape).transpose(1, 2)
        key = self.k_proj(key).view(*new_shape).transpose(1, 2)
        value = self.v_proj(value).view(*new_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = _rotary_2d(query, key, cos, sin, self.rope_k_repeat, num_k_exclude_rope)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_sam2_video.eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask=None, dropout=0.0,
                                    scaling=self.scaling, is_causal=self.is_causal, **kwargs)
        output = output.reshape(batch_size, point_batch_size, -1,
                                self.num_attention_heads * self.head_dim).contiguous()
        return self.o_proj(output), weights


class _ChunkedFeedForwardMemoryLayer(modeling_sam2_video.Sam2VideoMemoryAttentionLayer):
    """Memory-attention layer whose feed-forward block runs in token chunks at inference.

    The FFN is token-wise (LayerNorm, Linear 256->2048, ReLU, Linear, residual), so rows
    can go in chunks with the same result. Why: batched over objects, or at 1024 px, its
    hidden activation is 33 MB per object (168 MB for 20 objects at 512 px); such blocks are
    above glibc's largest mmap threshold, so every frame maps fresh pages and page-faults
    them in, and the ReLU and residual then stream them through memory. Chunks of
    ``_CHUNK_ELEMENTS`` hidden values stay cache- and allocator-friendly.
    """

    _CHUNK_ELEMENTS = 1 << 20

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                key_point_embedding: torch.Tensor,
                rope_position_embeddings: Tuple[torch.Tensor, torch.Tensor],
                num_k_exclude_rope: int = 0,
                keys_with_position: Optional[torch.Tensor] = None,
                self_attention_done: bool = False) -> torch.Tensor:
        """Run the layer (inference: FFN in chunks).

        ``self_attention_done``: ``queries`` already went through ``self_attention_block``
        (shared by all objects, see ``_SharedKeysMemoryAttention``).
        """
        if self.training:
            return super().forward(queries, keys, key_point_embedding,
                                   rope_position_embeddings, num_k_exclude_rope)
        if keys_with_position is None:
            keys_with_position = keys + key_point_embedding
        if not self_attention_done:
            queries = self.self_attention_block(queries, rope_position_embeddings)
        query = self.layer_norm2(queries)
        query, _ = self.cross_attn_image(query=query, key=keys_with_position,
                                         value=keys,
                                         position_embeddings=rope_position_embeddings,
                                         num_k_exclude_rope=num_k_exclude_rope)
        queries = queries + query
        flat = queries.reshape(-1, queries.shape[-1])
        rows = max(1, self._CHUNK_ELEMENTS // self.linear1.out_features)
        output = torch.empty_like(flat)
        for start in range(0, flat.shape[0], rows):
            part = flat[start:start + rows]
            hidden = self.activation(self.linear1(self.layer_norm3(part)))
            torch.add(part, self.linear2(hidden), out=output[start:start + rows])
        return output.view_as(queries)

    def self_attention_block(self, queries: torch.Tensor,
                             rope_position_embeddings: Tuple[torch.Tensor, torch.Tensor]
                             ) -> torch.Tensor:
        """Return ``queries`` after the layer's pre-norm self-attention and residual."""
        query = self.layer_norm1(queries)
        query, _ = self.self_attn(query=query, key=query, value=query,
                                  position_embeddings=rope_position_embeddings)
        return queries + query


class _FrameQueries(NamedTuple):
    """One frame's first-layer self-attention output and its rotary embeddings."""

    queries: torch.Tensor
    rope_position_embeddings: Tuple[torch.Tensor, torch.Tensor]


class _SharedKeysMemoryAttention(modeling_sam2_video.Sam2VideoMemoryAttention):
    """Memory attention that skips work repeated across layers and objects (same outputs).

    Every layer's cross-attention reads ``memory + position``; transformers adds the two
    again in each layer, here they are added once. The first layer's self-attention sees
    only the current frame's features, the same for every object: ``shared_queries``
    computes it once per frame and ``forward(..., shared_queries=...)`` starts from it
    (the official code and transformers redo it per object). How many objects share one
    call is decided by the caller (``Sam2Tracker._object_batch_size``).
    """

    def shared_queries(self, current_vision_features: torch.Tensor,
                       current_vision_position_embeddings: Optional[torch.Tensor] = None
                       ) -> _FrameQueries:
        """Return the first layer's self-attention output for one frame's features.

        ``(HW, 1, C)`` features give ``(1, 1, HW, C)`` queries (with the frame's rotary
        embeddings), to pass to ``forward`` for any number of objects.
        """
        output, rope_position_embeddings = self._queries(current_vision_features,
                                                         current_vision_position_embeddings)
        return _FrameQueries(
            self.layers[0].self_attention_block(output, rope_position_embeddings),
            rope_position_embeddings)

    def _queries(self, current_vision_features, current_vision_position_embeddings):
        output = current_vision_features
        if current_vision_position_embeddings is not None:
            output = output + 0.1 * current_vision_position_embeddings
        output = output.transpose(0, 1)
        rope_position_embeddings = self.rotary_emb(output, self.position_ids)
        return output.unsqueeze(1), rope_position_embeddings

    def forward(self, current_vision_features: torch.Tensor, memory: torch.Tensor,
                current_vision_position_embeddings: Optional[torch.Tensor] = None,
                memory_posision_embeddings: Optional[torch.Tensor] = None,
                num_object_pointer_tokens: int = 0,
                shared_queries: Optional[_FrameQueries] = None) -> torch.Tensor:
        chunked = all(type(layer) is _ChunkedFeedForwardMemoryLayer for layer in self.layers)
        if self.training or memory_posision_embeddings is None or not chunked:
            if shared_queries is not None:
                raise ValueError('shared_queries needs the inference modules in eval mode')
            return super().forward(current_vision_features, memory,
                                   current_vision_position_embeddings,
                                   memory_posision_embeddings, num_object_pointer_tokens)
        objects = memory.shape[1]
        if shared_queries is None:
            output, rope_position_embeddings = self._queries(
                current_vision_features, current_vision_position_embeddings)
        else:
            output = shared_queries.queries.expand(objects, -1, -1, -1)
            rope_position_embeddings = shared_queries.rope_position_embeddings
        memory = memory.transpose(0, 1).unsqueeze(1)
        position = memory_posision_embeddings.transpose(0, 1).unsqueeze(1)
        keys_with_position = memory + position
        for index, layer in enumerate(self.layers):
            output = layer(queries=output, keys=memory, key_point_embedding=position,
                           rope_position_embeddings=rope_position_embeddings,
                           num_k_exclude_rope=num_object_pointer_tokens,
                           keys_with_position=keys_with_position,
                           self_attention_done=index == 0 and shared_queries is not None)
        return self.layer_norm(output).transpose(0, 1)


_INFERENCE_SWAPS = {
    modeling_sam2_video.Sam2VideoMemoryAttention: _SharedKeysMemoryAttention,
    modeling_sam2_video.Sam2VideoRoPEAttention: _RoPEAttention,
    modeling_sam2_video.Sam2VideoMemoryAttentionLayer: _ChunkedFeedForwardMemoryLayer,
    modeling_sam2.Sam2MultiScaleAttention: _HieraAttention,
    modeling_sam2.Sam2MultiScaleBlock: _UnpaddedWindowHieraBlock,
    modeling_sam2.Sam2HieraDetModel: _StaticPosEmbedHiera,
    modeling_sam2.Sam2SinePositionEmbedding: _StaticSinePositionEmbedding,
}


def use_inference_modules(model: Sam2VideoModel) -> Sam2VideoModel:
    """Switch the model's image-encoder modules to their inference variants (same outputs).

    ``_HieraAttention`` drops dead work; ``_StaticPosEmbedHiera`` and
    ``_StaticSinePositionEmbedding`` stop recomputing position embeddings that are the same
    on every frame. Only the classes of existing instances change: weights, state dict and
    outputs are untouched (bit-identical, checked by test_sam2_tracker).
    """
    for module in model.modules():
        swap = _INFERENCE_SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model


def cut_to_prompt_box(out: dict, point_inputs: Optional[dict], margin: float,
                      image_size: int) -> None:
    """Set ``out``'s mask logits outside its box prompt (grown by ``margin``) to "no object".

    ``out`` is a SAM2 frame output (``high_res_masks``, ``pred_masks``) and ``point_inputs``
    the session's prompt of that frame (a box is the corner pair labelled 2 and 3, in
    model-input pixels); without a box nothing changes. A box bounds its object, but SAM2's
    decoder, small ones above all, lets a mask spill onto a touching neighbour of the same
    colour, and that spill would be encoded into the object's memory and followed.
    """
    if point_inputs is None:
        return
    labels = point_inputs['point_labels'].reshape(-1)
    corners = point_inputs['point_coords'].reshape(-1, 2)
    if not bool((labels == 2).any()) or not bool((labels == 3).any()):
        return
    (x0, y0), (x1, y1) = (corners[labels == k][0].tolist() for k in (2, 3))
    grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
    box = torch.tensor([[x0 - grow_x, y0 - grow_y, x1 + grow_x, y1 + grow_y]],
                       dtype=torch.float32, device=corners.device)
    for key in ('high_res_masks', 'pred_masks'):
        logits = out[key]
        # Cell centres in model-input pixels (the processor's square resize).
        inside = inside_boxes(box, logits.shape[-2:], image_size)[0]
        out[key] = torch.where(inside, logits, torch.full_like(logits, _NO_OBJ_SCORE))


def mirror_point_inputs(point_inputs: dict, image_size: int) -> dict:
    """Return SAM2 point inputs mirrored left-right in an ``image_size`` px model input.

    Coordinates are pixel indices (SAM2 adds 0.5 for the pixel centre), so x maps to
    ``image_size - 1 - x``. A box's corners (labels 2 and 3) swap their x as well, so that
    label 2 stays the top-left corner.
    """
    labels = point_inputs['point_labels']
    x = (image_size - 1) - point_inputs['point_coords'][..., 0]
    top_left, bottom_right = labels == 2, labels == 3
    if int(top_left.sum()) == 1 and int(bottom_right.sum()) == 1:
        swapped = x.clone()
        swapped[top_left], swapped[bottom_right] = x[bottom_right], x[top_left]
        x = swapped
    coords = torch.stack([x, point_inputs['point_coords'][..., 1]], dim=-1)
    return {'point_coords': coords, 'point_labels': labels}


def _checked_object_id(value) -> int:
    """Return ``value`` as an object ID, or raise PromptError unless it is one.

    IDs are mono16 label values (1..65535). Only integers are accepted: ``int(1.7)`` or
    ``int(True)`` would silently name object 1, and a string would never match an ID.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise PromptError(f'object ids must be integers, got {value!r} '
                          f'({type(value).__name__})')
    if not 1 <= int(value) <= MAX_LABEL_ID:
        raise PromptError(f'object ids must be positive integers up to {MAX_LABEL_ID} '
                          f'(mono16 label values), got {int(value)}')
    return int(value)


def _never_emptied(refined: np.ndarray, unrefined: np.ndarray) -> np.ndarray:
    """Return ``refined`` (N, H, W) masks, with ``unrefined`` ones where refinement left none.

    On a small mask (a few coarse cells of a fruit at the image border) the guided filter
    can pull every pixel below 0.5; the object would then be reported present without a
    pixel or box, and its memory encoded from an empty mask. Keeping SAM2's own mask there
    changes nothing where refinement leaves pixels.
    """
    emptied = ~refined.any(axis=(1, 2)) & unrefined.any(axis=(1, 2))
    if emptied.any():
        refined = refined.copy()
        refined[emptied] = unrefined[emptied]
    return refined


class Sam2Tracker:
    """Track objects on an endless RGB stream with SAM2's memory bank (ROS-free)."""

    # Cross-attention key bytes per object batch: (CPU, CUDA); see _object_batch_size.
    _BATCH_KEY_BYTES = (8 << 20, 1 << 30)

    def __init__(self, model: Sam2VideoModel, processor: Sam2VideoProcessor,
                 device: Union[str, torch.device] = 'cpu',
                 dtype: Union[str, torch.dtype] = 'float32',
                 *, max_conditioning_frames: int = 4, skip_absent_memory: bool = True,
                 max_object_batch: Optional[int] = None,
                 box_mask_margin: Optional[float] = 0.1,
                 motion_compensation: bool = True,
                 motion_gate_margin: Optional[float] = 0.25,
                 mask_refine_radius: Optional[float] = 1.0,
                 prompt_mirror_union: bool = True) -> None:
        """Wrap a loaded ``Sam2VideoModel`` and its processor.

        ``max_conditioning_frames`` caps the prompted frames kept per object (the first
        prompt and the most recent ones), so re-prompting a long-lived object does not
        grow memory or the memory-attention cost. ``skip_absent_memory=False`` restores
        SAM2's original rule of also encoding frames where the object is absent.
        Tracked objects go through memory attention, mask decoder and memory encoder in
        batches sized by their memory keys (see ``_object_batch_size``);
        ``max_object_batch`` caps a batch further (None: no cap).
        ``box_mask_margin``: on the frame of a box prompt, the object's mask is cut to its
        box grown by this fraction of the box's width/height on each side, both in the
        output and in the memory it starts from (None: SAM2's uncut mask; see
        ``cut_to_prompt_box``).
        ``motion_compensation``: the prompted-frame memory is moved by the camera's image
        motion since its frame (``scene_motion``); False keeps SAM2's fixed memory.
        ``motion_gate_margin``: a tracked mask is cut to the object's last box moved by
        the camera motion and grown by this fraction of its size (+ 2 px) per side; if
        less than half of the mask was inside, the object is reported absent and that
        frame is not memorised (None: no gate).
        ``mask_refine_radius``: masks are snapped to the frame's colour edges by a guided
        filter whose window radius is this many cells of the decoder's coarse mask grid,
        both the published masks and those the memory encoder stores (None or 0: SAM2's
        bilinearly upsampled masks; see ``mask_refinement``).
        ``prompt_mirror_union``: a new object's first box/point prompt is also decoded on
        the mirrored frame and its mask is the union of both (False: SAM2's single pass).
        """
        if max_conditioning_frames < 1:
            raise ValueError('max_conditioning_frames must be >= 1')
        if max_object_batch is not None and max_object_batch < 1:
            raise ValueError('max_object_batch must be >= 1 or None')
        if box_mask_margin is not None and not 0.0 <= box_mask_margin <= 10.0:
            raise ValueError('box_mask_margin must be in [0, 10] or None')
        self._box_mask_margin = None if box_mask_margin is None else float(box_mask_margin)
        if motion_gate_margin is not None and not 0.0 <= motion_gate_margin <= 10.0:
            raise ValueError('motion_gate_margin must be in [0, 10] or None')
        self._gate_margin = None if motion_gate_margin is None else float(motion_gate_margin)
        if mask_refine_radius is not None and not 0.0 <= mask_refine_radius <= 10.0:
            raise ValueError('mask_refine_radius must be in [0, 10] or None')
        self._refine_cells = mask_refine_radius or None  # 0 switches it off as None does
        self._align_memory = bool(motion_compensation)
        self._mirror_union = bool(prompt_mirror_union)
        uses_motion = self._align_memory or self._gate_margin is not None
        self._scene_motion = SceneMotion() if uses_motion else None
        self._max_batch = None if max_object_batch is None else int(max_object_batch)
        self._device = resolve_device(device)
        self._dtype = resolve_dtype(dtype, self._device)
        self._model = use_inference_modules(
            model.to(self._device, dtype=self._dtype).eval().requires_grad_(False))
        self._processor = processor
        config = model.config
        if processor.target_size != config.image_size:
            raise ModelLoadError(f'processor resizes to {processor.target_size} px but the model '
                                 f'expects {config.image_size} px inputs')
        self._max_cond = int(max_conditioning_frames)
        self._skip_absent_memory = bool(skip_absent_memory)
        # Windows of past non-conditioning frames the next frame, or a prompt on the latest
        # frame, reads (see _prune).
        self._mask_memory_window = max(config.num_maskmem - 1, 0)
        self._pointer_window = max(config.max_object_pointers_in_encoder - 1, 0)
        self._next_object_id = 1
        self.reset()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, model_dir: Union[str, Path], device: Union[str, torch.device] = 'auto',
             dtype: Union[str, torch.dtype] = 'float32', **kwargs) -> Sam2Tracker:
        """Load a SAM2/SAM2.1 transformers checkpoint from a local directory (no network).

        Weights that leave any model tensor unset (a partial or foreign checkpoint) raise
        ModelLoadError rather than run with random values.
        """
        path = check_model_dir(model_dir, _MODEL_TYPES)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        try:
            model, info = Sam2VideoModel.from_pretrained(
                path, local_files_only=True, dtype=torch_dtype, output_loading_info=True)
        except Exception as exc:  # safetensors/torch raise many types; report them all alike
            raise ModelLoadError(f"cannot load a SAM2 video model from '{path}': {exc}") from exc
        check_loading_info(path, info, 'SAM2 video')
        if any((path / name).is_file() for name in _PROCESSOR_FILES):
            try:
                processor = Sam2VideoProcessor.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # malformed JSON, unknown classes, missing fields
                raise ModelLoadError(
                    f"cannot load the SAM2 processor from '{path}': {exc}") from exc
        else:
            # The preprocessing is fixed by the architecture (square resize + ImageNet
            # normalisation), so a weights-only directory is still usable.
            logger.warning("'%s' has no processor config; using the standard SAM2 "
                           'preprocessing at %d px', path, model.config.image_size)
            processor = build_sam2_video_processor(model.config.image_size)
        return cls(model, processor, torch_device, torch_dtype, **kwargs)

    @classmethod
    def from_config(cls, config: Sam2VideoConfig, device: Union[str, torch.device] = 'cpu',
                    dtype: Union[str, torch.dtype] = 'float32', seed: int = 0,
                    **kwargs) -> Sam2Tracker:
        """Build a tracker with random weights from a config (deterministic for ``seed``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Sam2VideoModel(config)
        return cls(model, build_sam2_video_processor(config.image_size), device, dtype, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> Sam2VideoModel:
        """Return the wrapped transformers model."""
        return self._model

    @property
    def device(self) -> torch.device:
        """Return the inference device."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Return the inference dtype; always float32 on CPU."""
        return self._dtype

    @property
    def object_ids(self) -> List[int]:
        """Return the IDs of all objects, in creation order (including pending ones)."""
        return list(self._session.obj_ids)

    @property
    def frame_index(self) -> int:
        """Return the index of the last tracked frame (-1 before the first)."""
        return self._frame_index

    @property
    def image_size(self) -> Optional[Tuple[int, int]]:
        """Return the ``(H, W)`` of the stream, or None before the first frame."""
        return self._image_size

    @property
    def scene_offset(self) -> Tuple[float, float]:
        """Camera image motion since the first frame, in model-input pixels (0 when unused)."""
        return self._scene_offset

    @property
    def last_result(self) -> Optional[TrackResult]:
        """Return the result of the latest frame, including objects prompted on it."""
        return self._last_result

    @property
    def session(self):
        """Return the underlying transformers inference session, for inspection."""
        return self._session

    @property
    def num_stored_frames(self) -> int:
        """Return how many distinct frame indices hold any state in the session."""
        return len(self._stored_frame_indices())

    @property
    def num_stored_outputs(self) -> int:
        """Return the number of per-object per-frame outputs held in the session."""
        return sum(len(store) for out in self._session.output_dict_per_obj.values()
                   for store in out.values())

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Drop all objects, frames and memories; the next frame gets index 0."""
        self._session = self._processor.init_video_session(
            inference_device=self._device, dtype=self._dtype)
        self._frame_index = -1
        self._image_size: Optional[Tuple[int, int]] = None
        self._last_result: Optional[TrackResult] = None
        # Scene offset of the current frame in model-input pixels (see scene_motion).
        self._scene_offset = (0.0, 0.0)
        if self._scene_motion is not None:
            self._scene_motion.reset()
        # object id -> (its last box in model-input pixels, the scene offset of that frame)
        self._last_box: Dict[int, Tuple[Tuple[float, ...], Tuple[float, float]]] = {}
        # The latest frame (a copy, see track) and, once the memory path needs it, that
        # frame at the model's input size: the guides of the mask refinement.
        self._frame: Optional[np.ndarray] = None
        self._model_guide: Optional[np.ndarray] = None
        # object id -> frame index its first prompt is waiting for
        self._pending: Dict[int, int] = {}
        # pending objects whose prompt replaces their earlier conditioning frames
        self._replace_conditioning: set = set()

    def add_objects(self, frame_index: Optional[int] = None, *, boxes: Optional[ArrayLike] = None,
                    points: Optional[ArrayLike] = None, labels: Optional[ArrayLike] = None,
                    masks: Optional[ArrayLike] = None,
                    object_ids: Optional[Sequence[int]] = None,
                    replace_conditioning: bool = False) -> List[int]:
        """Prompt new (or re-prompt existing) objects; return their IDs.

        One object per box / point set / mask: ``boxes`` ``(N, 4)`` as ``(x0, y0, x1, y1)``
        pixels; ``points`` ``(N, P, 2)`` as ``(x, y)`` pixels with ``labels`` ``(N, P)``
        (1 foreground, 0 background; all 1 when omitted); boxes and points may be combined
        per object; ``masks`` ``(N, H, W)`` boolean, exclusive with boxes and points.
        ``object_ids`` names the objects (ints 1..65535); an existing ID re-prompts that
        object (a new conditioning frame), a new one creates it; by default new IDs are
        assigned. ``replace_conditioning=True`` makes this prompt the only conditioning
        frame of an existing object (its earlier prompts are dropped once it is applied;
        its recent tracking memories stay). ``frame_index`` must be the latest tracked frame
        (default) or the next one, see the module docstring. Raises PromptError for invalid
        prompts.
        """
        if self._frame_index < 0 or self._image_size is None:
            raise PromptError('no frame tracked yet: call track(frame) first (cheap with no '
                              'objects) so prompts can be checked against the image size')
        target = self._frame_index if frame_index is None else int(frame_index)
        if target not in (self._frame_index, self._frame_index + 1):
            raise PromptError(
                f'cannot prompt frame {target}: only the latest tracked frame '
                f'{self._frame_index} or the next frame {self._frame_index + 1} are accepted '
                '(older frames are dropped from the bounded memory)')
        count, point_arr, label_arr, box_arr, mask_list = self._validate_prompts(
            boxes, points, labels, masks)
        ids = self._assign_ids(object_ids, count)

        height, width = self._image_size
        session = self._session
        created = [obj_id for obj_id in ids if obj_id not in session._obj_id_to_idx]
        for i, obj_id in enumerate(ids):
            # One waiting prompt per object: a later prompt supersedes one still waiting
            # for the next frame (as a second prompt on one frame replaces the first).
            # Applying both would re-prompt the object on the next frame from the older
            # view, which the caller has just corrected.
            waiting = self._pending.get(obj_id)
            if waiting is not None and waiting != target:
                obj_idx = session.obj_id_to_idx(obj_id)
                session.remove_point_inputs(obj_idx, waiting)
                session.remove_mask_inputs(obj_idx, waiting)
            if mask_list is not None:
                self._processor.add_inputs_to_inference_session(
                    session, frame_idx=target, obj_ids=obj_id, input_masks=mask_list[i])
            else:
                self._processor.add_inputs_to_inference_session(
                    session, frame_idx=target, obj_ids=obj_id,
                    input_points=None if point_arr is None else [[point_arr[i].tolist()]],
                    input_labels=None if point_arr is None else [[label_arr[i].tolist()]],
                    input_boxes=None if box_arr is None else [[box_arr[i].tolist()]],
                    original_size=(height, width))
            self._next_object_id = (obj_id + 1 if object_ids is None
                                    else max(self._next_object_id, obj_id + 1))
        # The processor's helper overwrites this list on every call; it is not used by
        # this engine (pending prompts live in self._pending), so keep it empty.
        session.obj_with_new_inputs = []
        for obj_id in ids:
            self._pending[obj_id] = target
            if replace_conditioning:
                self._replace_conditioning.add(obj_id)
            else:
                self._replace_conditioning.discard(obj_id)

        if target == self._frame_index:
            try:
                with self._inference_context():
                    outputs = self._run_prompted(target, ids)
            except BaseException:
                # Out of GPU memory, say: the caller sees the error, and no half-added
                # object stays behind, waiting for a frame that has already passed.
                self._withdraw_prompts(target, ids, created)
                raise
            self._update_last_result(outputs)
            self._prune(target)
        return ids

    def _withdraw_prompts(self, frame_idx: int, ids: Sequence[int],
                          created: Sequence[int]) -> None:
        """Undo ``add_objects`` on ``frame_idx``: drop new objects, forget re-prompts."""
        session = self._session
        for obj_id in ids:
            if obj_id in created:
                self.remove_object(obj_id)
                continue
            obj_idx = session.obj_id_to_idx(obj_id)
            session.remove_point_inputs(obj_idx, frame_idx)
            session.remove_mask_inputs(obj_idx, frame_idx)
            self._pending.pop(obj_id, None)
            self._replace_conditioning.discard(obj_id)

    def remove_object(self, object_id: int) -> None:
        """Forget one object and its memory; unknown IDs raise PromptError."""
        session = self._session
        object_id = _checked_object_id(object_id)
        if object_id not in session._obj_id_to_idx:
            raise PromptError(f'unknown object id {object_id}; known ids: {self.object_ids}')
        keep = [obj_id for obj_id in session.obj_ids if obj_id != object_id]
        old_index = {obj_id: session._obj_id_to_idx[obj_id] for obj_id in keep}
        # transformers has no removal API and assigns new indices as len(mapping), so the
        # per-object dicts are re-indexed densely.
        for name in ('point_inputs_per_obj', 'mask_inputs_per_obj', 'output_dict_per_obj',
                     'frames_tracked_per_obj'):
            table = getattr(session, name)
            rebuilt = {new: table[old_index[obj_id]] for new, obj_id in enumerate(keep)}
            table.clear()
            table.update(rebuilt)
        session._obj_id_to_idx.clear()
        session._obj_idx_to_id.clear()
        for new, obj_id in enumerate(keep):
            session._obj_id_to_idx[obj_id] = new
            session._obj_idx_to_id[new] = obj_id
        session.obj_ids = list(keep)
        self._pending.pop(object_id, None)
        self._replace_conditioning.discard(object_id)
        self._last_box.pop(object_id, None)
        if self._last_result is not None:
            # A new result, so the one already handed to the caller is left untouched.
            self._last_result = TrackResult(
                self._last_result.frame_index,
                [obj for obj in self._last_result.objects if obj.object_id != object_id])

    def track(self, frame: np.ndarray) -> TrackResult:
        """Track all objects on the next frame (RGB uint8 ``(H, W, 3)``) and return them.

        The image size is fixed by the first frame until ``reset``. When the model fails
        on the frame (out of GPU memory, say), the error is raised and the prompts waiting
        for this frame are withdrawn (new objects removed), as for a failing
        ``add_objects``: the frame has passed, and they would otherwise wait for it forever.
        """
        self._check_frame(frame)
        # Copied: a prompt on this frame (add_objects) refines its mask against it after
        # track has returned, when a capture loop that reuses its buffer has already
        # written the next image into the caller's array. Only the refinement reads it.
        self._frame = np.array(frame) if self._refine_cells is not None else None
        self._model_guide = None
        frame_idx = self._frame_index + 1
        pixel_values = self._preprocess(frame)
        if self._scene_motion is not None:
            self._scene_offset = self._scene_motion.update_pixels(pixel_values)
        session = self._session
        session.add_new_frame(pixel_values, frame_idx=frame_idx)
        self._frame_index = frame_idx
        if self._image_size is None:
            self._image_size = (int(frame.shape[0]), int(frame.shape[1]))
        prompted = [obj_id for obj_id, idx in self._pending.items() if idx == frame_idx]
        tracked = [obj_id for obj_id in session.obj_ids if obj_id not in self._pending]
        result = TrackResult(frame_index=frame_idx)
        outputs: Dict[int, dict] = {}
        # Prompted objects without memory are new: a failed frame removes them again.
        created = [obj_id for obj_id in prompted if not any(
            session.output_dict_per_obj[session.obj_id_to_idx(obj_id)].values())]
        try:
            with self._inference_context():
                if tracked:
                    outputs.update(self._run_tracking(frame_idx, tracked))
                if prompted:
                    outputs.update(self._run_prompted(frame_idx, prompted))
        except BaseException:
            # Those applied before the failure are conditioning frames already.
            waiting = [obj_id for obj_id in prompted if self._pending.get(obj_id) == frame_idx]
            self._withdraw_prompts(frame_idx, waiting, created)
            raise
        ordered = [obj_id for obj_id in session.obj_ids if obj_id in outputs]
        result.objects = self._to_tracked_objects(ordered, outputs)
        self._last_result = result
        self._prune(frame_idx)
        return result

    # ------------------------------------------------------------------ validation
    def _check_frame(self, frame: np.ndarray) -> None:
        check_rgb_frame(frame)
        if self._image_size is not None and tuple(frame.shape[:2]) != self._image_size:
            raise ValueError(f'frame size {frame.shape[:2]} differs from the stream size '
                             f'{self._image_size}; call reset() before changing resolution')

    def _validate_prompts(self, boxes, points, labels, masks):
        height, width = self._image_size
        if masks is not None:
            if boxes is not None or points is not None or labels is not None:
                raise PromptError('masks cannot be combined with boxes or points')
            if isinstance(masks, np.ndarray) and masks.ndim != 3:
                raise PromptError(f'masks must have shape (N, H, W), got {masks.shape}')
            mask_list = [np.asarray(m) for m in masks]
            if not mask_list:
                raise PromptError('masks is empty')
            for i, mask in enumerate(mask_list):
                if mask.shape != (height, width):
                    raise PromptError(f'mask {i} has shape {mask.shape}; expected the image '
                                      f'size {(height, width)}')
                if mask.dtype != np.bool_:
                    raise PromptError(f'mask {i} must be boolean, got {mask.dtype}')
                if not mask.any():
                    raise PromptError(f'mask {i} is empty: an object needs at least one pixel')
            return len(mask_list), None, None, None, mask_list
        if boxes is None and points is None:
            if labels is not None:
                raise PromptError('labels given without points')
            raise PromptError('give boxes, points or masks')
        count = None
        box_arr = point_arr = label_arr = None
        if boxes is not None:
            try:
                box_arr = np.asarray(boxes, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise PromptError(f'boxes are not a numeric (N, 4) array: {exc}') from exc
            if box_arr.ndim != 2 or box_arr.shape[1] != 4 or box_arr.shape[0] == 0:
                raise PromptError(f'boxes must have shape (N, 4), got {box_arr.shape}')
            if not np.isfinite(box_arr).all():
                raise PromptError('boxes contain NaN or infinite values')
            x0, y0, x1, y1 = box_arr.T
            if (x1 <= x0).any() or (y1 <= y0).any():
                raise PromptError('boxes need x0 < x1 and y0 < y1')
            if (x0 < 0).any() or (y0 < 0).any() or (x1 > width).any() or (y1 > height).any():
                raise PromptError(f'box outside the {width}x{height} image: {box_arr.tolist()}')
            count = box_arr.shape[0]
        if points is not None:
            point_arr, label_arr = self._validate_points(points, labels)
            if count is not None and len(point_arr) != count:
                raise PromptError(f'{count} boxes but {len(point_arr)} point sets')
            count = len(point_arr)
        elif labels is not None:
            raise PromptError('labels given without points')
        return count, point_arr, label_arr, box_arr, None

    def _validate_points(self, points, labels) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        """Return per-object ``(P, 2)`` point and ``(P,)`` label arrays (P may differ)."""
        height, width = self._image_size
        try:
            point_arr = [np.asarray(p, dtype=np.float64) for p in points]
            label_arr = (None if labels is None
                         else [np.asarray(lab) for lab in labels])
        except (TypeError, ValueError) as exc:
            raise PromptError(f'points/labels are not numeric arrays: {exc}') from exc
        if not point_arr:
            raise PromptError('points is empty')
        for i, pts in enumerate(point_arr):
            if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
                raise PromptError(f'points must have shape (N, P, 2) (or a list of (P, 2)); '
                                  f'object {i} has {pts.shape}')
            if not np.isfinite(pts).all():
                raise PromptError('points contain NaN or infinite values')
            xs, ys = pts[:, 0], pts[:, 1]
            if (xs < 0).any() or (ys < 0).any() or (xs >= width).any() or (ys >= height).any():
                raise PromptError(f'point outside the {width}x{height} image: {pts.tolist()}')
        if label_arr is None:
            return point_arr, [np.ones(len(pts), dtype=np.int64) for pts in point_arr]
        if len(label_arr) != len(point_arr):
            raise PromptError(f'{len(label_arr)} label sets for {len(point_arr)} point sets')
        for i, (pts, lab) in enumerate(zip(point_arr, label_arr, strict=True)):
            if lab.shape != (len(pts),):
                raise PromptError(f'labels shape {lab.shape} does not match the {len(pts)} '
                                  f'points of object {i}')
            if not np.isin(lab, (0, 1)).all():
                raise PromptError('labels must be 1 (foreground) or 0 (background)')
        return point_arr, [lab.astype(np.int64) for lab in label_arr]

    def _assign_ids(self, object_ids: Optional[Sequence[int]], count: int) -> List[int]:
        if object_ids is None:
            ids: List[int] = []
            live = set(self._session.obj_ids)
            for _ in range(count):
                ids.append(next_label_id(ids[-1] + 1 if ids else self._next_object_id, live))
                live.add(ids[-1])
            return ids
        if isinstance(object_ids, (str, bytes)):
            raise PromptError(f'object_ids must be a list of ints, got {object_ids!r}')
        ids = [_checked_object_id(i) for i in object_ids]
        if len(ids) != count:
            raise PromptError(f'{len(ids)} object ids for {count} prompts')
        if len(set(ids)) != len(ids):
            raise PromptError(f'duplicate object ids: {ids}')
        return ids

    # ------------------------------------------------------------------ inference
    def _inference_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._device.type == 'cuda' and self._dtype != torch.float32:
            stack.enter_context(torch.autocast(device_type='cuda', dtype=self._dtype))
        return stack

    def _preprocess(self, frame: np.ndarray) -> torch.Tensor:
        # channels_last: the processor would guess, and read a frame 1 or 3 px high as
        # channels-first.
        processed = self._processor.video_processor(
            videos=[frame], device=str(self._device), input_data_format='channels_last',
            return_tensors='pt')
        return processed.pixel_values_videos[0, 0]

    def _vision_features(self, frame_idx: int):
        # batch_size=1: the model caches one copy of the frame's features (cache size 1).
        return self._model._prepare_vision_features(self._session, frame_idx, batch_size=1)

    def _run_prompted(self, frame_idx: int, ids: Sequence[int]) -> Dict[int, dict]:
        """Run objects with a prompt on ``frame_idx`` and store them as conditioning frames."""
        model, session = self._model, self._session
        feats, _ = self._vision_features(frame_idx)
        mirrored = None  # the mirrored frame's features, computed for the first new object
        results = {}
        for obj_id in ids:
            obj_idx = session.obj_id_to_idx(obj_id)
            store = session.output_dict_per_obj[obj_idx]
            point_inputs = session.point_inputs_per_obj[obj_idx].pop(frame_idx, None)
            mask_inputs = session.mask_inputs_per_obj[obj_idx].pop(frame_idx, None)
            # A first prompt starts from no memory; a prompt on an object that already has
            # memory refines its memory-conditioned prediction (as SAM2's interactive mode).
            is_init = not store['cond_frame_outputs'] and not store['non_cond_frame_outputs']
            if is_init or mask_inputs is not None:
                out = model._run_single_frame_inference(
                    inference_session=session, frame_idx=frame_idx, obj_idx=obj_idx,
                    batch_size=1, is_init_cond_frame=is_init, point_inputs=point_inputs,
                    mask_inputs=mask_inputs, reverse=False, streaming=True)
            else:
                out = self._run_memory_prompt(frame_idx, obj_idx, point_inputs)
            # An object the prompt did not find stays absent (its logits are "no object").
            if (self._mirror_union and is_init and point_inputs is not None
                    and float(out['object_score_logits'].reshape(-1)[0]) > 0):
                if mirrored is None:
                    mirrored = self._mirrored_frame_features(frame_idx)
                self._unite_with_mirror(out, point_inputs, mirrored)
            if self._box_mask_margin is not None:
                cut_to_prompt_box(out, point_inputs, self._box_mask_margin,
                                  model.config.image_size)
            self._remember_boxes([obj_id], out['high_res_masks'][:, 0])
            # Each prompted object gets its own memory-encoder call: transformers binarises
            # the masks of a whole batch when any member was prompted, which would alter
            # the memories of objects tracked on the same frame.
            memory, memory_pos = model._encode_new_memory(
                current_vision_feats=feats[-1],
                pred_masks_high_res=self._refined_for_memory(out['high_res_masks'],
                                                             out['pred_masks']),
                object_score_logits=out['object_score_logits'], is_mask_from_pts=True)
            out['maskmem_features'] = memory
            out['maskmem_pos_enc'] = memory_pos
            store['non_cond_frame_outputs'].pop(frame_idx, None)
            if obj_id in self._replace_conditioning:
                # After the prediction: the prompt still refines what memory says (above).
                store['cond_frame_outputs'].clear()
                self._replace_conditioning.discard(obj_id)
            store['cond_frame_outputs'][frame_idx] = {k: out[k] for k in _KEPT_OUTPUT_KEYS}
            store['cond_frame_outputs'][frame_idx]['scene_offset'] = self._scene_offset
            self._cap_conditioning(store['cond_frame_outputs'])
            self._pending.pop(obj_id, None)
            results[obj_id] = {'pred_masks': out['pred_masks'],
                               'object_score_logits': out['object_score_logits']}
        return results

    def _run_memory_prompt(self, frame_idx: int, obj_idx: int,
                           point_inputs: Optional[dict]) -> dict:
        """Decode a box/point prompt of an object with memory on its memory-read features.

        transformers' ``_run_single_frame_inference`` for a prompt on a non-initial frame,
        with the memory read as ``_run_tracking`` reads it (``_gather_memory``): with
        ``motion_compensation`` the prompted-frame memory is moved by the camera motion.
        transformers' own path reads it unmoved and would pull the prompted mask, which
        becomes a conditioning frame, back to where the object was on the first prompt.
        """
        model = self._model
        feats, pos_embeds = self._vision_features(frame_idx)
        memory, memory_pos, num_ptr_tokens = self._gather_memory(obj_idx, frame_idx)
        pix_feat = self._memory_conditioned(feats, pos_embeds, memory, memory_pos,
                                            num_ptr_tokens, batch=1)
        points = None if point_inputs is None else point_inputs['point_coords']
        labels = None if point_inputs is None else point_inputs['point_labels']
        sam = model._single_frame_forward(
            pixel_values=None, input_points=points, input_labels=labels, input_masks=None,
            image_embeddings=self._high_res_maps(feats) + [pix_feat],
            multimask_output=model._use_multimask(False, point_inputs))
        return {'pred_masks': sam.pred_masks, 'object_pointer': sam.object_pointer,
                'high_res_masks': sam.high_res_masks,
                'object_score_logits': sam.object_score_logits}

    def _memory_conditioned(self, feats: Sequence[torch.Tensor],
                            pos_embeds: Sequence[torch.Tensor], memory: torch.Tensor,
                            memory_pos: torch.Tensor, num_ptr_tokens: int, batch: int,
                            shared: Optional[_FrameQueries] = None) -> torch.Tensor:
        """Return a frame's features conditioned on ``batch`` objects' memories, (B, C, H, W).

        ``shared``: the memory attention's first self-attention, the same for every object
        of the frame (``shared_queries``), when already computed.
        """
        model = self._model
        conditioned = model.memory_attention(
            current_vision_features=feats[-1].expand(-1, batch, -1),
            current_vision_position_embeddings=pos_embeds[-1].expand(-1, batch, -1),
            memory=memory.to(self._session.dtype), memory_posision_embeddings=memory_pos,
            num_object_pointer_tokens=num_ptr_tokens, shared_queries=shared)
        height, width = model.backbone_feature_sizes[-1]
        # (1, B, HW, C) -> (B, C, H, W); transformers' own reshape assumes B == 1.
        return conditioned[0].permute(0, 2, 1).reshape(batch, -1, height, width)

    def _high_res_maps(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Return a frame's high-resolution backbone levels, (HW, 1, C) -> (1, C, H, W)."""
        return [x.permute(1, 2, 0).view(1, x.size(2), *size)
                for x, size in zip(feats[:-1], self._model.backbone_feature_sizes[:-1],
                                   strict=True)]

    def _mirrored_frame_features(self, frame_idx: int) -> List[torch.Tensor]:
        """Return the SAM-head inputs of mirrored ``frame_idx``, read as for a first prompt."""
        model, session = self._model, self._session
        image = session.get_frame(frame_idx).flip(-1).unsqueeze(0)
        feats = model.get_image_features(image, return_dict=True)
        levels = feats.fpn_hidden_states
        # A first prompt reads no memory; the model's own routine adds its no-memory input.
        pix_feat = model._prepare_memory_conditioned_features(
            inference_session=session, frame_idx=frame_idx, obj_idx=0,
            is_initial_conditioning_frame=True, current_vision_features=levels[-1],
            current_vision_positional_embeddings=feats.fpn_position_encoding[-1],
            num_total_frames=session.num_frames, track_in_reverse_time=False, streaming=True)
        return self._high_res_maps(levels) + [pix_feat]

    def _unite_with_mirror(self, out: dict, point_inputs: dict,
                           mirrored: List[torch.Tensor]) -> None:
        """Replace ``out``'s mask logits by their maximum with the mirrored frame's ones."""
        model = self._model
        prompt = mirror_point_inputs(point_inputs, model.config.image_size)
        other = model._single_frame_forward(
            pixel_values=None, input_points=prompt['point_coords'],
            input_labels=prompt['point_labels'], input_masks=None, image_embeddings=mirrored,
            multimask_output=model._use_multimask(True, prompt))
        for key, logits in (('high_res_masks', other.high_res_masks),
                            ('pred_masks', other.pred_masks)):
            out[key] = torch.maximum(out[key], logits.flip(-1).to(out[key].dtype))

    def _run_tracking(self, frame_idx: int, ids: Sequence[int]) -> Dict[int, dict]:
        """Propagate all unprompted objects to ``frame_idx``, batched by memory layout."""
        model, session = self._model, self._session
        feats, pos_embeds = self._vision_features(frame_idx)
        groups: Dict[Tuple[int, int], List[Tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for obj_id in ids:
            obj_idx = session.obj_id_to_idx(obj_id)
            memory, memory_pos, num_ptr_tokens = self._gather_memory(obj_idx, frame_idx)
            key = (memory.shape[0], num_ptr_tokens)
            groups.setdefault(key, []).append((obj_id, memory, memory_pos))
        batches = []
        for key, members in groups.items():
            step = self._object_batch_size(members[0][1])
            batches.extend((key, members[start:start + step])
                           for start in range(0, len(members), step))

        high_res = self._high_res_maps(feats)
        results = {}
        memory_batches = []
        # The first self-attention of the memory attention is the same for every object.
        shared = model.memory_attention.shared_queries(feats[-1], pos_embeds[-1])
        for (_, num_ptr_tokens), members in batches:
            batch = len(members)
            memory = torch.cat([m for _, m, _ in members], dim=1)
            memory_pos = torch.cat([p for _, _, p in members], dim=1)
            pix_feat = self._memory_conditioned(feats, pos_embeds, memory, memory_pos,
                                                num_ptr_tokens, batch, shared)
            head = self._sam_head(pix_feat, [h.expand(batch, -1, -1, -1) for h in high_res])
            memory_batches.append(([obj_id for obj_id, _, _ in members], head))

        for member_ids, head in memory_batches:
            if self._gate_margin is not None:
                self._motion_gate(member_ids, head)
            scores = head['object_score_logits']
            keep = list(range(len(member_ids)))
            if self._skip_absent_memory:
                keep = [i for i in keep if float(scores[i].reshape(-1)[0]) > 0]
            if keep:
                index = torch.tensor(keep, device=scores.device)
                memory, memory_pos = model._encode_new_memory(
                    current_vision_feats=feats[-1].expand(-1, len(keep), -1),
                    pred_masks_high_res=self._refined_for_memory(
                        head['high_res_masks'].index_select(0, index), head['pred_masks']),
                    object_score_logits=scores.index_select(0, index),
                    is_mask_from_pts=False)
            for i, obj_id in enumerate(member_ids):
                if i in keep:
                    j = keep.index(i)
                    obj_idx = session.obj_id_to_idx(obj_id)
                    session.output_dict_per_obj[obj_idx]['non_cond_frame_outputs'][frame_idx] = {
                        'object_pointer': head['object_pointer'][i:i + 1],
                        'object_score_logits': scores[i:i + 1],
                        'maskmem_features': memory[:, j:j + 1],
                        'maskmem_pos_enc': memory_pos[:, j:j + 1],
                        'scene_offset': self._scene_offset,
                    }
                results[obj_id] = {'pred_masks': head['pred_masks'][i:i + 1],
                                   'object_score_logits': scores[i:i + 1]}
        return results

    def _refined_for_memory(self, high_res_masks: torch.Tensor,
                            low_res_masks: torch.Tensor) -> torch.Tensor:
        """Return ``high_res_masks`` logits (B, 1, S, S) with their signs snapped to edges.

        The memory encoder reads the masks at the model's input size. Where the refined
        mask (``mask_refinement`` on the frame resized to that size) disagrees with the
        logit's sign, the sign is flipped; magnitudes stay as the decoder made them, so
        the memory sees masks of the same confidence it was trained on.
        """
        if self._refine_cells is None or high_res_masks.shape[0] == 0:
            return high_res_masks
        size = high_res_masks.shape[-2:]
        if self._model_guide is None:
            self._model_guide = cv2.resize(self._frame, (size[1], size[0]),
                                           interpolation=cv2.INTER_AREA)
        radius = refinement_radius(self._refine_cells, low_res_masks.shape[-2:], size)
        probabilities = torch.sigmoid(high_res_masks[:, 0].float()).cpu().numpy()
        unrefined = probabilities > 0.5
        refined = _never_emptied(
            refine_probabilities(self._model_guide, probabilities, radius) > 0.5, unrefined)
        flip = torch.from_numpy(refined != unrefined).to(high_res_masks.device)
        return torch.where(flip.unsqueeze(1), -high_res_masks, high_res_masks)

    def _object_batch_size(self, memory: torch.Tensor) -> int:
        """Return how many objects with memory tokens like ``memory`` share one batch.

        Batches hold about ``_BATCH_KEY_BYTES`` of cross-attention keys (one object's
        memory tokens projected to the attention width). On CPU the budget is cache-sized:
        batched over many objects the keys, their rotary temporaries and the memory-encoder
        activations are 100+ MB per frame at 512 px, so every element-wise pass streams from
        DRAM instead of cache. With 8 MB a batch is one object at 512 and 1024 px (7.4 MB
        of keys each with a full memory bank), four at 256 px, all of them for the tiny
        128 px model. Measured at 512 px with 20 objects against the official sam2 code
        (paired CPU-time ratio): batches of 8 objects 1.09-1.11, of 2 1.06, of 1 1.02.
        On CUDA larger batches mean fewer kernel launches; the budget there bounds the
        transient peak memory.
        """
        attention = self._model.memory_attention.layers[0].cross_attn_image
        key_bytes = memory.shape[0] * attention.internal_dim * memory.element_size()
        budget = self._BATCH_KEY_BYTES[self._device.type == 'cuda']
        size = max(1, budget // max(1, key_bytes))
        return size if self._max_batch is None else min(size, self._max_batch)

    def _gather_memory(self, obj_idx: int, frame_idx: int):
        """Return one object's memory tokens, their position encodings and pointer count."""
        model = self._model
        device = self._device
        positions = model._gather_memory_frame_outputs(self._session, obj_idx, frame_idx)
        if self._align_memory:
            # Temporal position 0 = conditioning (prompted) frames: only they grow old.
            positions = [(offset, self._aligned(out) if offset == 0 else out)
                         for offset, out in positions]
        memories, memory_pos = model._build_memory_attention_inputs(positions, device)
        offsets, pointers, max_pointers = model._get_object_pointers(
            self._session, obj_idx, frame_idx, None, device, track_in_reverse_time=False,
            streaming=True)
        num_ptr_tokens = 0
        if pointers:
            pointer_tokens, pointer_pos = model._process_object_pointers(
                offsets, pointers, max_pointers, 1, model.hidden_dim, device)
            memories.append(pointer_tokens)
            memory_pos.append(pointer_pos)
            num_ptr_tokens = pointer_tokens.shape[0]
        return torch.cat(memories, dim=0), torch.cat(memory_pos, dim=0), num_ptr_tokens

    def _remember_boxes(self, obj_ids: Sequence[int], high_res: torch.Tensor) -> None:
        """Store the boxes of objects' masks ``(B, S, S)`` (model-input px) for the gate."""
        if self._gate_margin is None or not obj_ids:
            return
        for obj_id, box in zip(obj_ids, logits_boxes(high_res), strict=True):
            if box is not None:
                self._last_box[obj_id] = (box, self._scene_offset)

    def _motion_gate(self, ids: Sequence[int], head: dict) -> None:
        """Cut tracked masks to their moved last box; mark the ones that left it absent."""
        high_res, low_res = head['high_res_masks'], head['pred_masks']
        scores = head['object_score_logits']
        present = (scores.reshape(len(ids), -1)[:, 0] > 0).tolist()
        rows = [i for i, obj_id in enumerate(ids) if present[i] and obj_id in self._last_box]
        if not rows:
            return
        boxes = []
        for i in rows:
            box, origin = self._last_box[ids[i]]
            boxes.append(moved_box(box, self._motion_since(origin), self._gate_margin))
        index = torch.tensor(rows, device=high_res.device)
        gated_high, gated_low = high_res[index, 0], low_res[index, 0]
        kept = gate_to_moved_boxes(gated_high, gated_low, boxes, self._model.config.image_size,
                                   _GATE_MIN_KEPT, _NO_OBJ_SCORE)
        high_res[index, 0], low_res[index, 0] = gated_high, gated_low
        stayed = [i for i, keep in zip(rows, kept, strict=True) if keep]
        self._remember_boxes([ids[i] for i in stayed], high_res[stayed, 0])
        left = torch.tensor([i for i, keep in zip(rows, kept, strict=True) if not keep],
                            dtype=torch.long, device=high_res.device)
        if left.numel():
            # Absent: no output mask, no memory; the last box keeps moving with the
            # scene, so the object returns when a mask shows up there again.
            scores[left] = torch.clamp(scores[left], max=0.0) - 1.0
            high_res[left] = _NO_OBJ_SCORE
            low_res[left] = _NO_OBJ_SCORE
            # As SAM2 does for an object it judges absent; read by later frames when absent
            # frames are memorised (skip_absent_memory=False).
            pointer = head['object_pointer']
            pointer[left] = self._model.no_object_pointer.to(pointer.dtype)

    def _motion_since(self, origin: Tuple[float, float]) -> Tuple[float, float]:
        """Return the scene motion from a frame with scene offset ``origin`` to now."""
        return (self._scene_offset[0] - origin[0], self._scene_offset[1] - origin[1])

    def _aligned(self, out: Optional[dict]) -> Optional[dict]:
        """Return a memory entry moved by the scene motion since its frame (a copy)."""
        if out is None or 'maskmem_features' not in out or 'scene_offset' not in out:
            return out
        shift = self._motion_since(out['scene_offset'])
        if abs(shift[0]) < 1e-3 and abs(shift[1]) < 1e-3:
            return out
        model = self._model
        moved = shift_memory(out['maskmem_features'], shift, model.backbone_feature_sizes[-1],
                             model.config.image_size)
        return dict(out, maskmem_features=moved)

    def _sam_head(self, pix_feat: torch.Tensor, high_res: List[torch.Tensor]) -> dict:
        """Run SAM2's prompt-free tracking head on a batch of memory-conditioned features.

        Mirrors ``Sam2VideoModel._single_frame_forward`` without prompts; its best-mask
        indexing only works for batch size 1, hence this batched version.
        """
        model = self._model
        batch = pix_feat.shape[0]
        points = torch.zeros(batch, 1, 1, 2, dtype=pix_feat.dtype, device=pix_feat.device)
        labels = -torch.ones(batch, 1, 1, dtype=torch.int32, device=pix_feat.device)
        sparse, dense = model.prompt_encoder(input_points=points, input_labels=labels,
                                             input_boxes=None, input_masks=None)
        image_pe = model.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
        multimask = model._use_multimask(False, None)
        low_res, iou, tokens, object_score_logits = model.mask_decoder(
            image_embeddings=pix_feat, image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask, high_resolution_features=high_res)
        rows = torch.arange(batch, device=pix_feat.device)
        best = iou[:, 0].argmax(dim=-1) if multimask else torch.zeros_like(rows)
        appearing = object_score_logits > 0  # (B, 1, 1)
        low_res = low_res[rows, 0, best].unsqueeze(1)  # (B, 1, h, w)
        low_res = torch.where(appearing[..., None], low_res, _NO_OBJ_SCORE)
        token = tokens[rows, 0, best] if tokens.size(2) > 1 else tokens[:, 0, 0]
        pointer = model.object_pointer_proj(token).unsqueeze(1)  # (B, 1, C)
        weight = appearing.to(pointer.dtype)
        pointer = weight * pointer + (1 - weight) * model.no_object_pointer
        high_res_masks = F.interpolate(low_res.float(), size=(model.image_size,) * 2,
                                       mode='bilinear', align_corners=False).to(low_res.dtype)
        return {'pred_masks': low_res, 'high_res_masks': high_res_masks,
                'object_pointer': pointer, 'object_score_logits': object_score_logits}

    # ------------------------------------------------------------------ bookkeeping
    def _cap_conditioning(self, cond_outputs: dict) -> None:
        while len(cond_outputs) > self._max_cond:
            frames = sorted(cond_outputs)
            # Keep the first prompt (the object's definition) and the most recent ones.
            del cond_outputs[frames[1]]

    def _prune(self, frame_idx: int) -> None:
        """Drop every frame the next frame cannot read (bounded memory on endless streams)."""
        session = self._session
        for stale in [idx for idx in session.processed_frames or {} if idx != frame_idx]:
            del session.processed_frames[stale]
        # The next frame (frame_idx + 1) reads mask memories at offsets 1..num_maskmem-1
        # and object pointers at offsets 1..max_object_pointers_in_encoder-1; a re-prompt of
        # a tracked object on this frame (add_objects on the latest frame) reads the same
        # offsets from frame_idx, so one frame further back is kept for it (without it the
        # oldest entry it reads has lost its mask memory).
        oldest_memory = frame_idx - self._mask_memory_window
        oldest_pointer = frame_idx - self._pointer_window
        for obj_idx, store in session.output_dict_per_obj.items():
            non_cond = store['non_cond_frame_outputs']
            for idx in list(non_cond):
                if idx < oldest_pointer:
                    del non_cond[idx]
                elif idx < oldest_memory and 'maskmem_features' in non_cond[idx]:
                    entry = non_cond[idx]
                    del entry['maskmem_features'], entry['maskmem_pos_enc']
            for table in (session.point_inputs_per_obj[obj_idx],
                          session.mask_inputs_per_obj[obj_idx]):
                for idx in [i for i in table if i < frame_idx]:
                    del table[idx]
            session.frames_tracked_per_obj[obj_idx].clear()

    def _stored_frame_indices(self) -> set:
        session = self._session
        frames = set(session.processed_frames or {})
        frames.update(session.cache._vision_features)
        for obj_idx, store in session.output_dict_per_obj.items():
            for table in store.values():
                frames.update(table)
            frames.update(session.point_inputs_per_obj[obj_idx])
            frames.update(session.mask_inputs_per_obj[obj_idx])
        return frames

    def _update_last_result(self, outputs: Dict[int, dict]) -> None:
        """Insert the objects just prompted on the latest frame into ``last_result``."""
        merged = {} if self._last_result is None else {
            obj.object_id: obj for obj in self._last_result.objects}
        for obj in self._to_tracked_objects(list(outputs), outputs):
            merged[obj.object_id] = obj
        ordered = [obj_id for obj_id in self._session.obj_ids if obj_id in merged]
        self._last_result = TrackResult(self._frame_index, [merged[i] for i in ordered])

    def _to_tracked_objects(self, ids: Sequence[int], outputs: Dict[int, dict]
                            ) -> List[TrackedObject]:
        if not ids:
            return []
        height, width = self._image_size
        logits = torch.cat([outputs[obj_id]['pred_masks'] for obj_id in ids], dim=0)
        scores = torch.cat([outputs[obj_id]['object_score_logits'].reshape(1)
                            for obj_id in ids]).float().cpu().numpy()
        # One batched upsampling of the low-res logits straight to the camera resolution.
        upsampled = F.interpolate(logits.float(), size=(height, width), mode='bilinear',
                                  align_corners=False)[:, 0]
        masks = (upsampled > 0).cpu().numpy()
        if self._refine_cells is not None:
            probabilities = torch.sigmoid(upsampled).cpu().numpy()
            # Absent objects are published without a mask: nothing of theirs to refine
            # (a mask with no pixel above 0.5 is skipped).
            probabilities[scores <= 0] = 0.0
            radius = refinement_radius(self._refine_cells, logits.shape[-2:], (height, width))
            masks = _never_emptied(
                refine_probabilities(self._frame, probabilities, radius) > 0.5, masks)
        objects = []
        for i, obj_id in enumerate(ids):
            # Judged present but without a pixel at this resolution (a sliver leaving the
            # image): nothing to show, so reported absent like an object judged gone.
            present = bool(scores[i] > 0) and bool(masks[i].any())
            mask = masks[i] if present else np.zeros((height, width), dtype=bool)
            objects.append(TrackedObject(
                object_id=int(obj_id), mask=mask, score=float(scores[i]), present=present,
                box=mask_to_box(mask) if present else None, area=int(mask.sum())))
        return objects
