"""Measurements of the testbed's acceptance criteria (testbed.md), used by the training report.

All functions take an adapted :class:`~regcache.encoders.VisionEncoder` (or the CLIP model for
zero-shot) and plain image tensors; the RegCache steps come from ``regcache.registers``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from regcache.encoders import VisionEncoder, adapt, record
from regcache.quant import NaiveConfig, calibrate_, quantize_
from regcache.registers import curate_candidates, derive_cache, install_deletion, install_prefix


@torch.no_grad()
def zeroshot_accuracy(
    image_encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    batch_size: int = 250,
) -> float:
    """Top-1 (micro) accuracy of argmax(normalized features @ classifier)."""
    device = classifier.device
    correct = 0
    for i in range(0, len(images), batch_size):
        feats = F.normalize(image_encoder(images[i : i + batch_size].to(device)), dim=-1)
        correct += (feats @ classifier).argmax(dim=-1).eq(labels[i : i + batch_size].to(device)).sum().item()
    return correct / len(images)


@torch.no_grad()
def block_outputs(encoder: VisionEncoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream after each block (B, N, C), float."""
    x = encoder.embed(images)
    outs = []
    for block in encoder.blocks:
        x = block(x)
        outs.append(x)
    return outs


@torch.no_grad()
def outlier_profile(encoder: VisionEncoder, images: torch.Tensor, factor: float = 5.0) -> list[dict]:
    """Per block output: mean per-image max/p90 token norm, outlier count and outlier cross-image cosine.

    Outlier tokens: patch tokens (no CLS) with norm > ``factor`` x the image's median token norm.
    """
    rows = []
    for x in block_outputs(encoder, images):
        norms = x[:, 1:].norm(dim=-1)  # (B, N-1)
        ratio = (norms.max(dim=1).values / norms.quantile(0.9, dim=1)).mean().item()
        is_out = norms > factor * norms.median(dim=1, keepdim=True).values
        cos = float("nan")
        if is_out.any():
            tok = F.normalize(x[:, 1:][is_out], dim=-1)
            owner = torch.nonzero(is_out)[:, 0]
            sim = tok @ tok.T
            cross = owner[:, None] != owner[None, :]
            if cross.any():
                cos = sim[cross].mean().item()
        rows.append({"max_over_p90": ratio, "outliers_per_image": is_out.sum(1).float().mean().item(), "cosine": cos})
    return rows


@torch.no_grad()
def sink_mass(
    encoder: VisionEncoder, images: torch.Tensor, blocks: tuple[int, ...], heads: tuple[int, ...], factor: float = 5.0
) -> dict[int, float]:
    """Mean attention mass (over images and queries) on outlier tokens, per block, for the given heads."""
    with record(encoder, ("attn_probs", "block_input"), blocks=list(blocks)) as rec:
        encoder(images)
    out = {}
    for b in blocks:
        norms = rec["block_input"][b].norm(dim=-1)
        norms[:, 0] = 0  # CLS is never a sink token
        is_out = norms > factor * norms[:, 1:].median(dim=1, keepdim=True).values
        probs = rec["attn_probs"][b][:, list(heads)]  # (B, h, N, N)
        out[b] = (probs * is_out[:, None, None, :]).sum(-1).mean().item()
    return out


def quantized_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    calib: torch.Tensor,
    bits: tuple[int, int] | None,
    regcache: dict | None = None,
) -> float:
    """Zero-shot accuracy of a fresh copy of the model: optional prefix/deletion, then naive W/A (None: float)."""
    clip = copy.deepcopy(model)
    encoder = adapt(clip)
    if regcache is not None:  # the library's steps: top-1 register at l_q, propagated prefix, top-k deletion
        layer = regcache["layer"]
        if regcache.get("prefix", True):
            with torch.no_grad():
                candidates = curate_candidates(encoder, [calib[:16]], layers=layer, k=1, progress=False)
                install_prefix(encoder, derive_cache(encoder, candidates, layer).entry(0), regcache.get("tau", 1))
        install_deletion(encoder, layer, regcache.get("delete", 0))
    if bits is not None:
        quantize_(encoder, NaiveConfig(w_bits=bits[0], a_bits=bits[1]))
        calibrate_(encoder, [calib[i : i + 64] for i in range(0, len(calib), 64)], progress=False)
    return zeroshot_accuracy(clip.encode_image, images, labels, classifier)


__all__ = [
    "block_outputs",
    "outlier_profile",
    "quantized_accuracy",
    "sink_mass",
    "zeroshot_accuracy",
]
