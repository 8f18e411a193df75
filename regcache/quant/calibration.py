"""Shared calibration plumbing: iterate image batches with progress, observe, finalize."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from regcache.quant.modules import QuantLinear, quantizers
from regcache.quant.quantizers import Quantizer, finalize_all


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch given as a tensor, a (images, ...) tuple or a dict with ``image``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a module's first parameter."""
    p = next(module.parameters())
    return p.device, p.dtype


def iter_images(
    encoder: nn.Module, batches: Iterable[Any], progress: bool = True, desc: str = "calibrating"
) -> Iterator[torch.Tensor]:
    """Images of each batch moved to the encoder's device and dtype, with a progress bar."""
    device, dtype = module_device_dtype(encoder)
    try:
        total = len(batches)
    except TypeError:  # iterable-style datasets have no length
        total = None
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
        yield batch_images(batch).to(device=device, dtype=dtype, non_blocking=True)


def activation_quantizers(encoder: nn.Module) -> list[Quantizer]:
    """Every quantizer except the weight quantizers of linears."""
    weight_qs = {id(m.weight_quantizer) for m in encoder.modules() if isinstance(m, QuantLinear)}
    return [q for _, q in quantizers(encoder) if id(q) not in weight_qs]


@torch.no_grad()
def observe_activations(
    encoder: nn.Module, batches: Iterable[Any], progress: bool = True, desc: str = "observing activations"
) -> int:
    """Static calibration pass: activation quantizers observe, the rest of the model runs in float.

    Returns the number of images seen. Quantizers are left with finalized parameters.
    """
    everything, acts = _quantizers_and_activation_quantizers(encoder)
    saved = [(q, q.mode) for q in everything]
    for q in everything:
        q.mode = "float"
    for q in acts:
        q.reset_observer()
        q.mode = "observe"
    seen = 0
    try:
        for images in iter_images(encoder, batches, progress, desc):
            encoder(images)
            seen += images.shape[0]
    finally:
        for q, mode in saved:
            q.mode = mode
    if seen == 0:
        raise ValueError("calibration data is empty: pass at least one batch of images")
    finalize_all(acts)
    return seen


def _quantizers_and_activation_quantizers(encoder: nn.Module) -> tuple[list[Quantizer], list[Quantizer]]:
    """Every quantizer and those of :func:`activation_quantizers`, from one walk of the module tree."""
    everything, weight_qs = [], set()
    for m in encoder.modules():
        if isinstance(m, Quantizer):
            everything.append(m)
        elif isinstance(m, QuantLinear):
            weight_qs.add(id(m.weight_quantizer))
    return everything, [q for q in everything if id(q) not in weight_qs]


@contextmanager
def init_on_first_use(qs: Sequence[Quantizer], init: Callable[[Quantizer, torch.Tensor], None]) -> Iterator[None]:
    """The quantizers quantize; an uncalibrated one first initialises itself with ``init(quantizer, first input)``."""

    def hook(quantizer: Quantizer, args: tuple[Any, ...]) -> None:
        if not quantizer.is_calibrated:
            init(quantizer, args[0])

    saved = [(q, q.mode) for q in qs]
    handles = [q.register_forward_pre_hook(hook) for q in qs]
    for q in qs:
        q.mode = "quant"  # uncalibrated ones get their parameters in the hook, before quantizing
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for q, mode in saved:
            q.mode = mode
