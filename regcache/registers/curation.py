"""Curate register candidates: streaming top-k tokens by l-inf norm of the float residual stream.

Only the blocks before the deepest requested layer run (``embed`` + ``forward_blocks``), and only
k tokens per layer are kept between batches, so reference pools of 50,000 images stream through
in constant memory. CLS/register tokens (the first ``num_prefix_tokens``) are never candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from regcache.encoders.base import VisionEncoder
from regcache.quant.calibration import iter_images
from regcache.registers._common import plain_float, require_float


@dataclass
class Candidates:
    """Candidate register vectors (M, C) with their provenance, best first within each layer."""

    vectors: torch.Tensor
    norms: torch.Tensor
    image_index: torch.Tensor
    token_index: torch.Tensor
    layer: torch.Tensor

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def subset(self, index: torch.Tensor | Sequence[int]) -> Candidates:
        """The candidates at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Candidates(*(t[index] for t in self._tensors()))

    def provenance(self) -> list[dict[str, Any]]:
        """Per candidate: image id (position in the reference stream), token index, layer, l-inf norm."""
        return [
            {"image": int(i), "token": int(t), "layer": int(l), "linf": float(n)}
            for i, t, l, n in zip(self.image_index, self.token_index, self.layer, self.norms, strict=True)
        ]

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.vectors, self.norms, self.image_index, self.token_index, self.layer

    def save(self, path: str | Path) -> Path:
        """Save to safetensors (creating the parent folder)."""
        names = ("vectors", "norms", "image_index", "token_index", "layer")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous().cpu() for n, t in zip(names, self._tensors(), strict=True)}, str(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        """Load from safetensors."""
        t = load_file(str(path))
        return cls(t["vectors"], t["norms"], t["image_index"], t["token_index"], t["layer"])


class _StreamingTopK:
    """The k largest scores seen so far, with their vectors and (image, token) positions."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scores: torch.Tensor | None = None
        self.vectors = self.image = self.token = None

    def update(self, tokens: torch.Tensor, first_image: int, token_offset: int) -> None:
        """Offer every token of a (B, N, C) batch; ``token_offset`` maps to full-sequence indices."""
        _, n, c = tokens.shape
        scores = tokens.abs().amax(dim=-1).reshape(-1)
        top = scores.topk(min(self.k, scores.numel())).indices  # only these can enter the global top-k
        vectors = tokens.reshape(-1, c)[top].float()
        image = top // n + first_image
        token = top % n + token_offset
        scores = scores[top].float()
        if self.scores is not None:
            scores = torch.cat([self.scores, scores])
            vectors = torch.cat([self.vectors, vectors])
            image, token = torch.cat([self.image, image]), torch.cat([self.token, token])
        keep = scores.topk(min(self.k, scores.numel())).indices
        self.scores, self.vectors, self.image, self.token = scores[keep], vectors[keep], image[keep], token[keep]


@torch.no_grad()
def curate_candidates(
    encoder: VisionEncoder,
    batches: Iterable[Any],
    layers: int | Sequence[int],
    k: int = 20,
    progress: bool = True,
) -> Candidates:
    """Top-``k`` tokens by l-inf norm of the float residual stream entering each of ``layers``.

    v1 default: ``layers=l_q, k=20``; v4 option: ``layers=[l_q-3, ..., l_q], k=100`` (k per layer).
    Image ids are positions in the ``batches`` stream; token ids index the full sequence.
    """
    require_float(encoder, "curation")
    layers = sorted({layers} if isinstance(layers, int) else set(layers))
    if not layers or layers[0] < 0 or layers[-1] >= encoder.num_blocks:
        raise ValueError(f"layers must lie in [0, {encoder.num_blocks}), got {layers}")
    npre = encoder.num_prefix_tokens
    pools = {l: _StreamingTopK(k) for l in layers}
    seen = 0
    with plain_float(encoder):
        for images in iter_images(encoder, batches, progress, desc="curating registers"):
            x, done = encoder.embed(images), 0
            for layer in layers:
                x, done = encoder.forward_blocks(x, done, layer), layer  # x = input of block `layer`
                pools[layer].update(x[:, npre:], seen, npre)
            seen += images.shape[0]
    if seen == 0:
        raise ValueError("the reference pool is empty")
    parts = [(p.vectors, p.scores, p.image, p.token, torch.full_like(p.image, layer)) for layer, p in pools.items()]
    return Candidates(*(torch.cat(col).cpu() for col in zip(*parts, strict=True)))
