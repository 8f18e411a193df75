"""Triton kernels of NoisyQuant's candidate search (imported lazily: only where Triton is installed)."""

import triton
import triton.language as tl

from regcache.quant._triton_fake_quant import _rint


@triton.jit
def _bf16_rne(v):
    """(bfloat16 of v rounded to nearest even, that value in float32), from the bits: the interpreter truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    top = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # finite v only (errors are)
    return top.to(tl.float32, bitcast=True).to(tl.bfloat16), top.to(tl.float32, bitcast=True)


@triton.jit
def lhs_kernel(
    x_ptr, p_ptr, out_ptr, n, tc, c, p_stride_k, p_stride_c, lo, hi,
    DIVIDE: tl.constexpr, SPLIT3: tl.constexpr, DOUBLE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The bfloat16 left operand of candidates k for inputs x (T, C), row (k, t) of width C, 2C or 3C.

    u = x / p[k] (DIVIDE, IEEE division) or x + p[k, c]; r = clamp(round(u), lo, hi) (half to even).
    SPLIT3: [e_hi | e_lo | e_hi] with e = r - u, e_hi = bf16(e), e_lo = bf16(e - e_hi) (bf16x3);
    else [r | r] (DOUBLE, bf16x2) or [r] (bf16): |r| <= 256 is exact in bfloat16. Conversions round
    to nearest even.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    k = offs // tc
    row = offs // c
    ch = offs - row * c
    x = tl.load(x_ptr + (offs - k * tc), mask=mask, other=0.0)
    if DIVIDE:
        u = tl.div_rn(x, tl.load(p_ptr + k * p_stride_k, mask=mask, other=1.0))
    else:
        u = x + tl.load(p_ptr + k * p_stride_k + ch * p_stride_c, mask=mask, other=0.0)
    r = tl.minimum(tl.maximum(_rint(u), lo, propagate_nan=tl.PropagateNan.ALL), hi, tl.PropagateNan.ALL)
    if SPLIT3:
        base = out_ptr + row * (3 * c) + ch
        e = r - u
        e_hi, e_hi32 = _bf16_rne(e)
        e_lo, _ = _bf16_rne(e - e_hi32)
        tl.store(base, e_hi, mask=mask)
        tl.store(base + c, e_lo, mask=mask)
        tl.store(base + 2 * c, e_hi, mask=mask)
    elif DOUBLE:
        base = out_ptr + row * (2 * c) + ch
        rb = r.to(tl.bfloat16)  # an integer of at most 9 bits: exact
        tl.store(base, rb, mask=mask)
        tl.store(base + c, rb, mask=mask)
    else:
        tl.store(out_ptr + offs, r.to(tl.bfloat16), mask=mask)


@triton.jit
def sq_dist_kernel(
    h_ptr, s_ptr, d_ptr, v_ptr, out_ptr, tn, cols, v_stride_k, nblk,
    DIVIDE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial sums over block b of candidate k of (h - s / d[k])^2 (DIVIDE) or (h - s - v[k, col])^2.

    h (K, T·N) float32, s (T·N) shared, out (K, nblk): one program per (k, b), no atomics (deterministic).
    """
    pid = tl.program_id(0).to(tl.int64)
    k = pid // nblk
    b = pid - k * nblk
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tn
    h = tl.load(h_ptr + k * tn + offs, mask=mask, other=0.0)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    if DIVIDE:
        diff = h - tl.div_rn(s, tl.load(d_ptr + k))
    else:
        diff = (h - s) - tl.load(v_ptr + k * v_stride_k + offs % cols, mask=mask, other=0.0)
    diff = tl.where(mask, diff, 0.0)
    tl.store(out_ptr + pid, tl.sum(diff * diff, axis=0))


cdiv = triton.cdiv
