"""Hungarian matching of SAM3 queries to ground truth (training/matching.py)."""

import itertools

import numpy as np
import pytest
import torch

from training.matching import (hungarian_match, match_cost_matrix, match_predictions,
                               match_to_anchors, MatchWeights)


def _brute_force_min(cost: np.ndarray) -> float:
    rows, cols = cost.shape
    best = np.inf
    if rows >= cols:
        for perm in itertools.permutations(range(rows), cols):
            best = min(best, sum(cost[p, t] for t, p in enumerate(perm)))
    else:
        for perm in itertools.permutations(range(cols), rows):
            best = min(best, sum(cost[q, p] for q, p in enumerate(perm)))
    return best


def test_hungarian_beats_greedy_on_a_known_matrix():
    # Greedy (take query 0's cheapest target first) would pick (0,0)=1 then (1,1)=100;
    # the optimum is (0,1)+(1,0) = 2 + 2.
    cost = torch.tensor([[1.0, 2.0], [2.0, 100.0]])
    queries, targets = hungarian_match(cost)
    assert targets.tolist() == [0, 1]
    assert queries.tolist() == [1, 0]


@pytest.mark.parametrize('shape', [(5, 3), (3, 5), (4, 4)])
def test_hungarian_is_optimal_against_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.random(shape)
        queries, targets = hungarian_match(torch.from_numpy(cost))
        assert len(queries) == min(shape)
        assert len(set(queries.tolist())) == len(queries)
        assert len(set(targets.tolist())) == len(targets)
        assert targets.tolist() == sorted(targets.tolist())
        total = cost[queries.numpy(), targets.numpy()].sum()
        assert total == pytest.approx(_brute_force_min(cost))


def test_empty_predictions_or_targets_give_empty_matches():
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3]])
    for q, t in ((0, 1), (1, 0), (0, 0)):
        queries, targets = match_predictions(torch.zeros(q), boxes[:q], boxes[:t],
                                             MatchWeights(cost_mask=0, cost_dice=0))
        assert queries.numel() == 0 and targets.numel() == 0
        assert queries.dtype == torch.long


def test_boxes_decide_the_match_when_scores_are_equal():
    targets = torch.tensor([[0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]])
    preds = torch.tensor([[0.05, 0.0, 0.2, 0.25], [0.3, 0.3, 0.4, 0.4], [0.6, 0.55, 0.9, 0.9]])
    queries, target_idx = match_predictions(torch.zeros(3), preds, targets,
                                            MatchWeights(cost_mask=0, cost_dice=0))
    assert dict(zip(target_idx.tolist(), queries.tolist(), strict=True)) == {0: 2, 1: 0}


def test_class_cost_prefers_the_confident_query_among_identical_boxes():
    box = torch.tensor([[0.2, 0.2, 0.5, 0.5]])
    preds = box.repeat(3, 1)
    logits = torch.tensor([-3.0, 4.0, 0.0])
    queries, _ = match_predictions(logits, preds, box, MatchWeights(cost_mask=0, cost_dice=0))
    assert queries.tolist() == [1]


def test_mask_cost_breaks_ties_between_identical_boxes():
    # Two touching fruit inside the same box: only the mask tells them apart.
    left = torch.zeros(16, 16)
    left[4:12, 4:8] = 1
    right = torch.zeros(16, 16)
    right[4:12, 8:12] = 1
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    preds = box.repeat(2, 1)
    pred_masks = torch.stack([right, left]) * 20 - 10  # logits: query 0 = right, 1 = left
    queries, targets = match_predictions(torch.zeros(2), preds, box.repeat(2, 1), MatchWeights(),
                                         pred_masks, torch.stack([left, right]))
    assert dict(zip(targets.tolist(), queries.tolist(), strict=True)) == {0: 1, 1: 0}
    cost = match_cost_matrix(torch.zeros(2), preds, box.repeat(2, 1), MatchWeights(),
                             pred_masks, torch.stack([left, right]))
    assert cost[1, 0] < cost[0, 0] and cost[0, 1] < cost[1, 1]


def test_official_weights_and_cost_composition():
    weights = MatchWeights()
    assert (weights.cost_class, weights.cost_bbox, weights.cost_giou) == (2.0, 5.0, 2.0)
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    target = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    only_l1 = MatchWeights(cost_class=0, cost_bbox=1, cost_giou=0, cost_mask=0, cost_dice=0)
    # cxcywh L1: |0.25-0.75| * 2 + 0 + 0 = 1.0
    assert float(match_cost_matrix(torch.zeros(1), pred, target, only_l1)) == pytest.approx(1.0)
    only_giou = MatchWeights(cost_class=0, cost_bbox=0, cost_giou=1, cost_mask=0, cost_dice=0)
    # Disjoint boxes touching at a corner: IoU 0, hull 1, union 0.5 -> GIoU -0.5, cost 0.5.
    assert float(match_cost_matrix(torch.zeros(1), pred, target, only_giou)) == pytest.approx(0.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match='NaN'):
        hungarian_match(torch.tensor([[float('nan')]]))
    with pytest.raises(ValueError, match='masks'):
        match_cost_matrix(torch.zeros(1), torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                          torch.tensor([[0.0, 0.0, 1.0, 1.0]]), MatchWeights())
    with pytest.raises(ValueError):
        match_cost_matrix(torch.zeros(2), torch.zeros(3, 4), torch.zeros(1, 4))


def test_anchor_assignment_pairs_each_target_with_the_nearest_free_anchor():
    # A 2x2 grid of anchors (xyxy, normalised).
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5],
                            [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])
    # Target 0 sits in the bottom-right cell, target 1 in the top-left; their size is
    # irrelevant (only centres count).
    targets = torch.tensor([[0.7, 0.7, 0.8, 0.8], [0.1, 0.1, 0.4, 0.2]])
    query_idx, target_idx = match_to_anchors(anchors, targets)
    assert target_idx.tolist() == [0, 1] and query_idx.tolist() == [3, 0]
    # Two targets in the same cell: one gets it, the other the nearest remaining anchor.
    crowded = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.2, 0.3, 0.3, 0.4]])
    query_idx, _ = match_to_anchors(anchors, crowded)
    assert sorted(query_idx.tolist()) == [0, 2]
    with pytest.raises(ValueError, match='xyxy'):
        match_to_anchors(anchors[:, :2], targets)
