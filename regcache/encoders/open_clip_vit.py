"""Adapter for open_clip's ``VisionTransformer`` (OpenAI CLIP and OpenCLIP towers)."""

from __future__ import annotations

import torch
from torch import nn

from regcache.encoders.base import Attention, Block, Mlp, VisionEncoder
from regcache.encoders.registry import register_adapter
from regcache.quant.modules import PatchConv2d


def _linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` that shares the given parameters."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = weight
    lin.bias = bias
    return lin


def _convert_block(block: nn.Module) -> Block:
    from open_clip.transformer import Attention as OpenClipAttention

    attn = block.attn
    ls1: nn.Module = block.ls_1
    if isinstance(attn, nn.MultiheadAttention):
        if not attn.batch_first or attn._qkv_same_embed_dim is False:
            raise NotImplementedError("only batch-first self-attention with packed in_proj is supported")
        canonical = Attention(
            _linear(attn.in_proj_weight, attn.in_proj_bias),
            _linear(attn.out_proj.weight, attn.out_proj.bias),
            attn.num_heads,
        )
    elif isinstance(attn, OpenClipAttention):
        if attn.logit_scale is not None or attn.head_scale is not None:
            raise NotImplementedError("open_clip blocks with scaled-cosine attention or head scaling are not supported")
        canonical = Attention(
            _linear(attn.in_proj_weight, attn.in_proj_bias),
            _linear(attn.out_proj.weight, attn.out_proj.bias),
            attn.num_heads,
            q_norm=attn.ln_q,
            k_norm=attn.ln_k,
            out_norm=attn.ln_inner,
        )
        if not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            ls1 = nn.Sequential(block.ln_attn, block.ls_1)
    else:
        raise NotImplementedError(f"unsupported open_clip attention {type(attn).__name__}")
    mlp = block.mlp
    fc_norm = mlp.ln if hasattr(mlp, "ln") else None
    return Block(
        block.ln_1,
        canonical,
        block.ln_2,
        Mlp(mlp.c_fc, mlp.gelu, mlp.c_proj, norm=fc_norm),
        ls1=ls1,
        ls2=block.ls_2,
    )


class OpenClipVisionEncoder(VisionEncoder):
    """open_clip ``VisionTransformer`` in canonical form; the final ``proj`` becomes a bias-free linear."""

    family = "open_clip"

    def __init__(self, visual: nn.Module) -> None:
        if getattr(visual, "attn_pool", None) is not None:
            raise NotImplementedError("open_clip towers with an attentional pooler (CoCa) are not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError(f"open_clip pool_type {visual.pool_type!r} is not supported")
        blocks = [_convert_block(b) for b in visual.transformer.resblocks]
        proj = visual.proj
        embed_dim = proj.shape[1] if proj is not None else visual.transformer.width
        super().__init__(blocks, num_prefix_tokens=1, embed_dim=embed_dim, source=type(visual).__name__)
        self.conv1 = PatchConv2d.from_conv(visual.conv1) if type(visual.conv1) is nn.Conv2d else visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre
        self.ln_post = visual.ln_post
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool
        self.output_tokens = visual.output_tokens
        self.image_size = visual.image_size
        self.patch_size = visual.patch_size
        self.proj = None
        if proj is not None:
            self.proj = nn.Linear(proj.shape[0], proj.shape[1], bias=False, device=proj.device, dtype=proj.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(proj.t())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify with conv1, prepend the class token, add positions, then patch dropout and ln_pre."""
        x = self.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's head: class-token or average pool with ln_post before or after it, then the projection.

        With ``output_tokens`` it returns ``(pooled, patch tokens)``, as the original tower does.
        """
        if self.final_ln_after_pool:
            pooled, rest = self._global_pool(tokens)
            pooled = self.ln_post(pooled)
        else:
            pooled, rest = self._global_pool(self.ln_post(tokens))
        if self.proj is not None:
            pooled = self.proj(pooled)
        return (pooled, rest) if self.output_tokens else pooled

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens open_clip returns with ``output_tokens`` (after ln_post unless it follows the pool)."""
        return (tokens if self.final_ln_after_pool else self.ln_post(tokens))[:, 1:]


def _is_open_clip_vit(module: nn.Module) -> bool:
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return isinstance(module, VisionTransformer)


register_adapter("open_clip", _is_open_clip_vit, OpenClipVisionEncoder)
