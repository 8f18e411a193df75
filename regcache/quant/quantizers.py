"""Fake quantizers: uniform (symmetric / asymmetric; per-tensor, per-channel, per-group).

Every quantizer is an ``nn.Module`` with three modes:

- ``float``: identity (the model runs in full precision),
- ``observe``: identity, but statistics of the input are accumulated (static calibration),
- ``quant``: the input is fake-quantized (quantize → dequantize) with straight-through rounding.

Quantization parameters live in buffers, so a calibrated model is saved and restored by its
``state_dict`` (see :mod:`regcache.quant.state`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from regcache.quant.fused import fake_quant_uniform

Mode = Literal["float", "observe", "quant"]
Granularity = Literal["tensor", "channel", "group"]
MODES: tuple[str, ...] = ("float", "observe", "quant")
QUANTIZERS: dict[str, type[Quantizer]] = {}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


class Quantizer(nn.Module):
    """Base class: mode switching, resizable buffers and a registry of subclasses."""

    kind: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind != "base":
            QUANTIZERS[cls.kind] = cls

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in [2, 16], got {bits}")
        self.bits = bits
        self.mode: Mode = "float"

    def set_mode(self, mode: Mode) -> None:
        """Switch between ``float``, ``observe`` and ``quant``."""
        if mode not in MODES:
            raise ValueError(f"unknown quantizer mode {mode!r}; choose one of {MODES}")
        if mode == "quant" and not self.is_calibrated:
            raise RuntimeError(
                f"{self.__class__.__name__} has no quantization parameters yet: observe data "
                "(mode='observe') and call finalize(), or calibrate it, before mode='quant'"
            )
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x in ``quant`` mode; otherwise pass it through, recording statistics in ``observe`` mode."""
        if self.mode == "quant":
            return self.fake_quant(x)
        if self.mode == "observe":
            self.observe(x.detach())
        return x

    # subclasses implement these
    @property
    def is_calibrated(self) -> bool:
        """Whether quantization parameters exist, i.e. ``quant`` mode is allowed."""
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate calibration statistics of x (turned into parameters by :meth:`finalize`)."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Turn observed statistics into quantization parameters."""
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize then dequantize x with the calibrated parameters (straight-through gradient)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (kind, bits, granularity ...) for coverage manifests."""
        return {"kind": self.kind, "bits": self.bits}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Buffers start empty and take their shape from the calibration; accept any saved shape
        # (on the incoming tensor's device: an empty buffer may still sit where it was created).
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            # (an inference tensor, made by a transform inside inference mode, cannot be copied into either)
            if key in state_dict and buf is not None and (buf.shape != state_dict[key].shape or buf.is_inference()):
                self._buffers[name] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class UniformQuantizer(Quantizer):
    """Uniform affine fake quantizer.

    ``symmetric``: signed levels ``[-2^(b-1), 2^(b-1) - 1]``, zero point 0, ``scale = absmax / (2^(b-1)-1)``.
    Asymmetric: levels ``[0, 2^b - 1]``, range widened to include 0, integer zero point.
    ``granularity="channel"`` keeps one scale per index of ``axis``; ``"group"`` one scale per
    ``group_size`` consecutive elements of the last dimension for every index of the other dims
    of a 2-D weight (per output channel and group).
    """

    kind: ClassVar[str] = "uniform"
    # Whether fake_quant may use the fused CUDA kernel (regcache.quant.fused): not for subclasses
    # that change how parameters broadcast or the formula itself.
    _fusable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fusable = all(
            getattr(cls, m) is getattr(UniformQuantizer, m) for m in ("_broadcast", "_grouped", "plain_fake_quant")
        )

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        granularity: Granularity = "tensor",
        axis: int = 0,
        group_size: int | None = None,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(bits)
        if granularity not in ("tensor", "channel", "group"):
            raise ValueError(f"granularity must be tensor, channel or group, got {granularity!r}")
        if granularity == "group" and not group_size:
            raise ValueError("granularity='group' needs group_size")
        self.symmetric = symmetric
        self.granularity = granularity
        self.axis = axis
        self.group_size = group_size
        self.eps = eps
        if symmetric:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            self.qmin, self.qmax = 0, 2**bits - 1
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def is_calibrated(self) -> bool:
        """True once a scale was set (by :meth:`finalize`, :meth:`set_range` or :meth:`set_scale`)."""
        return self.scale.numel() > 0

    # ---- shapes -------------------------------------------------------------------------
    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View x so that the reduction dims are contiguous: (..., groups, group_size)."""
        if x.shape[-1] % self.group_size:
            raise ValueError(f"last dim {x.shape[-1]} is not divisible by group_size {self.group_size}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)

    def _reduce_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.granularity == "tensor":
            return x.amin(), x.amax()
        if self.granularity == "channel":
            axis = self.axis % x.ndim
            xt = x.movedim(axis, 0).reshape(x.shape[axis], -1)
            return xt.amin(dim=1), xt.amax(dim=1)
        g = self._grouped(x)
        return g.amin(dim=-1), g.amax(dim=-1)

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "tensor":
            return p
        if self.granularity == "channel":
            shape = [1] * x.ndim
            shape[self.axis % x.ndim] = -1
            return p.reshape(shape)
        return p.unsqueeze(-1)

    # ---- calibration -------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Widen the running min / max of x at this quantizer's granularity (per tensor, channel or group)."""
        if self.granularity == "tensor" and type(self)._reduce_minmax is UniformQuantizer._reduce_minmax:
            # min and max are exact: reducing before the cast gives the same numbers, in one pass over x
            # and without a float32 copy of it (attention probabilities are the largest activations)
            lo, hi = (t.float() for t in torch.aminmax(x))
        else:
            lo, hi = self._reduce_minmax(x.float())
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def reset_observer(self) -> None:
        """Forget accumulated statistics."""
        self.min_val, self.max_val = torch.empty(0), torch.empty(0)

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set quantization parameters from a clipping range [lo, hi] (tensors of the param shape)."""
        lo, hi = torch.as_tensor(lo).float(), torch.as_tensor(hi).float()
        self.scale, self.zero_point = self._range_params(lo, hi, self.symmetric, self.qmin, self.qmax, self.eps)

    def set_scale(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Set the step size (and zero point) directly, e.g. from a search."""
        scale = torch.as_tensor(scale).float().clamp_min(self.eps)
        self.scale = scale
        self.zero_point = torch.zeros_like(scale) if zero_point is None else torch.as_tensor(zero_point).float()

    def finalize(self) -> None:
        """Min-max calibration: scale and zero point from the observed range; raises if nothing was observed."""
        if self.min_val.numel() == 0:
            raise RuntimeError("finalize() called before any data was observed")
        self.set_range(self.min_val, self.max_val)

    @staticmethod
    def _range_params(
        lo: torch.Tensor, hi: torch.Tensor, symmetric: bool, qmin: int, qmax: int, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of the clipping range [lo, hi], elementwise (the arithmetic of ``set_range``)."""
        if symmetric:
            absmax = torch.maximum(lo.abs(), hi.abs())
            scale = (absmax / qmax).clamp_min(eps)
            return scale, torch.zeros_like(scale)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        return scale, (qmin - lo / scale).round().clamp(qmin, qmax)

    def calibrate_(self, x: torch.Tensor) -> UniformQuantizer:
        """Min-max calibration from one tensor (weights), replacing earlier statistics."""
        self.reset_observer()
        self.observe(x.detach())
        self.finalize()
        return self

    # ---- quantization ------------------------------------------------------------------
    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x in float32, through the fused CUDA kernel where it applies, else op by op."""
        # Computed in float32 whatever x's dtype: a bf16 scale would move the grid by up to 0.4 %.
        if self._fusable and x.is_cuda and not torch.compiler.is_compiling() and not self.scale.requires_grad:
            # CUDA, eager, no autograd: one kernel with exactly the arithmetic of plain_fake_quant
            out = fake_quant_uniform(
                x, self.scale, self.zero_point, self.qmin, self.qmax, self.granularity, self.axis, self.group_size
            )
            if out is not None:
                return out
        return self.plain_fake_quant(x)

    def plain_fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The fake quantization formula op by op (what the fused CUDA kernel must reproduce bit for bit)."""
        shape, dtype = x.shape, x.dtype
        x = x.float()
        if self.granularity == "group":
            x = self._grouped(x)
        scale, zp = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        scaled = x / scale
        # straight-through rounding wherever a gradient flows, also to a learned step alone (LSQ: x has none)
        rounded = round_ste(scaled) if scaled.requires_grad else torch.round(scaled)
        q = torch.clamp(rounded + zp, self.qmin, self.qmax)
        return ((q - zp) * scale).reshape(shape).to(dtype)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (for inspection and tests)."""
        shape = x.shape
        if self.granularity == "group":
            x = self._grouped(x)
        scale, zp = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax).reshape(shape).long()

    def describe(self) -> dict[str, Any]:
        """The base summary plus symmetry and granularity (with the axis or group size it uses)."""
        d = {**super().describe(), "symmetric": self.symmetric, "granularity": self.granularity}
        if self.granularity == "channel":
            d["axis"] = self.axis
        if self.granularity == "group":
            d["group_size"] = self.group_size
        return d

    def extra_repr(self) -> str:
        """The :meth:`describe` fields (less kind) and the current mode, for ``print(model)``."""
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind") + f", mode={self.mode}"


def finalize_all(quantizers: list[Quantizer]) -> None:
    """``q.finalize()`` for every quantizer; plain per-tensor uniform ones share one vectorized computation.

    The scale / zero-point arithmetic is elementwise, so computing it on the stacked ranges gives
    every quantizer the same numbers as its own ``finalize`` (tested), in a handful of kernels
    instead of about ten per quantizer (a search re-calibrates ~1,000 times).
    """
    groups: dict[tuple[Any, ...], list[UniformQuantizer]] = {}
    for q in quantizers:
        if (
            isinstance(q, UniformQuantizer)
            and type(q).finalize is UniformQuantizer.finalize
            and type(q).set_range is UniformQuantizer.set_range
            and q.min_val.ndim == 0
            and q.max_val.ndim == 0
            and q.min_val.dtype == q.max_val.dtype == torch.float32
        ):
            key = (q.symmetric, q.qmin, q.qmax, q.eps, q.min_val.device)
            groups.setdefault(key, []).append(q)
        else:
            q.finalize()
    for (symmetric, qmin, qmax, eps, _), qs in groups.items():
        lo = torch.stack([q.min_val for q in qs])
        hi = torch.stack([q.max_val for q in qs])
        scale, zero_point = UniformQuantizer._range_params(lo, hi, symmetric, qmin, qmax, eps)
        for q, s, z in zip(qs, scale.unbind(), zero_point.unbind(), strict=True):
            q.scale, q.zero_point = s.clone(), z.clone()  # own storage, as finalize's (state files refuse shared)


def quantization_error(x: torch.Tensor, quantizer: Quantizer) -> float:
    """Relative L2 error ||Q(x) - x|| / ||x|| of a calibrated quantizer on x."""
    err = (quantizer.fake_quant(x) - x).norm() / x.norm().clamp_min(1e-12)
    return float(err) if math.isfinite(float(err)) else float("inf")
