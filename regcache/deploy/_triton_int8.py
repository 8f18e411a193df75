"""The ``triton`` deploy backend: Triton kernels of the integer path on CUDA (Hopper: int8 ``wgmma``).

Imported only by :func:`regcache.deploy.kernels.get_backend` when the ``triton`` (or ``auto`` on CUDA)
backend is asked for, so a CPU install never imports Triton. The functions meet the contract of
:mod:`regcache.deploy.kernels` (its docstring) and register themselves as the backend ``triton``:

- :func:`int8_linear`: ``acc = a @ b.T`` in int32 on the tensor cores (a ``int8 [M, K]``, b ``int8 [N, K]``,
  the ``nn.Linear`` layout: K contiguous is the layout the 8-bit tensor-core instructions read both
  operands in, so the weight codes need no transpose at deploy time), then in one epilogue per output
  tile, in float32: ``y = alpha * (acc - b_zero * rowsum(a)) + beta`` (``rowsum(a)`` summed inside the
  K loop, only when ``b_zero`` is given), rounded to ``out_dtype``, the activation, optionally
  ``+ residual`` (the block's skip connection, an extension of the contract), then stored in
  ``out_dtype`` or requantized to int8 for the next linear, so the output makes one trip to memory. Where
  the activation's arithmetic (exact erf) would keep the tensor cores idle in the epilogue (fc1,
  BENCHMARKS.md section 8), the tuned configuration runs it as a second elementwise pass instead: for 16-bit
  y a lookup in a 65,536-entry table of codes that the pass's own arithmetic computed once per quantizer
  (bit-identical, at the memory's speed).
- :func:`layernorm_quantize`: a warp a row (or one row over a padded block per program), float32
  statistics, rounded to x's dtype, quantized.
- :func:`quantize_static`: the static quantization alone (attention output -> proj input).
- :func:`int8_matmul`: the reference's (exact, float64); the integer attention is not a Triton kernel yet.

Quantization is the fake quantizer's: ``clamp(rint(v / scale) + zero_point, qmin, qmax)`` with an IEEE
division (``div_rn``, taken only where a product by the reciprocal could round otherwise: :func:`_quantize`)
and round half to even. Differences to the float64 reference: the epilogue's float32
products (``y`` within a few float32 ulps, so a rounding to ``out_dtype`` or a requantization can land one
step away where the exact value lies within that of a boundary) and, in the layer norm, float32 statistics
summed in another order. ``alpha`` / ``beta`` / ``b_zero`` of another dtype (the deployed modules keep
float64) are cast to float32 once and the copy kept while the buffer is unchanged; scale and zero point
are Python numbers (or one-element float32 device tensors, read in the kernel: no host synchronisation).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from regcache.deploy import kernels as _api
from regcache.quant._triton_fake_quant import _rint

_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_ROUND_CODE = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0, torch.float64: 0}
_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3}

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, kind). kind: 0 pointer loads; 1 tensor
# descriptors (the copy engine); 2 = 1 with the epilogue in two column halves; 3 = 1 persistent (one program
# per multiprocessor); 4 = 3 with the split epilogue; 5 = 1 storing y, then activation + requantization as a
# second elementwise pass (bit-identical to the fused epilogue). TUNED per (N, K, heavy epilogue: activation or
# requantization), the rest take the defaults. Picked on an H200 at ViT-B/16 shapes (M = 256 * 197) by
# benchmarks/bench_deploy.py --tune, which times each shape with the epilogue it has in the model.
Config = tuple[int, int, int, int, int, int, int]
TUNED: dict[tuple[int, int, bool], Config] = {
    (2304, 768, False): (256, 128, 128, 8, 8, 3, 3),  # qkv: 866 TOP/s (H200, 2026-12-02, c2e139a)
    (768, 768, False): (256, 128, 128, 8, 8, 3, 3),  # proj + residual: 615
    (3072, 768, True): (256, 128, 128, 8, 8, 3, 5),  # fc1 + GELU + requantization, two passes: 299 (fused: 177)
    (768, 3072, False): (128, 256, 128, 8, 8, 3, 4),  # fc2 + residual: 1,033
}
_DEFAULT_CONFIG: Config = (256, 128, 128, 8, 8, 3, 1)
_SMALL_M_CONFIG: Config = (64, 128, 128, 8, 4, 4, 0)


if os.environ.get("TRITON_INTERPRET", "0") == "1":  # CPU tests: the interpreter truncates float32 -> bfloat16

    @triton.jit
    def _round_to(v, ROUND: tl.constexpr):
        """v rounded to bfloat16 (1) / float16 (2) and back to float32, or unchanged (0); bf16 by its bits (RNE)."""
        if ROUND == 1:
            u = v.to(tl.uint32, bitcast=True)
            r = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000  # round half to even on the 16 dropped bits
            v = tl.where(v == v, r.to(tl.float32, bitcast=True), v)
        elif ROUND == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v

else:

    @triton.jit
    def _round_to(v, ROUND: tl.constexpr):
        """v rounded to bfloat16 (1) / float16 (2) and back to float32, or unchanged (0)."""
        if ROUND == 1:
            v = v.to(tl.bfloat16).to(tl.float32)
        elif ROUND == 2:
            v = v.to(tl.float16).to(tl.float32)
        return v


@triton.jit
def _quantize(v, q_scale, q_zp, q_min, q_max):
    """clamp(rint(v / s) + z, qmin, qmax) as int8 (IEEE division, half to even), the fake quantizer's codes.

    Computed as ``rint(v * (1 / s))``: the product is within 2^-22 relative of the correctly rounded
    quotient (1 / s correctly rounded, one rounding of the product), so the two round to different
    integers only where ``v * (1 / s)`` lies within that of a half-integer; where any element of the
    block does (rare: ~2^-20 |v / s| per element, ties included), the block takes the IEEE division
    for those elements. Bit-identical to ``rint(div_rn(v, s))`` at a multiply's cost per element
    instead of a division's (the division and its slow-path check were half the instructions of
    the GELU + requantization pass).
    """
    inv = tl.div_rn(1.0, q_scale)
    u = v * inv
    r = _rint(u)
    near = (0.5 - tl.abs(u - r)) <= tl.abs(u) * 4.76837158203125e-07  # 2^-21
    if tl.max(near.to(tl.int32)) > 0:
        r = tl.where(near, _rint(tl.div_rn(v, q_scale)), r)
    r = tl.minimum(tl.maximum(r + q_zp, q_min), q_max)
    return r.to(tl.int8)


@triton.jit
def _load_qparams(scale_ptr, zp_ptr, scale, zp, QP_PTR: tl.constexpr):
    """(scale, zero point) as float32 scalars, from device pointers (QP_PTR) or the arguments."""
    if QP_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
        z = tl.load(zp_ptr).to(tl.float32)
    else:  # float arguments are float32 scalars already
        s = scale
        z = zp
    return s, z


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of tile ``pid`` in grouped order: GROUP_M row tiles share a weight tile in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(
    acc,
    rowsum,
    offs_m,
    offs_n,
    c_ptr,
    alpha_ptr,
    beta_ptr,
    bzero_ptr,
    res_ptr,
    qscale_ptr,
    qzp_ptr,
    q_scale,
    q_zp,
    q_min,
    q_max,
    M,
    N,
    stride_cm,
    stride_cn,
    stride_cb,
    RPB,
    stride_rm,
    stride_rn,
    HAS_BZERO: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_QUANT: tl.constexpr,
    QP_PTR: tl.constexpr,
    ROUND: tl.constexpr,
    BATCHED: tl.constexpr,
):
    """float32 ``alpha * (acc - b_zero rowsum) + beta``, rounded, activation, + residual, stored or requantized."""
    n_mask = offs_n < N
    alpha = tl.load(alpha_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32)
    if HAS_BZERO:
        bz = tl.load(bzero_ptr + offs_n, mask=n_mask, other=0.0)
        y = y - bz[None, :] * rowsum.to(tl.float32)[:, None]
    y = y * alpha[None, :]
    if HAS_BETA:
        beta = tl.load(beta_ptr + offs_n, mask=n_mask, other=0.0)
        y = y + beta[None, :]
    y = _round_to(y, ROUND)  # the contract: y in out_dtype, then the activation on it
    y = _activation(y, ACT, ROUND)
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_RES:
        r_ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    if BATCHED:  # out is [B, RPB, N] with any batch / row strides (rows of a larger buffer)
        rows = (offs_m // RPB).to(tl.int64) * stride_cb + (offs_m % RPB).to(tl.int64) * stride_cm
    else:
        rows = offs_m.to(tl.int64) * stride_cm
    c_ptrs = c_ptr + rows[:, None] + offs_n[None, :] * stride_cn
    if OUT_QUANT:
        s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
        tl.store(c_ptrs, _quantize(_round_to(y, ROUND), s, z, q_min, q_max), mask=mask)
    else:
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_linear_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    alpha_ptr,
    beta_ptr,
    bzero_ptr,
    res_ptr,
    qscale_ptr,
    qzp_ptr,
    q_scale,
    q_zp,
    q_min,
    q_max,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_cb,
    RPB,
    stride_rm,
    stride_rn,
    HAS_BZERO: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACT: tl.constexpr,
    HAS_RES: tl.constexpr,
    OUT_QUANT: tl.constexpr,
    QP_PTR: tl.constexpr,
    ROUND: tl.constexpr,
    BATCHED: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile from pointer loads: int32 tensor-core K loop, then the epilogue."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # out-of-range rows / columns read a valid row instead (their results are never stored): unmasked loads
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :].to(tl.int64) * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_BZERO:
            rowsum += tl.sum(a.to(tl.int32), axis=1)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _epilogue(
        acc, rowsum, offs_m, offs_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
        q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
        HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED,
    )  # fmt: skip


@triton.jit
def _store_tile(
    acc, rowsum, off_m, off_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
    q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
    HAS_BZERO: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    OUT_QUANT: tl.constexpr, QP_PTR: tl.constexpr, ROUND: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """The epilogue of one tile, whole or (EPI_SPLIT) as two column halves: half the live registers."""
    offs_m = off_m + tl.arange(0, BLOCK_M)
    if EPI_SPLIT:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n = off_n + tl.arange(0, BLOCK_N // 2)
        _epilogue(
            acc0, rowsum, offs_m, offs_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
            q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
            HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED,
        )  # fmt: skip
        _epilogue(
            acc1, rowsum, offs_m, offs_n + BLOCK_N // 2, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr,
            qzp_ptr, q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
            HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED,
        )  # fmt: skip
    else:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        _epilogue(
            acc, rowsum, offs_m, offs_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
            q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
            HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED,
        )  # fmt: skip


@triton.jit
def _int8_linear_tma_kernel(
    a_desc, b_desc, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
    q_scale, q_zp, q_min, q_max, M, N, K, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
    HAS_BZERO: tl.constexpr, HAS_BETA: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    OUT_QUANT: tl.constexpr, QP_PTR: tl.constexpr, ROUND: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, PERSISTENT: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):  # fmt: skip
    """Tiles with operands through the tensor-memory copy engine (host descriptors; edges read as zeros).

    PERSISTENT: NUM_PROGRAMS programs walk the tiles, the tile loop flattened with the K loop so the
    next tile's loads are in flight during this tile's epilogue (ViT's K = 768 is only 6 steps of 128).
    """
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for k in range(k_tiles):
                a = a_desc.load([off_m, k * BLOCK_K])
                b = b_desc.load([off_n, k * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
                if HAS_BZERO:
                    rowsum += tl.sum(a.to(tl.int32), axis=1)
            _store_tile(
                acc, rowsum, off_m, off_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
                q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
                HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED, BLOCK_M, BLOCK_N, EPI_SPLIT,
            )  # fmt: skip
    else:
        pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            if HAS_BZERO:
                rowsum += tl.sum(a.to(tl.int32), axis=1)
        _store_tile(
            acc, rowsum, off_m, off_n, c_ptr, alpha_ptr, beta_ptr, bzero_ptr, res_ptr, qscale_ptr, qzp_ptr,
            q_scale, q_zp, q_min, q_max, M, N, stride_cm, stride_cn, stride_cb, RPB, stride_rm, stride_rn,
            HAS_BZERO, HAS_BETA, ACT, HAS_RES, OUT_QUANT, QP_PTR, ROUND, BATCHED, BLOCK_M, BLOCK_N, EPI_SPLIT,
        )  # fmt: skip


@triton.jit
def _activation(y, ACT: tl.constexpr, ROUND: tl.constexpr):
    """The activation of y (already in out_dtype) as torch computes it on that dtype.

    F.gelu (erf or tanh) upcasts to float32 and rounds once; quick_gelu is three torch ops
    (``1.702 * x``, ``sigmoid``, the product), each rounded to the dtype.
    """
    if ACT == 1:
        y = _round_to(0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476)), ROUND)
    elif ACT == 2:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u)
        y = _round_to(0.5 * y * (1.0 + t), ROUND)
    elif ACT == 3:
        t = _round_to(1.702 * y, ROUND)
        sg = _round_to(1.0 / (1.0 + tl.exp(-t)), ROUND)
        y = _round_to(y * sg, ROUND)
    return y


@triton.jit
def _layernorm_quantize_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    qscale_ptr,
    qzp_ptr,
    q_scale,
    q_zp,
    q_min,
    q_max,
    C,
    stride_x,
    stride_o,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    QP_PTR: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: float32 LayerNorm (biased variance, as F.layer_norm), rounded to ROUND, quantized to int8."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    y = d * tl.math.rsqrt(var + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
    tl.store(out_ptr + row * stride_o + cols, _quantize(_round_to(y, ROUND), s, z, q_min, q_max), mask=mask)


@triton.jit
def _layernorm_quantize_rows_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, qscale_ptr, qzp_ptr, q_scale, q_zp, q_min, q_max, R, C, stride_x, stride_o, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, QP_PTR: tl.constexpr, ROUND: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """ROWS rows a program (fewer, larger programs than one row each), the same arithmetic per row."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < C
    mask = (rows < R)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    d = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / C
    y = d * tl.math.rsqrt(var + eps)[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
    out_ptrs = out_ptr + rows[:, None] * stride_o + cols[None, :]
    tl.store(out_ptrs, _quantize(_round_to(y, ROUND), s, z, q_min, q_max), mask=mask)


@triton.jit
def _layernorm_quantize_warp_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, qscale_ptr, qzp_ptr, q_scale, q_zp, q_min, q_max, R, C, stride_x, stride_o, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, QP_PTR: tl.constexpr, ROUND: tl.constexpr,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr,
):  # fmt: skip
    """ROWS rows a program, one warp a row: the row in NCHUNK chunks of CHUNK (32 lanes x 16 bytes) columns.

    A chunk is exactly one warp's 16-byte loads, so the row's sums are warp shuffles (no shared memory, no
    barrier) and no lane idles on padding (768 = 3 x 256 bf16 columns; one row per program over 1024
    padded columns left a quarter of the lanes masked). Three sweeps over the row, the second and third
    from L1: the sum, the sum of squared deviations (two-pass variance, as the one-row kernel), then the
    normalized, quantized codes.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = (rows < R)[:, None]
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + rows[:, None] * stride_x
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for j in tl.static_range(NCHUNK):
        c = j * CHUNK + cols
        acc += tl.sum(tl.load(x_row + c[None, :], mask=rmask & (c < C)[None, :], other=0.0).to(tl.float32), axis=1)
    mean = acc / C
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for j in tl.static_range(NCHUNK):
        c = j * CHUNK + cols
        m = rmask & (c < C)[None, :]
        d = tl.where(m, tl.load(x_row + c[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None], 0.0)
        acc += tl.sum(d * d, axis=1)
    rstd = tl.math.rsqrt(acc / C + eps)
    s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
    o_row = out_ptr + rows[:, None] * stride_o
    for j in tl.static_range(NCHUNK):
        c = j * CHUNK + cols
        cm = c < C
        m = rmask & cm[None, :]
        y = (tl.load(x_row + c[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(o_row + c[None, :], _quantize(_round_to(y, ROUND), s, z, q_min, q_max), mask=m)


@triton.jit
def _activation_quantize_kernel(
    y_ptr, out_ptr, qscale_ptr, qzp_ptr, q_scale, q_zp, q_min, q_max, n,
    ACT: tl.constexpr, ROUND: tl.constexpr, QP_PTR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """The epilogue's activation + requantization as its own pass over a stored y (already in out_dtype)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = _activation(tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT, ROUND)
    s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
    tl.store(out_ptr + offs, _quantize(_round_to(y, ROUND), s, z, q_min, q_max), mask=mask)


@triton.jit
def _lookup_kernel(bits_ptr, lut_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = lut[bits]: the int8 code of each 16-bit input from its 65,536-entry table (L1-resident)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(bits_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    tl.store(out_ptr + offs, tl.load(lut_ptr + idx, mask=mask, other=0), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr, out_ptr, qscale_ptr, qzp_ptr, q_scale, q_zp, q_min, q_max, n, QP_PTR: tl.constexpr, BLOCK: tl.constexpr
):
    """Elementwise static quantization of a contiguous tensor to int8."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s, z = _load_qparams(qscale_ptr, qzp_ptr, q_scale, q_zp, QP_PTR)
    tl.store(out_ptr + offs, _quantize(x, s, z, q_min, q_max), mask=mask)


# ---- launchers ------------------------------------------------------------------------------------


def _qparams(scale, zero_point, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, float, float]:
    """(scale pointer, zero-point pointer, scale, zero point): tensors go by pointer, numbers by value."""
    if isinstance(scale, torch.Tensor) or isinstance(zero_point, torch.Tensor):
        s = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(1)
        z = torch.as_tensor(zero_point, dtype=torch.float32, device=device).reshape(1)
        return s, z, 1.0, 0.0
    return None, None, float(scale), float(zero_point)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous float32; a cast of a module's (float64) buffer is made once, kept on it while t is unchanged."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    if t.is_inference() or torch.compiler.is_compiling():  # no version counter to key a cache on
        return t.to(torch.float32).contiguous()
    hit = getattr(t, "_regcache_f32", None)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    out = t.to(torch.float32).contiguous()
    t._regcache_f32 = (t._version, out)
    return out


def _tma_ok(a: torch.Tensor, b: torch.Tensor, k: int) -> bool:
    """Whether both operands suit tensor descriptors (contiguous rows, 16-byte aligned rows and bases)."""
    return (
        a.stride(1) == 1
        and b.stride(1) == 1
        and k % 16 == 0
        and a.stride(0) % 16 == 0
        and b.stride(0) % 16 == 0
        and a.data_ptr() % 16 == 0
        and b.data_ptr() % 16 == 0
    )


def config_for(m: int, n: int, k: int, heavy: bool = False) -> Config:
    """The tile configuration of an (M, N, K) product: the tuned one of (N, K, heavy), else a default by size."""
    if m < 1024:
        return _SMALL_M_CONFIG
    return TUNED.get((n, k, heavy), _DEFAULT_CONFIG)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def int8_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor | None,
    b_zero: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    out_quant: tuple | None = None,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b.T - b_zero * rowsum(a)) + beta`` (+ GELU, + residual, or requantized) for int8 a, b.

    a: int8 ``[..., K]``; b: int8 ``[N, K]``; alpha / beta / b_zero: float32 ``[N]``; out_quant:
    ``(scale, zero_point, qmin, qmax)`` of the next linear's input (int8 output) or None (``out_dtype``).
    residual: ``[..., N]`` added after the activation (the block's skip connection). out: where to write
    the ``[M, N]`` result, ``[M, N]`` or ``[B, M / B, N]`` with the last dim contiguous and any other strides
    (rows inside a larger buffer: attention's keys after a register prefix); returned. config: tiles
    ``(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, tma)`` instead of :func:`config_for`'s.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_linear needs int8 operands, got {a.dtype} and {b.dtype}")
    if activation not in _ACT_CODE:
        raise ValueError(f"unknown activation {activation!r}; choose None or one of {tuple(_ACT_CODE)[1:]}")
    if out_dtype not in _ROUND_CODE:
        raise ValueError(
            f"out_dtype must be float32, bfloat16 or float16 (or float64 computed in float32), got {out_dtype}"
        )
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    m, k = a2.shape
    n, kb = b.shape
    if kb != k:
        raise ValueError(f"a has K = {k} but b is {tuple(b.shape)} (expected [N, K])")
    store_dtype = torch.float32 if out_dtype == torch.float64 else out_dtype
    given = out
    rpb, stride_cb = 1, 0
    if given is not None:
        want = torch.int8 if out_quant is not None else store_dtype
        if given.dtype != want or given.shape[-1] != n or given.numel() != m * n or given.stride(-1) != 1:
            raise ValueError(f"out must be {want} [M = {m}, N = {n}] (or [B, M / B, N]) with unit last stride")
        if given.ndim == 3:
            rpb, stride_cb = given.shape[1], given.stride(0)
            out = given
        elif given.ndim == 2:
            out = given
        else:
            raise ValueError(f"out must be 2-D or 3-D, got {tuple(given.shape)}")
    else:
        out = torch.empty((m, n), device=a.device, dtype=torch.int8 if out_quant is not None else store_dtype)
    if m == 0:
        return out if given is not None else out.reshape(*lead, n)
    alpha = _f32(alpha)
    beta_t = alpha if beta is None else _f32(beta)
    bz = alpha if b_zero is None else _f32(b_zero)
    if residual is not None:
        res = residual.reshape(m, n)
        res_strides = res.stride()
    else:
        res, res_strides = out, (0, 0)
    if out_quant is not None:
        scale, zp, qmin, qmax = out_quant
        sp, zpp, s, z = _qparams(scale, zp, a.device)
    else:
        sp, zpp, s, z, qmin, qmax = None, None, 1.0, 0.0, -128, 127
    heavy = activation is not None or out_quant is not None
    bm, bn, bk, gm, warps, stages, kind = config or config_for(m, n, k, heavy)
    if kind == 5 and residual is not None and heavy:
        kind = 1  # the residual comes after the activation: only the fused epilogue has that order
    if kind == 5 and given is not None:
        if heavy:  # the second pass writes a new tensor: copied into out
            res = int8_linear(a2, b, alpha, beta, b_zero, activation=activation, out_quant=out_quant,
                              out_dtype=out_dtype, residual=residual, config=config)  # fmt: skip
            return given.copy_(res.reshape(given.shape))
        kind = 1
    if kind == 5:  # two passes: the GEMM stores y in out_dtype, then activation + requantization
        cfg1 = (bm, bn, bk, gm, warps, stages, 1)
        y = int8_linear(a2, b, alpha, beta, b_zero, out_dtype=store_dtype, residual=residual, config=cfg1)
        if not heavy:
            return y.reshape(*lead, n).to(out_dtype)
        if out_quant is None:  # no pass saved: the activation on the stored y, as torch would
            return _activation_pass(y, activation, None, store_dtype).reshape(*lead, n).to(out_dtype)
        return _activation_pass(y, activation, out_quant, store_dtype).reshape(*lead, n)
    if kind and not _tma_ok(a2, b, k):
        kind = 0
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(tiles, _num_sms(a.device)) if kind >= 3 else tiles
    epilogue_args = (
        out,
        alpha,
        beta_t,
        bz,
        res,
        sp if sp is not None else alpha,
        zpp if zpp is not None else alpha,
        s,
        z,
        float(qmin),
        float(qmax),
        m,
        n,
        k,
    )
    stride_cm = out.stride(-2)
    out_strides = (stride_cm, out.stride(-1), stride_cb, rpb, res_strides[0], res_strides[1])
    flags = {
        "HAS_BZERO": b_zero is not None,
        "HAS_BETA": beta is not None,
        "ACT": _ACT_CODE[activation],
        "HAS_RES": residual is not None,
        "OUT_QUANT": out_quant is not None,
        "QP_PTR": sp is not None,
        "ROUND": _ROUND_CODE[out_dtype],
        "BATCHED": rpb > 1 and stride_cb != rpb * stride_cm,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": gm,
        "num_warps": warps,
        "num_stages": stages,
    }
    with _device(a):
        if kind:
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_desc = TensorDescriptor.from_tensor(a2, [bm, bk])
            b_desc = TensorDescriptor.from_tensor(b, [bn, bk])
            _int8_linear_tma_kernel[(programs,)](
                a_desc, b_desc, *epilogue_args, *out_strides, EPI_SPLIT=kind in (2, 4), PERSISTENT=kind >= 3,
                NUM_PROGRAMS=programs, **flags,
            )  # fmt: skip
        else:
            strides = (a2.stride(0), a2.stride(1), b.stride(0), b.stride(1))
            _int8_linear_kernel[(tiles,)](a2, b, *epilogue_args, *strides, *out_strides, EVEN_K=k % bk == 0, **flags)
    if given is not None:
        return given
    out = out.reshape(*lead, n)
    return out.to(out_dtype) if out.dtype != out_dtype and out_quant is None else out


# the activation + requantization pass (config kind 5): (BLOCK, num_warps, mode), set by
# benchmarks/bench_deploy.py to the fastest. mode "compute": the arithmetic per element; "lut" (16-bit inputs,
# scale a number): the code of each of the 65,536 input values computed once by that same kernel and looked up
# H200, [50432, 3072] bf16 (2026-12-02, 5529a05): lut 0.118 ms (3.9 TB/s of bytes read + written), compute 0.303
ACT_PASS: tuple[int, int, str] = (4096, 8, "lut")
_TABLES: dict[tuple, torch.Tensor] = {}


def _code_table(activation: str | None, out_quant: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """int8 [65536]: the pass's code for every 16-bit pattern of ``dtype`` (bit-identical: the same kernel made it)."""
    key = (activation, tuple(float(v) for v in out_quant), dtype, device)
    lut = _TABLES.get(key)
    if lut is None:
        if len(_TABLES) >= 256:  # a bound, not a policy: a deployed ViT-B holds 12 fc1 quantizers
            _TABLES.clear()
        values = torch.arange(65536, dtype=torch.int32, device=device).to(torch.int16).view(dtype)  # pattern p at p
        scale, zp, qmin, qmax = out_quant
        lut = torch.empty(65536, dtype=torch.int8, device=device)
        with _device(values):
            _activation_quantize_kernel[(triton.cdiv(65536, 4096),)](
                values, lut, values, values, float(scale), float(zp), float(qmin), float(qmax), 65536,
                ACT=_ACT_CODE[activation], ROUND=_ROUND_CODE[dtype], QP_PTR=False, BLOCK=4096, num_warps=8,
            )  # fmt: skip
        _TABLES[key] = lut
    return lut


def _activation_pass(y: torch.Tensor, activation: str | None, out_quant: tuple | None, dtype: torch.dtype):
    """activation (and requantization) of a stored ``y`` (in ``dtype``) as one elementwise pass (config kind 5)."""
    if out_quant is None:  # activation only: torch's own op on the stored dtype (the contract's definition)
        from regcache.deploy.kernels import ACTIVATIONS

        return ACTIVATIONS[activation](y) if activation is not None else y
    scale, zp, qmin, qmax = out_quant
    out = torch.empty(y.shape, device=y.device, dtype=torch.int8)
    sp, zpp, s, z = _qparams(scale, zp, y.device)
    n = y.numel()
    with _device(y):
        block, warps, mode = ACT_PASS
        if mode == "lut" and sp is None and y.element_size() == 2:
            lut = _code_table(activation, out_quant, y.dtype, y.device)
            _lookup_kernel[(triton.cdiv(n, block),)](y.view(torch.int16), lut, out, n, BLOCK=block, num_warps=warps)
            return out
        _activation_quantize_kernel[(triton.cdiv(n, block),)](
            y, out, sp if sp is not None else y, zpp if zpp is not None else y, s, z, float(qmin), float(qmax), n,
            ACT=_ACT_CODE[activation], ROUND=_ROUND_CODE[dtype], QP_PTR=sp is not None, BLOCK=block,
            num_warps=warps,
        )  # fmt: skip
    return out


# layernorm_quantize's kernel: "warp" (a warp a row, LN_ROWS rows a program) or "block" (the row over one
# padded block, LN_ROWS rows a program); benchmarks/bench_deploy.py times the variants and runs the fastest.
# H200, 50432 x 768 bf16 (2026-12-02, 5529a05): warp / 1 row 0.058 ms (2.0 TB/s), 2 / 4 / 8 rows 0.062 / 0.063 /
# 0.069, block / 1 row 0.085
LN_KERNEL = "warp"
LN_ROWS = 1


def layernorm_quantize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale,
    zero_point,
    qmin: int,
    qmax: int,
    *,
    rows_per_program: int | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """int8 codes of ``layer_norm(x)`` over the last dim (float32 statistics, rounded to x's dtype).

    ``rows_per_program`` (a power of two; default ``LN_ROWS``): rows each program normalizes; ``kernel``:
    ``"warp"`` (a warp a row) or ``"block"`` (default ``LN_KERNEL``).
    """
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, c), device=x.device, dtype=torch.int8)
    if rows == 0:
        return out.reshape(x.shape)
    sp, zpp, s, z = _qparams(scale, zero_point, x.device)
    block = triton.next_power_of_2(c)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    per = LN_ROWS if rows_per_program is None else rows_per_program
    chunk = 32 * (16 // x2.element_size())  # one warp's 16-byte loads
    if (kernel or LN_KERNEL) == "warp" and triton.cdiv(c, chunk) <= 16:
        with _device(x):
            _layernorm_quantize_warp_kernel[(triton.cdiv(rows, per),)](
                x2, w, b, out, sp if sp is not None else x2, zpp if zpp is not None else x2, s, z,
                float(qmin), float(qmax), rows, c, x2.stride(0), out.stride(0), float(eps),
                HAS_W=weight is not None, HAS_B=bias is not None, QP_PTR=sp is not None,
                ROUND=_ROUND_CODE.get(x.dtype, 0), ROWS=per, CHUNK=chunk, NCHUNK=triton.cdiv(c, chunk), num_warps=per,
            )  # fmt: skip
        return out.reshape(x.shape)
    if per > 1:
        with _device(x):
            _layernorm_quantize_rows_kernel[(triton.cdiv(rows, per),)](
                x2, w, b, out, sp if sp is not None else x2, zpp if zpp is not None else x2, s, z,
                float(qmin), float(qmax), rows, c, x2.stride(0), out.stride(0), float(eps),
                HAS_W=weight is not None, HAS_B=bias is not None, QP_PTR=sp is not None,
                ROUND=_ROUND_CODE.get(x.dtype, 0), ROWS=per, BLOCK=block, num_warps=8,
            )  # fmt: skip
        return out.reshape(x.shape)
    with _device(x):
        _layernorm_quantize_kernel[(rows,)](
            x2,
            w,
            b,
            out,
            sp if sp is not None else x2,
            zpp if zpp is not None else x2,
            s,
            z,
            float(qmin),
            float(qmax),
            c,
            x2.stride(0),
            out.stride(0),
            float(eps),
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            QP_PTR=sp is not None,
            ROUND=_ROUND_CODE.get(x.dtype, 0),
            BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return out.reshape(x.shape)


_QUANT_BLOCK = 4096


def quantize_static(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """int8 codes ``clamp(rint(x / scale) + zero_point, qmin, qmax)`` of x (any float dtype, per tensor)."""
    xc = x.contiguous()
    out = torch.empty(xc.shape, device=x.device, dtype=torch.int8)
    n = xc.numel()
    if n == 0:
        return out
    sp, zpp, s, z = _qparams(scale, zero_point, x.device)
    grid = (triton.cdiv(n, _QUANT_BLOCK),)
    with _device(x):
        _quantize_kernel[grid](
            xc,
            out,
            sp if sp is not None else xc,
            zpp if zpp is not None else xc,
            s,
            z,
            float(qmin),
            float(qmax),
            n,
            QP_PTR=sp is not None,
            BLOCK=_QUANT_BLOCK,
            num_warps=8,
        )
    return out


def _device(t: torch.Tensor):
    """The tensor's CUDA device as the current one (Triton launches on the current device); no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def int8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    a_zero: int,
    b_zero: int,
    *,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference's batched integer matmul (exact; float64 on the device): no Triton kernel for it yet."""
    return _api.int8_matmul(a, b, scale, a_zero, b_zero, out_dtype=out_dtype)


BACKEND = _api.register_backend(
    _api.Backend(
        "triton",
        quantize_static,
        int8_linear,
        int8_matmul,
        layernorm_quantize,
        activations=tuple(a for a in _ACT_CODE if a is not None),
        devices=("cuda",),
        available=torch.cuda.is_available,
    )
)
