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
        """Drop each image's k largest-l-inf patch tokens from (B, N, C), keeping prefix tokens and token order."""
        if self.k == 0:
            return x
        npre = self.num_prefix_tokens
        b, total, c = x.shape
        n = total - npre
        if self.k >= n:
            raise ValueError(f"cannot delete {self.k} of {n} patch tokens")
        dropped = x[:, npre:].abs().amax(dim=-1).topk(self.k, dim=1).indices
        # Kept indices in ascending order, without a sort or a host sync: a stable partition of the
        # patch positions (kept ones first, in order), written through its own permutation.
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, dropped, False)
        slot = torch.where(keep, keep.cumsum(1) - 1, (n - self.k) + (~keep).cumsum(1) - 1)
        position = torch.arange(npre, total, device=x.device).expand(b, n)
        order = torch.empty_like(slot).scatter_(1, slot, position)
        index = torch.cat([torch.arange(npre, device=x.device).expand(b, npre), order[:, : n - self.k]], dim=1)
        return x.gather(1, index.unsqueeze(-1).expand(b, total - self.k, c))  # one gather, prefix tokens included

    def extra_repr(self) -> str:
        """k and the protected prefix-token count, for ``print(model)``."""
        return f"k={self.k}, num_prefix_tokens={self.num_prefix_tokens}"


def install_deletion(encoder: VisionEncoder, layer: int, k: int) -> None:
    """Delete k tokens at the input of block ``layer`` (k = 0 removes any deletion there)."""
    encoder.blocks[layer].input_filter = TokenDeletion(k, encoder.num_prefix_tokens) if k > 0 else None


def remove_deletion(encoder: VisionEncoder) -> None:
    """Remove token deletion from every block."""
    for block in encoder.blocks:
        if isinstance(block.input_filter, TokenDeletion):
            block.input_filter = None
