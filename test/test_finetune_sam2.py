"""SAM2 fine-tuning on CPU: a tiny real Sam2VideoModel on synthetic orchard videos."""

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch

from sam_gap_ros.engines.sam2_tracker import Sam2Tracker
from sam_gap_ros.engines.tiny_sam2 import build_sam2_video_processor, build_tiny_sam2
from training import common, finetune_sam2, sam2_data
from training_harness import record_learning_rates

SMOKE = Path(__file__).resolve().parents[1] / 'training' / 'configs' / 'smoke_sam2.yaml'


def _cfg(tmp_path, name, **train):
    cfg = common.load_config(SMOKE)
    cfg['output_dir'] = str(tmp_path / name)
    cfg['train'].update(train)
    return cfg


def _disk_clip(num_frames=2, size=(48, 64)):
    """Two coloured disks moving right on grey: a tiny clip with exact masks."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    frames = np.full((num_frames, h, w, 3), 90, dtype=np.uint8)
    masks = np.zeros((num_frames, 2, h, w), dtype=bool)
    for t in range(num_frames):
        for k, (cx, cy, colour) in enumerate([(16, 20, (220, 30, 30)), (44, 28, (230, 210, 40))]):
            masks[t, k] = (xx - cx - 2 * t) ** 2 + (yy - cy) ** 2 <= 64
            frames[t][masks[t, k]] = colour
    return sam2_data.VideoClip(frames, masks, [3, 8], 'disks')


def test_prompts_come_from_the_ground_truth():
    clip = _disk_clip()
    rng = np.random.default_rng(0)
    mask = clip.masks[0, 0]
    for _ in range(20):
        prompt = sam2_data.sample_prompt(mask, rng, {'probabilities': {'points': 1.0},
                                                     'num_positive': 2, 'max_negative': 2})
        xs, ys = prompt.points[:, 0].astype(int), prompt.points[:, 1].astype(int)
        assert np.all(mask[ys[prompt.labels == 1], xs[prompt.labels == 1]])
        assert not np.any(mask[ys[prompt.labels == 0], xs[prompt.labels == 0]])
        box = sam2_data.sample_prompt(mask, rng, {'probabilities': {'box': 1.0},
                                                  'box_noise': 0.5, 'box_noise_max_px': 3}).box
        assert np.all(np.abs(box - np.array([8, 12, 25, 29])) <= 3 + 1e-6)
    with pytest.raises(ValueError, match='absent'):
        sam2_data.sample_prompt(np.zeros_like(mask), rng, {})
    assert sam2_data.human_prompt(mask, 'points').points.tolist() == [[16.5, 20.5]]


def test_strided_clips_skip_frames_and_stride_one_keeps_the_data_order():
    clip = _disk_clip(num_frames=12)
    seen = set()
    for seed in range(40):
        sub = sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 2, max_stride=3)
        start = int(sub.name.split('@')[1])
        # Recover the stride from the disks' motion (2 px per source frame).
        shift = np.flatnonzero(sub.masks[1, 0].any(0))[0] - np.flatnonzero(
            sub.masks[0, 0].any(0))[0]
        stride = int(shift) // 2
        assert 1 <= stride <= 3 and start + 3 * stride < 12
        assert np.array_equal(sub.frames, clip.frames[start:start + 3 * stride + 1:stride])
        seen.add(stride)
    assert seen == {1, 2, 3}
    plain = sam2_data.sample_subclip(clip, np.random.default_rng(5), 4, 2)
    strided_one = sam2_data.sample_subclip(clip, np.random.default_rng(5), 4, 2, max_stride=1)
    assert plain.name == strided_one.name and plain.num_frames == 4


def test_exit_fraction_oversamples_clips_where_a_prompted_object_leaves():
    clip = _disk_clip(num_frames=20)  # the right disk leaves the 64 px image after frame 13

    def has_exit(sub):
        areas = sub.masks.reshape(sub.num_frames, sub.num_objects, -1).sum(2)
        return bool((areas[1:] == 0).any())

    plain = [sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 1, max_stride=3)
             for seed in range(40)]
    forced = [sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 1, max_stride=3,
                                       exit_fraction=1.0) for seed in range(40)]
    plain_rate = np.mean([has_exit(sub) for sub in plain])
    assert all(has_exit(sub) for sub in forced)
    assert plain_rate < 0.5
    # Every forced clip still starts with its objects visible, so they can be prompted.
    assert all(sub.masks[0].reshape(sub.num_objects, -1).sum(1).min() >= 16 for sub in forced)
    # Off by default: the same draws, hence the same data order as before the option.
    off = [sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 1, max_stride=3,
                                    exit_fraction=0.0) for seed in range(40)]
    assert [sub.name for sub in off] == [sub.name for sub in plain]


def test_prompt_gap_puts_the_prompted_frame_further_back():
    clip = _disk_clip(num_frames=20)

    def first_gap(sub):  # from the left disk's motion (2 px per frame; it never leaves)
        starts = [np.flatnonzero(sub.masks[t, 0].any(0))[0] for t in (0, 1)]
        return int(starts[1] - starts[0]) // 2

    gaps = set()
    for seed in range(40):
        sub = sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 2, max_stride=2,
                                       max_prompt_gap=9)
        start = int(sub.name.split('@')[1])
        gap = first_gap(sub)
        stride = int(np.flatnonzero(sub.masks[2, 0].any(0))[0]
                     - np.flatnonzero(sub.masks[1, 0].any(0))[0]) // 2
        assert 1 <= stride <= 2 and stride <= gap <= 9 and start + gap + 2 * stride < 20
        index = [start, start + gap, start + gap + stride, start + gap + 2 * stride]
        assert np.array_equal(sub.frames, clip.frames[index])
        gaps.add(gap)
    assert max(gaps) >= 7 and min(gaps) <= 2
    # Off by default (0 or not above the stride): the same draws as before the option.
    plain = [sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 2, max_stride=3)
             for seed in range(10)]
    off = [sam2_data.sample_subclip(clip, np.random.default_rng(seed), 4, 2, max_stride=3,
                                    max_prompt_gap=1) for seed in range(10)]
    assert [sub.name for sub in off] == [sub.name for sub in plain]
    assert all(first_gap(sub) <= 3 for sub in off)


def test_video_folder_matches_the_generator(tmp_path):
    from sam_gap_ros.synthetic import OrchardSceneConfig, read_video_frame, write_video_dataset
    config = OrchardSceneConfig(width=64, height=48, n_apples=(2, 3))
    write_video_dataset(tmp_path, 1, 3, seed=1, config=config)
    clips = sam2_data.load_video_folder(tmp_path)
    assert len(clips) == 1 and clips[0].num_frames == 3
    index = json.loads((tmp_path / 'index.json').read_text())
    video = index['videos'][0]
    apples = [t['track_id'] for t in video['tracks'] if t['category'] == 'apple']
    assert clips[0].track_ids == apples
    rgb, labels, _ = read_video_frame(tmp_path, video, 2)
    assert np.array_equal(clips[0].frames[2], rgb)
    for k, track_id in enumerate(apples):
        assert np.array_equal(clips[0].masks[2, k], labels == track_id)
    # Training needs images and masks only: a dataset without depth reads the same.
    for frame in video['frames']:
        (tmp_path / frame.pop('depth')).unlink()
    (tmp_path / 'index.json').write_text(json.dumps(index))
    without_depth = sam2_data.load_video_folder(tmp_path)[0]
    assert np.array_equal(without_depth.frames, clips[0].frames)
    assert np.array_equal(without_depth.masks, clips[0].masks)
    assert read_video_frame(tmp_path, video, 2)[2] is None


def test_video_folder_frame_of_another_size_is_named(tmp_path):
    import cv2

    from sam_gap_ros.synthetic import OrchardSceneConfig, write_video_dataset
    write_video_dataset(tmp_path, 1, 3, seed=1, config=OrchardSceneConfig(width=64, height=48))
    entry = json.loads((tmp_path / 'index.json').read_text())['videos'][0]['frames'][2]
    # A re-exported frame (and its mask) at another resolution, as real datasets have.
    cv2.imwrite(str(tmp_path / entry['image']), np.zeros((40, 64, 3), np.uint8))
    cv2.imwrite(str(tmp_path / entry['mask']), np.zeros((40, 64), np.uint16))
    with pytest.raises(ValueError, match=r"video 'video_000' frame 2: image .*000002\.png' "
                       r'is 64x40 .* must be 64x48'):
        sam2_data.load_video_folder(tmp_path)


def test_forward_clip_trains_the_memory_path():
    model = build_tiny_sam2(image_size=64).train()
    processor = build_sam2_video_processor(64)
    clip = _disk_clip(num_frames=3)
    session = processor.init_video_session(video=list(clip.frames), inference_device='cpu',
                                           max_vision_features_cache_size=3)
    prompts = [sam2_data.human_prompt(clip.masks[0, 0], 'mask'),
               sam2_data.human_prompt(clip.masks[0, 1], 'box')]
    sam2_data.add_prompts_to_session(processor, session, 0, clip.track_ids, prompts, clip.size)
    frames = finetune_sam2.forward_clip(model, session, clip.track_ids, clip.num_frames)
    assert len(frames) == 3
    # The mask-prompted object is copied on frame 0 (nothing to learn), the boxed one is not.
    assert frames[0]['supervised'].tolist() == [False, True]
    assert frames[1]['supervised'].tolist() == [True, True]
    assert frames[1]['multimask_logits'].shape[:2] == (2, 3)
    targets = finetune_sam2.resize_masks(clip.masks, 64, torch.device('cpu'))
    loss, terms = finetune_sam2.clip_loss(frames, targets, {})
    assert set(terms) == {'mask_focal', 'mask_dice', 'iou', 'object_score'}
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    # Frames 1-2 are predicted from memory: the memory encoder and attention must learn.
    for prefix in ('memory_attention.', 'memory_encoder.', 'mask_decoder.', 'vision_encoder.'):
        assert any(g is not None and g.abs().sum() > 0
                   for n, g in grads.items() if n.startswith(prefix)), prefix


def _boxed_session(processor, clip):
    session = processor.init_video_session(video=list(clip.frames), inference_device='cpu',
                                           max_vision_features_cache_size=clip.num_frames)
    prompts = [sam2_data.human_prompt(clip.masks[0, k], 'box') for k in range(2)]
    sam2_data.add_prompts_to_session(processor, session, 0, clip.track_ids, prompts, clip.size)
    return session


def test_forward_clip_can_move_the_prompted_memory_with_the_camera():
    model = build_tiny_sam2(image_size=64).eval()  # eval: no dropout, comparable runs
    processor = build_sam2_video_processor(64)
    moving = _disk_clip(num_frames=3)  # all content moves 2 px per frame: a pan
    still = sam2_data.VideoClip(np.repeat(moving.frames[:1], 3, axis=0),
                                np.repeat(moving.masks[:1], 3, axis=0), moving.track_ids, 'still')
    runs = {}
    for clip in (moving, still):
        for compensate in (False, True):
            runs[clip.name, compensate] = finetune_sam2.forward_clip(
                model, _boxed_session(processor, clip), clip.track_ids, clip.num_frames,
                motion_compensation=compensate)
            # The model's own memory gathering is back after the clip.
            assert '_gather_memory_frame_outputs' not in vars(model)

    def logits(name, compensate, t):
        return runs[name, compensate][t]['multimask_logits']

    # Frame 0 reads no memory; on a pan the tracked frames read the moved memory ...
    assert torch.equal(logits('disks', False, 0), logits('disks', True, 0))
    assert not torch.allclose(logits('disks', False, 2), logits('disks', True, 2))
    # ... and a still camera moves nothing.
    assert torch.allclose(logits('still', False, 2), logits('still', True, 2), atol=1e-5)
    # The moved memory is differentiable: the memory path still learns.
    targets = finetune_sam2.resize_masks(moving.masks, 64, torch.device('cpu'))
    loss, _ = finetune_sam2.clip_loss(runs['disks', True], targets, {})
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n.startswith('memory_encoder.'))


def test_tiny_model_prompt_and_image_share_one_positional_basis():
    model, processor = finetune_sam2.build_model({'tiny': {'image_size': 64, 'seed': 1}})
    assert torch.equal(model.prompt_encoder.shared_embedding.positional_embedding,
                       model.shared_image_embedding.positional_embedding)
    assert processor.target_size == 64


def test_clip_loss_is_small_for_perfect_logits():
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 4:12, 4:12] = 1
    logits = (target[0] * 40 - 20)[:, None].repeat(1, 3, 1, 1)
    frame = {'multimask_logits': logits, 'iou_scores': torch.ones(1, 3),
             'object_score_logits': torch.tensor([20.0]), 'supervised': torch.tensor([True])}
    loss, terms = finetune_sam2.clip_loss([frame], target, {})
    assert loss.item() < 1e-3
    bad = dict(frame, multimask_logits=-logits)
    assert finetune_sam2.clip_loss([bad], target, {})[0].item() > 1.0


def test_smoke_training_resume_and_tracker_load(tmp_path):
    # Interrupted run: 10 of 50 steps, then resumed to the end.
    first = finetune_sam2.train(_cfg(tmp_path, 'run', stop_at_step=10), verbose=False)
    assert first['steps'] == 10
    ckpt10 = tmp_path / 'ckpt10'
    shutil.copytree(tmp_path / 'run' / 'last', ckpt10)
    full = finetune_sam2.train(_cfg(tmp_path, 'run'), resume=str(ckpt10), verbose=False)
    assert full['steps'] == 50 and len(full['losses']) == 50
    assert full['loss_drop_pct'] >= 30.0, full['losses']
    last = Path(full['checkpoint'])
    for name in ('model.safetensors', 'config.json', 'training_state.pt', 'trainer_state.json',
                 'processor_config.json'):
        assert (last / name).is_file(), name
    assert list((tmp_path / 'run' / 'eval').glob('step_*.png'))
    assert list((tmp_path / 'run' / 'tensorboard').glob('events.out.tfevents.*'))

    # Exact resume: an uninterrupted run to step 11 sees the same 11 losses.
    straight = finetune_sam2.train(_cfg(tmp_path, 'straight', stop_at_step=11),
                                   verbose=False)
    assert straight['losses'] == full['losses'][:11]

    # The trained directory is a model the streaming tracker loads and runs.
    tracker = Sam2Tracker.load(last, device='cpu')
    clip = _disk_clip()
    tracker.track(clip.frames[0])
    ids = tracker.add_objects(boxes=np.array([[8, 12, 25, 29]], dtype=np.float32))
    result = tracker.track(clip.frames[1])
    assert [obj.object_id for obj in result.objects] == ids
    assert result.objects[0].mask.shape == clip.size


def test_shipped_configs_use_only_keys_the_trainer_reads():
    for path in sorted(SMOKE.parent.glob('*sam2*.yaml')):
        common.load_config(path, [], finetune_sam2.CONFIG_SCHEMA)


def test_config_typos_stop_the_cli_before_training(tmp_path, capsys):
    out = str(tmp_path / 'out')
    with pytest.raises(SystemExit) as exit_info:
        finetune_sam2.main(['--config', str(SMOKE), '--output-dir', out, '--quiet',
                            '--set', 'train.setps=2'])
    assert exit_info.value.code == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    typo = tmp_path / 'typo.yaml'
    typo.write_text(SMOKE.read_text().replace('\ntrain:', '\ntrian:'))
    with pytest.raises(SystemExit):
        finetune_sam2.main(['--config', str(typo), '--output-dir', out, '--quiet'])
    assert "unknown config key 'trian' (did you mean 'train'?)" in capsys.readouterr().err
    # The API checks the same schema.
    cfg = _cfg(tmp_path, 'api')
    cfg['loss']['diec'] = 1.0
    with pytest.raises(KeyError, match="'loss.diec'"):
        finetune_sam2.train(cfg, verbose=False)
    assert not (tmp_path / 'api').exists()


def test_exponent_override_is_a_number_the_prompt_sampler_accepts():
    cfg = common.load_config(SMOKE, ['prompts.probabilities.box=5e-1'])
    assert cfg['prompts']['probabilities']['box'] == 0.5
    prompt = sam2_data.sample_prompt(_disk_clip().masks[0, 0], np.random.default_rng(0),
                                     cfg['prompts'])
    assert prompt.kind in sam2_data.PROMPT_KINDS


def test_fresh_run_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / 'run'
    (out / 'best').mkdir(parents=True)
    (out / 'best' / 'trainer_state.json').write_text('{"metrics": {"j_and_f": 2.0}}')
    (out / 'eval').mkdir()
    (out / 'eval' / 'step_009999.png').write_bytes(b'old')
    (out / 'tensorboard').mkdir()
    (out / 'tensorboard' / 'events.out.tfevents.old').write_bytes(b'old')
    cfg = _cfg(tmp_path, 'run', steps=1)
    with pytest.raises(FileExistsError, match='--overwrite'):
        finetune_sam2.train(cfg, verbose=False)
    assert (out / 'eval' / 'step_009999.png').exists()
    summary = finetune_sam2.train(cfg, verbose=False, overwrite=True)
    assert summary['steps'] == 1
    assert [p.name for p in (out / 'eval').iterdir()] == ['step_000001.png']
    assert not (out / 'tensorboard' / 'events.out.tfevents.old').exists()
    # best/ is this run's (the old one claimed an unbeatable J&F of 2.0).
    state = json.loads((out / 'best' / 'trainer_state.json').read_text())
    assert state['step'] == 1


def test_videos_are_kept_as_id_images_and_cut_into_the_same_clips(tmp_path):
    from sam_gap_ros.synthetic import OrchardVideo, write_video_dataset
    from sam_gap_ros.synthetic.config import scene_config_from_mapping
    scene = {'n_apples': [5, 6], 'hfov_deg': 30.0}
    videos = sam2_data.synthetic_videos(3, 2, 10, 64, 48, ('apple',), scene, {'pan_speed': 3.0})
    # The same videos as full (T, K, H, W) boolean mask stacks, as they used to be kept.
    config = scene_config_from_mapping(scene, width=64, height=48)
    stacks = []
    for video in videos:
        world = OrchardVideo(int(video.name.split('_')[1]), config, n_frames=10, pan_speed=3.0)
        stacks.append(sam2_data.clip_from_scenes([world[t] for t in range(10)],
                                                 video.track_ids, video.name))
    for video, stack in zip(videos, stacks, strict=True):
        assert len(video.track_ids) == stack.num_objects >= 3
        # Frames + 2-byte ID images, not one byte per object and pixel.
        kept = sum(v.nbytes for v in vars(video).values() if isinstance(v, np.ndarray))
        assert kept <= video.frames.nbytes * 5 // 3 + 8 * video.num_frames * stack.num_objects
        np.testing.assert_array_equal(video.object_areas, stack.object_areas)
    for options in ({}, {'max_stride': 3, 'exit_fraction': 0.5, 'max_prompt_gap': 6}):
        lazy = sam2_data.iterate_clips(videos, np.random.default_rng(1), 4, 3, 12, **options)
        full = sam2_data.iterate_clips(stacks, np.random.default_rng(1), 4, 3, 12, **options)
        for _ in range(20):
            a, b = next(lazy), next(full)
            assert (a.name, a.track_ids) == (b.name, b.track_ids)
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.masks, b.masks)
    for a, b in zip(finetune_sam2.validation_clips(videos, 6, 2, 12),
                    finetune_sam2.validation_clips(stacks, 6, 2, 12), strict=True):
        assert a.track_ids == b.track_ids and np.array_equal(a.masks, b.masks)
    # A video folder (uint16 ID PNGs) is kept the same way.
    write_video_dataset(tmp_path, 1, 3, seed=1, config=config)
    folder = sam2_data.load_video_folder(tmp_path)[0]
    assert folder.labels.dtype == np.uint16 and folder.labels.shape == (3, 48, 64)


def test_best_checkpoint_holds_weights_that_were_evaluated(tmp_path, monkeypatch):
    # Evaluations at steps 3 and 6, checkpoints every 2 steps: the step-3 evaluation is the
    # best, so best/ must be the step-3 weights, not step 4's labelled with step 3's J&F.
    scores = iter([0.5, 0.3])
    validate = finetune_sam2.validate

    def scripted(model, processor, clips, kind, device):
        metrics, samples = validate(model, processor, clips[:1], kind, device)
        metrics['j_and_f'] = next(scores)
        return metrics, samples

    monkeypatch.setattr(finetune_sam2, 'validate', scripted)
    cfg = _cfg(tmp_path, 'run', steps=6, eval_every=3, checkpoint_every=2)
    finetune_sam2.train(cfg, verbose=False)
    best = json.loads((tmp_path / 'run' / 'best' / common.TRAINER_STATE).read_text())
    assert best['step'] == 3 and best['metrics']['j_and_f'] == 0.5
    last = json.loads((tmp_path / 'run' / 'last' / common.TRAINER_STATE).read_text())
    assert last['step'] == 6 and last['metrics']['j_and_f'] == 0.3


def test_logged_lr_is_the_lr_each_step_trained_with(tmp_path, monkeypatch):
    logged, used = record_learning_rates(monkeypatch)
    finetune_sam2.train(_cfg(tmp_path, 'run', steps=4, eval_every=4), verbose=False)
    # Warm-up over 3 steps: lr/3, 2lr/3, lr, then the cosine decay.
    assert [logged[step] for step in sorted(logged)] == used
    assert used[0] == pytest.approx(used[2] / 3)


def test_a_partial_checkpoint_is_refused_not_trained_from_random_values(tmp_path):
    from safetensors.torch import load_file, save_file
    from sam_gap_ros.engines.loading import ModelLoadError
    model_dir = tmp_path / 'model'
    shutil.copytree(Path(__file__).resolve().parents[1] / 'models' / 'tiny-orchard-sam2',
                    model_dir)
    weights = load_file(str(model_dir / 'model.safetensors'))
    del weights['mask_decoder.conv_s0.bias']
    save_file(weights, str(model_dir / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ModelLoadError, match='mask_decoder.conv_s0.bias'):
        finetune_sam2.build_model({'pretrained_dir': str(model_dir)})


def test_resume_refuses_a_changed_config_or_another_runs_directory(tmp_path, capsys):
    base = ['--config', str(SMOKE), '--quiet', '--set', 'train.steps=2',
            '--set', 'train.eval_every=2']
    run, other = tmp_path / 'run', tmp_path / 'other'
    assert finetune_sam2.main(base + ['--output-dir', str(run)]) == 0
    # A changed lr used to be ignored (the optimizer state brings the saved one back) while
    # config.json recorded it.
    with pytest.raises(SystemExit) as exit_info:
        finetune_sam2.main(base + ['--output-dir', str(run), '--resume', str(run / 'last'),
                                   '--set', 'optim.lr=0.1'])
    assert exit_info.value.code == 2
    assert 'optim.lr: 0.0005 -> 0.1' in capsys.readouterr().err
    assert json.loads((run / 'config.json').read_text())['optim']['lr'] == 0.0005
    # Resuming into another run's directory used to replace its last/ and best/.
    assert finetune_sam2.main(base + ['--output-dir', str(other)]) == 0
    other_last = (other / 'last' / common.TRAINER_STATE).read_text()
    with pytest.raises(SystemExit) as exit_info:
        finetune_sam2.main(base + ['--output-dir', str(other), '--resume', str(run / 'last')])
    assert exit_info.value.code == 2
    assert 'holds another training run' in capsys.readouterr().err
    assert (other / 'last' / common.TRAINER_STATE).read_text() == other_last


def test_resuming_a_finished_run_keeps_its_final_metrics(tmp_path):
    cfg = _cfg(tmp_path, 'run', steps=2, eval_every=2)
    final = finetune_sam2.train(cfg, verbose=False)['metrics']
    assert final
    again = finetune_sam2.train(cfg, resume=str(tmp_path / 'run' / 'last'), verbose=False)
    assert again['steps'] == 2 and again['metrics'] == final
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['metrics'] == final


def test_steps_missing_or_null_is_named_before_anything_is_written(tmp_path, capsys):
    # null used to reach int(None) after the output directory had been claimed.
    for value in ('null', '0', '2.5'):
        out = tmp_path / f'run_{value}'
        with pytest.raises(SystemExit) as exit_info:
            finetune_sam2.main(['--config', str(SMOKE), '--quiet', '--output-dir', str(out),
                                '--set', f'train.steps={value}'])
        assert exit_info.value.code == 2
        assert "'train.steps' must be a whole number of optimizer steps >= 1" in \
            capsys.readouterr().err
        assert not out.exists()


def test_a_run_that_fails_during_setup_leaves_the_directory_free(tmp_path):
    # A freeze pattern matching nothing fails after the directory is claimed; the
    # config.json it used to leave made the corrected rerun refuse it as an earlier run.
    cfg = _cfg(tmp_path, 'run', steps=1)
    cfg['freeze'] = ['no_such_module']
    with pytest.raises(ValueError, match='matched no parameter'):
        finetune_sam2.train(cfg, verbose=False)
    assert not (tmp_path / 'run' / 'config.json').exists()
    cfg['freeze'] = []
    assert finetune_sam2.train(cfg, verbose=False)['steps'] == 1
