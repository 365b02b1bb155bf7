"""Loss functions against values worked out by hand."""

import math

import pytest
import torch

from training import losses

LN2 = math.log(2.0)


def test_focal_loss_hand_values():
    # p = sigmoid(0) = 0.5 for both pixels; (1 - p_t)^2 = 0.25; CE = ln 2.
    # positive pixel weight alpha = 0.25, negative pixel weight 0.75.
    logits = torch.zeros(1, 1, 2)
    targets = torch.tensor([[[1.0, 0.0]]])
    expected = (0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2) / 2
    got = losses.sigmoid_focal_loss(logits, targets)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_confident_pixel_and_no_alpha():
    # logit ln 3 -> p = 0.75; CE = -ln 0.75; modulating factor (0.25)^2.
    logits = torch.tensor([[math.log(3.0)]])
    targets = torch.ones(1, 1)
    plain = -math.log(0.75) * 0.0625
    assert losses.sigmoid_focal_loss(logits, targets, alpha=-1).item() == pytest.approx(
        plain, rel=1e-6)
    assert losses.sigmoid_focal_loss(logits, targets).item() == pytest.approx(
        0.25 * plain, rel=1e-6)


def test_focal_loss_is_per_object_mean():
    # Object 0: one pixel of the first test (0.25*0.25*ln2); object 1: perfect (~0).
    logits = torch.tensor([[0.0, 0.0], [30.0, -30.0]])
    targets = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_object = losses.sigmoid_focal_loss(logits, targets, reduction='none')
    assert per_object.shape == (2,)
    assert per_object[0].item() == pytest.approx(0.25 * 0.25 * LN2, rel=1e-6)
    assert per_object[1].item() == pytest.approx(0.0, abs=1e-12)
    total = losses.sigmoid_focal_loss(logits, targets, reduction='sum')
    assert total.item() == pytest.approx(per_object.sum().item())


def test_dice_loss_hand_values():
    # p = 0.5 everywhere, targets [1,1,0,0]: 1 - (2*1 + 1) / (2 + 2 + 1) = 0.4.
    logits = torch.zeros(1, 4)
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert losses.dice_loss(logits, targets).item() == pytest.approx(0.4, rel=1e-6)
    perfect = torch.tensor([[40.0, 40.0, -40.0, -40.0]])
    assert losses.dice_loss(perfect, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_iou_prediction_loss_hand_values():
    # prediction {0,1}, truth {0,2}: IoU = 1/3.
    logits = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    pred_iou = torch.tensor([0.5])
    actual = losses.mask_iou_from_logits(logits, targets)
    assert actual.item() == pytest.approx(1 / 3, rel=1e-6)
    mse = losses.iou_prediction_loss(pred_iou, logits, targets, kind='mse')
    assert mse.item() == pytest.approx((0.5 - 1 / 3) ** 2, rel=1e-6)
    l1 = losses.iou_prediction_loss(pred_iou, logits, targets, kind='l1')
    assert l1.item() == pytest.approx(1 / 6, rel=1e-6)
    with pytest.raises(ValueError, match='unknown IoU loss kind'):
        losses.iou_prediction_loss(pred_iou, logits, targets, kind='huber')


def test_iou_target_for_empty_prediction_of_empty_mask_is_one():
    logits = -torch.ones(1, 3)
    assert losses.mask_iou_from_logits(logits, torch.zeros(1, 3)).item() == 1.0


def test_iou_loss_gradient_only_reaches_the_iou_head():
    logits = torch.zeros(1, 4, requires_grad=True)
    pred_iou = torch.tensor([0.2], requires_grad=True)
    losses.iou_prediction_loss(pred_iou, logits, torch.ones(1, 4)).backward()
    assert logits.grad is None or torch.all(logits.grad == 0)
    assert pred_iou.grad is not None and pred_iou.grad.abs().item() > 0


def test_object_score_loss_hand_values():
    logits = torch.tensor([0.0, math.log(3.0)])
    present = torch.tensor([1.0, 0.0])
    per_item = losses.object_score_loss(logits, present, reduction='none')
    assert per_item[0].item() == pytest.approx(LN2, rel=1e-6)
    # p = 0.75 for an absent object: -ln(0.25) = ln 4.
    assert per_item[1].item() == pytest.approx(math.log(4.0), rel=1e-6)


def test_box_l1_loss_hand_values():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 0.0, 2.0, 4.0]])
    assert losses.box_l1_loss(pred, target).item() == pytest.approx(3.0)


def test_generalized_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    giou = losses.generalized_box_iou(a, b)
    assert giou.shape == (2, 2)
    # overlap: inter 1, union 7, hull 9 -> 1/7 - 2/9.
    assert giou[0, 0].item() == pytest.approx(1 / 7 - 2 / 9, rel=1e-6)
    # disjoint unit boxes 1 apart: iou 0, union 2, hull 3 -> -1/3.
    assert giou[1, 1].item() == pytest.approx(-1 / 3, rel=1e-6)
    assert losses.generalized_box_iou(a, a).diagonal().tolist() == pytest.approx([1.0, 1.0])


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0]])
    iou = losses.box_iou(a, b)
    assert iou.shape == (2, 2)
    assert iou[0, 0].item() == pytest.approx(1 / 7, rel=1e-6)
    assert iou[1, 1].item() == 0.0
    assert iou[1, 0].item() == 0.0  # touching at a corner only
    assert losses.box_iou(a, a).diagonal().tolist() == pytest.approx([1.0, 1.0])


def test_giou_loss_has_gradient_for_disjoint_boxes():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    loss = losses.giou_loss(pred, target)
    assert loss.item() == pytest.approx(1 + 1 / 3, rel=1e-6)
    loss.backward()
    assert pred.grad.abs().sum().item() > 0


def test_box_format_round_trip():
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    cxcywh = losses.box_xyxy_to_cxcywh(xyxy)
    assert cxcywh.tolist() == [[3.0, 6.0, 4.0, 8.0]]
    assert torch.equal(losses.box_cxcywh_to_xyxy(cxcywh), xyxy)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match='shape'):
        losses.dice_loss(torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match='x1 < x0'):
        losses.generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match='reduction'):
        losses.sigmoid_focal_loss(torch.zeros(1, 2), torch.zeros(1, 2), reduction='avg')


def test_weighted_sum_requires_every_weight():
    terms = {'focal': torch.tensor(2.0), 'dice': torch.tensor(0.5)}
    assert losses.weighted_sum(terms, {'focal': 20.0, 'dice': 1.0}).item() == pytest.approx(40.5)
    with pytest.raises(KeyError, match='dice'):
        losses.weighted_sum(terms, {'focal': 20.0})
