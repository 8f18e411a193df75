"""Tiny random transformers vision towers (hidden 32, 2 layers, 32 px) for the HF adapter tests."""

from __future__ import annotations

import torch
from torch import nn

HF_FAMILIES = ["clip", "clip_proj", "siglip", "siglip2", "dinov2", "dinov2_reg"]
IMAGE = 32
PATCH = 8


def make_hf(family: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A tiny random transformers vision model of the given family (``num_layers`` blocks), in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, patch_size=PATCH)
    if family in ("clip", "clip_proj"):
        cfg = tf.CLIPVisionConfig(
            **common, intermediate_size=64, image_size=IMAGE, projection_dim=24, hidden_act="quick_gelu"
        )
        model = (tf.CLIPVisionModelWithProjection if family == "clip_proj" else tf.CLIPVisionModel)(cfg)
    elif family == "siglip":
        cfg = tf.SiglipVisionConfig(**common, intermediate_size=64, image_size=IMAGE)
        model = tf.SiglipVisionModel(cfg)
    elif family == "siglip2":
        cfg = tf.Siglip2VisionConfig(**common, intermediate_size=64, num_patches=(IMAGE // PATCH) ** 2)
        model = tf.Siglip2VisionModel(cfg)
    elif family == "dinov2":
        cfg = tf.Dinov2Config(**common, mlp_ratio=2, image_size=IMAGE, layerscale_value=0.5)
        model = tf.Dinov2Model(cfg)
    elif family == "dinov2_reg":
        cfg = tf.Dinov2WithRegistersConfig(
            **common, mlp_ratio=2, image_size=IMAGE, layerscale_value=0.5, num_register_tokens=2
        )
        model = tf.Dinov2WithRegistersModel(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # random non-trivial norms, biases and positions, so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias") or "position" in name or "token" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_images(n: int = 4, seed: int = 1) -> torch.Tensor:
    """Random 32 px images."""
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def hf_call(model: nn.Module, x: torch.Tensor, **kwargs):
    """The transformers model's own forward on square images (SigLIP2: patchified as its image processor does)."""
    if type(model).__name__ == "Siglip2VisionModel":
        b, _, h, w = x.shape
        p = model.config.patch_size
        # the image processor's layout, written independently: per patch (row, col, channel) order
        patches = torch.stack(
            [
                x[:, :, i : i + p, j : j + p].permute(0, 2, 3, 1).reshape(b, -1)
                for i in range(0, h, p)
                for j in range(0, w, p)
            ],
            dim=1,
        )
        mask = torch.ones(b, patches.shape[1], dtype=torch.long)
        shapes = torch.tensor([[h // p, w // p]] * b)
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, **kwargs)
    return model(pixel_values=x, **kwargs)


def hf_embedding(out) -> torch.Tensor:
    """The pooled embedding the model returns (CLIP with projection: image_embeds)."""
    return out.image_embeds if hasattr(out, "image_embeds") and out.image_embeds is not None else out.pooler_output
