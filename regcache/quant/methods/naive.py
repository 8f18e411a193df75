"""Naive PTQ (RTN / min-max): the floor every method is compared with.

Weights: symmetric, per output channel, min-max, round-to-nearest. Activations (linear inputs,
and both attention matmul operands unless disabled): asymmetric, per tensor, static min-max over
the calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from regcache.quant.api import FilterFn, QuantConfig, swap_linears
from regcache.quant.calibration import observe_activations
from regcache.quant.modules import MatMul, QuantLinear, set_quant_mode
from regcache.quant.quantizers import UniformQuantizer

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder


@dataclass
class NaiveConfig(QuantConfig):
    """RTN per-channel weights + static per-tensor min-max activations."""

    name = "naive"
    quantize_matmuls: bool = True

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Swap the selected linears and attach per-channel weight and per-tensor asymmetric activation quantizers."""
        for _, module in swap_linears(encoder, filter_fn):
            if isinstance(module, QuantLinear):
                module.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=True, granularity="channel", axis=0)
                module.input_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
            elif isinstance(module, MatMul) and self.quantize_matmuls:
                module.a_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
                module.b_quantizer = UniformQuantizer(self.a_bits, symmetric=False)

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Min-max the weights once, then observe activation ranges on ``batches`` and switch to ``quant`` mode."""
        with torch.no_grad():
            for module in encoder.modules():
                if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
                    module.weight_quantizer.calibrate_(module.weight)
        self.calibrate_activations(encoder, batches, progress=progress)

    def calibrate_activations(
        self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True
    ) -> None:
        """The part of ``calibrate`` after the weights: a re-calibration with unchanged weights needs only this."""
        observe_activations(encoder, batches, progress=progress)
        set_quant_mode(encoder, "quant")
