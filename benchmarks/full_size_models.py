"""Randomly initialised production-size SAM2 / SAM3 models for benchmarks (nothing to download).

transformers' default configs are the released architectures: ``Sam2VideoConfig()`` is
SAM2.1-hiera-tiny at 1024 px, ``Sam3Config()`` is SAM3 (ViT backbone at 1008 px). Latency and
memory do not depend on the weight values, so these stand in for the checkpoints when
measuring speed or memory; they find nothing, so pass real checkpoints for quality figures.
The SAM3 directory gets the tiny test tokenizer (a few words; the real one is not on disk),
padded to the text encoder's 49408 tokens.
"""

from pathlib import Path
from typing import Union

import torch

FAMILIES = ('sam2', 'sam3')


def build_full_size(family: str, device: Union[str, torch.device] = 'cpu',
                    seed: int = 0) -> torch.nn.Module:
    """Return an eval-mode, randomly initialised ``Sam2VideoModel`` or ``Sam3Model``.

    The weights are created directly on ``device``: initialising SAM3's ~850M parameters on
    a GPU takes a second, on a CPU most of a minute.
    """
    from transformers import Sam2VideoConfig, Sam2VideoModel, Sam3Config, Sam3Model

    if family not in FAMILIES:
        raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')
    devices = [torch.device(device)] if torch.device(device).type == 'cuda' else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = Sam2VideoModel(Sam2VideoConfig()) if family == 'sam2' else Sam3Model(Sam3Config())
    return model.eval()


def save_full_size(family: str, out_dir: Union[str, Path],
                   device: Union[str, torch.device] = 'cpu') -> Path:
    """Write a loadable production-size model directory of ``family``; return its path."""
    from sam_gap_ros.engines.tiny_sam2 import build_sam2_video_processor
    from sam_gap_ros.engines.tiny_sam3 import build_sam3_processor, build_tiny_tokenizer

    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model = build_full_size(family, device)
    model.save_pretrained(path, safe_serialization=True)
    if family == 'sam2':
        build_sam2_video_processor(model.config.image_size).save_pretrained(path)
    else:
        # The load check wants as many tokens as the text encoder embeds (49408).
        tokenizer = build_tiny_tokenizer(vocab_size=model.config.text_config.vocab_size)
        build_sam3_processor(model.config.vision_config.backbone_config.image_size,
                             tokenizer).save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path
