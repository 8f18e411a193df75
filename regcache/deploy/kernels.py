"""Integer kernels of the deployed encoder: one interface, one registry of backends.

A backend is a :class:`Backend` of four functions; ``reference`` (this file: exact integer
arithmetic on any device, slow) is always there, ``triton`` (``regcache/deploy/_triton_int8.py``,
Hopper) registers itself when that module imports. :func:`get_backend` resolves ``auto``: triton
on a CUDA device where it imports, else the reference.

The contract every backend meets (the deployed modules rely on nothing else):

``quantize_static(x, scale, zero_point, qmin, qmax) -> int8``
    ``q = clamp(round_half_even(x.float() / scale) + zero_point, qmin, qmax)`` as int8, the codes of
    :meth:`regcache.quant.quantizers.UniformQuantizer.quantize_int` (the fake quantizer's
    ``torch.round(x / scale)`` in float32: IEEE division, not ``x * (1 / scale)``, whose rounding
    differs at ties). ``scale`` is a float32 value (a Python float holding one), ``zero_point``,
    ``qmin``, ``qmax`` integers with ``-128 <= qmin <= qmax <= 127``. An unsigned range (the
    asymmetric quantizer's ``[0, 2^b - 1]`` above 127) is stored shifted by -128: the *caller* passes
    ``zero_point - 128``, ``qmin - 128``, ``qmax - 128`` (:func:`int8_range`), so ``q - zero_point``,
    the only thing the arithmetic uses, is unchanged. ``zero_point`` itself may lie outside int8 and
    outside ``[qmin, qmax]`` (RepQ-ViT's per-tensor zero point is the mean of per-channel ones: 269 for
    ``[0, 255]`` on a tiny CLIP), so backends add it as an int32 / float, never as an int8; the same holds
    for ``int8_matmul``'s ``a_zero`` / ``b_zero`` and for ``b_zero`` of ``int8_linear``.

``int8_linear(a, b, alpha, beta, b_zero, *, activation=None, out_quant=None, out_dtype=float32, residual=None,
out=None)``
    ``a``: int8 ``[M, K]`` activation codes, ``b``: int8 ``[N, K]`` weight codes (row-major, the
    ``nn.Linear`` layout), ``alpha``, ``beta``: float ``[N]``, ``b_zero``: float ``[N]`` (integer
    values) or None (symmetric weights: zero). The result::

        acc[m, n] = sum_k a[m, k] * b[n, k]                              exact (int32 / exact float64)
        y[m, n]   = alpha[n] * (acc[m, n] - b_zero[n] * rowsum(a)[m]) + beta[n]

    With ``x̂ = s_a (a - z_a)`` and ``ŵ[n] = s_b[n] (b[n] - z_b[n])`` (the fake-quantized operands)
    and the linear's bias ``c``::

        sum_k x̂_k ŵ_nk + c_n = s_a s_b[n] (acc - z_b[n] rowsum(a) - z_a colsum(b)[n] + K z_a z_b[n]) + c_n

    so ``alpha[n] = s_a s_b[n]``, ``b_zero = z_b`` and ``beta[n] = c_n - alpha[n] z_a (colsum(b)[n] - K
    z_b[n])``: the activation zero point's terms depend on the weight only and are folded once at
    deploy time (:func:`fold_epilogue`); only ``b_zero * rowsum(a)`` needs the activation (zero for
    symmetric weights). ``y`` is rounded to ``out_dtype`` (the model's activation dtype; float32 or
    wider for the reference), then ``activation`` is applied in ``out_dtype`` — ``None``, ``"gelu"``
    (erf, ``nn.GELU()``), ``"gelu_tanh"`` (``nn.GELU("tanh")``), ``"quick_gelu"`` (``x σ(1.702 x)``,
    open_clip's QuickGELU) — then ``residual`` ([M, N] in ``out_dtype``, the block's skip connection
    ``x + proj(...)`` / ``x + fc2(...)``) is added, one addition rounded to ``out_dtype`` as the model's
    own add, and with ``out_quant = (scale, zero_point, qmin, qmax)`` the result is
    requantized to int8 with :func:`quantize_static`'s arithmetic (the next linear's static input
    quantizer: fc1 → GELU → fc2) and returned as int8 ``[M, N]``; else as ``out_dtype``. A backend
    lists the activations it implements in ``Backend.activations``; the deploy transform fuses only
    those (others run as a separate op on the float output). ``out``: a preallocated result, ``[M, N]`` or
    ``[B, M / B, N]`` with a contiguous last dim and any other strides (rows inside a larger buffer, such
    as the keys after a register prefix), written and returned.

``int8_matmul(a, b, scale, a_zero, b_zero, *, out_dtype=float32)``
    Batched ``[..., M, K] x [..., N, K]`` int8 codes (per-tensor zero points, both operands
    activations: attention's Q·Kᵀ with ``b`` = K, P·V with ``b`` = Vᵀ)::

        y[..., m, n] = scale * sum_k (a[..., m, k] - a_zero) (b[..., n, k] - b_zero)

    exact integer sum (``= acc - b_zero rowsum(a) - a_zero rowsum(b) + K a_zero b_zero``), then one
    multiplication by ``scale`` (``s_a s_b``, any extra factor such as 1/√d folded in by the caller)
    and rounding to ``out_dtype``.

``layernorm_quantize(x, weight, bias, eps, scale, zero_point, qmin, qmax) -> int8``
    ``quantize_static(F.layer_norm(x, (C,), weight, bias, eps), ...)`` over the last dim, the layer
    norm computed in ``x``'s dtype (as ``nn.LayerNorm`` and open_clip's LayerNorm do), for a norm
    whose output feeds only a quantized linear (``norm1 → qkv``, ``norm2 → fc1``).

Exactness of the reference: int8 products are below 2^14 in magnitude and a row of K <= 2^24 of
them sums to below 2^38 < 2^53, so a float64 matmul of the codes is exact (every partial sum is
an integer float64 represents exactly, whatever the summation order); float64 BLAS is that exact
and much faster than torch's int64 matmul (no BLAS). The epilogue then runs in float64 (``alpha =
s_a s_b`` of two float32 numbers is exact in float64), so the reference's ``y`` is the exact value
of the simulated ``x̂ ŵᵀ + c`` rounded once to float64 and then to ``out_dtype``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

OutQuant = tuple[float, int, int, int]
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}
BACKEND_NAMES = ("auto", "reference", "triton")
# modules that register a backend when imported (looked up on first use of the name)
_PROVIDERS = {"triton": "regcache.deploy._triton_int8"}


class BackendUnavailableError(RuntimeError):
    """A requested backend that cannot run here (the message says why and what to pick instead)."""


@dataclass(frozen=True)
class Backend:
    """The four integer functions of one implementation (see the module docstring for their contract)."""

    name: str
    quantize_static: Callable[..., torch.Tensor]
    int8_linear: Callable[..., torch.Tensor]
    int8_matmul: Callable[..., torch.Tensor]
    layernorm_quantize: Callable[..., torch.Tensor]
    activations: tuple[str, ...] = tuple(ACTIVATIONS)
    devices: tuple[str, ...] = ("cpu", "cuda")
    available: Callable[[], bool] = lambda: True


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under its name."""
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> Backend:
    """The backend ``name`` for tensors on ``device`` (``auto``: triton on CUDA where it imports, else reference)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown deploy backend {name!r}; choose one of {BACKEND_NAMES}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            try:
                return get_backend("triton", device)
            except BackendUnavailableError:
                pass
        return BACKENDS["reference"]
    if name not in BACKENDS and name in _PROVIDERS:
        try:
            importlib.import_module(_PROVIDERS[name])
        except ImportError as exc:
            raise BackendUnavailableError(
                f"deploy backend {name!r} does not import ({exc}); use backend='reference' (any device)"
            ) from exc
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendUnavailableError(f"deploy backend {name!r} is not registered; use backend='reference'")
    if device.type not in backend.devices or not backend.available():
        raise BackendUnavailableError(
            f"deploy backend {name!r} does not run on {device.type} here; use backend='reference' (any device) "
            f"or 'auto' (the fastest available)"
        )
    return backend


# ---- shared helpers (every backend's callers use them) --------------------------------------------


def int8_range(zero_point: int, qmin: int, qmax: int) -> tuple[int, int, int]:
    """``(zero_point, qmin, qmax)`` moved into int8: an unsigned range above 127 shifts by -128, others stay."""
    if qmin < -128 or qmax > 255 or qmax - qmin > 255:
        raise ValueError(f"levels [{qmin}, {qmax}] do not fit 8 bits")
    shift = -128 if qmax > 127 else 0
    return zero_point + shift, qmin + shift, qmax + shift


def fold_epilogue(
    b: torch.Tensor,
    a_scale: float,
    a_zero: int,
    b_scale: torch.Tensor,
    b_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)`` in float64 for int8 weight codes ``b`` [N, K] (module docstring: the algebra).

    ``a_scale`` / ``a_zero``: the activation's (int8-shifted) parameters; ``b_scale`` [N], ``b_zero``
    [N] or None: the weight's; ``bias`` [N] or None.
    """
    n, k = b.shape
    alpha = float(a_scale) * b_scale.double().reshape(n)
    zb = torch.zeros(n, dtype=torch.float64, device=b.device) if b_zero is None else b_zero.double().reshape(n)
    colsum = b.double().sum(dim=1)
    beta = -alpha * float(a_zero) * (colsum - k * zb)
    if bias is not None:
        beta = beta + bias.detach().double()
    return alpha, beta


# ---- the reference backend -----------------------------------------------------------------------


def _scale_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    # a 0-dim float32 tensor, as the fake quantizer's buffer: the same division kernel on every device
    return torch.as_tensor(scale, dtype=torch.float32).to(device)


def quantize_static(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """int8 codes ``clamp(round_half_even(x.float() / scale) + zero_point, qmin, qmax)`` (the fake quantizer's)."""
    q = torch.round(x.float() / _scale_tensor(scale, x.device)) + float(zero_point)
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def _exact_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of int8 codes over the last dim, exact, as float64 (module docstring: why float64 is exact)."""
    if a.shape[-1] >= 1 << 24:
        raise ValueError(f"K = {a.shape[-1]} is too long for an exact float64 sum of int8 products")
    return a.double() @ b.double().transpose(-2, -1)


def _finish(
    y: torch.Tensor,
    activation: str | None,
    out_quant: OutQuant | None,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    y = y.to(out_dtype)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose None or one of {tuple(ACTIVATIONS)}")
        y = ACTIVATIONS[activation](y)
    if residual is not None:  # the model's x + f(x): both in out_dtype, one rounding
        y = residual.reshape(y.shape).to(out_dtype) + y
    if out_quant is not None:
        return quantize_static(y, *out_quant)
    return y


def int8_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    b_zero: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_quant: OutQuant | None = None,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b.T - b_zero * rowsum(a)) + beta`` exactly, then activation, + residual, requantization."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_linear needs int8 codes, got a {a.dtype} and b {b.dtype}")
    acc = _exact_matmul_t(a, b)
    if b_zero is not None:
        acc = acc - b_zero.double().reshape(1, -1) * a.double().sum(dim=-1, keepdim=True)
    y = alpha.double().reshape(1, -1) * acc + beta.double().reshape(1, -1)
    y = _finish(y, activation, out_quant, out_dtype, residual)
    if out is None:
        return y
    if out.dtype != y.dtype or out.shape[-1] != y.shape[-1] or out.numel() != y.numel():
        raise ValueError(f"out must be {y.dtype} with {tuple(y.shape)}'s elements, got {out.dtype} {tuple(out.shape)}")
    return out.copy_(y.reshape(out.shape))


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    a_zero: int,
    b_zero: int,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``scale * (a - a_zero) @ (b - b_zero).T`` over batched int8 codes ``[..., M, K]``, ``[..., N, K]``, exact."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 codes, got a {a.dtype} and b {b.dtype}")
    k = a.shape[-1]
    acc = _exact_matmul_t(a, b)
    acc = acc - float(b_zero) * a.double().sum(dim=-1, keepdim=True)
    acc = acc - float(a_zero) * b.double().sum(dim=-1).unsqueeze(-2) + float(k * a_zero * b_zero)
    return (float(scale) * acc).to(out_dtype)


def layernorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: float,
    zero_point: int,
    qmin: int,
    qmax: int,
) -> torch.Tensor:
    """int8 codes of ``layer_norm(x)`` over the last dim (computed in x's dtype) with a static per-tensor quantizer."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return quantize_static(y, scale, zero_point, qmin, qmax)


REFERENCE = register_backend(
    Backend("reference", quantize_static, int8_linear, int8_matmul, layernorm_quantize, tuple(ACTIVATIONS))
)


def describe(backend: Backend) -> dict[str, Any]:
    """JSON-able summary of a backend (metrics.json, reports)."""
    return {"name": backend.name, "activations": list(backend.activations), "devices": list(backend.devices)}


__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailableError",
    "OutQuant",
    "describe",
    "fold_epilogue",
    "get_backend",
    "int8_linear",
    "int8_matmul",
    "int8_range",
    "layernorm_quantize",
    "quantize_static",
    "register_backend",
]
