"""Helpers shared by the register steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from regcache.encoders.base import VisionEncoder
from regcache.quant.calibration import module_device_dtype
from regcache.quant.modules import quant_mode, quantizers
from regcache.utils import weights_fingerprint


def float_fingerprint(encoder: VisionEncoder) -> str:
    """Fingerprint of the encoder's float weights (also for a quantized encoder, which remembers it)."""
    return getattr(encoder, "float_fingerprint", None) or weights_fingerprint(encoder)


def require_float(encoder: VisionEncoder, what: str) -> None:
    """Refuse an encoder whose float forward is not the original network's (edited weights)."""
    config = getattr(encoder, "quant_config", None)
    if config is not None and config.modifies_weights:
        raise ValueError(f"{what} needs the float encoder; {config.tag} edited this one's weights")


@contextmanager
def plain_float(encoder: VisionEncoder) -> Iterator[VisionEncoder]:
    """Run the encoder as the plain float network: no prefix, no token deletion, quantizers off."""
    saved = [(b, b.attn.prefix, b.input_filter) for b in encoder.blocks]
    outer = getattr(encoder, "in_plain_float", False)
    try:
        encoder.in_plain_float = True  # lets observers (e.g. OutlierReport) tell this pass apart
        for b in encoder.blocks:
            b.attn.prefix, b.input_filter = None, None
        if any(True for _ in quantizers(encoder)):
            with quant_mode(encoder, "float"):
                yield encoder
        else:
            yield encoder
    finally:
        encoder.in_plain_float = outer
        for b, prefix, filt in saved:
            b.attn.prefix, b.input_filter = prefix, filt


def device_dtype(encoder: VisionEncoder) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the encoder's parameters."""
    return module_device_dtype(encoder)
