"""Tiny SAM2 video configurations, processors and checkpoints that need no download.

The tiny model is the real ``Sam2VideoModel`` architecture (Hiera backbone, FPN neck,
memory attention, memory encoder, SAM heads) with reduced depth, width and input size.
Tests run it with random weights; ``training/`` trains it on orchard data and saves it
with the same directory layout a downloaded ``facebook/sam2.1-hiera-tiny`` has.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence, Union

import torch
from transformers import (
    Sam2ImageProcessor,
    Sam2VideoConfig,
    Sam2VideoModel,
    Sam2VideoProcessor,
    Sam2VideoVideoProcessor,
)

# Stride of the Hiera patch embedding and of the three FPN levels the SAM2 heads consume.
_BACKBONE_STRIDES = (4, 8, 16)


def resize_sam2_video_config(config: Sam2VideoConfig, image_size: int) -> Sam2VideoConfig:
    """Return a copy of ``config`` whose every size-dependent field matches ``image_size``.

    The input size appears in five places of a SAM2 config (model, prompt encoder, Hiera
    backbone, FPN feature sizes, memory-attention RoPE grid); changing only one of them
    gives shape errors deep inside the model, so they are always changed together.
    """
    if image_size <= 0 or image_size % 32 != 0:
        raise ValueError(f'image_size must be a positive multiple of 32, got {image_size}')
    resized = copy.deepcopy(config)
    resized.image_size = image_size
    resized.prompt_encoder_config.image_size = image_size
    resized.vision_config.backbone_config.image_size = [image_size, image_size]
    resized.vision_config.backbone_feature_sizes = [
        [image_size // stride, image_size // stride] for stride in _BACKBONE_STRIDES]
    resized.memory_attention_rope_feat_sizes = [image_size // 16, image_size // 16]
    return resized


def tiny_sam2_video_config(image_size: int = 128, hidden_size: int = 128,
                           num_maskmem: int = 7, memory_attention_layers: int = 1,
                           max_object_pointers_in_encoder: int = 16,
                           backbone_width: int = 16,
                           blocks_per_stage: Sequence[int] = (1, 1, 2, 1)) -> Sam2VideoConfig:
    """Return a small ``Sam2VideoConfig`` of the real SAM2.1 architecture.

    ``hidden_size`` must be a multiple of 64 and at least 128: the memory-attention
    cross-attention reads 64-channel memories (hard-wired in transformers), and object
    pointers are split into ``hidden_size // 64`` memory tokens exactly as in the full
    model (transformers only handles pointers correctly on that split path).

    The Hiera backbone has four stages of ``backbone_width * (1, 2, 4, 8)`` channels and
    ``blocks_per_stage`` blocks (Hiera-tiny: 96 wide, ``(1, 2, 7, 2)``); as in Hiera-tiny,
    the last block of stage 3 attends globally and the others within windows.
    """
    if hidden_size < 128 or hidden_size % 64 != 0:
        raise ValueError(f'hidden_size must be a multiple of 64 and >= 128, got {hidden_size}')
    if backbone_width < 8 or backbone_width % 8 != 0:
        raise ValueError(f'backbone_width must be a multiple of 8 and >= 8, got {backbone_width}')
    blocks = [int(b) for b in blocks_per_stage]
    if len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(f'blocks_per_stage needs 4 positive counts, got {blocks_per_stage}')
    dims = [backbone_width * factor for factor in (1, 2, 4, 8)]
    backbone = {
        'model_type': 'sam2_hiera_det_model',
        'hidden_size': dims[0],
        'num_attention_heads': 1,
        'blocks_per_stage': blocks,
        'embed_dim_per_stage': dims,
        'num_attention_heads_per_stage': [1, 1, 2, 2],
        'window_size_per_stage': [8, 4, 4, 4],
        'global_attention_blocks': [sum(blocks[:3]) - 1],
        'window_positional_embedding_background_size': [4, 4],
    }
    vision = {
        'model_type': 'sam2_vision_model',
        'backbone_config': backbone,
        'backbone_channel_list': dims[::-1],
        'fpn_hidden_size': hidden_size,
    }
    config = Sam2VideoConfig(
        vision_config=vision,
        prompt_encoder_config={'hidden_size': hidden_size, 'mask_input_channels': 8},
        mask_decoder_config={
            'hidden_size': hidden_size, 'mlp_dim': 2 * hidden_size, 'num_attention_heads': 2,
            'iou_head_hidden_dim': hidden_size,
        },
        num_maskmem=num_maskmem,
        max_object_pointers_in_encoder=max_object_pointers_in_encoder,
        memory_attention_hidden_size=hidden_size,
        memory_attention_num_layers=memory_attention_layers,
        memory_attention_feed_forward_hidden_size=2 * hidden_size,
        memory_encoder_hidden_size=hidden_size,
        memory_encoder_output_channels=64,
        mask_downsampler_embed_dim=hidden_size,
        memory_fuser_embed_dim=hidden_size,
        memory_fuser_intermediate_dim=2 * hidden_size,
    )
    return resize_sam2_video_config(config, image_size)


def build_sam2_video_processor(image_size: int = 1024) -> Sam2VideoProcessor:
    """Build the standard SAM2 video processor for ``image_size`` without any download.

    Same preprocessing as the hub checkpoints (resize to a square, ImageNet mean/std).
    """
    size = {'height': image_size, 'width': image_size}
    mask_size = {'height': image_size // 4, 'width': image_size // 4}
    return Sam2VideoProcessor(
        image_processor=Sam2ImageProcessor(size=size, mask_size=mask_size),
        video_processor=Sam2VideoVideoProcessor(size=size),
    )


def build_tiny_sam2(seed: int = 0, **config_kwargs) -> Sam2VideoModel:
    """Return a randomly initialised tiny ``Sam2VideoModel`` (deterministic for ``seed``)."""
    config = tiny_sam2_video_config(**config_kwargs)
    # Seed a private generator state so building a model does not depend on (or disturb)
    # whatever random state the caller is in.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2VideoModel(config)
    return model.eval()


def save_tiny_sam2(out_dir: Union[str, Path], seed: int = 0, **config_kwargs) -> Path:
    """Write a loadable tiny SAM2 directory (config, safetensors, processor config).

    The layout is the one ``Sam2Tracker.load`` and ``from_pretrained`` expect from a
    downloaded hub checkpoint. Returns the directory path.
    """
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_sam2(seed=seed, **config_kwargs)
    model.save_pretrained(path, safe_serialization=True)
    build_sam2_video_processor(model.config.image_size).save_pretrained(path)
    return path
