"""Adapters for Hugging Face ``transformers`` vision towers, the form vision-language models load them in.

Covered classes (each adapted into the canonical blocks of :mod:`regcache.encoders.base`):

- ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``: CLS token, ``pre_layrnorm`` before the
  blocks; the embedding is ``post_layernorm(CLS)`` (then ``visual_projection`` as ``proj``);
- ``SiglipVisionModel``: no CLS; the embedding is the MAP head (``map_head``) over the
  ``post_layernorm``-ed tokens, or their mean where the config has no head. The MAP head stays
  float under every method (its ``nn.MultiheadAttention`` does not call ``out_proj`` as a module,
  so it is not named a head linear);
- ``Siglip2VisionModel``: as SigLIP, on square images of a fixed resolution (the NaFlex
  patchification of the image processor is done here: no padding, so no attention mask);
- ``Dinov2Model`` / ``Dinov2WithRegistersModel``: CLS (+ register tokens), layer scale kept; the
  embedding is the final ``layernorm``'s CLS (``pooler_output``).

The blocks' separate ``q_proj`` / ``k_proj`` / ``v_proj`` become the canonical packed ``qkv``
linear: its weight is their concatenation (torch cannot view three parameters as one tensor), and
the tower's own layers are released so the weights are held once. Every other module (embeddings,
norms, head, projection) is the original one, shared.

``feature_layer`` selects what the tower outputs as its token grid, as VLMs pick it: ``-1`` (all
blocks, the final norm where the class applies one to ``last_hidden_state``) or ``-k`` for
``hidden_states[-k]`` (LLaVA uses ``-2``): the blocks after it are dropped, and the tokens are the
un-normed residual stream, as ``hidden_states`` holds them. :meth:`HFVisionEncoder.patch_tokens`
returns that grid without the CLS / register tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from regcache.encoders.base import Attention, Block, Mlp, VisionEncoder
from regcache.encoders.registry import register_adapter
from regcache.quant.modules import PatchConv2d

# transformers class name -> family key used below
HF_CLASSES = {
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "SiglipVisionModel": "siglip",
    "Siglip2VisionModel": "siglip2",
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
}


def _packed_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    """One linear computing ``[q; k; v]`` (the canonical ``qkv``), weights concatenated."""
    biases = [lin.bias for lin in (q, k, v)]
    has_bias = any(b is not None for b in biases)
    out = q.out_features + k.out_features + v.out_features
    qkv = nn.Linear(q.in_features, out, bias=has_bias, device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if has_bias:
            qkv.bias.copy_(torch.cat([b if b is not None else torch.zeros_like(q.weight[:, 0]) for b in biases]))
    return qkv


def _convert_layer(layer: nn.Module) -> Block:
    """A CLIP / SigLIP ``EncoderLayer`` or DINOv2 ``Layer`` as a canonical block."""
    if hasattr(layer, "self_attn"):  # CLIP, SigLIP, SigLIP2
        attn, norm1, norm2, ls1, ls2 = layer.self_attn, layer.layer_norm1, layer.layer_norm2, None, None
        out_proj = attn.out_proj
    else:  # DINOv2 (with registers)
        attn, norm1, norm2 = layer.attention, layer.norm1, layer.norm2
        ls1, ls2 = layer.layer_scale1, layer.layer_scale2
        out_proj = getattr(attn, "o_proj", None)
        if not isinstance(getattr(layer, "drop_path", nn.Identity()), nn.Identity) and layer.training:
            raise NotImplementedError("stochastic depth in training mode is not supported (call model.eval())")
    if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        raise NotImplementedError(
            f"unsupported transformers attention {type(attn).__name__}: need q_proj / k_proj / v_proj linears "
            "(transformers >= 5 layout)"
        )
    if not isinstance(out_proj, nn.Linear):
        raise NotImplementedError(f"unsupported transformers attention {type(attn).__name__}: no output projection")
    mlp = layer.mlp
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("fc1", "fc2")):
        raise NotImplementedError(
            f"unsupported transformers MLP {type(mlp).__name__} (need fc1 → activation → fc2; SwiGLU is not covered)"
        )
    num_heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
    canonical = Attention(_packed_qkv(attn.q_proj, attn.k_proj, attn.v_proj), out_proj, num_heads)
    if abs(canonical.scale - float(getattr(attn, "scale", getattr(attn, "scaling", canonical.scale)))) > 1e-12:
        raise NotImplementedError(f"{type(attn).__name__} scales its logits by other than head_dim ** -0.5")
    return Block(norm1, canonical, norm2, Mlp(mlp.fc1, mlp.activation_fn, mlp.fc2), ls1=ls1, ls2=ls2)


class _MovedLayers(nn.Module):
    """Left in the transformers encoder: its layers belong to the adapted encoder now."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError(
            "this transformers model was adapted: its layers moved into the VisionEncoder; call that instead"
        )


class HFVisionEncoder(VisionEncoder):
    """A ``transformers`` CLIP / SigLIP / SigLIP2 / DINOv2 vision tower in canonical form.

    ``forward`` returns the tower's pooled embedding (``image_embeds`` for
    ``CLIPVisionModelWithProjection``, else ``pooler_output``; SigLIP without a head: the mean
    token). ``feature_layer`` (``-1`` = all blocks) truncates the tower for VLM features; the
    pooled embedding is then computed on that layer's tokens by the same head.
    """

    family = "hf"

    def __init__(self, model: nn.Module, feature_layer: int = -1) -> None:
        kind = HF_CLASSES.get(type(model).__name__)
        if kind is None:
            raise TypeError(f"no transformers adapter for {type(model).__name__}; supported: {', '.join(HF_CLASSES)}")
        projection = getattr(model, "visual_projection", None)
        tower = model.vision_model if hasattr(model, "vision_model") else model
        layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer
        n_layers = len(layers)
        if not -n_layers <= feature_layer <= -1:
            raise ValueError(
                f"feature_layer must be in -{n_layers}..-1 (hidden_states[feature_layer]; -1 = the last block), "
                f"got {feature_layer}"
            )
        kept = n_layers + 1 + feature_layer
        blocks = [_convert_layer(layer) for layer in list(layers)[:kept]]
        config = tower.config
        num_prefix = {"clip": 1, "siglip": 0, "siglip2": 0}.get(kind, 1 + getattr(config, "num_register_tokens", 0))
        embed_dim = projection.out_features if projection is not None else config.hidden_size
        super().__init__(blocks, num_prefix_tokens=num_prefix, embed_dim=embed_dim, source=type(model).__name__)
        self.kind = kind
        self.feature_layer = feature_layer
        self.patch_size = config.patch_size
        self.image_size = getattr(config, "image_size", None) or int(config.num_patches**0.5) * config.patch_size
        self.embeddings = tower.embeddings
        stem = getattr(self.embeddings, "patch_embedding", None)  # CLIP / SigLIP
        if type(stem) is nn.Conv2d and stem.padding in ((0, 0), "valid"):
            stem.padding = (0, 0)  # "valid" is no padding; the patchify matmul needs the tuple
            self.embeddings.patch_embedding = PatchConv2d.from_conv(stem)
        dino_stem = getattr(getattr(self.embeddings, "patch_embeddings", None), "projection", None)
        if type(dino_stem) is nn.Conv2d:
            self.embeddings.patch_embeddings.projection = PatchConv2d.from_conv(dino_stem)
        self.pre_norm = getattr(tower, "pre_layrnorm", None) or nn.Identity()
        final = getattr(tower, "post_layernorm", None) or getattr(tower, "layernorm", None)
        self.post_norm = final if final is not None else nn.Identity()
        self.proj = projection  # CLIP's visual_projection: the methods' "proj" head linear
        self.map_head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
        setattr(tower.encoder, "layers" if hasattr(tower.encoder, "layers") else "layer", _MovedLayers())

    # ---- the tower's stem and head ------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (and CLS / registers), then CLIP's pre-LayerNorm."""
        if self.kind == "siglip2":
            b, c, h, w = images.shape
            p = self.patch_size
            if h % p or w % p:
                raise ValueError(f"SigLIP2 input {h}x{w} is not a multiple of the patch size {p}")
            # the image processor's NaFlex layout: patches row-major, each patch (p, p, channels) flattened
            patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
            shapes = torch.tensor([[h // p, w // p]], device=images.device).expand(b, 2)
            return self.embeddings(patches, shapes)
        if self.kind == "dinov2":
            return self.embeddings(images)
        size = self.image_size
        resized = tuple(images.shape[-2:]) != (size, size)
        return self.pre_norm(self.embeddings(images, interpolate_pos_encoding=resized))

    def token_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The norm the class applies to ``last_hidden_state`` (SigLIP, DINOv2); none for CLIP or a truncated tower."""
        if self.feature_layer != -1 or self.kind == "clip":
            return tokens
        return self.post_norm(tokens)

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch-token grid a VLM consumes (``hidden_states[feature_layer]`` without CLS / registers)."""
        return self.token_norm(tokens)[:, self.num_prefix_tokens :]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's pooled embedding: CLIP post-LN CLS (+ projection), SigLIP MAP head, DINOv2 normed CLS."""
        if self.kind == "clip":
            pooled = self.post_norm(tokens[:, 0])
            return self.proj(pooled) if self.proj is not None else pooled
        normed = self.post_norm(tokens)
        if self.kind == "dinov2":
            return normed[:, 0]
        return self.map_head(normed) if self.map_head is not None else normed.mean(dim=1)


def _is_hf_vision_tower(module: nn.Module) -> bool:
    return type(module).__name__ in HF_CLASSES and type(module).__module__.startswith("transformers.")


def _from_hf(model: nn.Module) -> HFVisionEncoder:
    # load_model("hf:...", feature_layer=k) leaves the choice on the model for adapt()
    return HFVisionEncoder(model, feature_layer=getattr(model, "regcache_feature_layer", -1))


register_adapter("hf", _is_hf_vision_tower, _from_hf)
