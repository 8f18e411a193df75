"""Quantizable layers: a linear with weight/input quantizers and an explicit two-operand matmul.

Both start in full precision (no quantizers). A method's transform attaches quantizers; the
forward pass then routes operands through them. ``quant_mode(module, mode)`` switches every
quantizer below a module at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from regcache.quant.quantizers import Mode, Quantizer


def _apply(quantizer: Quantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight pass through optional fake quantizers.

    Shares the parameters of the linear it replaces (``from_linear``), so folding methods such
    as RepQ-ViT can still edit ``weight`` and ``bias`` in place.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_quantizer: Quantizer | None = None
        self.weight_quantizer: Quantizer | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """Wrap an existing linear, sharing its parameters."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight = linear.weight
        q.bias = linear.bias
        q.input_quantizer = None
        q.weight_quantizer = None
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_apply(self.input_quantizer, x), _apply(self.weight_quantizer, self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through optional fake quantizers (shares parameters)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_quantizer: Quantizer | None = None
        self.weight_quantizer: Quantizer | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> QuantConv2d:
        """Wrap an existing conv, sharing its parameters."""
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        q.weight = conv.weight
        q.bias = conv.bias
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.input_quantizer is None else self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return self._conv_forward(x, w, self.bias)


class MatMul(nn.Module):
    """``a @ b`` as a module, so attention's Q·Kᵀ and P·V can be quantized like linears.

    ``quantize_a`` / ``quantize_b`` are exposed separately because RegCache's prefix attention
    concatenates full-precision register keys/values with the quantized token operands.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a_quantizer: Quantizer | None = None
        self.b_quantizer: Quantizer | None = None

    def quantize_a(self, a: torch.Tensor) -> torch.Tensor:
        """The left operand as the matmul sees it."""
        return _apply(self.a_quantizer, a)

    def quantize_b(self, b: torch.Tensor) -> torch.Tensor:
        """The right operand as the matmul sees it."""
        return _apply(self.b_quantizer, b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quantize_a(a) @ self.quantize_b(b)


def quantizers(module: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All quantizers below ``module`` with their qualified names."""
    for name, m in module.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def set_quant_mode(module: nn.Module, mode: Mode) -> None:
    """Set every quantizer below ``module`` to ``float``, ``observe`` or ``quant``."""
    for _, q in quantizers(module):
        q.set_mode(mode)


@contextmanager
def quant_mode(module: nn.Module, mode: Mode) -> Iterator[nn.Module]:
    """Temporarily switch all quantizers below ``module`` to ``mode``."""
    saved = [(q, q.mode) for _, q in quantizers(module)]
    try:
        for q, _ in saved:
            q.set_mode(mode)
        yield module
    finally:
        for q, m in saved:
            q.mode = m
