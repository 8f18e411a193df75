"""Install / remove a register cache as the attention prefix of blocks >= l_start.

τ = 0 means "not installed": the model is then exactly the plain (adapted, quantized) model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from regcache.encoders.base import AttentionPrefix, VisionEncoder
from regcache.registers._common import device_dtype
from regcache.registers.cache import RegisterCache


def prefix_layers(cache: RegisterCache, only: int | None = None) -> list[int]:
    """Blocks that get the prefix: all of the cache's (>= l_start), or just block ``only`` (DINOv2 v4: l_q)."""
    if only is None:
        return cache.layers
    if only not in cache.keys:
        raise ValueError(f"the cache has no entry for block {only} (it covers {cache.layers})")
    return [only]


def install_prefix(encoder: VisionEncoder, cache: RegisterCache, tau: int, only: int | None = None) -> list[int]:
    """Prepend the cache's registers (τ copies each) in its blocks; τ = 0 removes every prefix instead.

    Returns the blocks that now carry the prefix.
    """
    remove_prefix(encoder)
    if tau == 0:
        return []
    device, dtype = device_dtype(encoder)
    layers = prefix_layers(cache, only)
    for layer in layers:
        encoder.blocks[layer].attn.prefix = cache.prefix(layer, tau, device, dtype)
    return layers


def install_batched_prefix(
    encoder: VisionEncoder, caches: Sequence[RegisterCache], taus: Sequence[int], repeat: int, only: int | None = None
) -> None:
    """One (register, τ) per group of ``repeat`` consecutive samples: batch element ``p*repeat + b``
    gets ``caches[p]`` with multiplicity ``taus[p]`` (τ >= 1), so P configurations run as one batch.

    τ differs per sample, so the prefix has no host ``multiplicity``: float SDPA keeps the ``ln τ`` mask
    (repeating entries would need a different key count per sample).
    """
    if len(caches) != len(taus):
        raise ValueError("need one τ per cache")
    if min(taus) < 1:
        raise ValueError("batched prefixes need τ >= 1 (τ = 0 is 'no prefix': run it unbatched)")
    remove_prefix(encoder)
    device, dtype = device_dtype(encoder)
    log_tau = torch.tensor([math.log(t) for t in taus], device=device, dtype=dtype)
    log_tau = log_tau.repeat_interleave(repeat).view(-1, 1, 1, 1)
    for layer in prefix_layers(caches[0], only):
        keys = torch.stack([c.keys[layer] for c in caches]).to(device=device, dtype=dtype)
        values = torch.stack([c.values[layer] for c in caches]).to(device=device, dtype=dtype)
        encoder.blocks[layer].attn.prefix = AttentionPrefix(
            keys.repeat_interleave(repeat, dim=0), values.repeat_interleave(repeat, dim=0), log_tau
        )


def remove_prefix(encoder: VisionEncoder) -> None:
    """Remove the attention prefix from every block."""
    for block in encoder.blocks:
        block.attn.prefix = None
