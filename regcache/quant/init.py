"""Scale initialisation helpers: exact quantiles of any size and the percentile / MSE search.

``torch.quantile`` refuses inputs above 2^24 elements in older torch releases (a ViT-B fc2 input over 32 images is
larger). :func:`quantiles` computes the same linear-interpolation quantiles from the order
statistics near the tail that holds them (``topk``), so it has no size limit and stays cheap for
the tail percentiles the PTQ methods use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from regcache.quant.quantizers import UniformQuantizer

REPQ_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)  # RepQ-ViT's candidate set


def _order_statistics(x: torch.Tensor, ranks: Sequence[int]) -> dict[int, torch.Tensor]:
    """The rank-r smallest value (0-based) of each row of x (..., n), for every r in ranks."""
    n = x.shape[-1]
    out: dict[int, torch.Tensor] = {}
    high = sorted({r for r in ranks if r >= n // 2})
    low = sorted({r for r in ranks if r < n // 2})
    if high:  # descending top-k: position j holds rank n-1-j
        top = x.topk(n - high[0], dim=-1, largest=True, sorted=True).values
        out.update({r: top[..., n - 1 - r] for r in high})
    if low:  # ascending bottom-k: position j holds rank j
        bottom = x.topk(low[-1] + 1, dim=-1, largest=False, sorted=True).values
        out.update({r: bottom[..., r] for r in low})
    return out


def quantiles(x: torch.Tensor, qs: Sequence[float]) -> torch.Tensor:
    """Quantiles of each row of x (..., n) with linear interpolation (``torch.quantile``'s default).

    Returns a tensor of shape (len(qs), ...). Works for any n (no 2^24 limit).
    """
    n = x.shape[-1]
    positions = [q * (n - 1) for q in qs]
    ranks = [int(p // 1) for p in positions] + [min(int(p // 1) + 1, n - 1) for p in positions]
    stats = _order_statistics(x, ranks)
    rows = []
    for p in positions:
        lo = int(p // 1)
        hi = min(lo + 1, n - 1)
        frac = p - lo
        rows.append(torch.lerp(stats[lo], stats[hi], torch.full_like(stats[lo], frac)))
    return torch.stack(rows)


def affine_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric fake quantization with codes in [0, 2^b - 1] (scale/zero_point broadcast against x)."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale


def percentile_affine_search(
    rows: torch.Tensor, bits: int, percentiles: Sequence[float] = REPQ_PERCENTILES, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's uniform init: for each row, clip to the [1-p, p] percentiles and keep the p of least MSE.

    ``rows``: (R, n). Returns (scale, zero_point), each of shape (R,); zero points are the
    integer ``round(-lo / scale)`` and may fall outside the code range (as in the reference).
    Ties keep the earlier candidate.
    """
    rows = rows.detach().float()
    qs = list(percentiles) + [1.0 - p for p in percentiles]
    qv = quantiles(rows, qs)
    k = len(percentiles)
    best_err = best_scale = best_zp = None
    for i in range(k):
        hi, lo = qv[i], qv[k + i]
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(eps)
        zp = torch.round(-lo / scale)
        err = (affine_fake_quant(rows, scale[:, None], zp[:, None], bits) - rows).pow(2).mean(dim=1)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def official_quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D float32 tensor exactly as the official RepQ-ViT code gets it.

    ``torch.quantile`` (whose rank ``q (n - 1)`` is computed in float32, so it can land on another
    pair of order statistics than the exact rank) where it accepts the size (older torch releases refuse
    more than 2^24 elements), else numpy's ``percentile`` (float64 ranks) cast to float32: the
    official ``try`` / ``except``.
    """
    try:
        return torch.quantile(flat, q)
    except RuntimeError:
        pass
    value = np.percentile(flat.detach().cpu().numpy(), q * 100)
    return torch.tensor(value, device=flat.device, dtype=torch.float32)


def official_affine_search(
    x: torch.Tensor, bits: int, percentiles: Sequence[float] = REPQ_PERCENTILES
) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's per-tensor percentile / MSE search op for op as the official code (bit-identical).

    Candidates clip to the [1 - p, p] quantiles (:func:`official_quantile`); the score is the mean
    of ``|x - Q(x)|^2`` over the flattened tensor; a candidate replaces the best only when strictly
    better, starting from a score of 1e10. Returns 0-dim (scale, zero point); zero points are
    ``round(-lo / scale)`` (may fall outside the code range, as in the official code).
    """
    flat = x.detach().float().contiguous().reshape(-1)
    levels = 2**bits
    best_score, best = 1e10, None
    for p in percentiles:
        hi, lo = official_quantile(flat, p), official_quantile(flat, 1.0 - p)
        scale = (hi - lo) / (levels - 1)
        zp = (-lo / scale).round()
        q = torch.clamp(torch.round(flat / scale) + zp, 0, levels - 1)
        score = (flat - (q - zp) * scale).abs().pow(2.0).mean()
        if score < best_score:
            best_score, best = score, (scale, zp)
    if best is None:  # every candidate gave NaN (a constant tensor): its one value, exactly
        scale = flat.abs().amax().clamp_min(1e-8) / (levels - 1)
        best = (scale, (-flat.amin() / scale).round())
    return best


def official_channel_search(
    x: torch.Tensor, bits: int, axis: int, percentiles: Sequence[float] = REPQ_PERCENTILES
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`official_affine_search` on each index of ``axis`` in turn (the official channel loop), shape (C,)."""
    results = [official_affine_search(x.select(axis, c), bits, percentiles) for c in range(x.shape[axis])]
    return torch.stack([s for s, _ in results]), torch.stack([z for _, z in results])


def quantizer_rows(quantizer: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
    """x as (parameters, elements): one row per scale of the quantizer's granularity."""
    if quantizer.granularity == "tensor":
        return x.reshape(1, -1)
    if quantizer.granularity == "channel":
        axis = quantizer.axis % x.ndim
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    raise NotImplementedError("percentile init supports per-tensor and per-channel quantizers")


@torch.no_grad()
def percentile_calibrate_(
    quantizer: UniformQuantizer,
    x: torch.Tensor,
    percentiles: Sequence[float] = REPQ_PERCENTILES,
    official_arithmetic: bool = False,
) -> UniformQuantizer:
    """Set an asymmetric :class:`UniformQuantizer`'s scale and zero point by the percentile/MSE search on x.

    ``official_arithmetic``: one :func:`official_affine_search` per channel (bit-identical to the
    official RepQ-ViT code, slower); else all channels at once with exact quantile ranks.
    """
    if quantizer.symmetric:
        raise ValueError("the percentile search sets asymmetric (scale, zero point) pairs")
    if quantizer.granularity not in ("tensor", "channel"):
        raise NotImplementedError("percentile init supports per-tensor and per-channel quantizers")
    if official_arithmetic and quantizer.granularity == "tensor":
        scale, zp = official_affine_search(x, quantizer.bits, percentiles)
    elif official_arithmetic:
        scale, zp = official_channel_search(x, quantizer.bits, quantizer.axis % x.ndim, percentiles)
    else:
        scale, zp = percentile_affine_search(quantizer_rows(quantizer, x), quantizer.bits, percentiles)
        if quantizer.granularity == "tensor":
            scale, zp = scale[0], zp[0]
    quantizer.set_scale(scale, zp)
    return quantizer


__all__ = [
    "REPQ_PERCENTILES",
    "affine_fake_quant",
    "official_affine_search",
    "official_channel_search",
    "official_quantile",
    "percentile_affine_search",
    "percentile_calibrate_",
    "quantiles",
    "quantizer_rows",
]
