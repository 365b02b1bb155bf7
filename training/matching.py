"""Hungarian matching of SAM3 detection queries to ground-truth instances.

One text prompt yields ``Q`` query predictions (score logit, box, mask); the ``T`` instances
of that phrase are matched one-to-one to queries by minimising a weighted cost with
``scipy.optimize.linear_sum_assignment``. Cost terms follow the official SAM3 trainer
(binary focal class cost, box L1 on ``(cx, cy, w, h)``, negative GIoU; weights 2 / 5 / 2)
plus optional mask costs (pairwise sigmoid focal and dice, as in Mask2Former), which help
when boxes of touching fruit overlap heavily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment
import torch
import torch.nn.functional as F

from training.losses import box_xyxy_to_cxcywh, generalized_box_iou


@dataclass
class MatchWeights:
    """Weights of the matching cost terms (official SAM3: class 2, bbox 5, GIoU 2)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    cost_mask: float = 2.0
    """Pairwise sigmoid focal cost of the masks (0 disables it)."""
    cost_dice: float = 2.0
    """Pairwise dice cost of the masks (0 disables it)."""
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    mask_cost_size: int = 64
    """Masks are compared at most at this side length to bound the cost's memory."""


def _focal_class_cost(logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


def _pairwise_mask_costs(pred_masks: torch.Tensor, tgt_masks: torch.Tensor,
                         weights: MatchWeights) -> torch.Tensor:
    size = min(weights.mask_cost_size, pred_masks.shape[-1], tgt_masks.shape[-1])
    pred = F.interpolate(pred_masks[:, None].float(), size=(size, size), mode='bilinear',
                         align_corners=False)[:, 0].flatten(1)
    tgt = F.interpolate(tgt_masks[:, None].float(), size=(size, size), mode='bilinear',
                        align_corners=False)[:, 0].flatten(1)
    cost = pred.new_zeros(pred.shape[0], tgt.shape[0])
    num_pixels = pred.shape[1]
    if weights.cost_mask:
        prob = pred.sigmoid()
        alpha, gamma = weights.focal_alpha, weights.focal_gamma
        focal_pos = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(
            pred, torch.ones_like(pred), reduction='none')
        focal_neg = (1 - alpha) * prob ** gamma * F.binary_cross_entropy_with_logits(
            pred, torch.zeros_like(pred), reduction='none')
        focal = (focal_pos @ tgt.T + focal_neg @ (1 - tgt).T) / num_pixels
        cost = cost + weights.cost_mask * focal
    if weights.cost_dice:
        prob = pred.sigmoid()
        numerator = 2 * prob @ tgt.T
        denominator = prob.sum(-1)[:, None] + tgt.sum(-1)[None, :]
        cost = cost + weights.cost_dice * (1 - (numerator + 1) / (denominator + 1))
    return cost


@torch.no_grad()
def match_cost_matrix(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                      tgt_boxes: torch.Tensor, weights: Optional[MatchWeights] = None,
                      pred_masks: Optional[torch.Tensor] = None,
                      tgt_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return the ``(Q, T)`` matching cost of queries against targets.

    ``pred_logits`` ``(Q,)``; ``pred_boxes`` ``(Q, 4)`` and ``tgt_boxes`` ``(T, 4)`` are
    normalised ``(x0, y0, x1, y1)``; masks (logits / binary) are ``(Q, h, w)`` / ``(T, H, W)``
    and only used when a mask cost weight is non-zero.
    """
    weights = weights or MatchWeights()
    if pred_logits.dim() != 1 or pred_boxes.shape != (pred_logits.shape[0], 4):
        raise ValueError(f'expected logits (Q,) and boxes (Q, 4), got '
                         f'{tuple(pred_logits.shape)} and {tuple(pred_boxes.shape)}')
    if tgt_boxes.dim() != 2 or tgt_boxes.shape[-1] != 4:
        raise ValueError(f'expected target boxes (T, 4), got {tuple(tgt_boxes.shape)}')
    num_queries, num_targets = pred_logits.shape[0], tgt_boxes.shape[0]
    if num_queries == 0 or num_targets == 0:
        return pred_logits.new_zeros(num_queries, num_targets)
    pred_logits = pred_logits.float()
    pred_boxes = pred_boxes.float()
    tgt_boxes = tgt_boxes.to(pred_boxes)
    cost_class = _focal_class_cost(pred_logits, weights.focal_alpha, weights.focal_gamma)
    cost_bbox = torch.cdist(box_xyxy_to_cxcywh(pred_boxes), box_xyxy_to_cxcywh(tgt_boxes), p=1)
    cost_giou = -generalized_box_iou(pred_boxes, tgt_boxes)
    cost = (weights.cost_class * cost_class[:, None] + weights.cost_bbox * cost_bbox
            + weights.cost_giou * cost_giou)
    if weights.cost_mask or weights.cost_dice:
        if pred_masks is None or tgt_masks is None:
            raise ValueError('mask cost weights are set but no masks were given')
        if pred_masks.shape[0] != num_queries or tgt_masks.shape[0] != num_targets:
            raise ValueError('mask counts do not match the logits/boxes counts')
        cost = cost + _pairwise_mask_costs(pred_masks, tgt_masks.to(pred_masks.dtype), weights)
    return cost


def hungarian_match(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(query_idx, target_idx)`` of the minimum-cost one-to-one assignment.

    Each matched pair appears once, ordered by target index; with ``Q < T`` only ``Q``
    targets are matched. Empty predictions or targets give two empty index tensors.
    """
    if cost.dim() != 2:
        raise ValueError(f'cost must be a (Q, T) matrix, got shape {tuple(cost.shape)}')
    empty = torch.zeros(0, dtype=torch.long)
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        return empty, empty.clone()
    values = cost.detach().cpu().double().numpy()
    if not np.all(np.isfinite(values)):
        raise ValueError('matching cost has NaN/inf entries (diverged predictions?)')
    rows, cols = linear_sum_assignment(values)
    order = np.argsort(cols, kind='stable')
    return (torch.as_tensor(rows[order], dtype=torch.long),
            torch.as_tensor(cols[order], dtype=torch.long))


def match_predictions(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                      tgt_boxes: torch.Tensor, weights: Optional[MatchWeights] = None,
                      pred_masks: Optional[torch.Tensor] = None,
                      tgt_masks: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the Hungarian ``(query_idx, target_idx)`` for one prompt's predictions."""
    cost = match_cost_matrix(pred_logits, pred_boxes, tgt_boxes, weights, pred_masks, tgt_masks)
    return hungarian_match(cost)


def match_to_anchors(anchor_boxes: torch.Tensor, tgt_boxes: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(query_idx, target_idx)`` pairing each target with the nearest free anchor.

    ``anchor_boxes`` ``(Q, 4)`` are the queries' reference boxes before any refinement and
    ``tgt_boxes`` ``(T, 4)`` the instances, both normalised ``xyxy``; the cost is the
    distance between centres, solved one-to-one like ``hungarian_match``. Unlike matching on
    the predictions, the pairing cannot change from step to step, so each query learns to
    answer for its own image region (the stable assignment of anchor-based detectors).
    """
    if anchor_boxes.shape[-1] != 4 or tgt_boxes.shape[-1] != 4:
        raise ValueError('match_to_anchors expects (Q, 4) and (T, 4) xyxy boxes')
    anchors = box_xyxy_to_cxcywh(anchor_boxes.float())[:, :2]
    centres = box_xyxy_to_cxcywh(tgt_boxes.float())[:, :2]
    return hungarian_match(torch.cdist(anchors, centres))
