"""Patch-token fidelity: the quantized model's patch-token outputs against the float model's.

A vision-language model (or a dense head) consumes every patch token, not the pooled embedding,
so a configuration is judged by the cosine of each output patch token to the float model's token
at the same grid position (averaged per image, and the worst token), and by the cosine of the
two grids' mean tokens. Under the paper's shortened-sequence deletion the output lacks k̃ positions:
the remaining tokens are compared at their own positions and ``coverage`` (the fraction of the grid
present) says how much of the grid a consumer would be missing.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from regcache.eval.distributed import dedupe_by_id
from regcache.eval.metrics import _GatherMetric, _ids_or_none


def patch_tokens(encoder: torch.nn.Module, tokens: Tensor) -> Tensor:
    """The patch tokens of the stream after the last block: the adapter's own grid, else without CLS / registers."""
    own = getattr(encoder, "patch_tokens", None)
    return own(tokens) if callable(own) else tokens[:, encoder.num_prefix_tokens :]


@torch.no_grad()
def encode_patch_tokens(encoder: torch.nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward: ``(pooled embedding, patch tokens (B, N', C), positions)``.

    ``positions`` (B, N') are the grid indices of the patch tokens where a shortening deletion ran
    (``TokenDeletion(mode="drop")``), None where the output is the whole grid.
    """
    from regcache.registers.deletion import TokenDeletion, kept_positions

    for b in encoder.blocks:  # only this forward's deletions count below
        if isinstance(b.input_filter, TokenDeletion):
            b.input_filter.last_kept = None
    tokens = encoder.forward_blocks(encoder.embed(images))
    pooled = encoder.pool(tokens)
    return pooled, patch_tokens(encoder, tokens), kept_positions(encoder)[0]


class PatchTokenFidelity(_GatherMetric):
    """Cosine of the evaluated model's patch tokens to the float model's, per token and pooled.

    ``update(tokens, sample_ids, reference, positions=None)``: ``tokens`` (B, N', C), ``reference``
    the float model's (B, N, C), ``positions`` (B, N') their grid indices (None: N' = N, in order).
    ``compute()`` -> ``{"mean_token_cosine"`` (mean over images of the mean over tokens),
    ``"min_token_cosine"`` (the worst token of any image), ``"pooled_cosine"`` (mean over images of
    the cosine between the two mean tokens), ``"coverage"`` (mean fraction of the grid present),
    ``"num_samples"}``.
    """

    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("ids", "token_mean", "token_min", "pooled", "coverage"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, tokens: Tensor, sample_ids: Tensor, reference: Tensor, positions: Tensor | None = None) -> None:
        """Keep each image's mean / worst token cosine, pooled cosine and grid coverage."""
        tokens, reference = tokens.detach().float(), reference.detach().float().to(tokens.device)
        b, n_out, c = tokens.shape
        if reference.shape[0] != b or reference.shape[-1] != c:
            raise ValueError(f"patch tokens {tuple(tokens.shape)} and reference {tuple(reference.shape)} do not match")
        if positions is None:
            if n_out != reference.shape[1]:
                raise ValueError(
                    f"{n_out} patch tokens against a grid of {reference.shape[1]}: pass their grid positions "
                    "(encode_patch_tokens gives them)"
                )
            aligned = reference
        else:
            aligned = reference.gather(1, positions.to(tokens.device).unsqueeze(-1).expand(b, n_out, c))
        cos = F.cosine_similarity(tokens, aligned, dim=-1)  # (B, N')
        self.ids.append(_ids_or_none(sample_ids, b, tokens.device))
        self.token_mean.append(cos.mean(dim=1))
        self.token_min.append(cos.amin(dim=1))
        self.pooled.append(F.cosine_similarity(tokens.mean(dim=1), reference.mean(dim=1), dim=-1))
        self.coverage.append(torch.full((b,), n_out / reference.shape[1], device=tokens.device))

    def compute(self) -> dict[str, Tensor]:
        """The means over the gathered images (each sample id once) and the worst token."""
        ids = self._cat("ids")
        if ids is None:
            raise RuntimeError("PatchTokenFidelity.compute() called before any update()")
        ids, mean, worst, pooled, coverage = dedupe_by_id(
            ids, self._cat("token_mean"), self._cat("token_min"), self._cat("pooled"), self._cat("coverage")
        )
        return {
            "mean_token_cosine": mean.mean(),
            "min_token_cosine": worst.min(),
            "pooled_cosine": pooled.mean(),
            "coverage": coverage.mean(),
            "num_samples": torch.tensor(ids.numel()),
        }
