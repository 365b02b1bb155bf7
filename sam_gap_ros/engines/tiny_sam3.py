"""Tiny SAM3 configurations, tokenizer, processor and checkpoints that need no download.

The tiny model is the real ``Sam3Model`` architecture (windowed RoPE ViT backbone with
tiled position embeddings, FPN neck, CLIP text encoder, DETR encoder/decoder with presence
head, dot-product scoring, mask decoder) with reduced width, depth and input size. Tests run
it with random weights; ``training/`` trains it and saves it with the directory layout of a
downloaded ``facebook/sam3`` (config, safetensors, CLIP tokenizer, processor config).

The tokenizer is a genuine ``CLIPTokenizer`` (byte-level BPE, lower-casing, ``</w>``
word ends, start/end tokens, padded to 32 tokens by ``Sam3Processor``) over a small
vocabulary: every byte as a fallback symbol plus whole-word merges for orchard words and
basic English, so any text tokenizes and known words become single tokens.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tokenizers import pre_tokenizers
import torch
from transformers import (
    CLIPTokenizer,
    Sam3Config,
    Sam3ImageProcessor,
    Sam3Model,
    Sam3Processor,
)

# Orchard vocabulary plus the English glue words that noun phrases and the concept-query
# grammar (``but not``, ``and not``, ``near``) use.
TINY_VOCABULARY: Tuple[str, ...] = (
    # fruit and plant parts
    'apple', 'apples', 'pear', 'pears', 'cherry', 'cherries', 'peach', 'plum', 'fruit',
    'fruits', 'fruitlet', 'blossom', 'blossoms', 'flower', 'flowers', 'leaf', 'leaves',
    'branch', 'branches', 'twig', 'trunk', 'tree', 'trees', 'stem', 'stems', 'bud', 'buds',
    'canopy', 'root', 'bark', 'shoot', 'sucker', 'spur', 'graft', 'rootstock', 'cluster',
    # orchard infrastructure and scene
    'orchard', 'row', 'rows', 'trellis', 'wire', 'post', 'pole', 'net', 'netting', 'bin',
    'bins', 'crate', 'box', 'ladder', 'tractor', 'robot', 'gripper', 'arm', 'sprayer',
    'irrigation', 'pipe', 'hose', 'grass', 'ground', 'soil', 'weed', 'weeds', 'sky', 'person',
    'worker', 'hand', 'glove', 'label', 'sticker', 'shadow', 'light',
    # conditions and attributes
    'ripe', 'unripe', 'overripe', 'rotten', 'damaged', 'bruised', 'cracked', 'diseased',
    'healthy', 'scab', 'mildew', 'sunburn', 'sunburnt', 'hail', 'bird', 'insect', 'pest',
    'aphid', 'codling', 'moth', 'hole', 'spot', 'spots', 'fallen', 'dropped', 'hanging',
    'occluded', 'visible', 'dead', 'broken', 'pruned', 'cut', 'young', 'old', 'mature',
    'small', 'large', 'big', 'tiny', 'round', 'long', 'thin', 'thick',
    # colours
    'red', 'green', 'yellow', 'orange', 'brown', 'black', 'white', 'pink', 'purple', 'dark',
    'bright', 'pale',
    # basic English
    'a', 'an', 'the', 'of', 'on', 'in', 'at', 'with', 'without', 'and', 'or', 'but', 'not',
    'no', 'near', 'next', 'to', 'under', 'over', 'above', 'below', 'behind', 'front', 'left',
    'right', 'top', 'bottom', 'side', 'inside', 'outside', 'one', 'two', 'some', 'all', 'other',
)

BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'
TEXT_LENGTH = 32
"""Token length ``Sam3Processor`` pads every phrase to (the CLIP context of SAM3)."""


@functools.lru_cache(maxsize=8)
def _bpe_tables(words: Tuple[str, ...]) -> Tuple[Dict[str, int], Tuple[Tuple[str, str], ...]]:
    """Return the BPE ``(vocab, merges)`` for ``words``; special tokens come last as in CLIP."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens: List[str] = list(alphabet) + [symbol + '</w>' for symbol in alphabet]
    known = set(tokens)
    merges: List[Tuple[str, str]] = []
    for word in words:
        # ByteLevel maps every byte of a lower-case ASCII word to itself, so the word's
        # symbols are its characters; merge them left to right into the whole word.
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"tiny vocabulary words must be lower-case ASCII letters: '{word}'")
        symbols = list(word[:-1]) + [word[-1] + '</w>']
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in known:
                merges.append((current, symbol))
                known.add(merged)
                tokens.append(merged)
            current = merged
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, tuple(merges)


def build_tiny_tokenizer(words: Iterable[str] = TINY_VOCABULARY,
                         vocab_size: Optional[int] = None) -> CLIPTokenizer:
    """Build a ``CLIPTokenizer`` whose BPE has merges for ``words`` (no download).

    Each word's merges are added left to right, but BPE applies merges by rank, so a word
    that contains an earlier one (``unripe`` after ``ripe``) may come out as several known
    tokens (``un`` + ``ripe``) rather than one; no word maps to the unknown token.
    ``vocab_size`` pads the vocabulary with tokens no text produces, to that many tokens:
    it pairs the tokenizer with a text encoder of that size (the full SAM3's 49408).
    """
    vocab, merges = _bpe_tables(tuple(dict.fromkeys(words)))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f'vocab_size {vocab_size} is below the {len(vocab)} tokens of '
                             'these words')
        vocab = {**vocab, **{f'<unused_{i}>': i for i in range(len(vocab), vocab_size)}}
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token=EOS_TOKEN,
                         bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                         model_max_length=TEXT_LENGTH)


def tiny_vocab_size(words: Iterable[str] = TINY_VOCABULARY) -> int:
    """Return the number of tokens of ``build_tiny_tokenizer(words)``."""
    return len(_bpe_tables(tuple(dict.fromkeys(words)))[0])


def build_sam3_processor(image_size: int = 1008,
                         tokenizer: Optional[CLIPTokenizer] = None) -> Sam3Processor:
    """Build the standard SAM3 processor for ``image_size`` without any download.

    Same preprocessing as the hub checkpoint (resize to a square, mean/std 0.5); the
    tokenizer defaults to the tiny CLIP tokenizer.
    """
    size = {'height': int(image_size), 'width': int(image_size)}
    # The hub processor's mask size is 4x the ViT grid (288 for 1008 px, patch 14).
    mask_side = max(1, int(image_size) * 4 // 14)
    image_processor = Sam3ImageProcessor(size=size, mask_size={'height': mask_side,
                                                               'width': mask_side})
    return Sam3Processor(image_processor=image_processor,
                         tokenizer=tokenizer if tokenizer is not None else build_tiny_tokenizer(),
                         target_size=int(image_size))


def build_tiny_processor(image_size: int = 112,
                         words: Iterable[str] = TINY_VOCABULARY) -> Sam3Processor:
    """Build the processor matching ``tiny_sam3_config(image_size)`` (tiny tokenizer)."""
    return build_sam3_processor(image_size, build_tiny_tokenizer(words))


def tiny_sam3_config(image_size: int = 112, patch_size: int = 14, vit_hidden_size: int = 32,
                     vit_layers: int = 2, vit_heads: int = 2, window_size: int = 4,
                     global_attn_indexes: Optional[Sequence[int]] = None,
                     hidden_size: int = 32, heads: int = 2, detr_encoder_layers: int = 1,
                     detr_decoder_layers: int = 1, geometry_layers: int = 1,
                     num_queries: int = 16, text_hidden_size: int = 32, text_layers: int = 1,
                     text_heads: int = 2, vocab_size: Optional[int] = None) -> Sam3Config:
    """Return a small ``Sam3Config`` of the real SAM3 image architecture.

    ``image_size`` must be a multiple of ``patch_size``; as in the full model the ViT grid
    is split into ``window_size`` windows with global attention in the last block (unless
    ``global_attn_indexes`` says otherwise), and the position embeddings are pretrained
    for half the grid and tiled. ``vocab_size`` defaults to the tiny tokenizer's.
    """
    if image_size <= 0 or image_size % patch_size:
        raise ValueError(f'image_size must be a positive multiple of patch_size {patch_size}, '
                         f'got {image_size}')
    grid = image_size // patch_size
    if grid % 2:
        raise ValueError(f'image_size / patch_size must be even (FPN 0.5x level), got {grid}')
    if vocab_size is None:
        vocab_size = tiny_vocab_size()
    if global_attn_indexes is None:
        global_attn_indexes = [vit_layers - 1]
    backbone = {
        'model_type': 'sam3_vit_model',
        'hidden_size': vit_hidden_size,
        'intermediate_size': 4 * vit_hidden_size,
        'num_hidden_layers': vit_layers,
        'num_attention_heads': vit_heads,
        'image_size': image_size,
        'patch_size': patch_size,
        'window_size': window_size,
        'global_attn_indexes': list(global_attn_indexes),
        'pretrain_image_size': max(patch_size, (grid // 2) * patch_size),
        'rope_parameters': {'rope_type': 'axial', 'rope_theta': 10000.0},
    }
    fpn_sizes = [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]]
    detr = {'hidden_size': hidden_size, 'num_attention_heads': heads,
            'intermediate_size': 4 * hidden_size}
    config = Sam3Config(
        vision_config={'backbone_config': backbone, 'fpn_hidden_size': hidden_size,
                       'backbone_feature_sizes': fpn_sizes},
        text_config={
            'vocab_size': vocab_size, 'hidden_size': text_hidden_size,
            'intermediate_size': 4 * text_hidden_size, 'projection_dim': text_hidden_size,
            'num_hidden_layers': text_layers, 'num_attention_heads': text_heads,
            'max_position_embeddings': TEXT_LENGTH, 'hidden_act': 'gelu',
            # The tiny tokenizer puts start/end last, like CLIP's 49406/49407.
            'bos_token_id': vocab_size - 2, 'eos_token_id': vocab_size - 1,
            'pad_token_id': vocab_size - 1,
        },
        geometry_encoder_config=dict(detr, num_layers=geometry_layers),
        detr_encoder_config=dict(detr, num_layers=detr_encoder_layers),
        detr_decoder_config=dict(detr, num_layers=detr_decoder_layers, num_queries=num_queries),
        mask_decoder_config={'hidden_size': hidden_size, 'num_attention_heads': heads},
    )
    return config


def grid_reference_boxes(num_queries: int, box_size: float) -> torch.Tensor:
    """Return ``(num_queries, 4)`` pre-sigmoid DETR reference boxes on a square grid.

    ``num_queries`` must be a perfect square; box centres sit at the cell centres of a
    ``sqrt(num_queries)``-sided grid over the unit image and every box is ``box_size`` wide
    and high (normalised), in the decoder's ``(cx, cy, w, h)`` order.
    """
    side = math.isqrt(num_queries)
    if side * side != num_queries:
        raise ValueError(f'grid reference boxes need a square num_queries, got {num_queries}')
    if not 0.0 < box_size < 1.0:
        raise ValueError(f'box_size must be in (0, 1), got {box_size}')
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    cy, cx = torch.meshgrid(centres, centres, indexing='ij')
    size = torch.full_like(cx, box_size)
    boxes = torch.stack([cx, cy, size, size], dim=-1).reshape(num_queries, 4)
    return torch.logit(boxes)


RPB_OUTSIDE_PENALTY = 8.0
"""Attention-bias slope outside a query's box (per log-scaled unit) of the anchor init."""


def _init_box_local_bias(embed: torch.nn.Module, penalty: float) -> None:
    """Make a box-RPB MLP start as ``-penalty * (distance outside the box)`` on its axis.

    The RPB MLP sees ``(coord - lo, coord - hi)`` (log-scaled) for its axis; hidden unit 0
    computes ``relu(lo - coord)`` and unit 1 ``relu(coord - hi)``, both zero inside the box,
    and every head gets ``-penalty`` times their sum. The other hidden units keep their
    random init so they still learn. Why: with a random RPB each query's cross-attention is
    near uniform, all queries read the same global average and the masks of every query
    collapse to one (seen with the tiny model trained from scratch).
    """
    first, second = embed.layer1, embed.layer2
    first.weight[:2].zero_()
    first.bias[:2].zero_()
    first.weight[0, 0] = -1.0
    first.weight[1, 1] = 1.0
    second.weight[:, :2] = -float(penalty)


def build_tiny_sam3(seed: int = 0, anchor_box_size: Optional[float] = None,
                    **config_kwargs) -> Sam3Model:
    """Return a randomly initialised tiny ``Sam3Model`` in eval mode (deterministic per seed).

    With ``anchor_box_size`` the decoder's learned reference boxes start on a grid
    (``grid_reference_boxes``) instead of at random, the box deltas at zero and the box
    relative-position bias local (attention outside a query's box penalised, see
    ``_init_box_local_bias``): each query begins looking at its own image region, which
    training with anchor assignment (``matcher.assign: anchors``) relies on. Only the
    initial weights change; the architecture and checkpoint format do not.
    """
    config = tiny_sam3_config(**config_kwargs)
    # A private generator state: building a model neither depends on nor disturbs the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(config)
    if anchor_box_size is not None:
        decoder = model.detr_decoder
        with torch.no_grad():
            decoder.reference_points.weight.copy_(grid_reference_boxes(
                decoder.reference_points.num_embeddings, anchor_box_size))
            # Zero box deltas at the start (as Deformable DETR initialises its box head), so
            # every layer's first prediction is its anchor rather than a random offset of it.
            last = decoder.box_head.layer3 or decoder.box_head.layer2
            last.weight.zero_()
            last.bias.zero_()
            for embed in (decoder.box_rpb_embed_x, decoder.box_rpb_embed_y):
                _init_box_local_bias(embed, RPB_OUTSIDE_PENALTY)
    return model.eval()


def save_tiny_sam3(out_dir: Union[str, Path], seed: int = 0,
                   anchor_box_size: Optional[float] = None, **config_kwargs) -> Path:
    """Write a loadable tiny SAM3 directory (config, safetensors, tokenizer, processor).

    The layout is the one ``Sam3ConceptEngine.load`` and ``from_pretrained`` expect from a
    downloaded hub checkpoint. Returns the directory path.
    """
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_sam3(seed=seed, anchor_box_size=anchor_box_size, **config_kwargs)
    model.save_pretrained(path, safe_serialization=True)
    image_size = model.config.vision_config.backbone_config.image_size
    build_tiny_processor(image_size).save_pretrained(path)
    return path


__all__ = ['BOS_TOKEN', 'EOS_TOKEN', 'TEXT_LENGTH', 'TINY_VOCABULARY', 'build_sam3_processor',
           'build_tiny_processor', 'build_tiny_sam3', 'build_tiny_tokenizer',
           'grid_reference_boxes', 'save_tiny_sam3', 'tiny_sam3_config', 'tiny_vocab_size']
