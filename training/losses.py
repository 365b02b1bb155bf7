"""Loss functions shared by the SAM2 and SAM3 fine-tuning scripts.

Mask losses take raw logits and float/bool targets of the same shape ``(N, ..., H, W)`` and
return one value per object (``reduction='none'``) or their mean/sum. Averaging per object
first (then over objects) follows the official SAM2 training code, so large objects do not
dominate small ones. Boxes are ``(x0, y0, x1, y1)`` unless a helper says otherwise.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F

_REDUCTIONS = ('none', 'mean', 'sum')


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == 'none':
        return values
    if reduction == 'mean':
        return values.mean() if values.numel() else values.sum()
    if reduction == 'sum':
        return values.sum()
    raise ValueError(f"unknown reduction '{reduction}': use one of {_REDUCTIONS}")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f'{what}: prediction shape {tuple(a.shape)} != target shape '
                         f'{tuple(b.shape)}')


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0, reduction: str = 'mean') -> torch.Tensor:
    """Return the sigmoid focal loss (Lin et al. 2017) averaged over each object's pixels.

    ``alpha < 0`` disables the class-balancing weight. With ``reduction='none'`` the result
    has shape ``(N,)`` (one value per leading index).
    """
    _check_same_shape(logits, targets, 'sigmoid_focal_loss')
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction='none')
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss.flatten(1).mean(1), reduction)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0,
              reduction: str = 'mean') -> torch.Tensor:
    """Return ``1 - (2|P∩T| + s) / (|P| + |T| + s)`` per object on sigmoid probabilities."""
    _check_same_shape(logits, targets, 'dice_loss')
    prob = logits.sigmoid().flatten(1)
    targets = targets.to(logits.dtype).flatten(1)
    numerator = 2 * (prob * targets).sum(1) + smooth
    denominator = prob.sum(1) + targets.sum(1) + smooth
    return _reduce(1 - numerator / denominator, reduction)


def mask_iou_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the IoU of ``logits > 0`` with the targets per object (1.0 when both are empty).

    The result carries no gradient: it is the regression target of the IoU head.
    """
    _check_same_shape(logits, targets, 'mask_iou_from_logits')
    with torch.no_grad():
        pred = (logits > 0).flatten(1)
        true = targets.bool().flatten(1)
        inter = (pred & true).sum(1).float()
        union = (pred | true).sum(1).float()
        # An empty prediction for an empty target is a perfect answer, not a 0/0.
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def iou_prediction_loss(pred_iou: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                        kind: str = 'mse', reduction: str = 'mean') -> torch.Tensor:
    """Return the L1/MSE error of the predicted IoU against the mask's actual IoU.

    ``pred_iou`` has shape ``(N,)`` matching the leading dimension of ``logits``.
    """
    actual = mask_iou_from_logits(logits, targets).to(pred_iou.dtype)
    _check_same_shape(pred_iou, actual, 'iou_prediction_loss')
    if kind == 'mse':
        loss = F.mse_loss(pred_iou, actual, reduction='none')
    elif kind == 'l1':
        loss = F.l1_loss(pred_iou, actual, reduction='none')
    else:
        raise ValueError(f"unknown IoU loss kind '{kind}': use 'mse' or 'l1'")
    return _reduce(loss, reduction)


def object_score_loss(logits: torch.Tensor, present: torch.Tensor,
                      reduction: str = 'mean') -> torch.Tensor:
    """Return the BCE of object-presence logits against 0/1 presence targets."""
    _check_same_shape(logits, present, 'object_score_loss')
    loss = F.binary_cross_entropy_with_logits(logits, present.to(logits.dtype),
                                              reduction='none')
    return _reduce(loss, reduction)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``(cx, cy, w, h)`` boxes to ``(x0, y0, x1, y1)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """Convert ``(x0, y0, x1, y1)`` boxes to ``(cx, cy, w, h)``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_l1_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
    """Return the L1 distance between matched boxes, summed over the 4 coordinates."""
    _check_same_shape(pred, target, 'box_l1_loss')
    return _reduce((pred - target).abs().sum(-1), reduction)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    width = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    return width * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Return the pairwise IoU matrix ``(N, M)`` of two sets of xyxy boxes."""
    return _box_iou_and_union(boxes_a, boxes_b)[0]


def _box_iou_and_union(boxes_a: torch.Tensor, boxes_b: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    if boxes_a.shape[-1] != 4 or boxes_b.shape[-1] != 4:
        raise ValueError('box IoU expects (N, 4) and (M, 4) xyxy boxes')
    area_a = _box_area(boxes_a)
    area_b = _box_area(boxes_b)
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Return the pairwise generalized IoU matrix ``(N, M)`` of two sets of xyxy boxes.

    GIoU = IoU - (|C| - |A ∪ B|) / |C| with C the smallest box enclosing both (Rezatofighi
    et al. 2019); it lies in [-1, 1] and still has a gradient for disjoint boxes.
    """
    if boxes_a.shape[-1] != 4 or boxes_b.shape[-1] != 4:
        raise ValueError('generalized_box_iou expects (N, 4) and (M, 4) xyxy boxes')
    if ((boxes_a[:, 2:] < boxes_a[:, :2]).any() or (boxes_b[:, 2:] < boxes_b[:, :2]).any()):
        raise ValueError('generalized_box_iou got a box with x1 < x0 or y1 < y0')
    iou, union = _box_iou_and_union(boxes_a, boxes_b)
    hull_tl = torch.min(boxes_a[:, None, :2], boxes_b[None, :, :2])
    hull_br = torch.max(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    hull = (hull_br - hull_tl).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-9)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
    """Return ``1 - GIoU`` of matched xyxy box pairs (row i of pred with row i of target)."""
    _check_same_shape(pred, target, 'giou_loss')
    if pred.numel() == 0:
        return _reduce(pred.new_zeros(0), reduction)
    giou = torch.diagonal(generalized_box_iou(pred, target))
    return _reduce(1 - giou, reduction)


def weighted_sum(terms: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float]) -> torch.Tensor:
    """Return ``sum(weights[k] * terms[k])``; every term needs a weight, so none is dropped."""
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise KeyError(f'no loss weight configured for {missing}')
    if not terms:
        raise ValueError('weighted_sum needs at least one loss term')
    return sum(float(weights[name]) * value for name, value in terms.items())


def detach_terms(terms: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Return the loss terms as plain floats for logging."""
    return {name: float(value.detach()) for name, value in terms.items()}
