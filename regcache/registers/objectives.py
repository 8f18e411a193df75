"""Objectives that score a configuration from its final embeddings of the reference images.

Every objective is called as ``objective(embeddings, float_embeddings) -> float`` on the (N, D)
final embeddings of the reference images in stream order (the float model's embeddings of the
same images come second, for label-free objectives). ``greater_is_better`` says which way ranks.
``objective.score(embeddings, float_embeddings)`` is the same number as a 0-d tensor left on the
embeddings' device (no host sync), for the built-in objectives; ``float()`` of it is exactly
what calling the objective returns. The register search uses it to queue the next configuration's
work before reading this one's score.
The data/eval package can wire its own metrics in with :class:`Predictions` (any callable
mapping embeddings to predicted labels).

What an objective scores is its :meth:`Objective.readout` of the stream after the last block: the
pooled embedding for every objective but ``patch_cosine``, whose readout is the patch-token grid a
VLM consumes, ``(N, grid, C)``. Under a shortening deletion (``TokenDeletion(mode="drop")``) the
positions the output lacks are NaN rows there, so the score compares the kept tokens only; under
``mode="keep"`` the grid is whole and every token counts. The register search and the sensitivity
sweep call ``readout`` on the quantized and the float streams alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

OBJECTIVES: dict[str, type[Objective]] = {}


class Objective:
    """Base: a score of final embeddings; subclasses register under ``name``."""

    name: ClassVar[str] = ""
    greater_is_better: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            OBJECTIVES[cls.name] = cls

    def __call__(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> float:
        return float(self.score(embeddings, float_embeddings))

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor | float:
        """The score as a 0-d tensor on the embeddings' device (subclasses without one return a float)."""
        if type(self).__call__ is Objective.__call__:
            raise NotImplementedError(f"{type(self).__name__} defines neither score nor __call__")
        return self(embeddings, float_embeddings)

    def readout(self, encoder: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """What this objective scores, from the stream after the encoder's last block: the pooled embedding."""
        return encoder.pool(tokens)

    def to(self, device: torch.device | str) -> Objective:
        """This objective with its tensor fields (labels, classifier) on ``device``.

        The register search moves its objective once: labels left on the host would be copied to the
        device on every score, a blocking copy that drains the GPU queue between configurations.
        """
        if not dataclasses.is_dataclass(self):
            return self
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        return dataclasses.replace(self, **moved) if moved else self

    def drop(self, score: float, reference: float) -> float:
        """How much worse ``score`` is than ``reference`` (positive = worse)."""
        return reference - score if self.greater_is_better else score - reference

    def sort_key(self, score: float) -> float:
        """Key that sorts best first with ``sorted``."""
        return -score if self.greater_is_better else score


@dataclass
class ZeroShotTop1(Objective):
    """Top-1 accuracy (%) of a zero-shot classifier on a labelled reference split (``acc_ref``).

    ``classifier``: (D, C) class embeddings (normalized text prototypes), logits = normalized
    image embedding @ classifier. ``labels``: (N,) in reference stream order.
    """

    name: ClassVar[str] = "acc_ref"
    labels: torch.Tensor
    classifier: torch.Tensor

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor:
        """Zero-shot top-1 (%) of the normalized embeddings against the reference labels."""
        logits = F.normalize(embeddings.float(), dim=-1) @ self.classifier.to(embeddings.device, torch.float32)
        return _accuracy(logits.argmax(dim=-1), self.labels)


@dataclass
class Predictions(Objective):
    """Top-1 accuracy (%) of any caller-given ``predict(embeddings) -> labels`` (e.g. k-NN)."""

    name: ClassVar[str] = "predictions"
    labels: torch.Tensor
    predict: Callable[[torch.Tensor], torch.Tensor]

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor:
        """Top-1 (%) of the caller's predictions for these embeddings against the reference labels."""
        return _accuracy(self.predict(embeddings), self.labels)


@dataclass
class EmbeddingCosine(Objective):
    """Label-free: mean cosine similarity of each final embedding to the float model's."""

    name: ClassVar[str] = "cosine"

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor:
        """Mean per-image cosine similarity to the float model's embeddings (no labels needed)."""
        return F.cosine_similarity(embeddings.float(), float_embeddings.float(), dim=-1).mean()


@dataclass
class EmbeddingMSE(Objective):
    """Label-free: mean squared error of the final embeddings against the float model's (lower is better)."""

    name: ClassVar[str] = "mse"
    greater_is_better: ClassVar[bool] = False

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor:
        """Mean squared difference to the float model's embeddings (no labels needed; lower is better)."""
        return (embeddings.float() - float_embeddings.float()).pow(2).mean()


@dataclass
class PatchTokenCosine(Objective):
    """Label-free: mean per-token cosine of the patch tokens to the float model's (VLM features).

    ``score(tokens, float_tokens)`` on (N, grid, C) patch-token grids: per image the mean over grid
    positions of the cosine between the two tokens at that position, then the mean over images
    (``mean_token_cosine`` of :class:`regcache.eval.patch_tokens.PatchTokenFidelity`). A row of
    ``tokens`` that is NaN in every channel is a position the output lacks (a dropped token,
    :meth:`readout`): it is left out of its image's mean.
    """

    name: ClassVar[str] = "patch_cosine"

    def readout(self, encoder: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """The patch-token grid (B, grid, C) of the last forward; positions a shortening deletion removed are NaN."""
        from regcache.eval.patch_tokens import patch_tokens
        from regcache.registers.deletion import kept_positions

        out = patch_tokens(encoder, tokens)
        positions, deleted = kept_positions(encoder)
        if positions is None:
            return out
        b, kept, c = out.shape
        if positions.shape != (b, kept):
            raise ValueError(f"{tuple(out.shape)} patch tokens, but the last deletion kept {tuple(positions.shape)}")
        grid = out.new_full((b, kept + deleted, c), float("nan"))
        return grid.scatter_(1, positions.unsqueeze(-1).expand(b, kept, c), out)

    def score(self, embeddings: torch.Tensor, float_embeddings: torch.Tensor) -> torch.Tensor:
        """Mean over images of the mean per-token cosine to the float model's tokens (absent positions skipped)."""
        if embeddings.ndim != 3 or embeddings.shape != float_embeddings.shape:
            raise ValueError(
                f"patch_cosine needs two (N, grid, C) patch-token grids of one shape, got {tuple(embeddings.shape)} "
                f"and {tuple(float_embeddings.shape)}"
            )
        tokens = embeddings.float()
        present = ~tokens.isnan().all(dim=-1)  # (N, grid)
        filled = torch.where(present.unsqueeze(-1), tokens, 0.0)
        cos = F.cosine_similarity(filled, float_embeddings.float(), dim=-1)
        per_image = torch.where(present, cos, 0.0).sum(dim=1) / present.sum(dim=1)
        return per_image.mean()


def _accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labels = labels.to(predicted.device)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {labels.shape[0]} labels: reference order mismatch")
    return (predicted == labels).float().mean().double() * 100.0  # = 100.0 * float(mean), bit for bit


def make_objective(name: str, **kwargs: Any) -> Objective:
    """Build a registered objective by name, e.g. ``make_objective("acc_ref", labels=y, classifier=W)``."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; available: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)
