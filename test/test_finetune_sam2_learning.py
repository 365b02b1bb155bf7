"""SAM2 fine-tuning learns: prompted masks and memory tracking on an overfitted clip."""

import torch

from sam_gap_ros.mask_ops import mask_iou
from test_finetune_sam2 import _disk_clip
from training import common, finetune_sam2, sam2_data


def test_training_learns_prompted_masks_and_tracking():
    # Overfit one two-object clip: the validation path (plain transformers inference from
    # box prompts, second frame tracked through memory) must then segment both objects.
    common.seed_everything(0)
    model, processor = finetune_sam2.build_model({'tiny': {'image_size': 64}})
    model.train()
    clip = _disk_clip(num_frames=2)
    optimizer = common.build_optimizer(model, {'lr': 4e-4})
    stepper = common.GradientStepper(model, optimizer)
    targets = finetune_sam2.resize_masks(clip.masks, 64, torch.device('cpu'))
    prompts = [sam2_data.human_prompt(clip.masks[0, k], 'box') for k in range(2)]
    before, _ = finetune_sam2.validate(model, processor, [clip], 'box', torch.device('cpu'))
    for _ in range(80):
        session = processor.init_video_session(video=list(clip.frames), inference_device='cpu',
                                               max_vision_features_cache_size=2)
        sam2_data.add_prompts_to_session(processor, session, 0, clip.track_ids, prompts,
                                         clip.size)
        frames = finetune_sam2.forward_clip(model, session, clip.track_ids, 2)
        stepper.backward(finetune_sam2.clip_loss(frames, targets, {})[0])
    after, samples = finetune_sam2.validate(model, processor, [clip], 'box',
                                            torch.device('cpu'))
    assert before['miou'] < 0.2
    assert after['miou'] > 0.5, after
    # Each prompt selects its own object, on the prompted and on the tracked frame.
    for pred, true in zip(samples['pred'], samples['true'], strict=True):
        for k in range(2):
            assert mask_iou(pred[k], true[k]) > 0.3
