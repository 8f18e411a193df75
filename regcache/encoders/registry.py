"""Registry of encoder adapters: (predicate, constructor) pairs tried in registration order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from regcache.encoders.base import VisionEncoder


@dataclass(frozen=True)
class Adapter:
    """How to recognise a vision tower and turn it into a :class:`VisionEncoder`."""

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], VisionEncoder]


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(
    name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], VisionEncoder]
) -> None:
    """Register an adapter; a new family is one file calling this."""
    ADAPTERS[name] = Adapter(name, matches, build)


def adapt(model: nn.Module) -> VisionEncoder:
    """Adapt a model's vision tower into canonical form.

    ``model`` may be an open_clip ``CLIP``/``CustomTextCLIP`` (its ``visual`` is replaced in place,
    so ``model.encode_image`` runs through the adapted tower and the text tower is untouched), a
    bare vision tower, or a timm ``VisionTransformer``. The original tower's parameters are
    shared, not copied. Returns the adapted encoder, in eval mode.
    """
    if isinstance(model, VisionEncoder):
        return model
    parent, tower = (model, model.visual) if hasattr(model, "visual") else (None, model)
    for adapter in ADAPTERS.values():
        if adapter.matches(tower):
            encoder = adapter.build(tower).eval()
            if parent is not None:
                parent.visual = encoder
            return encoder
    raise TypeError(
        f"no encoder adapter for {type(tower).__name__}; supported: {', '.join(ADAPTERS)} "
        "(open_clip VisionTransformer, timm VisionTransformer, open_clip TimmModel with a ViT trunk, transformers "
        "CLIPVisionModel(WithProjection) / SiglipVisionModel / Siglip2VisionModel / Dinov2(WithRegisters)Model)"
    )
