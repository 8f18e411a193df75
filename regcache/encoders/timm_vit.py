"""Adapter for timm's ``VisionTransformer``: SigLIP / SigLIP2 towers (MAP head, no CLS) and DINOv2."""

from __future__ import annotations

import torch
from torch import nn

from regcache.encoders.base import Attention, Block, Mlp, VisionEncoder
from regcache.encoders.registry import register_adapter
from regcache.quant.modules import PatchConv2d


def _convert_block(block: nn.Module) -> Block:
    from timm.layers import Attention as TimmAttention

    attn, mlp = block.attn, block.mlp
    if type(attn) is not TimmAttention or getattr(attn, "gate", None) is not None:
        raise NotImplementedError(f"unsupported timm attention {type(attn).__name__} (need plain timm Attention)")
    if not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")) or not isinstance(mlp.fc1, nn.Linear):
        raise NotImplementedError(f"unsupported timm MLP {type(mlp).__name__} (need fc1 → act → fc2)")
    canonical = Attention(
        attn.qkv, attn.proj, attn.num_heads, q_norm=attn.q_norm, k_norm=attn.k_norm, out_norm=attn.norm
    )
    return Block(
        block.norm1,
        canonical,
        block.norm2,
        Mlp(mlp.fc1, mlp.act, mlp.fc2, norm=getattr(mlp, "norm", None)),
        ls1=block.ls1,
        ls2=block.ls2,
    )


class _MovedBlocks(nn.Module):
    """Left in the timm trunk: its blocks belong to the adapted encoder now."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this timm model was adapted: its blocks moved into the VisionEncoder; call that instead")


class TimmVisionEncoder(VisionEncoder):
    """timm ``VisionTransformer`` in canonical form.

    The trunk keeps its embedding, final norm and pooling head (CLS token, mean or MAP
    attention pool); its blocks move into ``self.blocks``. ``proj_head`` is open_clip's
    ``TimmModel.head`` when the trunk came from an open_clip model, else identity.
    """

    family = "timm"

    def __init__(self, trunk: nn.Module, proj_head: nn.Module | None = None, embed_dim: int | None = None) -> None:
        blocks = [_convert_block(b) for b in trunk.blocks]
        super().__init__(
            blocks,
            num_prefix_tokens=trunk.num_prefix_tokens,
            embed_dim=embed_dim or trunk.num_features,
            source=type(trunk).__name__,
        )
        trunk.blocks = _MovedBlocks()  # the blocks now live (once) in self.blocks
        stem = getattr(trunk.patch_embed, "proj", None)
        if type(stem) is nn.Conv2d:
            trunk.patch_embed.proj = PatchConv2d.from_conv(stem)
        self.trunk = trunk
        self.proj_head = proj_head if proj_head is not None else nn.Identity()

    @property
    def outputs_class_logits(self) -> bool:
        """A bare timm classifier (no open_clip projection head) with classes returns their logits."""
        return isinstance(self.proj_head, nn.Identity) and getattr(self.trunk, "num_classes", 0) > 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The timm trunk's stem: patch embedding, positions and prefix tokens, patch dropout and norm_pre."""
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(images))))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The trunk's final norm and ``forward_head`` pooling, then the (open_clip) projection head if any."""
        return self.proj_head(self.trunk.forward_head(self.trunk.norm(tokens)))

    def patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The patch tokens of the trunk's ``forward_features`` (final norm, without CLS / registers)."""
        return self.trunk.norm(tokens)[:, self.num_prefix_tokens :]


def _is_timm_vit(module: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer)


def _is_open_clip_timm_tower(module: nn.Module) -> bool:
    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, TimmModel) and _is_timm_vit(module.trunk)


def _from_open_clip_timm(tower: nn.Module) -> TimmVisionEncoder:
    head_out = [m.out_features for m in tower.head.modules() if isinstance(m, nn.Linear)]
    embed_dim = head_out[-1] if head_out else None
    return TimmVisionEncoder(tower.trunk, proj_head=tower.head, embed_dim=embed_dim)


register_adapter("timm", _is_timm_vit, TimmVisionEncoder)
register_adapter("open_clip_timm", _is_open_clip_timm_tower, _from_open_clip_timm)
