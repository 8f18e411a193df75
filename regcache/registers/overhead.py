"""FLOP overhead of RegCache relative to the plain model.

Counted like :meth:`VisionEncoder.flops_per_image` (2 x multiply-accumulates of the linears and
attention matmuls). A prefix of ``n`` entries in a block adds, per real token, ``n`` logits
(q·k, ``2·n·d`` FLOPs) and ``n`` value rows (``2·n·d``), d = heads x head_dim. τ costs nothing
extra (one added ``ln τ`` per logit, not counted, as softmax and norms are not counted).
Deleting k̃ tokens at the input of ``l_q`` shrinks every block from ``l_q`` on.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from regcache.encoders.base import VisionEncoder


def block_flops(encoder: VisionEncoder, layer: int, num_tokens: int) -> int:
    """FLOPs of one block for ``num_tokens`` tokens (the foundation's per-image count, one block)."""
    return VisionEncoder.flops_per_image(SimpleNamespace(blocks=[encoder.blocks[layer]]), num_tokens)


def regcache_flops(
    encoder: VisionEncoder,
    num_tokens: int,
    prefix_layers: Sequence[int] = (),
    num_entries: int = 1,
    l_q: int | None = None,
    delete_k: int = 0,
) -> dict[str, Any]:
    """Plain vs RegCache FLOPs per image: prefix in ``prefix_layers``, ``delete_k`` tokens removed at ``l_q``."""
    if delete_k and l_q is None:
        raise ValueError("token deletion needs l_q")
    base = encoder.flops_per_image(num_tokens)
    total = prefix = 0
    for layer in range(encoder.num_blocks):
        n = num_tokens - delete_k if delete_k and layer >= l_q else num_tokens
        total += block_flops(encoder, layer, n)
        if layer in prefix_layers:
            attn = encoder.blocks[layer].attn
            added = 2 * 2 * n * num_entries * attn.num_heads * attn.head_dim
            prefix += added
            total += added
    saved = base + prefix - total
    return {
        "plain": base,
        "regcache": total,
        "prefix_added": prefix,
        "deletion_saved": saved,
        "relative_added": (total - base) / base,
        "prefix_relative": prefix / base,
    }
