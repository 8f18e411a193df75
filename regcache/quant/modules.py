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


def _same_key(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    return all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b, strict=True))


def quantized_weight(layer: nn.Module, quantizer: Quantizer | None, weight: torch.Tensor) -> torch.Tensor:
    """``quantizer(weight)``, cached on ``layer`` while nothing it depends on has changed.

    Only in ``quant`` mode, with autograd off and outside ``torch.compile`` tracing (in every other
    case the quantizer simply runs). The key holds the weight and every quantizer buffer by identity
    and in-place version (``set_scale`` / ``set_range`` / calibration assign new tensors,
    ``load_state_dict`` and in-place edits bump the version), the weight's storage pointer, dtype and
    device (``.to()`` and ``.data =`` assignments), the quantizer's plain attributes (mode, bits,
    qmin/qmax, ...) and the inference-mode flag. Inference tensors carry no version counter, so
    nothing involving one is cached.
    """
    if quantizer is None:
        return weight
    if quantizer.mode != "quant" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return quantizer(weight)
    buffers = list(quantizer.named_buffers())
    if weight.is_inference() or any(b.is_inference() for _, b in buffers):
        return quantizer(weight)
    plain = tuple(
        sorted((k, v) for k, v in quantizer.__dict__.items() if isinstance(v, (bool, int, float, str, type(None))))
    )
    key = (
        weight,
        weight._version,
        weight.data_ptr(),
        weight.dtype,
        weight.device,
        torch.is_inference_mode_enabled(),
        quantizer,
        plain,
        *((name, b, b._version, b.data_ptr()) for name, b in buffers),
    )
    flat = tuple(v for k in key for v in (k if isinstance(k, tuple) else (k,)))
    cached = layer.__dict__.get("_quantized_weight_cache")
    if cached is not None and _same_key(cached[0], flat):
        return cached[1]
    out = quantizer(weight)
    layer.__dict__["_quantized_weight_cache"] = (flat, out)
    return out


def clear_weight_cache(module: nn.Module) -> None:
    """Drop every cached quantized weight below ``module`` (frees their memory)."""
    for m in module.modules():
        m.__dict__.pop("_quantized_weight_cache", None)


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
        """Linear on the input-quantized x with the (cached) fake-quantized weight."""
        return self.forward_prequantized(_apply(self.input_quantizer, x))

    def forward_prequantized(self, x: torch.Tensor) -> torch.Tensor:
        """The forward for an input already through ``input_quantizer`` (a kernel applied it in its epilogue)."""
        return F.linear(x, quantized_weight(self, self.weight_quantizer, self.weight), self.bias)


def patchify_conv2d(
    conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``conv``'s output as one matmul over non-overlapping patches, or None where it is not a patchify conv.

    A ViT stem (kernel = stride, no padding, dilation or groups) is a linear map of each patch. cuDNN
    runs it as a general convolution with layout conversions, several times slower than this
    reshape + matmul (BENCHMARKS.md §3). Returns the (B, O, H/p, W/p)
    result as a view of a (B, H/p, W/p, O) tensor, so the usual ``flatten(2).transpose(1, 2)`` into
    tokens costs no copy. Trailing rows/columns a strided conv would skip are skipped.
    """
    kh, kw = conv.kernel_size
    if (
        x.ndim != 4
        or conv.stride != (kh, kw)
        or conv.groups != 1
        or conv.dilation != (1, 1)
        or conv.padding not in ("valid", (0, 0))
    ):
        return None
    b, c, h, w = x.shape
    gh, gw = h // kh, w // kw
    if gh == 0 or gw == 0:
        return None
    x = x[:, :, : gh * kh, : gw * kw]
    patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * kh * kw)
    return F.linear(patches, weight.reshape(weight.shape[0], -1), bias).permute(0, 3, 1, 2)


class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs a patchify convolution (the ViT stem) as one matmul (:func:`patchify_conv2d`).

    Only on the device types in ``matmul_devices`` (CUDA). On CPU the gain is mixed (oneDNN's
    convolution is faster for the testbed's stem and slower for ViT-B/16's, BENCHMARKS.md §3), and
    keeping the convolution keeps the CPU numbers (tests, demo) those of the original model: the W6A6
    testbed rows move by points under ~1e-6 changes (docs/testbed.md).
    """

    matmul_devices: tuple[str, ...] = ("cuda",)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PatchConv2d:
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

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = patchify_conv2d(self, x, weight, bias) if x.device.type in self.matmul_devices else None
        return super()._conv_forward(x, weight, bias) if out is None else out


class QuantConv2d(PatchConv2d):
    """Conv2d whose input and weight pass through optional fake quantizers (shares parameters)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_quantizer: Quantizer | None = None
        self.weight_quantizer: Quantizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve the input-quantized x with the (cached) fake-quantized weight, as a patch matmul where possible."""
        x = x if self.input_quantizer is None else self.input_quantizer(x)
        w = quantized_weight(self, self.weight_quantizer, self.weight)
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
        """Product of both operands after their optional quantizers."""
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
