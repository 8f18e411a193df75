"""One-kernel uniform fake quantization for CUDA tensors in eager mode (bit-identical to the plain formula).

The plain formula, ``((clamp(round(x / s) + z, qmin, qmax) - z) * s).to(dtype)`` computed in
float32, is eight full-tensor kernels with float32 temporaries in eager mode. :func:`fake_quant_uniform`
does it in one Triton kernel (read x once, write the result once) with the same float32 operations
in the same order, each correctly rounded:

- ``x / s`` with ``div_rn`` (IEEE round-to-nearest, as PyTorch's CUDA division; Triton's ``/`` is
  the approximate ``div.full.f32``, which is why a plain ``torch.compile`` of the formula is not
  bit-identical by default),
- ``round`` with ``nearbyint`` (half to even, as ``torch.round``),
- ``clamp`` propagating NaN (as ``torch.clamp``), then ``(q - z) * s`` (a subtraction then a
  product: nothing to contract into an FMA), stored with round-to-nearest-even to x's dtype.

It returns ``None`` (the caller then runs the plain formula) whenever it does not apply: no Triton,
not CUDA, under ``torch.compile`` tracing (Inductor fuses the plain formula itself), a dtype other
than float32 / bfloat16 / float16, parameters not float32 or of a shape it does not index, or more
than 2^31 - 1 elements.
"""

from __future__ import annotations

import functools

import torch

from regcache import kernels

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_NUMEL = 2**31 - 1
_BLOCK = 1024


@functools.cache
def _kernel():
    """(cdiv, the Triton kernel), or None when Triton (with div_rn) is unavailable."""
    try:
        from regcache.quant import _triton_fake_quant as k
    except (ImportError, AttributeError):  # pragma: no cover - depends on the install
        return None
    return k.cdiv, k.fake_quant_kernel


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill a contiguous span of its storage exactly once, in some dim order."""
    expected = 1
    dims = [(size, stride) for size, stride in zip(t.shape, t.stride(), strict=True) if size != 1]
    for size, stride in sorted(dims, key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The storage span of a non-overlapping dense tensor as a 1-D view (elementwise maps only)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def fake_quant_uniform(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: str,
    axis: int = 0,
    group_size: int | None = None,
) -> torch.Tensor | None:
    """The fused fake quantization of x, or None where the plain formula must run instead."""
    if torch.compiler.is_compiling() or not x.is_cuda:
        return None
    return launch(x, scale, zero_point, qmin, qmax, granularity, axis, group_size)


def launch(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    granularity: str,
    axis: int = 0,
    group_size: int | None = None,
) -> torch.Tensor | None:
    """:func:`fake_quant_uniform` without the device check (tests run it on CPU under ``TRITON_INTERPRET=1``)."""
    if x.dtype not in _DTYPES or x.requires_grad:
        return None
    if scale.dtype != torch.float32 or zero_point.dtype != torch.float32 or scale.device != x.device:
        return None
    if zero_point.device != x.device or zero_point.shape != scale.shape or not 0 < x.numel() <= _MAX_NUMEL:
        return None
    # KernelConfig.fused_fake_quant (REGCACHE_FUSED_FAKE_QUANT=0 for A/B timing), unless it fell back once
    kernel = _kernel() if kernels.active("fused_fake_quant") else None
    if kernel is None:
        return None
    cdiv, fn = kernel
    nparam = scale.numel()
    if granularity == "tensor":
        if nparam != 1:
            return None
        inner = x.numel()
        if not _dense(x):
            x = x.contiguous()
        out = torch.empty_like(x)  # same strides: the flat storage spans map element to element
        xf, of = _flat(x), _flat(out)
    elif granularity == "channel":
        ax = axis % x.ndim
        if nparam not in (1, x.shape[ax]) or scale.ndim > 1:
            return None
        inner = 1
        for d in x.shape[ax + 1 :]:
            inner *= d
        x = x.contiguous()
        out = torch.empty_like(x)
        xf, of = x.view(-1), out.view(-1)
    elif granularity == "group":
        if not group_size or x.shape[-1] % group_size:
            return None
        if tuple(scale.shape) != (*x.shape[:-1], x.shape[-1] // group_size):
            return None
        inner = group_size
        x = x.contiguous()
        out = torch.empty_like(x)
        xf, of = x.view(-1), out.view(-1)
    else:
        return None
    n = x.numel()
    scale, zero_point = scale.contiguous(), zero_point.contiguous()
    grid = (cdiv(n, _BLOCK),)
    try:
        if x.is_cuda:
            with torch.cuda.device(x.device):
                fn[grid](xf, of, scale, zero_point, n, inner, nparam, float(qmin), float(qmax), _BLOCK)
        else:  # the Triton interpreter
            fn[grid](xf, of, scale, zero_point, n, inner, nparam, float(qmin), float(qmax), _BLOCK)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a Triton without div_rn / PropagateNan, a compile failure: plain formula from now on
        _kernel.cache_clear()
        kernels.record_fallback("fused_fake_quant", repr(exc))
        return None
    return out
