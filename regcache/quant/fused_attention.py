"""Fused quantized attention: one Triton kernel per (batch·head, block of query rows).

The explicit attention materializes scores, softmax, fake-quantized probabilities and P·V in HBM
(the probabilities must be quantized, so SDPA / flash kernels cannot run it).
:func:`quantized_attention` walks the keys in tiles twice per block of query rows: a first pass
for the softmax's row max and sum, a second for the probabilities, their fake quantizer and P·V,
all in registers (``_triton_attention.py``): nothing of size N² reaches HBM, at the price of
computing q·kᵀ twice (cheap next to the per-probability work).

Numerics, two kinds (``KernelConfig.fused_attention_exact``). Fast (default): the explicit path computed in float32
registers (no rounding to the activation dtype between ops, reciprocals instead of divisions,
``exp2``), as Inductor computes a compiled explicit attention; for bfloat16 activations that is
more precise than the eager path, which rounds scores, probabilities and every quantizer op to
bfloat16, so codes near a boundary differ from eager's (RepQ-ViT's 4-bit log-√2 levels are a factor
√2 apart: one flipped top-level probability moves an output by up to ~30 %, docs/kernels.md).
Exact (``KernelConfig.fused_attention_exact``; ``REGCACHE_FUSED_ATTENTION_EXACT=1`` sets the default): the
eager ops with their rounding, op for op, slower
(BENCHMARKS.md §3). Either way the softmax is computed differently (online row sums), so a probability on a
quantization boundary can land on the neighbouring code: tests/test_fused_attention.py bounds the
fraction of flipped codes and the output difference in steps, the fast kernel against the
explicit path in float32, the exact one against the eager path. Float32 activations multiply in
TF32 where torch's own matmuls do (``torch.backends.cuda.matmul.allow_tf32``, set by
``torch.set_float32_matmul_precision("high")``, the CLI's default) and in full float32 otherwise:
full-float32 ``tl.dot`` runs on CUDA cores, many times the bf16 kernel's time (BENCHMARKS.md §3).

Probability quantizers handled in registers: none / ``float`` mode, :class:`UniformQuantizer`
(per tensor or per head, the formula of ``plain_fake_quant``), :class:`LogSqrt2Quantizer` (RepQ-ViT)
and :class:`TwinSoftmaxQuantizer` (PTQ4ViT, both variants). Q, K and V arrive already quantized
(``matmul_qk.quantize_a/b``, ``matmul_pv.quantize_b`` run outside, as in the explicit path). A
RegCache prefix adds full-precision key/value entries with a per-column logit bias ``ln τ``, the
probability quantized as ``p/τ`` then times τ.

On by default wherever it applies (CUDA inference with nothing observing the attention: no
calibration observers, hooks or autograd); ``KernelConfig.fused_attention`` false
(``regcache.kernels``; ``REGCACHE_FUSED_ATTENTION=0`` sets the default) or :func:`set_enabled` keeps the explicit
path, the reference numerics. Under ``torch.compile`` the
kernel runs as the custom op ``regcache::quantized_attention`` (opaque to Inductor, with a fake
implementation for tracing), so compiled graphs keep the fused attention without a graph break.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from regcache import kernels
from regcache.quant.log_quantizers import LogSqrt2Quantizer
from regcache.quant.modules import _same_key
from regcache.quant.quantizers import Quantizer, UniformQuantizer
from regcache.quant.twin_uniform import TwinSoftmaxQuantizer

if TYPE_CHECKING:
    from regcache.encoders.base import AttentionPrefix

HEAD_DIMS = (16, 32, 64, 128)


_LOG2E = 1.4426950408889634
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rounded_sqrt2_factor(dtype: torch.dtype) -> float:
    # ``1 + odd * (√2 - 1)`` of LogSqrt2Quantizer._level for odd codes, with the rounding of x's dtype
    one = torch.ones((), dtype=dtype)
    return float(1 + one * (math.sqrt(2) - 1))


# computed once here: under torch.compile tracing a host float from a tensor would break the graph
_SQRT2_FACTOR = {dt: _rounded_sqrt2_factor(dt) for dt in _DTYPE_CODES}


def enabled() -> bool:
    """Whether Attention.forward may use the fused kernel (``KernelConfig.fused_attention``, no fallback taken)."""
    return kernels.active("fused_attention")


@contextlib.contextmanager
def enabled_as(flag: bool) -> Iterator[None]:
    """Within the block the fused attention is on (``flag``) or off; the previous setting returns after it."""
    with kernels.kernel_config(fused_attention=bool(flag)):
        yield


def set_enabled(flag: bool) -> None:
    """Turn the fused attention on or off for this process (clears an earlier launch failure)."""
    kernels.set_kernel_config(fused_attention=bool(flag))


def _exact() -> bool:
    """``KernelConfig.fused_attention_exact``: the eager rounding op for op, or the fast float32 kernel."""
    return kernels.current().fused_attention_exact


# whether Triton is installed, known without importing it: supports() runs inside torch.compile
# traces, where a cached importing function draws a dynamo warning on every compile
_HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel() -> Any:
    """The kernel module, or None when Triton is unavailable (called from launch, outside dynamo's tracing)."""
    try:
        from regcache.quant import _triton_attention as k
    except (ImportError, AttributeError):  # pragma: no cover - depends on the install
        return None
    return k


def has_hooks(module: torch.nn.Module | None) -> bool:
    """Whether forward (pre-)hooks are registered on ``module`` itself (hooks read what the kernel skips)."""
    return module is not None and bool(
        module._forward_hooks or module._forward_pre_hooks or getattr(module, "_forward_hooks_with_kwargs", None)
    )


def prob_quantizer_spec(quantizer: Quantizer | None, dtype: torch.dtype) -> tuple[int, bool, float, float] | None:
    """``(kind, additive, c0, c1)`` of the probability quantizer as the kernel takes it, or None if unsupported."""
    if quantizer is None or quantizer.mode == "float":
        return 0, False, 0.0, 0.0
    if quantizer.mode != "quant" or has_hooks(quantizer):
        return None
    if isinstance(quantizer, UniformQuantizer) and type(quantizer)._fusable:
        if quantizer.scale.dtype != torch.float32 or quantizer.zero_point.dtype != torch.float32:
            return None
        if quantizer.granularity == "tensor" and quantizer.scale.numel() == 1:
            return 1, False, float(quantizer.qmin), float(quantizer.qmax)
        if quantizer.granularity == "channel" and quantizer.axis % 4 == 1 and quantizer.scale.ndim == 1:
            return 1, False, float(quantizer.qmin), float(quantizer.qmax)  # one step per head
        return None
    if type(quantizer) is LogSqrt2Quantizer and quantizer.scale.numel() == 1:
        return 2, False, _SQRT2_FACTOR[dtype], float(quantizer.num_nonzero_codes)
    if type(quantizer) is TwinSoftmaxQuantizer and quantizer.split.numel() == 1:
        return 3, bool(quantizer.additive_quirk), float(2 ** (quantizer.bits - 1) - 1), 0.0
    return None


def _prob_params(quantizer: Quantizer | None, kind: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The quantizer's tensor parameters, (nparam, 2) float32.

    Uniform: (scale, zero point); log-√2: (Δ in dtype, 0); twin: (split, split / levels), in dtype.
    """
    if kind == 1:
        return torch.stack([quantizer.scale.reshape(-1), quantizer.zero_point.reshape(-1)], -1).to(device)
    if kind == 2:
        delta = quantizer.scale.reshape(1).to(device=device, dtype=dtype).float()
        return torch.stack([delta, torch.zeros_like(delta)], -1)
    if kind == 3:
        split = quantizer.split.reshape(1).to(device=device, dtype=dtype)
        low_step = split / (2 ** (quantizer.bits - 1) - 1)
        return torch.stack([split.float(), low_step.float()], -1)
    return torch.zeros(1, 2, device=device)


def operand_fold(
    owner: torch.nn.Module,
    quantizers: tuple[Quantizer | None, ...],
    device: torch.device,
    rows: tuple[int, ...] = (0, 1, 2, 3),
) -> tuple[torch.Tensor, int] | None:
    """Quantizers the kernel applies in registers: ((4, 4) float32 [scale, zero point, qmin, qmax], bit mask).

    ``quantizers``: Q, K, V and optionally a fourth, the output projection's input quantizer (applied to
    the kernel's output). Bit ``1 << row`` is set for each row in ``rows`` whose quantizer is a plain
    per-tensor uniform one in quant mode; the caller applies every other quantizer itself (absent or
    float-mode ones are the identity). None when no bit is set. Folding saves the separate
    elementwise pass that writes the quantized tensor. Eager: the parameter tensor is built on the
    device (no host sync) and cached on ``owner`` until a quantizer's mode or tensors change; under
    ``torch.compile`` it is built in the graph (tensor versions cannot be read while tracing).
    """
    folded = []  # (row, quantizer) of the operands the kernel quantizes
    for row in rows:
        quantizer = quantizers[row] if row < len(quantizers) else None
        kind = prob_quantizer_spec(quantizer, torch.float32)  # the kernel's test of a plain uniform quantizer
        # absent / float mode: nothing to apply; log-√2, twin, one step per head, hooked: applied outside
        if kind is not None and kind[0] == 1 and quantizer.granularity == "tensor":
            folded.append((row, quantizer))
    if not folded:
        return None
    mask = sum(1 << row for row, _ in folded)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        key = tuple(
            v
            for row, q in folded
            for v in (row, q.scale, q.scale._version, q.zero_point, q.zero_point._version, q.qmin, q.qmax)
        )
        cached = getattr(owner, "_operand_fold_cache", None)
        if cached is not None and _same_key(cached[0], key):
            return cached[1], mask
    params = torch.zeros(4, 4, device=device)
    for row, q in folded:
        params[row, :2] = torch.stack([q.scale.reshape(()), q.zero_point.reshape(())])
        params[row, 2], params[row, 3] = float(q.qmin), float(q.qmax)  # fills: no host-to-device copy
    if not compiling:
        owner._operand_fold_cache = (key, params)
    return params, mask


def supports(q: torch.Tensor, prefix: AttentionPrefix | None, prob_quantizer: Quantizer | None) -> bool:
    """Whether :func:`quantized_attention` runs these (B, heads, N, head_dim) queries, prefix and quantizer."""
    if not (q.is_cuda or (_INTERPRET and q.device.type == "cpu")) or not _HAS_TRITON:
        return False
    if q.dtype not in _DTYPE_CODES or q.ndim != 4 or q.shape[-1] not in HEAD_DIMS:
        return False
    if torch.is_grad_enabled() and q.requires_grad:
        return False
    if prefix is not None and prefix.keys.shape[0] not in (1, q.shape[0]):
        return False
    spec = prob_quantizer_spec(prob_quantizer, q.dtype)
    if spec is None:
        return False
    return spec[0] != 1 or prob_quantizer.scale.numel() in (1, q.shape[1])


def _last_dim_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_keys: torch.Tensor | None,
    prefix_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    factor: torch.Tensor | None,
    qparams: torch.Tensor,
    kind: int,
    additive: bool,
    c0: float,
    c1: float,
    scale: float,
    block_m: int = 0,
    num_warps: int = 0,
    store_probs: bool = False,
    block_n: int = 0,
    exact: bool | None = None,
    operand_params: torch.Tensor | None = None,
    operand_mask: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel: (output (B, heads, N, D) laid out as (B, N, heads, D), quantized probabilities or None).

    ``exact`` None: ``KernelConfig.fused_attention_exact``. ``operand_params`` / ``operand_mask``: Q / K / V
    (and output) quantizers applied in the kernel (:func:`operand_fold`); q, k, v are then the unquantized operands.
    """
    kmod = _kernel()
    b, h, n, d = q.shape
    exact = _exact() if exact is None else bool(exact)
    npre = 0 if prefix_keys is None else prefix_keys.shape[-2]
    small = max(16, kmod.next_power_of_2(n))
    tile = kernels.current().fused_attention_tile
    block_m = block_m or min(tile[0], small)
    block_n = block_n or min(tile[1], small)
    num_warps = num_warps or 4
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    # (B, N, heads, D) storage: the caller's transpose(1, 2).reshape(B, N, heads·D) is then a view
    out = torch.empty(b, n, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    probs = torch.empty(b, h, n, npre + n, device=q.device, dtype=q.dtype) if store_probs else out
    if prefix_keys is None:
        pk = pv = q
        spk = spv = (0, 0, 0)
    else:
        pk, pv = _last_dim_dense(prefix_keys), _last_dim_dense(prefix_values)
        spk = (pk.stride(0) if pk.shape[0] > 1 else 0, pk.stride(1), pk.stride(2))
        spv = (pv.stride(0) if pv.shape[0] > 1 else 0, pv.stride(1), pv.stride(2))
    if bias is None:
        bias_t = fac_t = qparams
        sbias = 0
    else:
        bias_t, fac_t = bias.contiguous(), factor.contiguous()
        sbias = bias_t.stride(0) if bias_t.shape[0] > 1 else 0
    qparams = qparams.contiguous()
    grid = (b * h, kmod.cdiv(n, block_m))
    op_t = qparams if operand_params is None else operand_params.contiguous()  # not read when the mask is 0
    args = (q, k, v, pk, pv, bias_t, fac_t, qparams, op_t, out, probs, h, n, npre)
    args += (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    args += (v.stride(0), v.stride(1), v.stride(2), *spk, *spv, sbias)
    sm_scale = float(scale) if exact else float(scale) * _LOG2E  # fast: scores in log2 units, exp2 in the kernel
    args += (out.stride(0), out.stride(1), out.stride(2), qparams.shape[0], sm_scale, float(c0), float(c1))
    meta = {
        "D": d,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_P": max(16, kmod.next_power_of_2(npre)),
        "QKIND": kind,
        "ADDITIVE": additive,
        "HAS_PREFIX": prefix_keys is not None,
        "HAS_BIAS": bias is not None,
        "STORE_P": store_probs,
        "DT": _DTYPE_CODES[q.dtype],
        "IEEE": full_float32_products(q.dtype),
        "EXACT": exact,
        "QMASK": operand_mask if operand_params is not None else 0,
    }
    if q.is_cuda:
        with torch.cuda.device(q.device):
            kmod.quantized_attention_kernel[grid](*args, **meta, num_warps=num_warps)
    else:  # the Triton interpreter
        kmod.quantized_attention_kernel[grid](*args, **meta)
    return out, (probs if store_probs else None)


def full_float32_products(dtype: torch.dtype) -> bool:
    """Whether the kernel's products are full float32 (IEEE): float32 activations, unless torch allows TF32.

    The eager attention's matmuls follow ``torch.backends.cuda.matmul.allow_tf32``; the kernel does the
    same, so a float32 model run at matmul precision "high" gets TF32 products in both paths.
    """
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


@torch.library.custom_op("regcache::quantized_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_keys: torch.Tensor | None,
    prefix_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    factor: torch.Tensor | None,
    qparams: torch.Tensor,
    kind: int,
    additive: bool,
    c0: float,
    c1: float,
    scale: float,
    block_m: int,
    num_warps: int,
    block_n: int,
    exact: bool,
    operand_params: torch.Tensor | None,
    operand_mask: int,
) -> torch.Tensor:
    out, _ = launch(
        q, k, v, prefix_keys, prefix_values, bias, factor, qparams, kind, additive, c0, c1, scale, block_m, num_warps,
        block_n=block_n, exact=exact, operand_params=operand_params, operand_mask=operand_mask,
    )  # fmt: skip
    return out


@_attention_op.register_fake
def _(
    q, k, v, prefix_keys, prefix_values, bias, factor, qparams, kind, additive, c0, c1, scale, bm, nw, bn, ex, op, om
):
    b, h, n, d = q.shape
    return q.new_empty(b, n, h, d).transpose(1, 2)


def prepare(
    q: torch.Tensor,
    scale: float,
    prob_quantizer: Quantizer | None = None,
    prefix: AttentionPrefix | None = None,
    exact: bool | None = None,
) -> tuple[tuple, dict[str, Any]]:
    """The tensors and constants the kernel takes for these queries, quantizer and prefix (see :func:`launch`).

    Exact: parameters rounded to q's dtype as the eager quantizers use them; fast: in float32, the
    quantizers' own values (the fast kernel is the explicit path computed in float32).
    """
    exact = _exact() if exact is None else bool(exact)
    work = q.dtype if exact else torch.float32
    kind, additive, c0, c1 = prob_quantizer_spec(prob_quantizer, work)
    qparams = _prob_params(prob_quantizer, kind, work, q.device)
    pk = pv = bias = factor = None
    if prefix is not None:
        pk, pv = prefix.keys.to(q.dtype), prefix.values.to(q.dtype)  # register keys / values stay full precision
        lm = prefix.entry_log_multiplicity()
        if lm is not None:  # the explicit path's per-column bias ln τ and factor τ, in the working dtype
            lm = lm.reshape(lm.shape[0], prefix.num_entries)
            bias = lm.to(work).float()
            factor = (lm.exp().to(q.dtype) if exact else lm.float().exp()).float()
    consts = {"kind": kind, "additive": additive, "c0": c0, "c1": c1, "scale": float(scale)}
    return (pk, pv, bias, factor, qparams), consts


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    prob_quantizer: Quantizer | None = None,
    prefix: AttentionPrefix | None = None,
    block_m: int = 0,
    num_warps: int = 0,
    block_n: int = 0,
    exact: bool | None = None,
    operand_fold: tuple[torch.Tensor, int] | None = None,
    checked: bool = False,
) -> torch.Tensor | None:
    """Q_p(softmax(q kᵀ · scale [+ ln τ])) · v over [prefix; tokens] in one kernel, or None where it does not apply.

    q, k, v: (B, heads, N, head_dim), already through their matmul quantizers, or raw with
    ``operand_fold`` (:func:`operand_fold`: the kernel quantizes them in registers). The output has
    q's shape and dtype (stored as (B, N, heads, head_dim): transposing it back is a free view).
    ``exact`` None: ``KernelConfig.fused_attention_exact`` (the eager rounding; False: Inductor-like float32 registers).
    ``checked``: the caller has just run :func:`supports` on these queries, prefix and quantizer.
    """
    if not checked and not supports(q, prefix, prob_quantizer):
        return None
    exact = _exact() if exact is None else bool(exact)
    (pk, pv, bias, factor, qparams), c = prepare(q, scale, prob_quantizer, prefix, exact)
    args = (q, k.to(q.dtype), v.to(q.dtype), pk, pv, bias, factor, qparams)
    op_params, op_mask = operand_fold if operand_fold is not None else (None, 0)
    consts = (c["kind"], c["additive"], c["c0"], c["c1"], c["scale"], block_m, num_warps, block_n, exact)
    consts += (op_params, op_mask)
    if torch.compiler.is_compiling():
        return _attention_op(*args, *consts)
    try:
        return _attention_op(*args, *consts)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # a compile or launch failure: explicit attention from now on
        kernels.record_fallback("fused_attention", repr(exc))
        return None


def attention_observed(attn: torch.nn.Module) -> bool:
    """Whether a hook reads this Attention's probabilities, matmuls or matmul quantizers (global hooks included)."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return True
    modules = (attn.tap_probs, attn.matmul_qk, attn.matmul_pv, *attn.matmul_quantizers())
    return any(has_hooks(m) for m in modules)


def attention_fusable(attn: torch.nn.Module) -> bool:
    """Whether nothing on this Attention needs the explicit path (hooks on taps / matmuls / quantizers, observers)."""
    if not enabled() or attention_observed(attn):
        return False
    return all(q.mode != "observe" for q in attn.matmul_quantizers())


__all__ = [
    "attention_fusable",
    "attention_observed",
    "enabled",
    "enabled_as",
    "has_hooks",
    "launch",
    "operand_fold",
    "prepare",
    "quantized_attention",
    "set_enabled",
    "supports",
]
