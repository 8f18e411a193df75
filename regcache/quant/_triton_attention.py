"""The Triton kernel behind :mod:`regcache.quant.fused_attention` (imported lazily: only where Triton is installed).

One program = one (batch, head) and one block of query rows. It walks the keys (the prefix
entries as one small tile, then the tokens in tiles) twice: once for each row's softmax max and
sum, once to compute the probabilities, fake-quantize them in registers and accumulate P·V. q is read once, K twice,
V once, the output written once; nothing of size N² reaches HBM.

The eager attention rounds to the activation dtype after every op (matmul, ``* scale``, ``+ ln τ``,
softmax, ``/ τ``, each op of a quantizer that computes in x's dtype, ``* τ``); ``_rd`` repeats those
roundings on the float32 register values so that a bfloat16 model quantizes the same bfloat16
numbers. The interpreter truncates on float → bfloat16 casts, so there ``_rd`` rounds to nearest
even by bit manipulation, and every value is made exactly representable before it is stored or
fed to ``tl.dot``.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:  # CPU tests: the interpreter has no libdevice

    @triton.jit
    def _rint(u):
        """Round half to even, exactly, in plain float32 arithmetic (|u| < 2^23 are the non-integers)."""
        c = 8388608.0
        return tl.where(tl.abs(u) < c, tl.where(u >= 0, (u + c) - c, (u - c) + c), u)

    @triton.jit
    def _log2(u):
        return tl.log2(u)

    @triton.jit
    def _exp2(u):
        return tl.exp2(u)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # the interpreter multiplies bfloat16 operands as raw bits: upcast (exact products, float32 sums)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")

    @triton.jit
    def _rd(x, DT: tl.constexpr):
        """x rounded to the activation dtype (0 float32, 1 bfloat16, 2 float16), as float32."""
        if DT == 1:
            b = x.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)
        elif DT == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rn(x, DT: tl.constexpr):
        """x made exactly representable in DT (the interpreter's casts truncate; a GPU's round to nearest)."""
        return _rd(x, DT)

else:

    @triton.jit
    def _rint(u):
        """Round half to even (cvt.rni), as torch.round."""
        return libdevice.rint(u)

    @triton.jit
    def _log2(u):
        # libdevice's correctly rounded-ish log2 (not lg2.approx): log-√2 codes sit on its rounding
        return libdevice.log2(u)

    @triton.jit
    def _exp2(u):
        return libdevice.exp2(u)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # float32 activations: full float32 products as eager matmuls (no TF32)
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _rd(x, DT: tl.constexpr):
        """x rounded (to nearest even) to the activation dtype (0 float32, 1 bfloat16, 2 float16), as float32."""
        if DT == 1:
            return x.to(tl.bfloat16).to(tl.float32)
        elif DT == 2:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rn(x, DT: tl.constexpr):
        """x as it is: the cast before a store or tl.dot rounds to nearest on the GPU."""
        return x


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, tl.PropagateNan.ALL)


@triton.jit
def _fake_quant(
    x, p0, p1, r0, r1, c0, c1, QKIND: tl.constexpr, ADDITIVE: tl.constexpr, DT: tl.constexpr, EXACT: tl.constexpr
):
    """Fake quantization of probabilities x (float32 registers holding DT values).

    QKIND 0: none. 1: uniform (UniformQuantizer.plain_fake_quant: float32, p0 = scale, p1 = zero
    point, c0 / c1 = qmin / qmax, result rounded to DT). 2: log-√2 (LogSqrt2Quantizer.fake_quant, in
    DT: p0 = Δ in DT, c0 = the rounded 1 + (√2 - 1), c1 = number of non-zero codes). 3: twin softmax
    (fake_twin_softmax, in DT: p0 = split in DT, p1 = split / levels in DT, c0 = levels).
    r0 / r1 = 1 / p0 and 1 / p1. EXACT: every op rounded as the eager quantizer (divisions, DT
    roundings, libdevice log2); otherwise float32 throughout with reciprocals and the fast log2 / exp2,
    as Inductor's fused kernels compute (a probability on a code boundary may take the neighbour).
    """
    if EXACT:
        if QKIND == 1:
            r = _rint(tl.div_rn(x, p0))
            q = _clamp(r + p1, c0, c1)
            return _rd((q - p1) * p0, DT)
        elif QKIND == 2:
            t = _rd(tl.div_rn(tl.maximum(x, 0.0), p0), DT)
            raw = tl.minimum(_rd(-2.0 * _rd(_log2(t), DT), DT), c1)  # x = 0: +inf, capped into the zero code
            code = _rint(raw)
            is_zero = code >= c1
            code = _clamp(code, 0.0, c1 - 1.0)
            half = tl.ceil(code * 0.5)
            odd = code - 2.0 * tl.floor(code * 0.5)
            level = _rd(_rd(_exp2(-half) * tl.where(odd > 0, c0, 1.0), DT) * p0, DT)
            return tl.where(is_zero, 0.0, level)
        elif QKIND == 3:
            if ADDITIVE:
                hx = _rd(tl.maximum(tl.minimum(x, 1.0), p0) * c0, DT)
                high = _rd(tl.div_rn(_clamp(_rint(hx), 0.0, c0), c0), DT)
                lx = _rd(tl.div_rn(tl.minimum(tl.maximum(x, 0.0), p0), p1), DT)
                low = _rd(_clamp(_rint(lx), 0.0, c0) * p1, DT)
                return _rd(high + low, DT)
            else:
                high = _rd(tl.div_rn(_clamp(_rint(_rd(x * c0, DT)), 0.0, c0), c0), DT)
                low = _rd(_clamp(_rint(_rd(tl.div_rn(x, p1), DT)), 0.0, c0) * p1, DT)
                return tl.where(x < p0, low, high)
        else:
            return x
    else:
        if QKIND == 1:
            q = _clamp(_rint(x * r0) + p1, c0, c1)
            return (q - p1) * p0
        elif QKIND == 2:
            # round(-2 log2 t) from t's exponent e and mantissa m in [1, 2): -2e - [m >= 2^(1/4)] - [m >= 2^(3/4)]
            # (no transcendental; the thresholds are irrational, so no ties): exact, unlike lg2.approx
            t = tl.maximum(x, 0.0) * r0
            bits = t.to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) - 127
            m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
            code = (-2 * e - (m >= 1.189207115002721).to(tl.int32) - (m >= 1.681792830507429).to(tl.int32)).to(
                tl.float32
            )
            is_zero = (code >= c1) | (t < 1.1754943508222875e-38)  # zero or subnormal t: beyond every code
            code = _clamp(code, 0.0, c1 - 1.0)
            half = tl.ceil(code * 0.5)
            odd = code - 2.0 * tl.floor(code * 0.5)
            level = _exp2(-half) * tl.where(odd > 0, c0, 1.0) * p0
            return tl.where(is_zero, 0.0, level)
        elif QKIND == 3:
            inv_levels = 1.0 / c0
            if ADDITIVE:
                high = _clamp(_rint(tl.maximum(tl.minimum(x, 1.0), p0) * c0), 0.0, c0) * inv_levels
                low = _clamp(_rint(tl.minimum(tl.maximum(x, 0.0), p0) * r1), 0.0, c0) * p1
                return high + low
            else:
                high = _clamp(_rint(x * c0), 0.0, c0) * inv_levels
                low = _clamp(_rint(x * r1), 0.0, c0) * p1
                return tl.where(x < p0, low, high)
        else:
            return x


@triton.jit
def _operand_quant(x, s, z, lo, hi, DT: tl.constexpr, EXACT: tl.constexpr):
    """A Q / K / V operand through its per-tensor uniform fake quantizer (plain_fake_quant), in its own dtype."""
    y = _fake_quant(x.to(tl.float32), s, z, 1.0 / s, 1.0, lo, hi, 1, False, DT, EXACT)
    return _rn(y, DT).to(x.dtype)


@triton.jit
def _tile_scores(
    q, ptr, base, s_n, idx, n, sm_scale, ks, kz, klo, khi,
    D: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, EXACT: tl.constexpr, KQ: tl.constexpr,
):  # fmt: skip
    """(q kᵀ) · scale for key rows ``idx`` (< n) of one tile (EXACT: each op rounded as eager); -inf past n.

    KQ: the keys go through their fake quantizer (scale ks, zero point kz, codes klo..khi) first.
    """
    ok = idx < n
    kk = tl.load(ptr + base + idx[:, None] * s_n + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
    if KQ:
        kk = _operand_quant(kk, ks, kz, klo, khi, DT, EXACT)
    s = _dot(q, tl.trans(kk), IEEE)
    if EXACT:  # noqa: SIM108 (kernel code: one constexpr branch per build)
        s = _rd(_rd(s, DT) * sm_scale, DT)
    else:
        s = s * sm_scale
    return tl.where(ok[None, :], s, float("-inf"))


@triton.jit
def _softexp(x, EXACT: tl.constexpr):
    """e^x (EXACT: scores in natural units, as eager's softmax) or 2^x (fast: scores pre-scaled by log2 e)."""
    if EXACT:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _pv(pq, ptr, base, s_n, idx, n, vs, vz, vlo, vhi, D: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
        EXACT: tl.constexpr, VQ: tl.constexpr):  # fmt: skip
    """pq @ V[idx] for value rows ``idx`` (< n) of one tile, float32 (VQ: V through its fake quantizer first)."""
    vv = tl.load(ptr + base + idx[:, None] * s_n + tl.arange(0, D)[None, :], mask=(idx < n)[:, None], other=0.0)
    if VQ:
        vv = _operand_quant(vv, vs, vz, vlo, vhi, DT, EXACT)
    return _dot(pq.to(vv.dtype), vv, IEEE)


@triton.jit
def quantized_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pk_ptr,
    pv_ptr,
    bias_ptr,
    fac_ptr,
    qp_ptr,
    op_ptr,
    out_ptr,
    p_ptr,
    H,
    N,
    NPRE,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    spk_b,
    spk_h,
    spk_n,
    spv_b,
    spv_h,
    spv_n,
    sbias_b,
    so_b,
    so_h,
    so_n,
    nparam,
    sm_scale,
    c0,
    c1,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    QKIND: tl.constexpr,
    ADDITIVE: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_P: tl.constexpr,
    DT: tl.constexpr,
    IEEE: tl.constexpr,
    EXACT: tl.constexpr,
    QMASK: tl.constexpr,
):
    """out[b, h, rows] = Q_p(softmax(q kᵀ · scale + bias)) · v over [prefix; tokens] (last dim stride 1).

    Two passes over the keys: the first finds each row's max and exp-sum (online), the second
    recomputes the scores, normalizes, quantizes and accumulates P·V in float32. The probabilities
    must be final before they are quantized, hence the second pass instead of flash attention's
    rescaled accumulator. The prefix
    (NPRE <= BLOCK_P entries, with the ``ln τ`` bias and the p/τ quantization) is its own small
    tile, so the token tiles carry none of its extra arithmetic.
    EXACT: every op rounded to the activation dtype as the eager path; otherwise float32 registers
    throughout with scores in log2 units (``sm_scale`` then includes log2 e), as Inductor computes.
    Strides are in elements; a prefix / bias batch stride of 0 shares one register set by the batch.
    ``p_ptr`` (with STORE_P) receives the quantized probabilities, (B, H, N, NPRE + N) contiguous.
    QMASK bits 1 / 2 / 4: Q / K / V go through their per-tensor uniform fake quantizers in registers
    (``op_ptr``: (4, 4) float32 rows [scale, zero point, qmin, qmax]); the prefix stays full precision.
    Bit 8: the output goes through row 3's quantizer (the output projection's input quantizer).
    """
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dcol = tl.arange(0, D)
    kbase = b * sk_b + h * sk_h
    vbase = b * sv_b + h * sv_h
    pkbase = b * spk_b + h * spk_h
    pvbase = b * spv_b + h * spv_h
    pre = tl.arange(0, BLOCK_P)
    nk = NPRE + N
    pbase = (b * H + h) * N * nk
    log_unit = 1.0 if EXACT else 1.4426950408889634  # ln τ in the scores' units

    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_n + dcol[None, :], mask=row_ok[:, None], other=0.0)
    if QMASK & 1:
        q = _operand_quant(q, tl.load(op_ptr), tl.load(op_ptr + 1), tl.load(op_ptr + 2), tl.load(op_ptr + 3), DT, EXACT)
    ks, kz, klo, khi = 1.0, 0.0, 0.0, 0.0  # unused unless QMASK says so (op_ptr may be a dummy then)
    if QMASK & 2:
        ks, kz, klo, khi = tl.load(op_ptr + 4), tl.load(op_ptr + 5), tl.load(op_ptr + 6), tl.load(op_ptr + 7)
    vs, vz, vlo, vhi = 1.0, 0.0, 0.0, 0.0
    if QMASK & 4:
        vs, vz, vlo, vhi = tl.load(op_ptr + 8), tl.load(op_ptr + 9), tl.load(op_ptr + 10), tl.load(op_ptr + 11)

    # pass 1: row max and sum of exp, prefix tile first
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    lsum = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_PREFIX:
        sp = _tile_scores(q, pk_ptr, pkbase, spk_n, pre, NPRE, sm_scale, ks, kz, klo, khi, D, DT, IEEE, EXACT, False)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + b * sbias_b + pre, mask=pre < NPRE, other=0.0)
            if EXACT:  # noqa: SIM108
                sp = _rd(sp + bias[None, :], DT)
            else:
                sp = sp + bias[None, :] * log_unit
        m = tl.max(sp, axis=1)
        lsum = tl.sum(_softexp(sp - m[:, None], EXACT), axis=1)
    for start in range(0, N, BLOCK_N):
        kidx = start + tl.arange(0, BLOCK_N)
        s = _tile_scores(
            q, k_ptr, kbase, sk_n, kidx, N, sm_scale, ks, kz, klo, khi, D, DT, IEEE, EXACT, (QMASK & 2) != 0
        )
        m_new = tl.maximum(m, tl.max(s, axis=1))
        lsum = lsum * _softexp(m - m_new, EXACT) + tl.sum(_softexp(s - m_new[:, None], EXACT), axis=1)
        m = m_new
    inv = 1.0 / lsum

    # pass 2: probabilities, their fake quantizer, P·V
    pidx = h % nparam
    p0 = tl.load(qp_ptr + pidx * 2)
    p1 = tl.load(qp_ptr + pidx * 2 + 1)
    r0 = 1.0 / p0
    r1 = 1.0 / p1
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    if HAS_PREFIX:
        pp = _softexp(sp - m[:, None], EXACT) * inv[:, None]
        if EXACT:
            pp = _rd(pp, DT)
        if HAS_BIAS:  # each of τ copies' share p/τ is quantized, then the τ copies summed back
            fac = tl.load(fac_ptr + b * sbias_b + pre, mask=pre < NPRE, other=1.0)
            if EXACT:
                xp = _rd(tl.div_rn(pp, fac[None, :]), DT)
                ppq = _rd(_fake_quant(xp, p0, p1, r0, r1, c0, c1, QKIND, ADDITIVE, DT, EXACT) * fac[None, :], DT)
            else:
                xp = pp * (1.0 / fac)[None, :]
                ppq = _rn(_fake_quant(xp, p0, p1, r0, r1, c0, c1, QKIND, ADDITIVE, DT, EXACT) * fac[None, :], DT)
        else:
            ppq = _rn(_fake_quant(pp, p0, p1, r0, r1, c0, c1, QKIND, ADDITIVE, DT, EXACT), DT)
        ppq = tl.where((pre < NPRE)[None, :], ppq, 0.0)
        if STORE_P:
            tl.store(
                p_ptr + pbase + rows[:, None] * nk + pre[None, :], ppq, mask=row_ok[:, None] & (pre < NPRE)[None, :]
            )
        acc += _pv(ppq, pv_ptr, pvbase, spv_n, pre, NPRE, vs, vz, vlo, vhi, D, DT, IEEE, EXACT, False)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _tile_scores(
            q, k_ptr, kbase, sk_n, cols, N, sm_scale, ks, kz, klo, khi, D, DT, IEEE, EXACT, (QMASK & 2) != 0
        )
        p = _softexp(s - m[:, None], EXACT) * inv[:, None]
        if EXACT:
            p = _rd(p, DT)
        pq = _rn(_fake_quant(p, p0, p1, r0, r1, c0, c1, QKIND, ADDITIVE, DT, EXACT), DT)
        pq = tl.where((cols < N)[None, :], pq, 0.0)
        if STORE_P:
            ptrs = p_ptr + pbase + rows[:, None] * nk + NPRE + cols[None, :]
            tl.store(ptrs, pq, mask=row_ok[:, None] & (cols < N)[None, :])
        acc += _pv(pq, v_ptr, vbase, sv_n, cols, N, vs, vz, vlo, vhi, D, DT, IEEE, EXACT, (QMASK & 4) != 0)
    out = _rd(acc, DT).to(out_ptr.dtype.element_ty)
    if QMASK & 8:  # the output projection's input quantizer, on the output as the eager path rounds it
        out = _operand_quant(
            out, tl.load(op_ptr + 12), tl.load(op_ptr + 13), tl.load(op_ptr + 14), tl.load(op_ptr + 15), DT, EXACT
        )
    tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_n + dcol[None, :], out, mask=row_ok[:, None])


cdiv = triton.cdiv
next_power_of_2 = triton.next_power_of_2
