"""The Triton kernel behind :mod:`regcache.quant.fused` (imported lazily: only where Triton is installed)."""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # CPU tests: the interpreter has no libdevice

    @triton.jit
    def _rint(u):
        """Round half to even, exactly, in plain float32 arithmetic (|u| < 2^23 are the non-integers)."""
        c = 8388608.0
        return tl.where(tl.abs(u) < c, tl.where(u >= 0, (u + c) - c, (u - c) + c), u)

else:

    @triton.jit
    def _rint(u):
        """Round half to even (cvt.rni), as torch.round."""
        return libdevice.rint(u)


@triton.jit
def fake_quant_kernel(x_ptr, out_ptr, scale_ptr, zp_ptr, n, inner, nparam, qmin, qmax, BLOCK: tl.constexpr):
    """out = ((clamp(round(x / s) + z, qmin, qmax) - z) * s) in float32, stored in out's dtype.

    Element i uses parameter ``(i // inner) % nparam`` (per tensor: nparam = 1; per channel: inner =
    the product of the dims after the channel axis; per group: inner = group size).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = (offs // inner) % nparam
    s = tl.load(scale_ptr + p, mask=mask, other=1.0)
    z = tl.load(zp_ptr + p, mask=mask, other=0.0)
    r = _rint(tl.div_rn(x, s))  # IEEE division (not div.full) and round half to even
    q = tl.minimum(tl.maximum(r + z, qmin, propagate_nan=tl.PropagateNan.ALL), qmax, tl.PropagateNan.ALL)
    y = (q - z) * s
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


cdiv = triton.cdiv
