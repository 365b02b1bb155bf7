"""Tiny SAM3 tokenizer/config/checkpoint and ``Sam3ConceptEngine.load`` from a real directory."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer, Sam3Processor, Sam3VideoConfig

from sam_gap_ros.engines.sam3_concepts import check_concepts_for_model, Sam3ConceptEngine
from sam_gap_ros.engines.tiny_sam2 import save_tiny_sam2
from sam_gap_ros.engines.tiny_sam3 import (
    build_tiny_sam3,
    build_tiny_tokenizer,
    grid_reference_boxes,
    save_tiny_sam3,
    TEXT_LENGTH,
    TINY_VOCABULARY,
    tiny_sam3_config,
    tiny_vocab_size,
)
from sam_gap_ros.engines.types import ConceptError, ModelLoadError


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    return save_tiny_sam3(tmp_path_factory.mktemp('tiny_sam3'), seed=0)


def test_tokenizer_knows_orchard_words_and_falls_back_to_bytes():
    tokenizer = build_tiny_tokenizer()
    assert isinstance(tokenizer, CLIPTokenizer)
    assert len(tokenizer) == tiny_vocab_size()
    ids = tokenizer('  Ripe   RED apple ')['input_ids']
    assert tokenizer.convert_ids_to_tokens(ids) == [
        '<|startoftext|>', 'ripe</w>', 'red</w>', 'apple</w>', '<|endoftext|>']
    # Unknown words still tokenize (byte fallback), without an unknown token.
    unknown = tokenizer('xylophone')['input_ids']
    assert len(unknown) > 3
    assert tokenizer.decode(unknown, skip_special_tokens=True) == 'xylophone'
    padded = tokenizer(['apple'], padding='max_length', max_length=TEXT_LENGTH)
    assert len(padded['input_ids'][0]) == TEXT_LENGTH
    assert sum(padded['attention_mask'][0]) == 3


def test_tokenizer_padded_to_a_text_encoders_size_tokenizes_the_same():
    # Pairs the tiny tokenizer with the full SAM3 text encoder (benchmarks' random weights).
    plain, padded = build_tiny_tokenizer(), build_tiny_tokenizer(vocab_size=49408)
    assert len(padded) == 49408
    for text in ('ripe red apple', 'xylophone'):
        assert padded(text)['input_ids'] == plain(text)['input_ids']
    assert len(build_tiny_tokenizer()) == tiny_vocab_size()  # the cached tables are untouched
    with pytest.raises(ValueError, match='below'):
        build_tiny_tokenizer(vocab_size=tiny_vocab_size() - 1)


def test_tiny_config_is_the_real_architecture_small():
    config = tiny_sam3_config(image_size=84)
    backbone = config.vision_config.backbone_config
    assert (backbone.image_size, backbone.patch_size) == (84, 14)
    assert backbone.global_attn_indexes == [backbone.num_hidden_layers - 1]
    assert config.text_config.max_position_embeddings == TEXT_LENGTH
    assert config.text_config.vocab_size == tiny_vocab_size()
    model = build_tiny_sam3(seed=0, image_size=84)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    with pytest.raises(ValueError, match='multiple of patch_size'):
        tiny_sam3_config(image_size=100)
    with pytest.raises(ValueError, match='even'):
        tiny_sam3_config(image_size=98)


def test_same_seed_same_weights():
    a, b, c = build_tiny_sam3(seed=3), build_tiny_sam3(seed=3), build_tiny_sam3(seed=4)
    key = 'detr_decoder.box_head.layer1.weight'
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])


def test_saved_directory_loads_and_matches_from_config(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {'config.json', 'model.safetensors', 'tokenizer.json',
            'processor_config.json'} <= names
    processor = Sam3Processor.from_pretrained(tiny_dir, local_files_only=True)
    assert isinstance(processor.tokenizer, CLIPTokenizer)
    loaded = Sam3ConceptEngine.load(tiny_dir, device='cpu', dtype='float32')
    built = Sam3ConceptEngine.from_config(seed=0)
    frame = np.random.default_rng(0).integers(0, 256, (50, 64, 3), dtype=np.uint8)
    results = []
    for engine in (loaded, built):
        engine.set_concepts(['apple', 'leaf near branch'])
        results.append(engine.segment(frame, score_threshold=0.0))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results, strict=True):
        assert a.concept == b.concept
        assert a.score == pytest.approx(b.score, abs=1e-6)
        assert np.array_equal(a.mask, b.mask)


def test_load_errors_are_clear(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match='does not exist'):
        Sam3ConceptEngine.load(tmp_path / 'missing')
    wrong = tmp_path / 'sam2'
    wrong.mkdir()
    (wrong / 'config.json').write_text(json.dumps({'model_type': 'sam2_video'}))
    with pytest.raises(ModelLoadError, match="'sam2_video' model"):
        Sam3ConceptEngine.load(wrong)
    no_weights = tmp_path / 'no_weights'
    no_weights.mkdir()
    shutil.copy(tiny_dir / 'config.json', no_weights)
    with pytest.raises(ModelLoadError, match='safetensors'):
        Sam3ConceptEngine.load(no_weights)
    no_tokenizer = tmp_path / 'no_tokenizer'
    no_tokenizer.mkdir()
    for name in ('config.json', 'model.safetensors'):
        shutil.copy(tiny_dir / name, no_tokenizer)
    with pytest.raises(ModelLoadError, match='processor/tokenizer'):
        Sam3ConceptEngine.load(no_tokenizer, device='cpu')
    with pytest.raises(ValueError, match='unknown device'):
        Sam3ConceptEngine.load(tiny_dir, device='tpu')


def _copy_dir(source, target, skip=()):
    target.mkdir()
    for item in source.iterdir():
        if item.name not in skip:
            shutil.copy(item, target)
    return target


def test_load_refuses_incomplete_or_foreign_weights(tiny_dir, tmp_path):
    """Weights transformers would leave at random init fail to load (it only logs them)."""
    weights = load_file(str(tiny_dir / 'model.safetensors'))
    partial = _copy_dir(tiny_dir, tmp_path / 'partial')
    kept = sorted(weights)[::2]
    save_file({k: weights[k] for k in kept}, str(partial / 'model.safetensors'))
    with pytest.raises(ModelLoadError, match=r'complete SAM3 weights: \d+ tensor\(s\) missing'):
        Sam3ConceptEngine.load(partial, device='cpu')
    foreign = _copy_dir(tiny_dir, tmp_path / 'sam2_weights')
    save_tiny_sam2(tmp_path / 'sam2')
    shutil.copy(tmp_path / 'sam2' / 'model.safetensors', foreign)
    with pytest.raises(ModelLoadError, match='unknown tensor.*another model'):
        Sam3ConceptEngine.load(foreign, device='cpu')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_unreadable_weights_raise_model_load_error(tiny_dir, tmp_path, damage):
    broken = _copy_dir(tiny_dir, tmp_path / damage)
    weights = broken / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(b'not safetensors' if damage == 'garbage' else data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match='could not load a SAM3 model'):
        Sam3ConceptEngine.load(broken, device='cpu')


def test_load_refuses_missing_or_foreign_tokenizer(tiny_dir, tmp_path):
    # Without tokenizer.json transformers builds a 2-token CLIPTokenizer: every word
    # would be the unknown token.
    no_tokenizer = _copy_dir(tiny_dir, tmp_path / 'no_tokenizer', skip={'tokenizer.json'})
    with pytest.raises(ModelLoadError, match='tokenizer.json'):
        Sam3ConceptEngine.load(no_tokenizer, device='cpu')
    # Another model's tokenizer, with more tokens than this text encoder has rows.
    other = _copy_dir(tiny_dir, tmp_path / 'other_tokenizer', skip={'tokenizer.json'})
    words = [*TINY_VOCABULARY, *(f'extra{chr(97 + i)}' for i in range(26))]
    build_tiny_tokenizer(words).save_pretrained(tmp_path / 'big')
    shutil.copy(tmp_path / 'big' / 'tokenizer.json', other)
    with pytest.raises(ModelLoadError, match=f'has {tiny_vocab_size(words)} '
                                             f'tokens.*embeds {tiny_vocab_size()}'):
        Sam3ConceptEngine.load(other, device='cpu')


def test_config_that_is_not_a_json_object_is_a_load_error(tiny_dir, tmp_path):
    listed = _copy_dir(tiny_dir, tmp_path / 'listed')
    (listed / 'config.json').write_text(json.dumps([{'model_type': 'sam3'}]))
    with pytest.raises(ModelLoadError, match='JSON list, not an object'):
        Sam3ConceptEngine.load(listed, device='cpu')


def test_loads_sam3_video_layout(tiny_dir, tmp_path):
    """A ``facebook/sam3``-style directory: sam3_video config, detector_model.* weights."""
    video_dir = tmp_path / 'sam3_video'
    Sam3VideoConfig(detector_config=tiny_sam3_config().to_dict()).save_pretrained(video_dir)
    weights = {f'detector_model.{k}': v.contiguous()
               for k, v in build_tiny_sam3(seed=0).state_dict().items()}
    # Tracker weights are not needed by the concept engine and must be ignored.
    weights['tracker_model.unused.weight'] = torch.zeros(2)
    save_file(weights, str(video_dir / 'model.safetensors'))
    for name in ('tokenizer.json', 'tokenizer_config.json', 'processor_config.json'):
        shutil.copy(tiny_dir / name, video_dir)
    assert json.loads((video_dir / 'config.json').read_text())['model_type'] == 'sam3_video'
    assert check_concepts_for_model(video_dir, ['Apple']) == ['apple']
    with pytest.raises(ConceptError, match='reads at most 32'):
        check_concepts_for_model(video_dir, ['z' * 40])
    frame = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    results = []
    for directory in (video_dir, tiny_dir):
        engine = Sam3ConceptEngine.load(directory, device='cpu')
        engine.set_concepts(['apple'])
        results.append(engine.segment(frame, score_threshold=0.0))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a.mask, b.mask) and a.score == pytest.approx(b.score, abs=1e-6)


def test_concepts_checked_from_the_text_files_as_the_loaded_engine_checks_them(tiny_dir,
                                                                               tmp_path):
    engine = Sam3ConceptEngine.load(tiny_dir, device='cpu')
    # 'z' * 40 is within the grammar's character limit but 42 tokens long.
    for concepts in (['Apple', ' apple', 'red apple but not leaf'], ['apple', 'z' * 40],
                     ['leaf near ' + 'z' * 40], []):
        outcomes = []
        for check in (engine.set_concepts, lambda c: check_concepts_for_model(tiny_dir, c)):
            try:
                outcomes.append(check(concepts))
            except ConceptError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], concepts
    assert check_concepts_for_model(tiny_dir, ['Apple']) == ['apple']
    with pytest.raises(ConceptError, match='42 tokens long'):
        check_concepts_for_model(tiny_dir, ['leaf near ' + 'z' * 40])
    no_tokenizer = _copy_dir(tiny_dir, tmp_path / 'no_tokenizer')
    (no_tokenizer / 'tokenizer_config.json').write_text('{')
    with pytest.raises(ModelLoadError, match='config/tokenizer'):
        check_concepts_for_model(no_tokenizer, ['apple'])
    with pytest.raises(ModelLoadError):
        check_concepts_for_model(tmp_path / 'missing', ['apple'])


def test_anchor_init_puts_queries_on_a_grid_each_attending_to_its_own_box():
    boxes = grid_reference_boxes(16, 0.2).sigmoid()
    assert boxes.shape == (16, 4)
    centres = sorted({round(float(v), 4) for v in boxes[:, 0]})
    assert centres == [0.125, 0.375, 0.625, 0.875]
    assert torch.allclose(boxes[:, 2:], torch.full((16, 2), 0.2))
    with pytest.raises(ValueError, match='square'):
        grid_reference_boxes(12, 0.2)
    model = build_tiny_sam3(seed=0, anchor_box_size=0.2, num_queries=16)
    decoder = model.detr_decoder
    torch.testing.assert_close(decoder.reference_points.weight.sigmoid(), boxes)
    # Zero box deltas: each query's first box is exactly its anchor.
    assert not decoder.box_head.layer3.weight.any()
    random_init = build_tiny_sam3(seed=0, num_queries=16)
    assert not torch.allclose(random_init.detr_decoder.reference_points.weight,
                              decoder.reference_points.weight)

    # The box relative-position bias starts local: each query's cross-attention is
    # penalised outside its own box (so queries do not all read the same global average).
    def inside_outside_bias(model):
        dec = model.detr_decoder
        anchors = dec.reference_points.weight.sigmoid()[None]
        side = 16
        with torch.no_grad():
            bias = dec._get_rpb_matrix(anchors, (torch.tensor(side), torch.tensor(side)))[0]
        coords = (torch.arange(side) / side)
        x0, y0 = anchors[0, :, 0] - anchors[0, :, 2] / 2, anchors[0, :, 1] - anchors[0, :, 3] / 2
        x1, y1 = x0 + anchors[0, :, 2], y0 + anchors[0, :, 3]
        inside_x = (coords[None] >= x0[:, None]) & (coords[None] <= x1[:, None])
        inside_y = (coords[None] >= y0[:, None]) & (coords[None] <= y1[:, None])
        inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)   # (Q, side*side)
        return bias[:, inside].mean(), bias[:, ~inside].mean()

    inside, outside = inside_outside_bias(model)
    assert inside - outside > 3.0, (float(inside), float(outside))
    inside, outside = inside_outside_bias(random_init)
    assert abs(float(inside - outside)) < 1.0
