"""Fixed input/output contract of the exported vision encoders of SAM2 and SAM3.

Both families replace the same thing: the ``vision_encoder`` sub-module of the transformers
model (``Sam2VideoModel.vision_encoder``, ``Sam3Model.vision_encoder``, and
``Sam3VideoModel.detector_model.vision_encoder``). The exported graph takes one input and
returns a flat list of tensors in a fixed order; ``pack_outputs`` turns that list back into the
exact output dataclass transformers consumes, so nothing downstream can tell the difference.

Input (both families): ``pixel_values`` float ``(1, 3, H, W)``, already normalised by the
processor. Outputs, ``L`` = number of FPN levels (SAM2: ``num_feature_levels`` = 3, strides
4/8/16; SAM3: ``len(scale_factors)`` = 4, scales 4x/2x/1x/0.5x of the ViT grid):

- ``last_hidden_state``: SAM2 ``(1, H/32, W/32, C_hiera)``; SAM3 ``(1, H/p * W/p, C_vit)``.
- ``fpn_hidden_states_<i>``, i = 0..L-1: ``(1, C_fpn, h_i, w_i)``, high to low resolution.
- ``fpn_position_encoding_<i>``: same shapes, sine position encodings of each level.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

FAMILIES = ('sam2', 'sam3')
PARTS = ('vision',)
INPUT_NAME = 'pixel_values'
MODEL_TYPES = {
    'sam2': ('sam2_video', 'sam2'),
    'sam3': ('sam3', 'sam3_video'),
}


def check_family(model: nn.Module, family: str) -> None:
    """Raise ValueError when ``family`` is unknown or does not match the model's type."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}': use one of {list(FAMILIES)}")
    model_type = getattr(getattr(model, 'config', None), 'model_type', None)
    if model_type not in MODEL_TYPES[family]:
        raise ValueError(f"family '{family}' expects a model of type {list(MODEL_TYPES[family])}, "
                         f"got '{model_type}'")


def vision_owner(model: nn.Module) -> nn.Module:
    """Return the module whose ``vision_encoder`` attribute is the image encoder."""
    # Sam3VideoModel keeps the shared SAM3 backbone inside its detector.
    owner = getattr(model, 'detector_model', None)
    if owner is None:
        owner = model
    if getattr(owner, 'vision_encoder', None) is None:
        raise ValueError(f'{type(model).__name__} has no vision_encoder to replace')
    return owner


def native_image_size(model: nn.Module, family: str) -> Tuple[int, int]:
    """Return the (height, width) the model's processor feeds to its vision encoder."""
    config = model.config
    if family == 'sam3':
        config = getattr(config, 'detector_config', None) or config
        size = config.vision_config.backbone_config.image_size
    else:
        size = config.image_size
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def input_size_problem(model: nn.Module, family: str, size: Sequence[int]) -> Optional[str]:
    """Return why the vision encoder cannot encode ``(height, width)`` inputs; None if it can."""
    height, width = (int(v) for v in size)
    native = native_image_size(model, family)
    if family == 'sam3':
        # The ViT's position embeddings are built for the native patch grid; other sizes fail
        # deep inside the encoder with a bare shape error.
        if (height, width) != native:
            return (f'SAM3 encodes only its native {native[0]}x{native[1]} input (its ViT '
                    f'position embeddings are fixed to that grid), not {height}x{width}: omit '
                    '--height/--width')
        return None
    multiple = _sam2_size_multiple(vision_owner(model).vision_encoder)
    if multiple and (height % multiple[0] or width % multiple[1]):
        return (f'the SAM2 vision encoder needs a height that is a multiple of {multiple[0]} and '
                f'a width that is a multiple of {multiple[1]} (patch stride x query pooling and '
                f'window position embedding), got {height}x{width}; native is '
                f'{native[0]}x{native[1]}')
    return None


def _sam2_size_multiple(encoder: nn.Module) -> Optional[Tuple[int, int]]:
    """Return the (height, width) a SAM2 Hiera input must be a multiple of; None if unknown."""
    try:
        config = encoder.config.backbone_config
        patch = _pair(config.patch_stride)
        query = _pair(config.query_stride)
        stages = int(config.num_query_pool_stages)
        window = tuple(int(v) for v in encoder.backbone.pos_embed_window.shape[-2:])
    except AttributeError:
        return None  # another transformers layout: let the export itself report the problem
    # The pooled stages must divide evenly for the FPN's 2x upsampling, and the window
    # position embedding is tiled over the patch grid.
    return tuple(math.lcm(patch[i] * query[i] ** stages, patch[i] * window[i])  # type: ignore
                 for i in range(2))


def _pair(value: Any) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def num_levels(encoder: nn.Module, family: str) -> int:
    """Return the number of FPN levels a PyTorch vision encoder of ``family`` returns."""
    vision_config = encoder.config
    if family == 'sam3':
        return len(vision_config.scale_factors)
    return int(vision_config.num_feature_levels)


def output_names(levels: int) -> List[str]:
    """Return the exported output names, in graph order, for ``levels`` FPN levels."""
    return (['last_hidden_state']
            + [f'fpn_hidden_states_{i}' for i in range(levels)]
            + [f'fpn_position_encoding_{i}' for i in range(levels)])


class VisionExportWrapper(nn.Module):
    """Flatten a transformers vision encoder's output into the fixed tensor list for export."""

    def __init__(self, vision_encoder: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Run the encoder and return ``last_hidden_state, fpn..., pos...``."""
        out = self.vision_encoder(pixel_values, return_dict=True)
        # Position encodings depend only on the shape, so the exporter folds them to constants;
        # TensorRT's ONNX parser may reject a network output that is a constant. Adding an
        # input-dependent exact zero keeps them graph outputs at negligible cost.
        zero = pixel_values[:, :1, :1, :1] * 0
        pos = tuple(p + zero for p in out.fpn_position_encoding)
        return (out.last_hidden_state, *out.fpn_hidden_states, *pos)


def pack_outputs(family: str, tensors: Dict[str, torch.Tensor], levels: int) -> Any:
    """Rebuild the transformers vision-encoder output object from named engine outputs."""
    fpn = tuple(tensors[f'fpn_hidden_states_{i}'] for i in range(levels))
    pos = tuple(tensors[f'fpn_position_encoding_{i}'] for i in range(levels))
    if family == 'sam3':
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput
        return Sam3VisionEncoderOutput(last_hidden_state=tensors['last_hidden_state'],
                                       fpn_hidden_states=fpn, fpn_position_encoding=pos)
    from transformers.models.sam2.modeling_sam2 import Sam2VisionEncoderOutput
    return Sam2VisionEncoderOutput(last_hidden_state=tensors['last_hidden_state'],
                                   fpn_hidden_states=fpn, fpn_position_encoding=pos)
