"""Tests of the SAM2 streaming tracker on tiny randomly initialised SAM2 models."""

import copy
import json
import shutil

import cv2
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch
import torch.nn.functional as F
from transformers import Sam2VideoModel

from sam_gap_ros.engines.sam2_tracker import (
    mirror_point_inputs,
    Sam2Tracker,
    use_inference_modules,
)
from sam_gap_ros.engines.scene_motion import shift_memory
from sam_gap_ros.engines.tiny_sam2 import (
    build_sam2_video_processor,
    build_tiny_sam2,
    save_tiny_sam2,
    tiny_sam2_video_config,
)
from sam_gap_ros.engines.tiny_sam3 import save_tiny_sam3
from sam_gap_ros.engines.types import ModelLoadError, PromptError

H, W = 96, 160
BOX_A = [10, 10, 60, 50]
BOX_B = [70, 20, 150, 90]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frames(count, seed=0):
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, (H, W, 3), np.uint8)
    # A slowly moving bright square over a fixed background: a real (if simple) video.
    out = []
    for i in range(count):
        frame = base.copy()
        x = 20 + 2 * (i % 30)
        frame[30:60, x:x + 30] = 250
        out.append(frame)
    return out


def set_presence(tracker, logit):
    """Bias SAM2's object-score head so every object is judged present (>0) or absent (<0)."""
    with torch.no_grad():
        tracker.model.mask_decoder.pred_obj_score_head.proj_out.weight.zero_()
        tracker.model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(logit)


def make_tracker(presence=3.0, **kwargs):
    tracker = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=0, **kwargs)
    if presence is not None:
        set_presence(tracker, presence)
    return tracker


def run(tracker, video, schedule):
    """Track ``video``; ``schedule[i]`` is called with the tracker after frame i."""
    results = []
    for i, frame in enumerate(video):
        result = tracker.track(frame)
        if i in schedule:
            schedule[i](tracker)
            result = tracker.last_result
        results.append(result)
    return results


def by_id(result):
    return {obj.object_id: obj for obj in result.objects}


# ---------------------------------------------------------------- loading


def test_load_from_saved_tiny_directory(tmp_path):
    model_dir = save_tiny_sam2(tmp_path / 'tiny', seed=3)
    loaded = Sam2Tracker.load(model_dir, device='cpu')
    built = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=3)
    assert loaded.device.type == 'cpu' and loaded.dtype == torch.float32
    state_a, state_b = loaded.model.state_dict(), built.model.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    video = frames(3)
    for tracker in (loaded, built):
        set_presence(tracker, 3.0)
        tracker.track(video[0])
        tracker.add_objects(boxes=[BOX_A])
    for frame in video[1:]:
        a, b = loaded.track(frame), built.track(frame)
        assert np.array_equal(a.objects[0].mask, b.objects[0].mask)


def test_tiny_config_backbone_width_and_depth(tmp_path):
    # The defaults are the architecture of the shipped tiny orchard model.
    default = tiny_sam2_video_config().vision_config
    assert default.backbone_config.embed_dim_per_stage == [16, 32, 64, 128]
    assert default.backbone_config.blocks_per_stage == [1, 1, 2, 1]
    assert default.backbone_config.global_attention_blocks == [3]
    config = tiny_sam2_video_config(backbone_width=32, blocks_per_stage=(1, 2, 3, 1))
    backbone = config.vision_config.backbone_config
    assert backbone.embed_dim_per_stage == [32, 64, 128, 256]
    assert config.vision_config.backbone_channel_list == [256, 128, 64, 32]
    # Last block of stage 3 is the global one: blocks 0 | 1-2 | 3-5 | 6.
    assert backbone.global_attention_blocks == [5]
    model_dir = save_tiny_sam2(tmp_path / 'wide', backbone_width=32, blocks_per_stage=(1, 2, 3, 1))
    tracker = Sam2Tracker.load(model_dir, device='cpu')
    assert tracker.model.config.vision_config.backbone_config.embed_dim_per_stage[0] == 32
    set_presence(tracker, 3.0)
    video = frames(3)
    tracker.track(video[0])
    tracker.add_objects(boxes=[BOX_A])
    for frame in video[1:]:
        assert tracker.track(frame).objects[0].mask.shape == (H, W)
    with pytest.raises(ValueError, match='backbone_width'):
        tiny_sam2_video_config(backbone_width=12)
    with pytest.raises(ValueError, match='blocks_per_stage'):
        tiny_sam2_video_config(blocks_per_stage=(1, 1, 2))


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match='does not exist'):
        Sam2Tracker.load(tmp_path / 'missing')
    with pytest.raises(ModelLoadError, match='empty'):
        Sam2Tracker.load('')
    wrong = tmp_path / 'wrong'
    wrong.mkdir()
    (wrong / 'config.json').write_text(json.dumps({'model_type': 'sam3'}))
    (wrong / 'model.safetensors').write_bytes(b'')
    with pytest.raises(ModelLoadError, match="'sam3' model"):
        Sam2Tracker.load(wrong)
    no_weights = tmp_path / 'no_weights'
    no_weights.mkdir()
    (no_weights / 'config.json').write_text(json.dumps({'model_type': 'sam2_video'}))
    with pytest.raises(ModelLoadError, match='safetensors'):
        Sam2Tracker.load(no_weights)
    corrupt = tmp_path / 'corrupt'
    save_tiny_sam2(corrupt)
    (corrupt / 'model.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(ModelLoadError):
        Sam2Tracker.load(corrupt)


def test_load_refuses_incomplete_or_foreign_weights(tmp_path):
    """Weights transformers would leave at random init fail to load (it only logs them)."""
    partial = save_tiny_sam2(tmp_path / 'partial')
    weights = load_file(str(partial / 'model.safetensors'))
    save_file({k: weights[k] for k in sorted(weights)[::2]}, str(partial / 'model.safetensors'))
    with pytest.raises(ModelLoadError,
                       match=r'complete SAM2 video weights: \d+ tensor\(s\) missing'):
        Sam2Tracker.load(partial, device='cpu')
    foreign = save_tiny_sam2(tmp_path / 'sam3_weights')
    save_tiny_sam3(tmp_path / 'sam3')
    shutil.copy(tmp_path / 'sam3' / 'model.safetensors', foreign)
    with pytest.raises(ModelLoadError, match='unknown tensor.*another model'):
        Sam2Tracker.load(foreign, device='cpu')
    listed = save_tiny_sam2(tmp_path / 'listed')
    (listed / 'config.json').write_text(json.dumps([{'model_type': 'sam2_video'}]))
    with pytest.raises(ModelLoadError, match='JSON list, not an object'):
        Sam2Tracker.load(listed, device='cpu')


def test_processor_size_must_match_model():
    model = Sam2Tracker.from_config(tiny_sam2_video_config()).model
    with pytest.raises(ModelLoadError, match='processor'):
        Sam2Tracker(model, build_sam2_video_processor(256))


# ---------------------------------------------------------------- equivalence


def test_matches_plain_transformers_streaming_loop():
    """Batched tracking equals transformers' own per-object streaming forward."""
    # SAM2's own rules: absent frames memorised, box-prompted masks left uncut and decoded
    # once (no mirrored pass).
    tracker = make_tracker(skip_absent_memory=False, box_mask_margin=None,
                           motion_compensation=False, motion_gate_margin=None,
                           mask_refine_radius=None, prompt_mirror_union=False)
    video = frames(9)
    ours = run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A, BOX_B])})

    model = tracker.model
    processor = build_sam2_video_processor(model.config.image_size)
    session = processor.init_video_session(inference_device='cpu', dtype=torch.float32)
    processor.add_inputs_to_inference_session(
        session, frame_idx=0, obj_ids=[1, 2], input_boxes=[[BOX_A, BOX_B]], original_size=(H, W))
    for i, frame in enumerate(video):
        pixels = processor.video_processor(videos=[frame], return_tensors='pt')
        out = model(inference_session=session, frame=pixels.pixel_values_videos[0, 0],
                    frame_idx=i)
        masks = F.interpolate(out.pred_masks.float(), size=(H, W), mode='bilinear',
                              align_corners=False)[:, 0] > 0
        scores = out.object_score_logits.reshape(-1)
        assert [o.object_id for o in ours[i].objects] == [1, 2]
        for k, obj in enumerate(ours[i].objects):
            assert obj.score == pytest.approx(float(scores[k]), abs=1e-5)
            assert np.array_equal(obj.mask, masks[k].numpy())
    assert any(obj.area > 0 for result in ours for obj in result.objects)


def test_inference_module_swaps_keep_outputs_identical():
    config = tiny_sam2_video_config()
    plain = Sam2Tracker.from_config(config, seed=5).model
    # A fresh transformers model, not passed through the tracker.
    reference = build_tiny_sam2(seed=5)
    encoder = reference.vision_encoder
    assert type(encoder.backbone.blocks[0].attn).__name__ == 'Sam2MultiScaleAttention'
    assert type(plain.vision_encoder.backbone.blocks[0].attn).__name__ == '_HieraAttention'
    assert type(plain.vision_encoder.backbone).__name__ == '_StaticPosEmbedHiera'
    assert type(plain.vision_encoder.neck.position_encoding).__name__ == \
        '_StaticSinePositionEmbedding'
    generator = torch.Generator().manual_seed(0)
    # Several calls: the cached position embeddings must come back unchanged each time.
    for batch in (2, 1, 2):
        pixels = torch.randn(batch, 3, 128, 128, generator=generator)
        with torch.inference_mode():
            expected = reference.get_image_features(pixels)
            actual = plain.get_image_features(pixels)
        for name in ('fpn_hidden_states', 'fpn_position_encoding'):
            assert len(getattr(expected, name)) == len(getattr(actual, name)) == 3
            assert all(torch.equal(a, b) for a, b in zip(
                getattr(expected, name), getattr(actual, name), strict=True)), name


def test_hiera_blocks_skip_linears_on_window_padding():
    # Windows of 6 on the 8 x 8 stage-3 map: padded to 12 x 12, as hiera-tiny's 14 x 14
    # windows pad its 64 x 64 map at 1024 px (the tiny default config never pads).
    config = tiny_sam2_video_config()
    backbone = config.vision_config.backbone_config
    backbone.window_size_per_stage = [8, 4, 6, 4]
    backbone.global_attention_blocks = []
    torch.manual_seed(3)
    reference = Sam2VideoModel(config).eval()
    with torch.no_grad():
        # transformers initialises biases to zero; padding gets the qkv bias, so make it real.
        for block in reference.vision_encoder.backbone.blocks:
            block.attn.qkv.bias.normal_(std=0.5)
    swapped = use_inference_modules(copy.deepcopy(reference))
    padded_blocks = []

    def record(block, args):
        height, width = args[0].shape[1:3]
        if (block.window_size and not block.query_stride and block.dim == block.dim_out
                and (height % block.window_size or width % block.window_size)):
            padded_blocks.append(block)

    for block in swapped.vision_encoder.backbone.blocks:
        assert type(block).__name__ == '_UnpaddedWindowHieraBlock'
        block.register_forward_pre_hook(record)
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference.get_image_features(pixels).fpn_hidden_states
        actual = swapped.get_image_features(pixels).fpn_hidden_states
    assert len(padded_blocks) == 1
    assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


def test_memory_attention_swaps_keep_outputs_identical(monkeypatch):
    from sam_gap_ros.engines import sam2_tracker
    config = tiny_sam2_video_config()
    swapped = Sam2Tracker.from_config(config, seed=5).model.memory_attention
    reference = build_tiny_sam2(seed=5).memory_attention
    assert type(reference).__name__ == 'Sam2VideoMemoryAttention'
    assert type(swapped).__name__ == '_SharedKeysMemoryAttention'
    assert type(swapped.layers[0]).__name__ == '_ChunkedFeedForwardMemoryLayer'
    assert type(swapped.layers[0].cross_attn_image).__name__ == '_RoPEAttention'
    # Small chunks so the feed-forward really runs in several pieces (64 tokens x 3 objects)
    monkeypatch.setattr(sam2_tracker._ChunkedFeedForwardMemoryLayer, '_CHUNK_ELEMENTS',
                        50 * config.memory_attention_feed_forward_hidden_size)
    generator = torch.Generator().manual_seed(0)
    tokens, objects, hidden = 8 * 8, 3, config.memory_attention_hidden_size
    pointers = 4
    memory_tokens = 2 * tokens + pointers
    inputs = dict(
        current_vision_features=torch.randn(tokens, objects, hidden, generator=generator),
        memory=torch.randn(memory_tokens, objects, 64, generator=generator),
        current_vision_position_embeddings=torch.randn(tokens, objects, hidden,
                                                       generator=generator),
        memory_posision_embeddings=torch.randn(memory_tokens, objects, 64, generator=generator),
        num_object_pointer_tokens=pointers)
    with torch.inference_mode():
        expected = reference(**inputs)
        actual = swapped(**inputs)
    assert actual.shape == expected.shape
    # The same arithmetic (FFN in chunks, RoPE as a complex product): bit-identical.
    assert torch.equal(actual, expected)
    # One frame's features for all objects (the tracker's case): the first self-attention
    # computed once and shared gives the same output as computing it per object.
    frame = {name: inputs[name][:, :1].expand(-1, objects, -1)
             for name in ('current_vision_features', 'current_vision_position_embeddings')}
    with torch.inference_mode():
        expected = reference(**dict(inputs, **frame))
        shared = swapped.shared_queries(inputs['current_vision_features'][:, :1],
                                        inputs['current_vision_position_embeddings'][:, :1])
        actual = swapped(**dict(inputs, **frame), shared_queries=shared)
        unshared = swapped(**dict(inputs, **frame))
    assert shared.queries.shape == (1, 1, tokens, hidden)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    # The shared queries stand in for the per-object features (the caller's promise).
    with torch.inference_mode():
        assert torch.equal(swapped(**inputs, shared_queries=shared), actual)
        assert not torch.equal(swapped(**inputs), actual)
    assert torch.equal(unshared, expected)
    # Training takes transformers' own path (dropout, no chunks): same random draws, same out.
    swapped.train()
    reference.train()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = reference(**inputs)
        torch.manual_seed(1)
        torch.testing.assert_close(swapped(**inputs), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match='shared_queries'):
            swapped(**inputs, shared_queries=shared)


def test_cached_hiera_position_embedding_follows_weight_updates():
    backbone = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=5).model \
        .vision_encoder.backbone
    with torch.inference_mode():
        before = backbone._get_pos_embed((32, 32)).clone()
        assert torch.equal(backbone._get_pos_embed((32, 32)), before)
        backbone.pos_embed.add_(1.0)  # an in-place update, as an optimiser step does
        after = backbone._get_pos_embed((32, 32))
    assert torch.allclose(after, before + 1.0, atol=1e-5)


def test_tracker_built_inside_inference_mode_tracks():
    # Parameters created under inference_mode are inference tensors without a version
    # counter: the cached position embedding must not rely on one (it used to raise).
    video = frames(3)
    with torch.inference_mode():
        tracker = make_tracker()
        backbone = tracker.model.vision_encoder.backbone
        assert backbone.pos_embed.is_inference()
        result = run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
        before = backbone._get_pos_embed((32, 32)).clone()
        backbone.pos_embed.add_(1.0)  # possible in place for inference tensors, too
        after = backbone._get_pos_embed((32, 32))
    assert len(result) == 3 and [o.object_id for o in result[-1].objects] == [1]
    assert torch.allclose(after, before + 1.0, atol=1e-5)
    reference = run(make_tracker(), video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
    assert np.array_equal(result[-1].objects[0].mask, reference[-1].objects[0].mask)


# ---------------------------------------------------------------- objects


def test_add_later_keeps_existing_track():
    video = frames(24)
    solo = run(make_tracker(), video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
    added_ids = []
    latest = run(make_tracker(), video, {
        0: lambda t: t.add_objects(boxes=[BOX_A]),
        5: lambda t: added_ids.append(t.add_objects(5, points=[[[100, 50]]])),
    })
    nxt = run(make_tracker(), video, {
        0: lambda t: t.add_objects(boxes=[BOX_A]),
        5: lambda t: added_ids.append(t.add_objects(6, masks=[video[0][..., 0] > 128])),
    })
    assert added_ids == [[2], [2]]
    for i in range(len(video)):
        reference = by_id(solo[i])[1]
        for results in (latest, nxt):
            objs = by_id(results[i])
            assert set(objs) == ({1} if i < 5 or (results is nxt and i == 5) else {1, 2})
            assert objs[1].score == pytest.approx(reference.score, abs=1e-5)
            assert np.array_equal(objs[1].mask, reference.mask), f'frame {i}'
    # The object added on the latest frame appears in that frame's result at once.
    assert latest[5].objects[1].object_id == 2 and latest[5].objects[1].present
    assert nxt[6].objects[1].object_id == 2 and nxt[6].objects[1].area > 0


def test_object_ids_remove_and_reset():
    tracker = make_tracker()
    video = frames(6)
    tracker.track(video[0])
    assert tracker.add_objects(boxes=[BOX_A, BOX_B]) == [1, 2]
    assert tracker.add_objects(points=[[[5, 5]]], object_ids=[7]) == [7]
    assert tracker.add_objects(boxes=[BOX_B]) == [8]
    assert tracker.object_ids == [1, 2, 7, 8]
    tracker.track(video[1])
    tracker.remove_object(2)
    assert tracker.object_ids == [1, 7, 8]
    assert [o.object_id for o in tracker.last_result.objects] == [1, 7, 8]
    result = tracker.track(video[2])
    assert [o.object_id for o in result.objects] == [1, 7, 8]
    # Re-indexing after removal keeps every survivor's own memory.
    session = tracker.session
    assert all(len(session.output_dict_per_obj[session.obj_id_to_idx(i)]['cond_frame_outputs'])
               == 1 for i in (1, 7, 8))
    # IDs are not reused, even after removal...
    assert tracker.add_objects(boxes=[BOX_A]) == [9]
    # ...until 65535 have been handed out (mono16 label values): then they start again at
    # 1, skipping the live ones.
    tracker._next_object_id = 65535
    assert tracker.add_objects(boxes=[BOX_A, BOX_B, BOX_A]) == [65535, 2, 3]
    for object_id in (65535, 2, 3):
        tracker.remove_object(object_id)
    with pytest.raises(PromptError, match='unknown object id 2'):
        tracker.remove_object(2)
    tracker.reset()
    assert tracker.object_ids == [] and tracker.frame_index == -1
    assert tracker.num_stored_frames == 0
    assert tracker.track(video[3]).objects == [] and tracker.frame_index == 0
    # The image size may change after reset.
    assert tracker.image_size == (H, W)
    tracker.reset()
    tracker.track(np.zeros((64, 64, 3), np.uint8))
    assert tracker.image_size == (64, 64)


def test_object_ids_must_be_mono16_integers():
    tracker = make_tracker()
    tracker.track(frames(1)[0])
    # numpy integers are integers (IDs read from a label image); stored as int.
    assert tracker.add_objects(boxes=[BOX_A], object_ids=[np.uint16(65535)]) == [65535]
    assert type(tracker.object_ids[0]) is int
    for bad, message in (('65535', 'must be integers'), (65535.0, 'must be integers'),
                         (True, 'must be integers'), (70000, 'up to 65535')):
        with pytest.raises(PromptError, match=message):
            tracker.remove_object(bad)
    tracker.remove_object(np.int64(65535))
    assert tracker.object_ids == []


def test_later_prompt_supersedes_one_waiting_for_the_next_frame():
    video = frames(3)
    tracker = make_tracker(motion_gate_margin=None)
    tracker.track(video[0])
    assert tracker.add_objects(1, boxes=[BOX_A]) == [1]
    session = tracker.session
    assert list(session.point_inputs_per_obj[0]) == [1]
    # Re-prompted on the current frame before the waiting prompt was applied: the new
    # prompt is applied now and the waiting one is dropped with its inputs.
    tracker.add_objects(0, boxes=[BOX_B], object_ids=[1])
    assert not session.point_inputs_per_obj[0] and not session.mask_inputs_per_obj[0]
    cond = session.output_dict_per_obj[0]['cond_frame_outputs']
    assert list(cond) == [0]
    tracker.track(video[1])
    assert list(cond) == [0]
    # A mask waiting for the next frame is superseded the same way...
    tracker.add_objects(2, masks=[video[0][..., 0] > 128], object_ids=[1])
    tracker.add_objects(1, points=[[[30, 40]]], object_ids=[1])
    assert not session.mask_inputs_per_obj[0] and list(cond) == [0, 1]
    # ...while a prompt made after one applied on the current frame waits as usual.
    tracker.add_objects(2, boxes=[BOX_A], object_ids=[1])
    tracker.track(video[2])
    assert list(cond) == [0, 1, 2]


def test_reprompt_existing_object_adds_conditioning_frame():
    tracker = make_tracker(max_conditioning_frames=2)
    video = frames(8)
    tracker.track(video[0])
    tracker.add_objects(boxes=[BOX_A])
    for frame in video[1:4]:
        tracker.track(frame)
    assert tracker.add_objects(boxes=[BOX_B], object_ids=[1]) == [1]
    cond = tracker.session.output_dict_per_obj[0]['cond_frame_outputs']
    assert sorted(cond) == [0, 3]
    assert 3 not in tracker.session.output_dict_per_obj[0]['non_cond_frame_outputs']
    tracker.track(video[4])
    tracker.add_objects(points=[[[30, 40]]], object_ids=[1])
    # Capped at 2: the first prompt and the latest one are kept.
    assert sorted(cond) == [0, 4]


def test_reprompt_on_latest_frame_reads_the_full_memory_bank(monkeypatch):
    """Pruning keeps what a re-prompt on the latest frame reads (a full bank and pointers).

    A re-prompt reads the mask memories and object pointers before its own frame, one frame
    further back than the next frame does; once a track is longer than the memory bank
    that oldest entry must still hold its mask memory (it used to raise KeyError).
    """
    config = tiny_sam2_video_config(num_maskmem=4, max_object_pointers_in_encoder=6)
    video = frames(12)
    results = []
    for prune in (True, False):
        with monkeypatch.context() as patch:
            if not prune:  # the reference keeps every frame's memory
                patch.setattr(Sam2Tracker, '_prune', lambda self, frame_idx: None)
            tracker = Sam2Tracker.from_config(config, seed=0, motion_gate_margin=None)
            set_presence(tracker, 3.0)
            ours = run(tracker, video, {
                0: lambda t: t.add_objects(boxes=[BOX_A]),
                9: lambda t: t.add_objects(boxes=[BOX_B], object_ids=[1])})
        results.append(ours)
    for pruned, full in zip(*results, strict=True):
        assert pruned.objects[0].score == pytest.approx(full.objects[0].score, abs=1e-6)
        assert np.array_equal(pruned.objects[0].mask, full.objects[0].mask)


def test_a_prompt_failing_in_the_model_leaves_no_half_added_object(monkeypatch):
    tracker = make_tracker(motion_gate_margin=None)
    video = frames(4)
    tracker.track(video[0])
    assert tracker.add_objects(boxes=[BOX_A]) == [1]
    tracker.track(video[1])
    conditioning = tracker.session.output_dict_per_obj[0]['cond_frame_outputs']

    def out_of_memory(frame_idx, ids):
        raise RuntimeError('CUDA out of memory (injected)')

    with monkeypatch.context() as patch:
        patch.setattr(tracker, '_run_prompted', out_of_memory)
        with pytest.raises(RuntimeError, match='out of memory'):
            tracker.add_objects(boxes=[BOX_B])               # a new object
        with pytest.raises(RuntimeError, match='out of memory'):
            tracker.add_objects(boxes=[BOX_B], object_ids=[1])  # a re-prompt
    # Neither left anything behind: object 1 tracks on from its first prompt alone.
    assert tracker.object_ids == [1] and tracker._pending == {}
    assert sorted(conditioning) == [0]
    assert not tracker.session.point_inputs_per_obj[0].get(1)
    assert [obj.object_id for obj in tracker.track(video[2]).objects] == [1]
    assert tracker.add_objects(boxes=[BOX_B]) == [3]  # ID 2 went with the failed prompt


def test_a_frame_failing_in_the_model_withdraws_the_prompts_waiting_for_it(monkeypatch):
    # Prompts for the next frame, and that frame fails (out of GPU memory): they used to
    # wait for a frame that had passed, so object 2 stayed in object_ids and was never
    # tracked or reported again.
    tracker = make_tracker(motion_gate_margin=None)
    video = frames(4)
    tracker.track(video[0])
    assert tracker.add_objects(boxes=[BOX_A]) == [1]
    assert tracker.add_objects(1, boxes=[BOX_B]) == [2]                   # a new object
    tracker.add_objects(1, points=[[[30, 30]]], object_ids=[1])          # a re-prompt

    def out_of_memory(frame_idx, ids):
        raise RuntimeError('CUDA out of memory (injected)')

    with monkeypatch.context() as patch:
        patch.setattr(tracker, '_run_prompted', out_of_memory)
        with pytest.raises(RuntimeError, match='out of memory'):
            tracker.track(video[1])
    assert tracker.frame_index == 1
    assert tracker.object_ids == [1] and tracker._pending == {}
    assert not tracker.session.point_inputs_per_obj[0]
    result = tracker.track(video[2])
    assert [obj.object_id for obj in result.objects] == [1]
    conditioning = tracker.session.output_dict_per_obj[0]['cond_frame_outputs']
    assert sorted(conditioning) == [0]
    # A prompt for the next frame after the failure is applied as usual.
    assert tracker.add_objects(3, boxes=[BOX_B]) == [3]
    assert [obj.object_id for obj in tracker.track(video[3]).objects] == [1, 3]


def test_reprompt_can_replace_conditioning_frames():
    # The random decoder's masks wander off their boxes, which the motion gate would
    # report as absent (no memory): this test is about the conditioning bookkeeping.
    tracker = make_tracker(motion_gate_margin=None)
    video = frames(8)
    tracker.track(video[0])
    tracker.add_objects(boxes=[BOX_A, BOX_B])
    for frame in video[1:3]:
        tracker.track(frame)
    before = tracker.last_result
    tracker.add_objects(boxes=[BOX_B], object_ids=[1], replace_conditioning=True)
    first, second = (tracker.session.output_dict_per_obj[i]['cond_frame_outputs']
                     for i in (0, 1))
    assert sorted(first) == [2] and sorted(second) == [0]
    recent = tracker.session.output_dict_per_obj[0]['non_cond_frame_outputs']
    assert 'maskmem_features' in recent[1]
    # The prompt itself still reads the old memory; only what later frames read changes.
    assert not np.array_equal(by_id(tracker.last_result)[1].mask, by_id(before)[1].mask)
    # Pending on the next frame: replaced when it is applied, not before.
    tracker.add_objects(3, masks=[by_id(tracker.last_result)[2].mask], object_ids=[2],
                        replace_conditioning=True)
    assert sorted(second) == [0]
    tracker.track(video[3])
    assert sorted(second) == [3] and sorted(first) == [2]
    # A plain re-prompt adds to the (replaced) set again.
    tracker.add_objects(boxes=[BOX_A], object_ids=[1])
    assert sorted(first) == [2, 3]
# ---------------------------------------------------------------- absence


def test_absent_objects_reported_absent_and_not_memorised():
    tracker = make_tracker(presence=None)
    video = frames(5)
    tracker.track(video[0])
    tracker.add_objects(masks=[video[0][..., 0] > 128])
    # A mask prompt is present by definition and is always memorised.
    assert tracker.last_result.objects[0].present
    set_presence(tracker, -4.0)
    store = tracker.session.output_dict_per_obj[0]
    for frame in video[1:]:
        obj = tracker.track(frame).objects[0]
        assert not obj.present and obj.score < 0
        assert obj.mask.dtype == bool and obj.mask.shape == (H, W) and not obj.mask.any()
        assert obj.box is None and obj.area == 0
    assert store['non_cond_frame_outputs'] == {}
    assert list(store['cond_frame_outputs']) == [0]
    set_presence(tracker, 4.0)
    obj = tracker.track(video[0]).objects[0]
    assert obj.present and obj.area == obj.mask.sum() > 0
    assert list(store['non_cond_frame_outputs']) == [5]
    assert 'maskmem_features' in store['non_cond_frame_outputs'][5]


def test_present_object_without_mask_pixels_is_reported_absent():
    # Without the motion gate, which would already mark a mask gone from its box absent.
    tracker = make_tracker(presence=4.0, motion_gate_margin=None)
    video = frames(3)
    tracker.track(video[0])
    tracker.add_objects(boxes=[(20, 30, 50, 60)])
    assert tracker.last_result.objects[0].present
    # SAM2 still judges the object present, but its mask decoder now paints no pixel.
    with torch.no_grad():
        for mlp in tracker.model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.zero_()
            mlp.proj_out.bias.zero_()
    obj = tracker.track(video[1]).objects[0]
    assert obj.score > 0
    assert not obj.present and obj.box is None and obj.area == 0 and not obj.mask.any()
    assert tracker.last_result.present == []


def test_absent_frames_memorised_when_asked():
    tracker = make_tracker(presence=-4.0, skip_absent_memory=False)
    tracker.track(frames(1)[0])
    tracker.add_objects(masks=[frames(1)[0][..., 0] > 128])
    tracker.track(frames(1)[0])
    assert list(tracker.session.output_dict_per_obj[0]['non_cond_frame_outputs']) == [1]


# ---------------------------------------------------------------- prompts


def _grown(box, margin):
    x0, y0, x1, y1 = box
    return (x0 - margin * (x1 - x0), y0 - margin * (y1 - y0),
            x1 + margin * (x1 - x0), y1 + margin * (y1 - y0))


def _inside(mask, box):
    """Return whether every mask pixel's centre lies in ``box`` (x0, y0, x1, y1)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = box
    return bool(((xs + 0.5 >= x0) & (xs + 0.5 <= x1) & (ys + 0.5 >= y0)
                 & (ys + 0.5 <= y1)).all())


def _first_memory(tracker, obj_id):
    store = tracker.session.output_dict_per_obj[tracker.session.obj_id_to_idx(obj_id)]
    return store['cond_frame_outputs'][0]['maskmem_features']


@pytest.mark.parametrize('margin', [0.0, 0.1, 0.5])
def test_box_prompt_mask_is_cut_to_its_grown_box(margin):
    """A box-prompted mask (output and first memory) stays inside the box plus margin."""
    video = frames(3)
    # Edge refinement off: it reshapes borders after the cut, which this test is not about.
    uncut = make_tracker(box_mask_margin=None, mask_refine_radius=None)
    cut = make_tracker(box_mask_margin=margin, mask_refine_radius=None)
    for tracker in (uncut, cut):
        tracker.track(video[0])
        tracker.add_objects(boxes=[BOX_A, BOX_B])
    # The output is upsampled from the low-res logits, whose cells (image_size / 4 per
    # side) straddle the box edge: the mask may reach into the cells on the edge.
    cell_x = W / (cut.model.config.image_size / 4)
    cell_y = H / (cut.model.config.image_size / 4)
    grown = [_grown(BOX_A, margin), _grown(BOX_B, margin)]
    for obj, raw, box in zip(cut.last_result.objects, uncut.last_result.objects, grown,
                             strict=True):
        # The random decoder spills far outside the box: the cut is what keeps it inside.
        assert not _inside(raw.mask, box)
        assert obj.area > 0 and _inside(obj.mask, (box[0] - cell_x, box[1] - cell_y,
                                                   box[2] + cell_x, box[3] + cell_y))
        # Inside the box, SAM2's mask is kept as it was (up to the upsampling of the
        # cut low-res logits at the box edge).
        x0, y0, x1, y1 = (int(np.ceil(box[0])) + 2, int(np.ceil(box[1])) + 2,
                          int(box[2]) - 2, int(box[3]) - 2)
        assert np.array_equal(obj.mask[y0:y1, x0:x1], raw.mask[y0:y1, x0:x1])
        # The memory the track starts from is encoded from the cut mask.
        assert not torch.equal(_first_memory(cut, obj.object_id),
                               _first_memory(uncut, raw.object_id))
    assert cut.track(video[1]).objects and cut.track(video[2]).objects


def test_box_mask_cut_leaves_point_prompts_and_huge_margins_alone():
    video = frames(2)
    results = []
    for margin in (None, 0.1, 10.0):
        tracker = make_tracker(box_mask_margin=margin)
        tracker.track(video[0])
        tracker.add_objects(points=[[[30, 30]]], labels=[[1]])
        tracker.add_objects(boxes=[BOX_B])
        results.append((by_id(tracker.last_result), _first_memory(tracker, 1),
                        _first_memory(tracker, 2)))
    (none, none_mem1, none_mem2), (tenth, tenth_mem1, _), (huge, _, huge_mem2) = results
    # A click prompt has no box to cut to.
    assert np.array_equal(tenth[1].mask, none[1].mask) and torch.equal(tenth_mem1, none_mem1)
    # A box grown 10 times its size per side covers the frame: nothing is cut.
    assert np.array_equal(huge[2].mask, none[2].mask) and torch.equal(huge_mem2, none_mem2)
    assert not np.array_equal(tenth[2].mask, none[2].mask)
    with pytest.raises(ValueError, match='box_mask_margin'):
        make_tracker(box_mask_margin=-0.1)


def test_prompt_validation():
    tracker = make_tracker()
    with pytest.raises(PromptError, match='track'):
        tracker.add_objects(boxes=[BOX_A])
    video = frames(4)
    tracker.track(video[0])
    tracker.track(video[1])
    bad = [
        (dict(boxes=[[0, 0, W + 1, 10]]), 'outside'),
        (dict(boxes=[[-1, 0, 10, 10]]), 'outside'),
        (dict(boxes=[[20, 10, 10, 30]]), 'x0 < x1'),
        (dict(boxes=[1, 2, 3, 4]), 'shape'),
        (dict(boxes=[[1, 2, 3, float('nan')]]), 'NaN'),
        (dict(points=[[[W, 5]]]), 'outside'),
        (dict(points=[[5, 5]]), 'shape'),
        (dict(points=[[[5, 5]]], labels=[[2]]), 'labels'),
        (dict(points=[[[5, 5]]], labels=[[1, 1]]), 'labels shape'),
        (dict(labels=[[1]]), 'without points'),
        (dict(boxes=[[1, 2, 3], [1, 2, 3, 4]]), 'boxes'),
        (dict(points=[[[5, 5]], [[6, 6], [7, 7]]], labels=[[1]]), 'label sets'),
        (dict(masks=np.ones((H, W), bool)), r'\(N, H, W\)'),
        (dict(boxes=[BOX_A, BOX_B], points=[[[5, 5]]]), 'point sets'),
        (dict(masks=[np.zeros((H, W), bool)]), 'empty'),
        (dict(masks=[np.ones((H, W + 1), bool)]), 'shape'),
        (dict(masks=[np.ones((H, W), np.uint8)]), 'boolean'),
        (dict(masks=[np.ones((H, W), bool)], boxes=[BOX_A]), 'cannot be combined'),
        (dict(), 'give boxes'),
        (dict(boxes=[BOX_A], object_ids=[1, 2]), 'object ids'),
        (dict(boxes=[BOX_A, BOX_B], object_ids=[3, 3]), 'duplicate'),
        (dict(boxes=[BOX_A], object_ids=[0]), 'positive'),
        (dict(boxes=[BOX_A], object_ids=[70000]), 'up to 65535'),
        (dict(boxes=[BOX_A], object_ids=[1.7]), 'must be integers'),
        (dict(boxes=[BOX_A], object_ids=[True]), 'must be integers'),
        (dict(boxes=[BOX_A], object_ids=['1']), 'must be integers'),
        (dict(boxes=[BOX_A], object_ids='1'), 'list of ints'),
    ]
    for kwargs, message in bad:
        with pytest.raises(PromptError, match=message):
            tracker.add_objects(**kwargs)
    for frame_index in (0, 3):
        with pytest.raises(PromptError, match='only the latest'):
            tracker.add_objects(frame_index, boxes=[BOX_A])
    # Nothing was half-added by the rejected prompts.
    assert tracker.object_ids == [] and tracker.num_stored_outputs == 0
    # Objects may have different numbers of points.
    ids = tracker.add_objects(points=[[[5, 5]], [[60, 30], [70, 40], [10, 80]]],
                              labels=[[1], [1, 0, 1]])
    assert ids == [1, 2] and [o.object_id for o in tracker.last_result.objects] == [1, 2]
    session = tracker.session
    assert session.output_dict_per_obj[1]['cond_frame_outputs'].keys() == {1}
    assert not session.point_inputs_per_obj[1]  # consumed by the prompt run
    with pytest.raises(ValueError, match='differs'):
        tracker.track(np.zeros((H + 1, W, 3), np.uint8))
    with pytest.raises(ValueError, match='uint8'):
        tracker.track(np.zeros((H, W, 3), np.float32))
    with pytest.raises(ValueError, match='uint8'):
        tracker.track(np.zeros((H, W), np.uint8))
    assert tracker.frame_index == 1 and tracker.object_ids == [1, 2]


# ---------------------------------------------------------------- memory and determinism


def test_memory_stays_bounded():
    config = tiny_sam2_video_config(num_maskmem=4, max_object_pointers_in_encoder=6)
    tracker = Sam2Tracker.from_config(config, seed=0)
    set_presence(tracker, 3.0)
    video = frames(60)
    tracker.track(video[0])
    tracker.add_objects(boxes=[BOX_A, BOX_B])
    counts = []
    for i, frame in enumerate(video[1:], start=1):
        if i == 30:
            tracker.add_objects(points=[[[100, 50]]])
        tracker.track(frame)
        counts.append((tracker.num_stored_frames, tracker.num_stored_outputs))
    session = tracker.session
    cond_frames = {f for out in session.output_dict_per_obj.values()
                   for f in out['cond_frame_outputs']}
    assert cond_frames == {0, 29}  # prompted on the latest frame before frame 30
    # Pointer window (the current frame and the 5 before it, which a re-prompt on the
    # current frame reads) + conditioning frames.
    assert max(c[0] for c in counts) <= 1 + 5 + len(cond_frames)
    assert counts[-1] == counts[-10]
    assert len(session.processed_frames) == 1 and len(session.cache._vision_features) == 1
    for out in session.output_dict_per_obj.values():
        non_cond = out['non_cond_frame_outputs']
        assert len(non_cond) <= 6
        with_memory = [f for f, entry in non_cond.items() if 'maskmem_features' in entry]
        # num_maskmem: the current frame and the 3 before it (the next frame reads 3 of them).
        assert len(with_memory) <= 4
        assert all(set(entry) <= {'object_pointer', 'object_score_logits', 'maskmem_features',
                                  'maskmem_pos_enc', 'scene_offset'}
                   for entry in non_cond.values())
    assert all(not table for table in session.frames_tracked_per_obj.values())


def test_deterministic_for_seed():
    video = frames(6)
    outputs = []
    for _ in range(2):
        tracker = Sam2Tracker.from_config(tiny_sam2_video_config(), seed=11)
        outputs.append(run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A, BOX_B])}))
    other = run(Sam2Tracker.from_config(tiny_sam2_video_config(), seed=12), video,
                {0: lambda t: t.add_objects(boxes=[BOX_A, BOX_B])})
    scores = [[o.score for o in r.objects] for r in outputs[0]]
    assert scores == [[o.score for o in r.objects] for r in outputs[1]]
    assert scores != [[o.score for o in r.objects] for r in other]
    for a, b in zip(*outputs, strict=True):
        assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects,
                                                                  strict=True))


def test_object_batch_chunks_give_same_results():
    video = frames(6)
    boxes = [BOX_A, BOX_B, [30, 40, 90, 95]]
    # Edge refinement off: its per-pixel decisions (which memory pixels flip sign) turn the
    # ~1e-6 rounding differences of other batch shapes into whole-pixel differences later.
    runs = [run(make_tracker(max_object_batch=size, mask_refine_radius=None), video,
                {0: lambda t: t.add_objects(boxes=boxes)}) for size in (1, 2, None)]
    for results in runs[1:]:
        for a, b in zip(runs[0], results, strict=True):
            assert [o.object_id for o in b.objects] == [1, 2, 3]
            for x, y in zip(a.objects, b.objects, strict=True):
                assert y.score == pytest.approx(x.score, abs=1e-5)
                assert np.array_equal(x.mask, y.mask)
    # With it on (the default), the batch shape may still move single border pixels only.
    refined = [run(make_tracker(max_object_batch=size), video,
                   {0: lambda t: t.add_objects(boxes=boxes)}) for size in (1, None)]
    for a, b in zip(*refined, strict=True):
        for x, y in zip(a.objects, b.objects, strict=True):
            union = (x.mask | y.mask).sum()
            assert union == 0 or (x.mask & y.mask).sum() / union >= 0.99
    with pytest.raises(ValueError, match='max_object_batch'):
        make_tracker(max_object_batch=0)


def test_object_batch_size_follows_key_bytes(monkeypatch):
    tracker = make_tracker()
    width = tracker.model.memory_attention.layers[0].cross_attn_image.internal_dim
    memory = torch.zeros(2 * 8 * 8 + 4, 1, 64)  # 2 memory frames of 8 x 8 + 4 pointers
    key_bytes = memory.shape[0] * width * 4
    monkeypatch.setattr(Sam2Tracker, '_BATCH_KEY_BYTES', (3 * key_bytes + 1, 1 << 30))
    assert tracker._object_batch_size(memory) == 3
    assert tracker._object_batch_size(torch.zeros(10 * 8 * 8, 1, 64)) == 1  # never 0
    tracker._max_batch = 2
    assert tracker._object_batch_size(memory) == 2
    # bf16 keys take half the bytes.
    tracker._max_batch = None
    assert tracker._object_batch_size(memory.bfloat16()) == 6


# ---------------------------------------------------------------- camera motion


def panned(count, step_px, seed=0):
    """Return a textured view panned by ``step_px`` per frame (content moves right)."""
    rng = np.random.RandomState(seed)
    world = rng.randint(0, 255, (H, W + step_px * count, 3), np.uint8)
    world = np.ascontiguousarray(cv2.GaussianBlur(world, (5, 5), 1.5))
    right = world.shape[1]
    return [world[:, right - W - step_px * i:right - step_px * i] for i in range(count)]


def test_still_camera_tracks_exactly_as_without_motion_compensation():
    """No camera motion, no change: the aligned memory is SAM2's memory bit for bit."""
    video = [frames(1)[0]] * 6
    results = []
    for compensate in (False, True):
        tracker = make_tracker(motion_compensation=compensate, motion_gate_margin=None)
        results.append(run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A, BOX_B])}))
        assert np.hypot(*tracker.scene_offset) < 1e-6
    for plain, aligned in zip(*results, strict=True):
        for a, b in zip(plain.objects, aligned.objects, strict=True):
            assert a.score == b.score and np.array_equal(a.mask, b.mask)


def test_prompted_memory_moves_with_the_camera():
    step = 4
    video = panned(6, step)
    tracker = make_tracker(motion_gate_margin=None)
    plain = make_tracker(motion_compensation=False, motion_gate_margin=None)
    ours = run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
    theirs = run(plain, video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
    # The estimate is in model-input pixels (the frame is resized to a square).
    size = tracker.model.config.image_size
    x, y = tracker.scene_offset
    assert x == pytest.approx(step * 5 * size / W, abs=1.0) and abs(y) < 0.5
    assert plain.scene_offset == (0.0, 0.0)
    # What frame 5 reads: the prompted memory moved by the offset, recent ones as stored.
    store = tracker.session.output_dict_per_obj[0]
    cond = store['cond_frame_outputs'][0]
    memory, _, _ = tracker._gather_memory(0, 6)
    grid = tracker.model.backbone_feature_sizes[-1]
    tokens = grid[0] * grid[1]
    expected = shift_memory(cond['maskmem_features'], (x, y), grid, size)
    assert torch.allclose(memory[:tokens].float(), expected.float())
    recent = [entry['maskmem_features'] for _, entry in sorted(
        store['non_cond_frame_outputs'].items()) if 'maskmem_features' in entry]
    assert len(recent) == 5 and torch.equal(memory[tokens:tokens * 6].float(),
                                            torch.cat(recent).float())
    # ... and the tracks use it.
    assert any(not np.array_equal(a.mask, b.mask)
               for a, b in zip(ours[5].objects, theirs[5].objects, strict=True))


def test_reprompt_reads_the_memory_moved_with_the_camera():
    """A box/point re-prompt is conditioned on the memory tracking reads: moved, not stale."""
    video = panned(6, 4)
    tracker = make_tracker(motion_gate_margin=None)
    attention = tracker.model.memory_attention
    forward = attention.forward
    memories = []

    def recording(*args, **kwargs):
        memories.append(kwargs['memory'].float().clone())
        return forward(*args, **kwargs)

    attention.forward = recording
    run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_A])})
    assert tracker.scene_offset[0] > 10
    tracked = memories[-1]  # what tracking frame 5 read
    tracker.add_objects(boxes=[[30, 10, 80, 50]], object_ids=[1])
    # The re-prompt on frame 5 reads the same bank (frames before 5), so the same memory.
    assert len(memories) == 6 and torch.equal(memories[-1], tracked)


def test_mask_that_leaves_its_moved_box_is_reported_absent():
    """The motion gate: a tracked mask mostly outside the object's last box is not it."""
    video = frames(4)
    # A mask prompt is its own output: the object's last box is this small square.
    small = np.zeros((H, W), bool)
    small[40:52, 70:82] = True
    results = {}
    for gate in (None, 0.25):
        tracker = make_tracker(motion_gate_margin=gate)
        tracker.track(video[0])
        tracker.add_objects(masks=[small])
        results[gate] = [tracker.track(frame).objects[0] for frame in video[1:]]
        store = tracker.session.output_dict_per_obj[0]['non_cond_frame_outputs']
        results[gate, 'memorised'] = [f for f, e in store.items() if 'maskmem_features' in e]
    # The random decoder's tracked mask spreads far beyond the square ...
    ungated = results[None][0]
    assert ungated.present and ungated.mask[40:52, 70:82].sum() < 0.5 * ungated.area
    # ... so the gate reports the object absent, with no mask and no memory of the frame.
    gated = results[0.25]
    assert all(not obj.present and obj.score < 0 and not obj.mask.any() for obj in gated)
    assert results[0.25, 'memorised'] == [] and results[None, 'memorised'] == [1, 2, 3]
    with pytest.raises(ValueError, match='motion_gate_margin'):
        make_tracker(motion_gate_margin=-0.5)


def test_gated_absent_frame_memorised_with_the_no_object_pointer():
    """With absent frames memorised, a gated-out frame is memorised as SAM2's absent ones."""
    video = frames(4)
    small = np.zeros((H, W), bool)
    small[40:52, 70:82] = True
    tracker = make_tracker(skip_absent_memory=False)
    tracker.track(video[0])
    tracker.add_objects(masks=[small])
    assert not any(tracker.track(frame).objects[0].present for frame in video[1:])
    no_object = tracker.model.no_object_pointer.reshape(-1)
    for entry in tracker.session.output_dict_per_obj[0]['non_cond_frame_outputs'].values():
        assert float(entry['object_score_logits'].reshape(-1)[0]) < 0
        assert torch.equal(entry['object_pointer'].reshape(-1), no_object)


def test_mask_refinement_only_moves_mask_borders():
    """Edge refinement changes masks near their borders only, in output and memory."""
    video = frames(4)
    results, memories = {}, {}
    for radius in (None, 1.0):
        tracker = make_tracker(motion_gate_margin=None, mask_refine_radius=radius)
        results[radius] = run(tracker, video, {0: lambda t: t.add_objects(boxes=[BOX_B])})
        store = tracker.session.output_dict_per_obj[0]
        memories[radius] = store['cond_frame_outputs'][0]['maskmem_features']
    # The tiny config decodes 4x coarser than its input: radius 1.0 = 4 px, reach 8 px.
    reach = 2 * 4 + 1
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    changed_somewhere = False
    for plain, refined in zip(results[None], results[1.0], strict=True):
        for a, b in zip(plain.objects, refined.objects, strict=True):
            border = (cv2.dilate(a.mask.astype(np.uint8), kernel)
                      != cv2.erode(a.mask.astype(np.uint8), kernel))
            assert not (a.mask != b.mask)[~border].any()
            assert b.area == int(b.mask.sum())
            changed_somewhere |= bool((a.mask != b.mask).any())
    assert changed_somewhere
    # The prompted frame's memory is made from the refined mask.
    assert not torch.equal(memories[None], memories[1.0])
    with pytest.raises(ValueError, match='mask_refine_radius'):
        make_tracker(mask_refine_radius=11.0)


def test_prompt_on_the_latest_frame_refines_against_that_frame_not_the_callers_buffer():
    # A capture loop that reuses its array has written the next image into it by the time
    # a prompt is applied to the latest frame; the prompt's mask used to be snapped to the
    # edges of that next image.
    video = frames(3)
    masks = []
    for reuse in (False, True):
        tracker = make_tracker(motion_gate_margin=None)
        buffer = video[0].copy()
        tracker.track(buffer)
        if reuse:
            buffer[:] = video[2][::-1, ::-1]
        tracker.add_objects(boxes=[BOX_A, BOX_B])
        masks.append([obj.mask for obj in tracker.last_result.objects])
    assert all(np.array_equal(a, b) for a, b in zip(*masks, strict=True))


def test_mask_refinement_never_erases_a_present_mask():
    """Where the guided filter would empty a mask, SAM2's own mask is kept (output, memory).

    The shipped tiny model on a held-out synthetic frame: a box over an apple at the image
    border decodes to a thin mask that refinement would pull entirely below 0.5, leaving
    an object reported present with no pixel and memorised from an empty mask.
    """
    from training.sam2_data import synthetic_videos
    scene = {'n_apples': [2, 4], 'cluster_size': [1, 2], 'apple_distance_m': [0.8, 1.0],
             'apple_radius_m': [0.035, 0.055], 'hfov_deg': 15.0, 'n_front_leaves': [0, 1],
             'leaf_occlusion_prob': 0.15}
    frame = synthetic_videos(1234, 1, 41, 128, 128, scene=scene,
                             video={'pan_speed': 2.0})[0].frames[40]
    objects, memories = {}, {}
    for radius in (None, 1.0):
        tracker = Sam2Tracker.load('models/tiny-orchard-sam2', device='cpu',
                                   mask_refine_radius=radius)
        tracker.track(frame)
        tracker.add_objects(boxes=[[108, 7, 128, 128]])
        objects[radius] = tracker.last_result.objects[0]
        memories[radius] = tracker.session.output_dict_per_obj[0]['cond_frame_outputs'][0][
            'maskmem_features']
    plain, refined = objects[None], objects[1.0]
    assert plain.present and plain.area > 0
    assert refined.present and refined.area > 0 and refined.box is not None
    assert np.array_equal(refined.mask, plain.mask)
    assert torch.equal(memories[1.0], memories[None])


def test_negative_stride_and_thin_frames():
    """A BGR->RGB view tracks like its copy; frames 1 or 3 px high are read channels-last."""
    video = frames(3)
    results = []
    for flip in (np.ascontiguousarray, lambda f: f):
        # No gate: the random decoder's masks would be gated away and compared empty.
        tracker = make_tracker(motion_gate_margin=None)
        views = [frame[..., ::-1] for frame in video]
        assert views[0].strides[-1] < 0
        results.append(run(tracker, [flip(v) for v in views],
                           {0: lambda t: t.add_objects(boxes=[BOX_A])}))
    for copied, viewed in zip(*results, strict=True):
        assert copied.objects[0].area > 0
        assert all(np.array_equal(a.mask, b.mask) and a.score == b.score
                   for a, b in zip(copied.objects, viewed.objects, strict=True))
    colour = np.array([200, 30, 60], np.uint8)
    model_inputs = []
    for rows in (1, 3, 20):
        tracker = make_tracker()
        tracker.track(np.broadcast_to(colour, (rows, 40, 3)).copy())
        model_inputs.append(tracker.session.get_frame(0))
    for thin in model_inputs[:2]:
        torch.testing.assert_close(thin, model_inputs[2])
    # ImageNet normalisation of the red value (channels-first would mix the colours).
    assert float(model_inputs[0][0].mean()) == pytest.approx((200 / 255 - 0.485) / 0.229,
                                                             abs=1e-4)


# ---------------------------------------------------------------- mirrored first prompt


def test_mirror_point_inputs_keeps_box_corners_in_order():
    size = 128
    point_inputs = {'point_coords': torch.tensor([[[[10.0, 20.0], [50.0, 60.0], [30.0, 5.0]]]]),
                    'point_labels': torch.tensor([[[2, 3, 1]]], dtype=torch.int32)}
    mirrored = mirror_point_inputs(point_inputs, size)
    # Corner 2 (top-left) takes the mirrored right edge; the click mirrors in place.
    assert mirrored['point_coords'].tolist() == [[[[77.0, 20.0], [117.0, 60.0], [97.0, 5.0]]]]
    assert torch.equal(mirrored['point_labels'], point_inputs['point_labels'])
    twice = mirror_point_inputs(mirrored, size)
    assert torch.equal(twice['point_coords'], point_inputs['point_coords'])


def _square_frame(size=32, seed=3):
    rng = np.random.RandomState(seed)
    frame = rng.randint(0, 255, (size, size, 3), np.uint8)
    frame[8:20, 4:14] = 250  # an off-centre bright blob: the mirror is a different image
    return frame


@pytest.mark.parametrize('prompt', ['box', 'point'])
def test_first_prompt_mask_is_the_union_with_the_mirrored_frame(prompt):
    """A new object's mask = its mask on the frame OR (mirrored back) on the mirror image."""
    # A 32 px frame is the decoder's own grid (128 px input / 4): the published mask is the
    # low-res logits thresholded without resampling, so the union is exact per pixel.
    frame = _square_frame(32)
    # Frame x -> model x * 4 -> mirrored 127 - 4 x -> frame 127 / 4 - x (SAM2 coordinates are
    # pixel indices; it adds 0.5 for the centre).
    far = 127 / 4
    if prompt == 'box':
        kwargs = dict(boxes=[[3.0, 6.0, 16.0, 22.0]])
        mirrored_kwargs = dict(boxes=[[far - 16.0, 6.0, far - 3.0, 22.0]])
    else:
        kwargs = dict(points=[[[9.0, 12.0]]])
        mirrored_kwargs = dict(points=[[[far - 9.0, 12.0]]])
    masks, memories = {}, {}
    for name, image, union, prompt_kwargs in (
            ('on', frame, True, kwargs), ('off', frame, False, kwargs),
            ('mirror', frame[:, ::-1].copy(), False, mirrored_kwargs)):
        tracker = make_tracker(box_mask_margin=None, mask_refine_radius=None,
                               prompt_mirror_union=union)
        tracker.track(image)
        tracker.add_objects(**prompt_kwargs)
        masks[name] = tracker.last_result.objects[0].mask
        memories[name] = _first_memory(tracker, 1)
    union = masks['off'] | masks['mirror'][:, ::-1]
    assert np.array_equal(masks['on'], union)
    # Not a no-op on this frame: the mirrored pass adds pixels, and the memory the track
    # starts from is encoded from the union.
    assert (masks['on'] & ~masks['off']).any()
    assert not torch.equal(memories['on'], memories['off'])


def test_mirrored_pass_runs_once_per_frame_and_only_for_new_box_or_point_prompts():
    small = np.zeros((H, W), bool)
    small[40:52, 70:82] = True
    video = frames(2)
    calls = {}
    for union in (False, True):
        tracker = make_tracker(prompt_mirror_union=union)
        encoder_calls = []
        original = tracker.model.get_image_features

        def counting(*args, _calls=encoder_calls, _original=original, **kwargs):
            _calls.append(1)
            return _original(*args, **kwargs)

        tracker.model.get_image_features = counting
        tracker.track(video[0])
        tracker.add_objects(boxes=[BOX_A, BOX_B])  # two new objects on one frame
        first = len(encoder_calls)
        tracker.track(video[1])
        tracker.add_objects(boxes=[BOX_A], object_ids=[1])  # existing object: memory decides
        tracker.add_objects(masks=[small])  # a mask prompt is taken as the mask itself
        calls[union] = (first, len(encoder_calls) - first)
        objects = by_id(tracker.last_result)
        assert sorted(objects) == [1, 2, 3] and objects[3].present
    # One extra image-encoder pass for the frame with new box prompts, none otherwise.
    assert calls[True][0] == calls[False][0] + 1
    assert calls[True][1] == calls[False][1]
