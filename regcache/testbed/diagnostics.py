"""Measurements of the testbed's acceptance criteria (testbed.md), used by the training report.

All functions take an adapted :class:`~regcache.encoders.VisionEncoder` (or the CLIP model for
zero-shot) and plain image tensors; nothing here belongs to the RegCache core (which lives in
``regcache/registers``): the prefix/deletion helpers are the minimal mechanism check.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from regcache.encoders import AttentionPrefix, VisionEncoder, adapt, record
from regcache.quant import NaiveConfig, calibrate_, quantize_


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str]
) -> torch.Tensor:
    """(D, K) classifier: per class, mean of the normalized template embeddings, renormalized."""
    device = next(model.parameters()).device
    columns = []
    for name in classnames:
        tokens = tokenizer([t.replace("{c}", name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0)
        columns.append(F.normalize(emb, dim=-1))
    return torch.stack(columns, dim=1)


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


class TopNormDeletion(nn.Module):
    """Drop, per image, the k patch tokens with the largest l-inf norm (never the first ``keep`` tokens)."""

    def __init__(self, k: int, keep: int = 1) -> None:
        super().__init__()
        self.k, self.keep = k, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return x
        head, rest = x[:, : self.keep], x[:, self.keep :]
        order = rest.abs().amax(dim=-1).argsort(dim=1, descending=True)[:, self.k :].sort(dim=1).values
        kept = rest.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([head, kept], dim=1)


@torch.no_grad()
def register_prefixes(
    encoder: VisionEncoder, z: torch.Tensor, start: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Propagate the one-token sequence [z] through blocks start.. in float; per block its (K, V) (1, H, 1, D)."""
    x = z.view(1, 1, -1)
    cache = {}
    for i in range(start, encoder.num_blocks):
        block = encoder.blocks[i]
        _, k, v = block.attn.project_qkv(block.norm1(x))
        cache[i] = (k, v)
        x = block(x)
    return cache


@torch.no_grad()
def top_token(encoder: VisionEncoder, images: torch.Tensor, layer: int) -> torch.Tensor:
    """The patch token of largest l-inf norm at the input of ``layer`` over the images (a register candidate)."""
    x = encoder.forward_blocks(encoder.embed(images), 0, layer)[:, 1:]
    flat = x.reshape(-1, x.shape[-1])
    return flat[flat.abs().amax(dim=-1).argmax()].clone()


def install_regcache_(
    encoder: VisionEncoder, z: torch.Tensor | None, start: int, tau: float, delete_k: int
) -> VisionEncoder:
    """Prefix registers from z (None: none) in blocks >= start and top-k deletion at the input of ``start``."""
    if z is not None:
        for i, (k, v) in register_prefixes(encoder, z, start).items():
            lm = torch.full((1, 1, 1, 1), math.log(tau), device=k.device)
            encoder.blocks[i].attn.prefix = AttentionPrefix(k, v, lm)
    encoder.blocks[start].input_filter = TopNormDeletion(delete_k) if delete_k else None
    return encoder


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
    if regcache is not None:
        z = top_token(encoder, calib[:16], regcache["layer"]) if regcache.get("prefix", True) else None
        install_regcache_(encoder, z, regcache["layer"], regcache.get("tau", 1.0), regcache.get("delete", 0))
    if bits is not None:
        quantize_(encoder, NaiveConfig(w_bits=bits[0], a_bits=bits[1]))
        calibrate_(encoder, [calib[i : i + 64] for i in range(0, len(calib), 64)], progress=False)
    return zeroshot_accuracy(clip.encode_image, images, labels, classifier)


__all__ = [
    "TopNormDeletion",
    "block_outputs",
    "install_regcache_",
    "outlier_profile",
    "quantized_accuracy",
    "register_prefixes",
    "sink_mass",
    "top_token",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
