"""Encoder adapters: every supported vision tower in one canonical transformer form."""

from regcache.encoders import hf_vit, open_clip_vit, timm_vit  # noqa: F401  (register adapters)
from regcache.encoders.base import (
    TAP_NAMES,
    Attention,
    AttentionPrefix,
    Block,
    Mlp,
    Tap,
    VisionEncoder,
    record,
)
from regcache.encoders.registry import ADAPTERS, adapt, register_adapter

__all__ = [
    "ADAPTERS",
    "TAP_NAMES",
    "Attention",
    "AttentionPrefix",
    "Block",
    "Mlp",
    "Tap",
    "VisionEncoder",
    "adapt",
    "record",
    "register_adapter",
]
