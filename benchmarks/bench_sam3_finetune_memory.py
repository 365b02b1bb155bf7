"""Measure what SAM3 fine-tuning keeps in memory for backward, per component, on CPU.

Builds the real ``Sam3Model`` architecture at full width (ViT 1024, DETR 256, 200 queries)
but with few layers, runs one training forward/backward of ``finetune_sam3``'s loss at a
reduced resolution, and counts the bytes of every tensor autograd saves (deduplicated by
storage), except the parameters: a linear layer saves its weight for the input gradient,
but weights are in memory anyway, do not grow with the resolution or the prompts, and the
trainer's estimate counts them (with gradients and optimizer state) on their own.
Differences between runs with one more ViT / DETR-encoder / DETR-decoder layer give
the per-layer cost; everything is then extrapolated to the full model (32 ViT layers, 6+6
DETR layers) at 1008 px. No weights are needed (random init), no GPU either.

    python benchmarks/bench_sam3_finetune_memory.py --size 336 --prompts 2

Activations scale with the token count (``(size / 14) ** 2``) and with the number of prompts
(the detector runs batched over an image's prompts); attention matrices are not stored with
SDPA/flash attention, so the extrapolation is linear in both.
"""

import argparse
import time

import torch
from transformers import Sam3Config, Sam3Model
from transformers.modeling_outputs import BaseModelOutputWithPooling

GIB = float(1 << 30)


def build(vit_layers: int, enc_layers: int, dec_layers: int, size: int) -> Sam3Model:
    config = Sam3Config(
        vision_config={'backbone_config': {
            'model_type': 'sam3_vit_model', 'num_hidden_layers': vit_layers,
            'global_attn_indexes': [vit_layers - 1], 'image_size': size}},
        text_config={'model_type': 'clip_text_model', 'num_hidden_layers': 1,
                     'hidden_size': 64, 'intermediate_size': 128, 'num_attention_heads': 2,
                     'projection_dim': 64, 'max_position_embeddings': 32},
        detr_encoder_config={'num_layers': enc_layers},
        detr_decoder_config={'num_layers': dec_layers},
        geometry_encoder_config={'num_layers': 1})
    config._attn_implementation = 'sdpa'
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam3Model(config)
    return model.train()


def saved_bytes(model: Sam3Model, size: int, prompts: int, train_vision: bool = True) -> float:
    """Return the GiB of activations autograd saves for one fine-tuning step."""
    storages = {}
    # Saved weights are not activations (see the module docstring): counted, a ViT layer's
    # 50 MiB of weights were 58 % of its measured cost at 336 px and were then scaled 9x
    # with the token count.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    pixel_values = torch.randn(1, 3, size, size)
    text = torch.randn(prompts, 32, model.config.text_config.hidden_size)
    mask = torch.ones(prompts, 32, dtype=torch.long)
    mask[:, 6:] = 0
    model.vision_encoder.requires_grad_(train_vision)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.set_grad_enabled(train_vision):
            vision = model.get_vision_features(pixel_values=pixel_values)
        expanded = type(vision)(
            fpn_hidden_states=tuple(h.expand(prompts, *h.shape[1:])
                                    for h in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.expand(prompts, *p.shape[1:])
                                        for p in vision.fpn_position_encoding))
        embeds = BaseModelOutputWithPooling(pooler_output=model.text_projection(text))
        out = model(vision_embeds=expanded, text_embeds=embeds, attention_mask=mask)
        # The mask loss upsamples matched masks to the input size (finetune_sam3 default).
        matched = torch.nn.functional.interpolate(out.pred_masks[:, :4], size=(size, size),
                                                  mode='bilinear', align_corners=False)
        loss = (out.pred_logits.sigmoid().sum() + out.pred_boxes.sum()
                + matched.sigmoid().mean() + out.presence_logits.sum())
    loss.backward()
    return sum(storages.values()) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', type=int, default=336, help='measurement resolution')
    parser.add_argument('--prompts', type=int, default=2)
    parser.add_argument('--target-size', type=int, default=1008)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    runs = {}
    for name, layers in {'base': (1, 1, 1), 'vit': (2, 1, 1), 'enc': (1, 2, 1),
                         'dec': (1, 1, 2)}.items():
        runs[name] = saved_bytes(build(*layers, args.size), args.size, args.prompts)
        print(f'{name:5s} layers={layers}: {runs[name]:.3f} GiB saved', flush=True)
    runs['frozen'] = saved_bytes(build(1, 1, 1, args.size), args.size, args.prompts, False)
    print(f"frozen vision encoder (detector preset): {runs['frozen']:.3f} GiB saved")
    per_vit = runs['vit'] - runs['base']
    per_enc = runs['enc'] - runs['base']
    per_dec = runs['dec'] - runs['base']
    rest = runs['frozen'] - per_enc - per_dec
    neck = runs['base'] - runs['frozen'] - per_vit
    scale = (args.target_size / args.size) ** 2
    print(f'\nper component at {args.size} px, {args.prompts} prompts (fp32): ViT layer '
          f'{per_vit:.3f}, DETR enc layer {per_enc:.3f}, DETR dec layer {per_dec:.3f}, '
          f'mask decoder + loss {rest:.3f}, embeddings + neck {neck:.3f} GiB')
    print(f'extrapolated to {args.target_size} px, per prompt (fp32 GiB): DETR enc layer '
          f'{per_enc * scale / args.prompts:.3f}, dec layer {per_dec * scale / args.prompts:.3f},'
          f' mask decoder + loss {rest * scale / args.prompts:.3f}; per image: ViT layer '
          f'{per_vit * scale:.3f}, embeddings + neck {neck * scale:.3f}')
    for prompts in (4, 8):
        detector = (6 * per_enc + 6 * per_dec + rest) * scale * prompts / args.prompts
        backbone = (32 * per_vit + neck) * scale
        print(f'full model at {args.target_size} px, {prompts} prompts, fp32 activations: '
              f'detector {detector:.1f} GiB, whole ViT trainable +{backbone:.1f} GiB '
              f'(bf16 AMP roughly halves both)')
    print(f'measured in {time.monotonic() - started:.0f} s')


if __name__ == '__main__':
    main()
