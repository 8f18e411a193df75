"""Log-√2 quantizer for post-softmax attention probabilities (RepQ-ViT).

Code ``q = round(-2 log2(x / Δ))`` clamped to ``[0, 2^b - 1]``, value ``Δ · 2^(-q/2)``. Values
above Δ saturate at code 0. As in the official RepQ-ViT code, an input whose unclamped code
reaches ``2^b`` (x below ``Δ · 2^(-(2^b - 0.5)/2)``) and an input of 0 become exactly 0: the
official quantizer thus has 2^b non-zero levels plus zero. ``reserve_zero_code=True`` gives a
strict b-bit codebook instead: code ``2^b - 1`` means 0 and the non-zero levels are codes
``0 .. 2^b - 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from regcache.quant.init import REPQ_PERCENTILES, official_quantile, quantiles
from regcache.quant.quantizers import Quantizer, round_ste


class LogSqrt2Quantizer(Quantizer):
    """Per-tensor log-√2 fake quantizer for non-negative inputs (softmax outputs)."""

    kind: ClassVar[str] = "log_sqrt2"

    def __init__(self, bits: int, reserve_zero_code: bool = False) -> None:
        super().__init__(bits)
        self.reserve_zero_code = reserve_zero_code
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def num_nonzero_codes(self) -> int:
        """Codes that stand for a non-zero level."""
        return 2**self.bits - (1 if self.reserve_zero_code else 0)

    @property
    def is_calibrated(self) -> bool:
        """True once Δ (``scale``) was set by :meth:`finalize` or :meth:`calibrate_`."""
        return self.scale.numel() > 0

    # ---- calibration ----------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Track the largest value seen (the min-max Δ); the inputs are non-negative, so no minimum is kept."""
        hi = x.detach().float().amax()
        self.max_val = hi if self.max_val.numel() == 0 else torch.maximum(self.max_val, hi)

    def reset_observer(self) -> None:
        """Forget accumulated statistics."""
        self.max_val = torch.empty(0)

    def finalize(self) -> None:
        """Min-max: Δ = the largest observed value (use :meth:`calibrate_` for the reference search)."""
        if self.max_val.numel() == 0:
            raise RuntimeError("finalize() called before any data was observed")
        self.scale = self.max_val.clone()

    def codes_and_values(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes (-1 for zero) and dequantized values of x for step Δ = scale."""
        code = torch.round(self._raw_code(x, scale))
        is_zero = code >= self.num_nonzero_codes
        code = code.clamp(0, self.num_nonzero_codes - 1)
        return torch.where(is_zero, -1, code).long(), torch.where(is_zero, 0.0, self._level(code, scale))

    def _raw_code(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # -2 log2(x/Δ); x = 0 gives +inf, capped so it still rounds into the zero code (and STE stays finite)
        return (-2 * torch.log2(x.clamp_min(0) / scale)).clamp(max=self.num_nonzero_codes)

    @staticmethod
    def _level(code: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # Δ · 2^(-q/2) written as the reference does: an exact power of two times √2 for odd codes
        odd = torch.remainder(code, 2)
        return torch.exp2(-torch.ceil(code / 2)) * (1 + odd * (math.sqrt(2) - 1)) * scale

    @torch.no_grad()
    def calibrate_(
        self, x: torch.Tensor, percentiles: Sequence[float] = REPQ_PERCENTILES, official_arithmetic: bool = False
    ) -> LogSqrt2Quantizer:
        """RepQ-ViT's init: Δ ∈ {percentile p of x} with the least MSE (earlier candidate on ties).

        ``official_arithmetic``: quantiles as the official code takes them
        (:func:`~regcache.quant.init.official_quantile`, float32 ranks) instead of at exact ranks.
        """
        flat = x.detach().float().contiguous().reshape(1, -1)
        if official_arithmetic:  # the official start: Δ = max x, beaten by a candidate of score < 1e10
            candidates = [official_quantile(flat[0], p) for p in percentiles]
            best_err, best = 1e10, flat.amax()
        else:
            candidates = list(quantiles(flat, percentiles)[:, 0])
            best_err, best = None, None
        for delta in candidates:
            err = (self.codes_and_values(flat, delta)[1] - flat).pow(2).mean()
            if best_err is None or err < best_err:
                best_err, best = err, delta
        self.scale = best.clone()
        return self

    # ---- quantization ---------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Round x to the nearest log-√2 level below Δ (straight-through), sending the zero code to exactly 0."""
        scale = self.scale.to(x.dtype)
        code = round_ste(self._raw_code(x, scale))
        is_zero = code.detach() >= self.num_nonzero_codes
        code = code.clamp(0, self.num_nonzero_codes - 1)
        return torch.where(is_zero, torch.zeros_like(x), self._level(code, scale))

    def describe(self) -> dict[str, Any]:
        """The base summary plus per-tensor granularity and whether a code is reserved for zero."""
        return {**super().describe(), "granularity": "tensor", "reserve_zero_code": self.reserve_zero_code}

    def extra_repr(self) -> str:
        """Bits, zero-code reservation and mode, for ``print(model)``."""
        return f"bits={self.bits}, reserve_zero_code={self.reserve_zero_code}, mode={self.mode}"


__all__ = ["LogSqrt2Quantizer"]
