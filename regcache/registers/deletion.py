"""Token deletion at the input of block l_q: drop each image's top-k̃ tokens by l-inf norm.

Two modes (``DELETE_MODES``):

- ``drop`` (the paper's, the default for classification / retrieval): the sequence is k̃ tokens
  shorter from l_q on, and every pooling head runs on the shorter sequence;
- ``keep`` (for outputs that need the full token grid: a VLM feeding every patch token to its
  language model, dense heads): the k̃ tokens are taken out of blocks l_q.. exactly as in ``drop``
  (so they are neither keys / values of any later attention nor in any quantizer's statistics)
  and put back at their positions after the last block (:meth:`TokenDeletion.restore`, called by
  :meth:`VisionEncoder.forward_blocks`), refilled as ``refill`` says (``REFILLS``).
"""

from __future__ import annotations

import torch
from torch import nn

from regcache.encoders.base import VisionEncoder

DELETE_MODES = ("drop", "keep")
REFILLS = ("input", "mean")


class TokenDeletion(nn.Module):
    """Remove, per image, the ``k`` non-prefix tokens with the largest l-inf norm.

    The first ``num_prefix_tokens`` (CLS and register tokens) are never deleted; the remaining
    tokens keep their order. The output is ``(B, N - k, C)``, so every later block, and any
    pooling (CLS, mean over patches, MAP), simply runs on the shorter sequence.

    ``mode="keep"`` remembers the deleted positions and states of the last forward and
    :meth:`restore` writes them back into the final ``(B, N - k, C)`` stream, giving ``(B, N, C)``.
    ``refill`` is what a deleted position holds then:

    - ``"input"`` (default): the token's own residual state at the input of l_q. A sink's residual
      stream barely changes once it has formed (its norm dwarfs what later blocks add to it), so its
      pre-deletion state is the closest estimate of its float output that needs nothing learned, and a
      consumer that relies on the artifact tokens (VLMs were trained with them) still finds them;
    - ``"mean"``: the mean of the image's kept patch tokens after the last block: a neutral token
      with no massive norm, for consumers (dense heads, norms over the grid) a sink would dominate.

    ``last_kept``: the gather index of the last forward (positions kept, in order), read by
    :func:`regcache.eval.patch_tokens.encode_patch_tokens` to align a shortened output with the grid.
    """

    def __init__(self, k: int, num_prefix_tokens: int, mode: str = "drop", refill: str = "input") -> None:
        super().__init__()
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if mode not in DELETE_MODES:
            raise ValueError(f"unknown deletion mode {mode!r}; choose one of {DELETE_MODES}")
        if refill not in REFILLS:
            raise ValueError(f"unknown refill {refill!r}; choose one of {REFILLS} (used by mode='keep')")
        self.k = k
        self.num_prefix_tokens = num_prefix_tokens
        self.mode = mode
        self.refill = refill
        self.last_kept: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def keeps_positions(self) -> bool:
        """Whether the deleted positions come back after the last block (``mode="keep"``)."""
        return self.mode == "keep" and self.k > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop each image's k largest-l-inf patch tokens from (B, N, C), keeping prefix tokens and token order."""
        if self.k == 0:
            return x
        npre = self.num_prefix_tokens
        b, total, c = x.shape
        n = total - npre
        if self.k >= n:
            raise ValueError(f"cannot delete {self.k} of {n} patch tokens")
        # l-inf norms in one reduction (abs().amax() wrote |x| out first: a full pass, 0.09 ms at ViT-B/16, batch 256)
        norms = torch.linalg.vector_norm(x[:, npre:], ord=float("inf"), dim=-1)
        dropped = norms.topk(self.k, dim=1).indices
        # Kept indices in ascending order, without a sort or a host sync: a stable partition of the
        # patch positions (kept ones first, in order), written through its own permutation.
        keep = torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, dropped, False)
        slot = torch.where(keep, keep.cumsum(1) - 1, (n - self.k) + (~keep).cumsum(1) - 1)
        position = torch.arange(npre, total, device=x.device).expand(b, n)
        order = torch.empty_like(slot).scatter_(1, slot, position)
        index = torch.cat([torch.arange(npre, device=x.device).expand(b, npre), order[:, : n - self.k]], dim=1)
        self.last_kept = index
        if self.mode == "keep":
            removed = order[:, n - self.k :]
            self._pending = (index, removed, x.gather(1, removed.unsqueeze(-1).expand(b, self.k, c)))
        return x.gather(1, index.unsqueeze(-1).expand(b, total - self.k, c))  # one gather, prefix tokens included

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The full (B, N, C) grid: ``x`` (B, N - k, C) at the kept positions, the refill at the deleted ones."""
        if self._pending is None:
            raise RuntimeError("TokenDeletion.restore() without a forward in keep mode before it")
        index, removed, states = self._pending
        self._pending = None
        b, kept, c = x.shape
        if index.shape != (b, kept):
            raise ValueError(f"restore() got {tuple(x.shape)} tokens, the last deletion kept {tuple(index.shape)}")
        if self.refill == "input":
            fill = states.to(x.dtype)
        else:
            fill = x[:, self.num_prefix_tokens :].mean(dim=1, keepdim=True).expand(b, self.k, c)
        out = x.new_empty(b, kept + self.k, c)
        out.scatter_(1, index.unsqueeze(-1).expand(b, kept, c), x)
        return out.scatter_(1, removed.unsqueeze(-1).expand(b, self.k, c), fill)

    def extra_repr(self) -> str:
        """k, the protected prefix-token count and the mode, for ``print(model)``."""
        extra = f", mode={self.mode}" + (f", refill={self.refill}" if self.mode == "keep" else "")
        return f"k={self.k}, num_prefix_tokens={self.num_prefix_tokens}{extra}"


def install_deletion(encoder: VisionEncoder, layer: int, k: int, mode: str = "drop", refill: str = "input") -> None:
    """Delete k tokens at the input of block ``layer`` (k = 0 removes any deletion there), see TokenDeletion."""
    deletion = TokenDeletion(k, encoder.num_prefix_tokens, mode, refill)  # validates mode / refill even for k = 0
    encoder.blocks[layer].input_filter = deletion if k > 0 else None


def kept_positions(encoder: VisionEncoder) -> tuple[torch.Tensor | None, int]:
    """``(positions, deleted)`` of the shortening deletions (``mode="drop"``) that ran in the encoder's last forward.

    ``positions`` (B, N'): the patch-grid index of each patch token left in the output (None where
    no shortening deletion ran: the output is the whole grid); ``deleted``: how many patch tokens
    per image the output lacks (N = N' + deleted). Reads each deletion's ``last_kept``, in block order.
    """
    positions, deleted = None, 0
    npre = encoder.num_prefix_tokens
    for block in encoder.blocks:
        f = block.input_filter
        if not isinstance(f, TokenDeletion) or f.last_kept is None or f.keeps_positions:
            continue
        kept = f.last_kept[:, npre:] - npre  # patch-grid indices into the stream entering this block
        positions = kept if positions is None else positions.gather(1, kept)
        deleted += f.k
    return positions, deleted


def remove_deletion(encoder: VisionEncoder) -> None:
    """Remove token deletion from every block."""
    for block in encoder.blocks:
        if isinstance(block.input_filter, TokenDeletion):
            block.input_filter = None
