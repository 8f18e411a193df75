"""Token deletion at the input of block l_q: drop each image's top-k̃ tokens by l-inf norm."""

from __future__ import annotations

import torch
from torch import nn

from regcache.encoders.base import VisionEncoder


class TokenDeletion(nn.Module):
    """Remove, per image, the ``k`` non-prefix tokens with the largest l-inf norm.

    The first ``num_prefix_tokens`` (CLS and register tokens) are never deleted; the remaining
    tokens keep their order. The output is ``(B, N - k, C)``, so every later block, and any
    pooling (CLS, mean over patches, MAP), simply runs on the shorter sequence.
    """

    def __init__(self, k: int, num_prefix_tokens: int) -> None:
        super().__init__()
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 0:
            return x
        npre = self.num_prefix_tokens
        prefix, patches = x[:, :npre], x[:, npre:]
        b, n, c = patches.shape
        if self.k >= n:
            raise ValueError(f"cannot delete {self.k} of {n} patch tokens")
        dropped = patches.abs().amax(dim=-1).topk(self.k, dim=1).indices
        # Kept indices in ascending order without a host sync: dropped ones are pushed past the end.
        position = torch.arange(n, device=x.device).expand(b, n).clone()
        position.scatter_(1, dropped, n)
        kept = position.sort(dim=1).values[:, : n - self.k]
        kept_tokens = patches.gather(1, kept.unsqueeze(-1).expand(b, n - self.k, c))
        return torch.cat([prefix, kept_tokens], dim=1)

    def extra_repr(self) -> str:
        return f"k={self.k}, num_prefix_tokens={self.num_prefix_tokens}"


def install_deletion(encoder: VisionEncoder, layer: int, k: int) -> None:
    """Delete k tokens at the input of block ``layer`` (k = 0 removes any deletion there)."""
    encoder.blocks[layer].input_filter = TokenDeletion(k, encoder.num_prefix_tokens) if k > 0 else None


def remove_deletion(encoder: VisionEncoder) -> None:
    """Remove token deletion from every block."""
    for block in encoder.blocks:
        if isinstance(block.input_filter, TokenDeletion):
            block.input_filter = None
