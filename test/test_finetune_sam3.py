"""SAM3 fine-tuning on CPU: tiny real Sam3Model, synthetic orchard data, real losses."""

import copy
import json
import math
from pathlib import Path
import re

import numpy as np
import pytest
from safetensors.torch import load_file
import torch
import yaml

from sam_gap_ros.engines.sam3_concepts import Sam3ConceptEngine
from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
from sam_gap_ros.engines.types import ConceptError
from training import common
from training.coco_data import CocoInstances
from training.finetune_sam3 import (_count_matches, apply_sam3_freezing, build_targets,
                                    choose_phrases, CONFIG_SCHEMA,
                                    enable_activation_checkpointing, estimate_peak_memory,
                                    EVAL_METRICS, load_sam3, main, PromptTargets,
                                    Sam3FineTuner, write_synthetic_dataset)
from training.losses import sigmoid_focal_loss
from training_harness import record_learning_rates

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / 'training' / 'configs' / 'smoke_sam3.yaml'


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """Tiny model directory, synthetic dataset and the smoke config pointing at both."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('sam3')
    model_dir = save_tiny_sam3(root / 'model', seed=0)
    cfg = common.load_config(SMOKE)
    write_synthetic_dataset(str(root / 'data'), cfg['data']['synthetic'])
    cfg['data'].pop('synthetic')
    cfg['data']['root'] = str(root / 'data')
    cfg['model'] = {'pretrained_dir': str(model_dir)}
    cfg['tensorboard'] = False
    cfg['num_threads'] = 1
    return {'root': root, 'model_dir': model_dir, 'cfg': cfg}


def _cfg(assets, **overrides):
    cfg = copy.deepcopy(assets['cfg'])
    common.apply_overrides(cfg, [f'{k}={v}' for k, v in overrides.items()])
    return cfg


def _history(directory):
    state = json.loads((Path(directory) / common.TRAINER_STATE).read_text())
    return state['step'], state['extra']['loss_history']


@pytest.fixture(scope='module')
def smoke_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp('smoke_out')
    path = out / 'cfg.yaml'
    path.write_text(yaml.safe_dump(assets['cfg']))
    return out, path


def test_smoke_cli_trains_loss_drops_and_writes_loadable_checkpoint(assets, smoke_run, capsys):
    out, cfg_path = smoke_run
    assert main(['--config', str(cfg_path), '--output-dir', str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r'loss_drop_pct=(-?[0-9.]+) checkpoint=(\S+)', lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) >= 30.0
    assert any(line.startswith('validation before training:') for line in lines)
    assert any('estimated GPU peak memory' in line for line in lines)
    assert any(line.startswith('metric') and 'before' in line for line in lines)
    best = Path(match.group(2))
    assert best == out / 'best'
    for name in ('model.safetensors', 'config.json', 'processor_config.json',
                 'tokenizer.json', common.TRAINING_STATE):
        assert (best / name).is_file(), name
    step, history = _history(out / 'last')
    assert step == 50 and len(history) == 50
    assert np.mean(history[-8:]) < 0.7 * np.mean(history[:8])
    # The frozen parts are bit-identical to the starting model, the trained ones moved.
    start = load_file(str(assets['model_dir'] / 'model.safetensors'))
    trained = load_file(str(out / 'last' / 'model.safetensors'))
    assert torch.equal(start['text_encoder.text_model.embeddings.token_embedding.weight'],
                       trained['text_encoder.text_model.embeddings.token_embedding.weight'])
    assert torch.equal(start['vision_encoder.backbone.layers.0.mlp.fc1.weight'],
                       trained['vision_encoder.backbone.layers.0.mlp.fc1.weight'])
    assert not torch.equal(start['detr_decoder.presence_head.layer3.weight'],
                           trained['detr_decoder.presence_head.layer3.weight'])
    # The deliverable: the best directory loads in the runtime engine and segments.
    engine = Sam3ConceptEngine.load(best, device='cpu')
    engine.set_concepts(['ripe red apple', 'leaf'])
    frame = CocoInstances(assets['cfg']['data']['root'], 'annotations_val.json')[0].image
    instances = engine.segment(frame, score_threshold=0.0, max_instances=3)
    assert all(i.mask.shape == frame.shape[:2] for i in instances)
    best_weights = load_file(str(best / 'model.safetensors'))
    torch.testing.assert_close(engine.model.detr_decoder.presence_head.layer3.weight,
                               best_weights['detr_decoder.presence_head.layer3.weight'])
    assert (out / 'eval' / 'step_000000.png').is_file()
    assert (out / 'eval' / 'step_000050.png').is_file()
    # A second fresh run into the same directory is refused before the model loads.
    with pytest.raises(SystemExit) as exit_info:
        main(['--config', str(cfg_path), '--output-dir', str(out)])
    assert exit_info.value.code == 2
    assert '--overwrite' in capsys.readouterr().err


def test_resume_continues_from_the_same_step_with_the_same_losses(assets, smoke_run,
                                                                  tmp_path):
    reference_dir, _ = smoke_run
    _, reference = _history(reference_dir / 'last')
    cfg = _cfg(assets, **{'train.stop_at_step': 25})
    Sam3FineTuner(cfg, str(tmp_path)).train()
    step, first_half = _history(tmp_path / 'last')
    assert step == 25
    resumed = Sam3FineTuner(_cfg(assets), str(tmp_path)).train(resume=str(tmp_path / 'last'))
    assert len(resumed['loss_history']) == 50
    # The first resumed step is step 26 and sees the same data, weights and RNG.
    np.testing.assert_allclose(resumed['loss_history'][25:], reference[25:], rtol=1e-4)
    np.testing.assert_allclose(first_half, reference[:25], rtol=1e-5)


def test_prompts_are_per_annotation_noun_phrases_with_matching_targets(assets):
    cfg = _cfg(assets, **{'data.max_positive_phrases': 'null'})
    trainer = Sam3FineTuner(cfg, str(assets['root'] / 'prompts'))
    seen = []
    original = trainer.text_inputs

    def record(phrases):
        seen.append(list(phrases))
        return original(phrases)

    trainer.text_inputs = record
    dataset = trainer.train_set
    for step in range(8):
        index, phrases = trainer.train_item(step, 0)
        sample = dataset[index]
        targets = build_targets(sample, phrases, 32)
        trainer.compute_losses(trainer.forward(('train', index), sample, phrases), targets)
        # Each annotation's own noun phrase is a prompt (not just its category name).
        assert set(sample.noun_phrases) <= set(phrases)
        assert seen[-1] == phrases
        for phrase, masks in zip(phrases, targets.masks, strict=True):
            # Targets of a prompt are exactly the instances that answer to that phrase.
            expected = [i for i, names in enumerate(sample.phrases) if phrase in names]
            assert masks.shape[0] == len(expected)
            if not expected:  # a negative prompt: no instance carries it
                assert phrase not in sample.present_phrases
    prompted = {p for call in seen for p in call}
    assert {'ripe red apple', 'unripe green apple'} <= prompted
    assert prompted <= set(trainer.all_phrases)


def test_two_phrases_of_one_category_are_distinct_prompts(tmp_path):
    # One 'apple' category, two noun phrases: each is its own prompt with its own targets.
    import cv2
    (tmp_path / 'images').mkdir()
    cv2.imwrite(str(tmp_path / 'images' / 'a.png'), np.zeros((20, 20, 3), np.uint8))
    square = lambda x: [[x, 2, x + 6, 2, x + 6, 8, x, 8]]  # noqa: E731
    data = {'images': [{'id': 1, 'file_name': 'a.png', 'width': 20, 'height': 20}],
            'categories': [{'id': 1, 'name': 'apple'}, {'id': 2, 'name': 'leaf'}],
            'annotations': [
                {'id': 1, 'image_id': 1, 'category_id': 1, 'segmentation': square(1),
                 'noun_phrase': 'ripe red apple'},
                {'id': 2, 'image_id': 1, 'category_id': 1, 'segmentation': square(11),
                 'noun_phrase': 'unripe green apple'}]}
    (tmp_path / 'annotations.json').write_text(json.dumps(data))
    sample = CocoInstances(tmp_path)[0]
    rng = np.random.default_rng(0)
    phrases = choose_phrases(sample.noun_phrases, sample.present_phrases,
                             ['apple', 'leaf', 'ripe red apple', 'unripe green apple'], 5, None,
                             rng)
    assert phrases[:2] == ['ripe red apple', 'unripe green apple']
    assert set(phrases[2:]) == {'apple', 'leaf'}
    targets = build_targets(sample, phrases, 20)
    assert [int(m.shape[0]) for m in targets.masks] == [1, 1, 0, 0]
    assert targets.boxes[0][0].tolist() == pytest.approx([1 / 20, 2 / 20, 7 / 20, 8 / 20])
    assert targets.boxes[1][0, 0] > 0.5  # the green apple is the right-hand one
    # 'absent' phrases restrict negatives to the ones known to be absent.
    assert choose_phrases(sample.noun_phrases, sample.present_phrases, ['leaf', 'pear'], 5,
                          None, rng, absent=['pear'])[2:] == ['pear']
    # An image without instances always gets a prompt, even with an empty absent list.
    assert choose_phrases([], [], ['leaf'], 2, None, rng, absent=[]) == ['leaf']


def test_negative_prompt_only_trains_presence(assets):
    trainer = Sam3FineTuner(_cfg(assets), str(assets['root'] / 'neg'))
    sample = trainer.train_set[0]
    negatives = [p for p in trainer.all_phrases if p not in sample.present_phrases][:1]
    assert negatives
    targets = build_targets(sample, negatives, trainer.mask_loss_size)
    terms = trainer.compute_losses(trainer.forward(('train', 0), sample, negatives), targets)
    assert float(terms['loss_presence'].detach()) > 0
    for name in ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_mask', 'loss_dice'):
        assert float(terms[name].detach()) == 0.0
    trainer.total_loss(terms).backward()
    presence_grad = trainer.model.detr_decoder.presence_head.layer3.weight.grad
    assert presence_grad is not None and presence_grad.abs().sum() > 0
    box_grad = trainer.model.detr_decoder.box_head.layer3.weight.grad
    assert box_grad is None or box_grad.abs().sum() == 0


def test_freeze_presets(assets):
    model, _ = load_sam3(str(assets['model_dir']))

    def trainable(prefix):
        return any(p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix))

    apply_sam3_freezing(model, 'heads_only')
    assert trainable('dot_product_scoring') and trainable('detr_decoder.box_head')
    assert not trainable('detr_decoder.layers') and not trainable('detr_encoder')
    assert not trainable('mask_decoder.pixel_decoder') and trainable('mask_decoder.mask_embedder')
    apply_sam3_freezing(model, 'decoder')
    assert trainable('detr_decoder.layers') and not trainable('detr_encoder')
    apply_sam3_freezing(model, 'detector')
    assert trainable('detr_encoder') and trainable('geometry_encoder')
    assert not trainable('vision_encoder') and not trainable('text_encoder')
    apply_sam3_freezing(model, 'detector+last_n_backbone_blocks', last_n_blocks=1)
    layers = len(model.vision_encoder.backbone.layers)
    assert trainable(f'vision_encoder.backbone.layers.{layers - 1}.')
    assert not trainable('vision_encoder.backbone.layers.0.') or layers == 1
    assert not trainable('vision_encoder.backbone.embeddings') and trainable('vision_encoder.neck')
    apply_sam3_freezing(model, 'all')
    assert trainable('vision_encoder.backbone.embeddings') and not trainable('text_encoder')
    apply_sam3_freezing(model, 'all', train_text_encoder=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        apply_sam3_freezing(model, 'everything')
    with pytest.raises(ValueError):
        apply_sam3_freezing(model, 'detector+last_n_backbone_blocks', last_n_blocks=0)


def test_activation_checkpointing_and_feature_cache_give_identical_losses(assets):
    def loss_and_grad(checkpointing, preset):
        cfg = _cfg(assets, **{'freeze.preset': preset,
                              'train.activation_checkpointing': checkpointing})
        trainer = Sam3FineTuner(cfg, str(assets['root'] / f'ckpt_{checkpointing}_{preset}'))
        trainer.model.train()
        index, phrases = trainer.train_item(0, 0)
        sample = trainer.train_set[index]
        targets = build_targets(sample, phrases, trainer.mask_loss_size)
        losses = []
        for _ in range(2):  # the second pass reads the cached vision features if frozen
            trainer.model.zero_grad()
            torch.manual_seed(0)
            loss = trainer.total_loss(trainer.compute_losses(
                trainer.forward(('train', index), sample, phrases), targets))
            loss.backward()
            losses.append(float(loss.detach()))
        grad = trainer.model.detr_encoder.layers[0].mlp.fc1.weight.grad.clone()
        return losses, grad, trainer

    plain, grad_plain, trainer = loss_and_grad(False, 'detector')
    assert trainer.cache_features and len(trainer._vision_cache) == 1
    assert plain[0] == pytest.approx(plain[1], rel=1e-6)
    ckpt, grad_ckpt, trainer = loss_and_grad(True, 'all')
    assert trainer.checkpointed_layers > 0 and not trainer.cache_features
    plain_all, grad_all, _ = loss_and_grad(False, 'all')
    assert ckpt[0] == pytest.approx(plain_all[0], rel=1e-5)
    torch.testing.assert_close(grad_ckpt, grad_all, rtol=1e-4, atol=1e-6)
    assert enable_activation_checkpointing(load_sam3(str(assets['model_dir']))[0]) > 0


def test_starting_model_stays_best_when_training_does_not_help(assets, tmp_path, capsys):
    # f1 is 0 before and after a few steps of a random tiny model: no improvement, so
    # best/ must hold the untouched starting weights.
    cfg = _cfg(assets, **{'train.steps': 4, 'train.eval_every': 2, 'eval.metric': 'f1',
                          'eval.score_threshold': 0.99,
                          'eval.retention_phrases': '[unripe green apple, yellow apple]',
                          'tensorboard': 'true'})
    trainer = Sam3FineTuner(cfg, str(tmp_path))
    # An earlier run in the same directory, with an unbeatable best/ and its own logs.
    (tmp_path / 'best').mkdir()
    (tmp_path / 'best' / common.TRAINER_STATE).write_text('{"metrics": {"f1": 1.0}}')
    for name in ('eval/step_009999.png', 'tensorboard/events.out.tfevents.old'):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_bytes(b'old')
    with pytest.raises(FileExistsError, match='--overwrite'):
        trainer.train()
    summary = trainer.train(overwrite=True)
    assert sorted(p.name for p in (tmp_path / 'eval').iterdir()) == [
        'step_000000.png', 'step_000002.png', 'step_000004.png']
    assert not (tmp_path / 'tensorboard' / 'events.out.tfevents.old').exists()
    assert summary['best_step'] == 0
    start = load_file(str(assets['model_dir'] / 'model.safetensors'))
    best = load_file(str(tmp_path / 'best' / 'model.safetensors'))
    assert all(torch.equal(start[k], best[k]) for k in start)
    text = capsys.readouterr().out
    assert 'best checkpoint is the starting model' in text
    assert 'retention check on held-out phrases' in text
    assert set(summary['retention_before']) == set(summary['retention_after'])


def test_eval_mask_threshold_reaches_post_processing(assets, tmp_path, monkeypatch):
    cfg = _cfg(assets, **{'eval.mask_threshold': 0.35, 'eval.max_images': 1})
    tuner = Sam3FineTuner(cfg, str(tmp_path))
    seen = []
    original = tuner.processor.post_process_instance_segmentation

    def spy(*args, **kwargs):
        seen.append(kwargs['mask_threshold'])
        return original(*args, **kwargs)

    monkeypatch.setattr(tuner.processor, 'post_process_instance_segmentation', spy)
    metrics = tuner.evaluate(tuner.val_set)
    assert seen and set(seen) == {0.35}
    # eval.metric is validated against these names at startup: they must be what it returns.
    assert sorted(metrics) == sorted(EVAL_METRICS)


def test_memory_estimate_and_resolution(assets):
    model, processor = load_sam3(str(assets['model_dir']), image_size=56)
    assert processor.image_processor.size == {'height': 56, 'width': 56}
    inputs = processor(images=np.zeros((30, 40, 3), np.uint8), text=['leaf'], return_tensors='pt')
    assert inputs['pixel_values'].shape[-1] == 56
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.pred_masks.shape[-1] == 4 * 56 // 14
    apply_sam3_freezing(model, 'all')
    small = estimate_peak_memory(model, 56, 4, 'fp32')
    large = estimate_peak_memory(model, 1008, 4, 'fp32')
    checkpointed = estimate_peak_memory(model, 1008, 4, 'fp32', activation_checkpointing=True)
    assert large['total'] > small['total']
    assert checkpointed['vit_activations'] < large['vit_activations']
    apply_sam3_freezing(model, 'detector')
    frozen = estimate_peak_memory(model, 1008, 4, 'fp32')
    assert frozen['gradients+adamw'] < large['gradients+adamw']
    with pytest.raises(ValueError):
        load_sam3(str(assets['model_dir']), image_size=50)


def test_aux_losses_cover_every_decoder_layer(assets, tmp_path):
    model_dir = save_tiny_sam3(tmp_path / 'model2', seed=1, detr_decoder_layers=2)
    cfg = _cfg(assets)
    cfg['model'] = {'pretrained_dir': str(model_dir)}
    trainer = Sam3FineTuner(cfg, str(tmp_path / 'out'))
    index, phrases = trainer.train_item(0, 0)
    sample = trainer.train_set[index]
    outputs = trainer.forward(('train', index), sample, phrases)
    layers = trainer.decoder_layer_outputs(outputs)
    assert len(layers) == 2
    # The reconstructed last layer is exactly what the model returns.
    torch.testing.assert_close(layers[-1][0], outputs.pred_logits.float())
    torch.testing.assert_close(layers[-1][1], outputs.pred_boxes.float())
    assert not torch.allclose(layers[0][1], layers[1][1])
    targets = build_targets(sample, phrases, trainer.mask_loss_size)
    terms = trainer.compute_losses(outputs, targets)
    assert all(float(terms[k].detach()) > 0 for k in ('aux_ce', 'aux_bbox', 'aux_giou'))
    trainer.total_loss(terms).backward()
    with_aux = trainer.model.detr_decoder.layers[0].mlp.fc1.weight.grad.clone()
    trainer.model.zero_grad()
    trainer.aux_loss = False
    plain = trainer.compute_losses(trainer.forward(('train', index), sample, phrases), targets)
    assert 'aux_ce' not in plain
    trainer.total_loss(plain).backward()
    # Deep supervision changes what the first decoder layer learns.
    assert not torch.allclose(with_aux, trainer.model.detr_decoder.layers[0].mlp.fc1.weight.grad)


def test_semantic_loss_trains_the_semantic_head_against_the_instance_union(assets):
    cfg = _cfg(assets)
    trainer = Sam3FineTuner(cfg, str(assets['root'] / 'plain'))
    index, phrases = trainer.train_item(0, 0)
    sample = trainer.train_set[index]
    targets = build_targets(sample, phrases, trainer.mask_loss_size)
    plain = trainer.compute_losses(trainer.forward(('train', index), sample, phrases), targets)
    assert 'loss_semantic' not in plain  # off unless weighted
    cfg['loss']['weights'] = dict(cfg['loss'].get('weights') or {}, loss_semantic=5.0)
    trainer = Sam3FineTuner(cfg, str(assets['root'] / 'semantic'))
    outputs = trainer.forward(('train', index), sample, phrases)
    terms = trainer.compute_losses(outputs, targets)
    assert float(terms['loss_semantic'].detach()) > 0
    trainer.total_loss(terms).backward()
    grad = trainer.model.mask_decoder.semantic_projection.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The target is each prompt's union of instances: a perfect map scores ~0 (BCE + dice).
    union = torch.stack([m.amax(0) if m.shape[0] else torch.zeros(m.shape[-2:])
                         for m in targets.masks])
    perfect = (union * 40.0 - 20.0)[:, None]
    assert float(trainer.semantic_term(perfect, targets)) < 1e-3
    assert float(trainer.semantic_term(-perfect, targets)) > 1.0


def test_iabce_class_loss_is_the_official_iou_aware_bce(assets):
    trainer = Sam3FineTuner(_cfg(assets, **{'loss.class_loss': 'iabce', 'loss.pos_weight': 10.0}),
                            str(assets['root'] / 'iabce'))
    target = torch.tensor([[0.0, 0.0, 0.4, 0.4]])
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.3],     # matched, box IoU 0.75
                          [0.0, 0.0, 0.4, 0.4],     # unmatched duplicate: still a negative
                          [0.6, 0.6, 0.9, 0.9]])
    logits = torch.tensor([0.0, 0.0, 2.0], requires_grad=True)
    loss = trainer._class_term(logits, boxes, target, torch.tensor([0]), torch.tensor([0]))
    # Worked out by hand: positive target 0.5 ** 0.25 * 0.75 ** 0.75 at p = 0.5, weight 10;
    # negatives BCE(x, 0) * p ** 2.
    soft = 0.5 ** 0.25 * 0.75 ** 0.75
    pos = 10 * -(soft * math.log(0.5) + (1 - soft) * math.log(0.5))
    p2 = 1 / (1 + math.exp(-2.0))
    neg = -math.log(0.5) * 0.25 + -math.log(1 - p2) * p2 ** 2
    assert float(loss) == pytest.approx((pos + neg) / 3, rel=1e-5)
    loss.backward()
    # The matched query is pushed up (its target exceeds p), the others down.
    assert logits.grad[0] < 0 and logits.grad[1] > 0 and logits.grad[2] > 0
    focal = Sam3FineTuner(_cfg(assets), str(assets['root'] / 'focal'))
    plain = focal._class_term(torch.zeros(3), boxes, target, torch.tensor([0]), torch.tensor([0]))
    assert float(plain) == pytest.approx(float(sigmoid_focal_loss(
        torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), reduction='sum')), rel=1e-6)
    with pytest.raises(ValueError, match='class_loss'):
        Sam3FineTuner(_cfg(assets, **{'loss.class_loss': 'softmax'}), str(assets['root'] / 'bad'))


def test_anchor_assignment_ignores_where_the_predictions_went(assets):
    anchored = Sam3FineTuner(_cfg(assets, **{'matcher.assign': 'anchors'}),
                             str(assets['root'] / 'anchors'))
    plain = Sam3FineTuner(_cfg(assets), str(assets['root'] / 'predictions'))
    grid = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5],
                          [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]])
    target = torch.tensor([[0.6, 0.6, 0.9, 0.9]])   # in anchor 3's cell
    targets = PromptTargets(['apple'], [torch.ones(1, 8, 8)], [target])
    far = torch.tensor([0.0, 0.0, 0.1, 0.1])
    boxes = far.repeat(1, 4, 1)
    boxes[0, 0] = target[0]                            # query 0 predicted the box exactly
    logits = torch.zeros(1, 4)
    _, bbox_anchor, _, _ = anchored._detection_terms(logits, boxes, targets, 1, anchors=grid)
    _, bbox_pred, _, _ = plain._detection_terms(logits, boxes, targets, 1)
    assert float(bbox_pred) == pytest.approx(0.0, abs=1e-6)   # matched to query 0
    assert float(bbox_anchor) > 0.5                           # query 3 answers for the cell
    boxes[0, 3] = target[0]
    _, bbox_anchor, _, _ = anchored._detection_terms(logits, boxes, targets, 1, anchors=grid)
    assert float(bbox_anchor) == pytest.approx(0.0, abs=1e-6)
    # A real forward pass trains with anchors end to end.
    index, phrases = anchored.train_item(0, 0)
    sample = anchored.train_set[index]
    terms = anchored.compute_losses(anchored.forward(('train', index), sample, phrases),
                                    build_targets(sample, phrases, anchored.mask_loss_size))
    assert torch.isfinite(anchored.total_loss(terms))
    with pytest.raises(ValueError, match='matcher.assign'):
        Sam3FineTuner(_cfg(assets, **{'matcher.assign': 'nearest'}), str(assets['root'] / 'x'))


def test_shipped_configs_use_only_keys_the_trainer_reads():
    for path in sorted(SMOKE.parent.glob('*sam3*.yaml')):
        common.load_config(path, [], CONFIG_SCHEMA)
    with pytest.raises(KeyError, match="did you mean 'train.steps'"):
        common.load_config(SMOKE, ['train.setps=2'], CONFIG_SCHEMA)


def test_eval_metric_typo_fails_before_anything_runs(assets, tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=r"eval.metric 'f1_score'.*did you mean 'f1'"):
        Sam3FineTuner(_cfg(assets, **{'eval.metric': 'f1_score'}), str(out))
    with pytest.raises(ValueError, match='eval.mode'):
        Sam3FineTuner(_cfg(assets, **{'eval.mode': 'maximum'}), str(out))
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(['--config', str(SMOKE), '--output-dir', str(out), '--set', 'eval.metric=F1'])
    assert exit_info.value.code == 2
    assert "eval.metric 'F1'" in capsys.readouterr().err


def test_missing_image_fails_at_startup_not_mid_run(assets, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(assets['cfg']['data']['root'], root)
    train = json.loads((root / 'annotations_train.json').read_text())
    missing = train['images'][-1]['file_name']
    CocoInstances(root, 'annotations_train.json').image_path(train['images'][-1]).unlink()
    with pytest.raises(ValueError) as info:
        Sam3FineTuner(_cfg(assets, **{'data.root': str(root)}), str(tmp_path / 'out'))
    message = str(info.value)
    assert 'missing_image: 1' in message and Path(missing).name in message
    assert 'annotations_train.json' in message and '--drop-invalid' in message
    assert not (tmp_path / 'out').exists()


def test_phrase_too_long_for_the_text_encoder_fails_at_startup(assets, tmp_path):
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(assets['cfg']['data']['root'], root)
    val = json.loads((root / 'annotations_val.json').read_text())
    # 47 characters of words the tiny tokenizer splits into bytes: over its 32 tokens.
    val['annotations'][0]['noun_phrase'] = 'apple near xylophone quixotic zephyr juxtaposed'
    (root / 'annotations_val.json').write_text(json.dumps(val))
    with pytest.raises(ConceptError, match="'apple near xylophone quixotic zephyr "
                       "juxtaposed' is 33 tokens long"):
        Sam3FineTuner(_cfg(assets, **{'data.root': str(root)}), str(tmp_path / 'out'))
    assert not any((tmp_path / 'out').iterdir())  # stopped before anything was written


def _crowd_dataset(root):
    """Four 40 px images; B has a crowd of apples, D only crowds (of both categories)."""
    import cv2
    (root / 'images').mkdir(parents=True)
    square = lambda x, y: [[x, y, x + 8, y, x + 8, y + 8, x, y + 8]]  # noqa: E731
    images, anns = [], []
    for image_id, name in enumerate('ABCD', start=1):
        cv2.imwrite(str(root / 'images' / f'{name}.png'), np.full((40, 40, 3), 90, np.uint8))
        images.append({'id': image_id, 'file_name': f'{name}.png', 'width': 40, 'height': 40})
    crowd = {'size': [40, 40], 'counts': [40 * 20, 40 * 20]}  # right half
    anns += [
        {'id': 1, 'image_id': 1, 'category_id': 1, 'segmentation': square(2, 2),
         'noun_phrase': 'ripe red apple'},
        {'id': 2, 'image_id': 1, 'category_id': 1, 'segmentation': square(20, 2),
         'noun_phrase': 'unripe green apple'},
        {'id': 3, 'image_id': 2, 'category_id': 2, 'segmentation': square(2, 20)},
        {'id': 4, 'image_id': 2, 'category_id': 1, 'segmentation': crowd, 'iscrowd': 1,
         'noun_phrase': 'ripe red apple'},
        {'id': 5, 'image_id': 3, 'category_id': 2, 'segmentation': square(2, 2)},
        {'id': 6, 'image_id': 4, 'category_id': 1, 'segmentation': crowd, 'iscrowd': 1},
        {'id': 7, 'image_id': 4, 'category_id': 2, 'segmentation': crowd, 'iscrowd': 1}]
    data = {'images': images, 'annotations': anns,
            'categories': [{'id': 1, 'name': 'apple'}, {'id': 2, 'name': 'leaf'}]}
    (root / 'annotations_train.json').write_text(json.dumps(data))
    val = dict(data, images=images[1:2], annotations=[a for a in anns if a['image_id'] == 2])
    (root / 'annotations_val.json').write_text(json.dumps(val))


def test_crowd_regions_are_ignored_not_negatives_or_targets(assets, tmp_path):
    _crowd_dataset(tmp_path / 'data')
    trainer = Sam3FineTuner(_cfg(assets, **{'data.root': str(tmp_path / 'data'),
                                            'data.negatives_per_image': 3}),
                            str(tmp_path / 'out'))
    assert trainer.all_phrases == ['leaf', 'ripe red apple', 'unripe green apple']
    dataset = trainer.train_set
    seen = set()
    for step in range(12):
        index, phrases = trainer.train_item(step, 0)
        seen.add(index)
        # Image D (crowds only, covering every phrase) has no safe prompt: it is left out.
        assert index != 3 and phrases
        if index == 1:
            # A crowd of apples may hold any apple phrase: neither is drawn as "absent".
            assert phrases == ['leaf']
        targets = build_targets(dataset[index], phrases, 16)
        assert sum(int(m.shape[0]) for m in targets.masks) == len(dataset[index])
    assert seen == {0, 1, 2}
    assert dataset.crowd_phrases(1) == ['ripe red apple', 'unripe green apple']
    sample = dataset[1]
    assert len(sample) == 1 and sample.noun_phrases == ['leaf']  # the crowd is no instance
    assert sample.crowd_masks.shape == (1, 40, 40) and sample.crowd_masks[0, :, 20:].all()
    metrics = trainer.evaluate(trainer.val_set)
    assert sorted(metrics) == sorted(EVAL_METRICS)


def test_predictions_inside_a_crowd_region_are_not_false_positives():
    truth = np.zeros((1, 20, 20), bool)
    truth[0, :5, :5] = True
    crowd = np.zeros((20, 20), bool)
    crowd[:, 10:] = True
    pred = np.zeros((3, 20, 20), bool)
    pred[0] = truth[0]          # a match
    pred[1, 2:8, 12:18] = True  # inside the crowd: ignored
    pred[2, 12:18, 2:8] = True  # elsewhere: a false positive
    scores = np.array([0.9, 0.8, 0.7])
    matched, ignored = _count_matches(pred, scores, truth, crowd)
    assert matched == [1.0] and ignored == 1
    assert _count_matches(pred, scores, truth) == ([1.0], 0)
    assert _count_matches(pred[1:], scores[1:], truth[:0], crowd) == ([], 1)


def test_evaluations_between_checkpoints_reach_best_and_lr_is_logged_per_step(
        assets, tmp_path, monkeypatch):
    # Evaluations at steps 3 and 6, checkpoints every 2 steps: step 3 scores best, so best/
    # must be the step-3 weights (it used to keep the starting model: no checkpoint at 3).
    cfg = _cfg(assets, **{'train.steps': 6, 'train.eval_every': 3,
                          'train.checkpoint_every': 2, 'train.log_every': 1,
                          'eval.metric': 'f1', 'eval.max_images': 1})
    tuner = Sam3FineTuner(cfg, str(tmp_path))
    scores = iter([0.1, 0.9, 0.2])   # before training, step 3, step 6
    evaluate = tuner.evaluate

    def scripted(dataset, phrase_filter=None, png_path=None):
        metrics = evaluate(dataset, phrase_filter, png_path)
        metrics['f1'] = next(scores)
        return metrics

    logged, used = record_learning_rates(monkeypatch)
    monkeypatch.setattr(tuner, 'evaluate', scripted)
    summary = tuner.train()
    assert summary['best_step'] == 3 and summary['metrics_best']['f1'] == 0.9
    assert [logged[step] for step in sorted(logged)] == used and len(used) == 6


def test_a_partial_checkpoint_is_refused_not_trained_from_random_values(assets, tmp_path):
    import shutil
    from safetensors.torch import save_file
    from sam_gap_ros.engines.loading import ModelLoadError
    model_dir = tmp_path / 'model'
    shutil.copytree(assets['model_dir'], model_dir)
    weights = load_file(str(model_dir / 'model.safetensors'))
    del weights['detr_decoder.box_head.layer1.bias']
    save_file(weights, str(model_dir / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ModelLoadError, match='box_head.layer1.bias'):
        load_sam3(str(model_dir))


def test_steps_that_are_no_whole_number_are_named_before_writing(tmp_path, capsys):
    # 0 trained nothing yet printed a best checkpoint it had not written.
    for value in ('0', '2.5', 'many'):
        out = tmp_path / f'run_{value}'
        with pytest.raises(SystemExit) as exit_info:
            main(['--config', str(SMOKE), '--output-dir', str(out),
                  '--set', f'train.steps={value}'])
        assert exit_info.value.code == 2
        assert "'train.steps' must be a whole number of optimizer steps >= 1" in \
            capsys.readouterr().err
        assert not out.exists()


def test_a_one_step_run_reports_no_drop_and_succeeds(assets, tmp_path, capsys):
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(assets['cfg']))
    assert main(['--config', str(path), '--output-dir', str(tmp_path / 'out'),
                 '--set', 'train.steps=1']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('loss_drop_pct=0.00 ')
