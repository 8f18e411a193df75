"""PTQ4ViT's quantizers: uniform steps per chunk, and the two twin uniform quantizers.

- :class:`ChunkedUniformQuantizer`: symmetric signed uniform with one step per equal chunk of an
  axis (PTQ4ViT's qkv weight has three steps: the q, k and v rows).
- :class:`TwinSoftmaxQuantizer`: post-softmax values in [0, 1] split at ``s`` into a fine range
  [0, s) (step ``s / (2^(k-1) - 1)``) and a coarse range [s, 1] (step ``1 / (2^(k-1) - 1)``); one
  bit picks the range, k-1 bits the level. The steps follow hahnyuan/PTQ4ViT's code.
- :class:`TwinGeluQuantizer`: post-GELU values; the negative range has the fixed step
  ``0.16997 / 2^(k-1)`` (GELU's minimum is about -0.17), the positive range a searched step.

The pure ``fake_*`` functions broadcast their step/split arguments, so the scale search can
evaluate many candidates at once with exactly the arithmetic the quantizer modules use.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from regcache.quant.quantizers import Quantizer, UniformQuantizer, round_ste

# |min_x GELU(x)| as hahnyuan/PTQ4ViT hard-codes it (QuickGELU's minimum, -0.1636, lies inside).
GELU_NEG_RANGE = 0.16997124254703522


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, straight-through when gradients are tracked."""
    return round_ste(x) if x.requires_grad else torch.round(x)


def fake_uniform(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / step), qmin, qmax) * step`` with ``step`` broadcast against x."""
    if x.requires_grad or step.requires_grad:
        return torch.clamp(_round(x / step), qmin, qmax) * step
    # the same operations in place on the one (candidates x data) result: on a CPU the allocation of
    # each temporary costs about as much as the pass that fills it
    return torch.div(x, step).round_().clamp_(qmin, qmax).mul_(step)


def fake_twin_softmax(x: torch.Tensor, split: torch.Tensor, bits: int, additive: bool = False) -> torch.Tensor:
    """Twin uniform fake quantization of values in [0, 1] split at ``split`` (broadcast against x).

    ``additive=False``: disjoint ranges (the paper). ``additive=True``: hahnyuan/PTQ4ViT's code,
    which sums both branches without masking, so values below the split gain
    ``round(split * (2^(k-1)-1)) / (2^(k-1)-1)`` and values at or above it gain ``split``.
    """
    levels = 2 ** (bits - 1) - 1
    split = split.to(x.dtype)
    low_step = split / levels
    if additive:
        high = torch.clamp(_round(torch.maximum(torch.minimum(x, x.new_ones(())), split) * levels), 0, levels) / levels
        low = torch.clamp(_round(torch.minimum(x.clamp_min(0), split) / low_step), 0, levels) * low_step
        return high + low
    high = torch.clamp(_round(x * levels), 0, levels) / levels
    low = torch.clamp(_round(x / low_step), 0, levels) * low_step
    return torch.where(x < split, low, high)


def twin_softmax_codes(x: torch.Tensor, split: float, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(range bit, level) of each value under the disjoint twin softmax quantizer."""
    levels = 2 ** (bits - 1) - 1
    upper = x >= split
    code = torch.where(upper, torch.round(x * levels), torch.round(x / (split / levels)))
    return upper, code.clamp(0, levels).long()


def fake_twin_gelu(x: torch.Tensor, pos_step: torch.Tensor, neg_step: torch.Tensor, bits: int) -> torch.Tensor:
    """Post-GELU twin uniform: levels ``0..2^(k-1)-1`` of ``pos_step`` (x >= 0), ``-2^(k-1)..0`` of ``neg_step``.

    Equal to the reference's sum of a positive and a negative branch: each branch is exactly
    zero on the other side of 0, so one step per sign and one clamp give the same values.
    """
    half = 2 ** (bits - 1)
    step = torch.where(x >= 0, pos_step, neg_step)
    if x.requires_grad or step.requires_grad:
        return torch.clamp(_round(x / step), -half, half - 1) * step
    return torch.div(x, step).round_().clamp_(-half, half - 1).mul_(step)  # in place, as fake_uniform


def twin_gelu_codes(x: torch.Tensor, pos_step: float, neg_step: float, bits: int) -> torch.Tensor:
    """Signed integer code of each value: positive levels count ``pos_step``, negative ones ``neg_step``."""
    half = 2 ** (bits - 1)
    return torch.where(
        x >= 0, torch.round(x / pos_step).clamp(0, half - 1), torch.round(x / neg_step).clamp(-half, 0)
    ).long()


class ChunkedUniformQuantizer(UniformQuantizer):
    """Symmetric signed uniform quantizer with one step per equal chunk of ``axis``.

    ``chunks=3, axis=0`` on a qkv weight gives PTQ4ViT's separate q, k and v steps.
    """

    kind: ClassVar[str] = "uniform_chunked"

    def __init__(self, bits: int, chunks: int, axis: int = 0) -> None:
        super().__init__(bits, symmetric=True, granularity="channel", axis=axis)
        self.granularity = "chunk"  # type: ignore[assignment]  (shape logic overridden below)
        self.chunks = chunks

    def _chunked(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.ndim
        if x.shape[axis] % self.chunks:
            raise ValueError(f"dim {axis} of size {x.shape[axis]} does not split into {self.chunks} chunks")
        return x.movedim(axis, 0).reshape(self.chunks, -1)

    def _reduce_minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xc = self._chunked(x)
        return xc.amin(dim=1), xc.amax(dim=1)

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        return p.repeat_interleave(x.shape[axis] // self.chunks).reshape(shape)

    def describe(self) -> dict[str, Any]:
        """Kind, bits and the chunking (count and axis) instead of the parent's channel granularity."""
        return {"kind": self.kind, "bits": self.bits, "symmetric": True, "chunks": self.chunks, "axis": self.axis}


class TwinSoftmaxQuantizer(Quantizer):
    """Twin uniform quantizer for attention probabilities; ``split`` (a power of two) is searched."""

    kind: ClassVar[str] = "twin_softmax"

    def __init__(self, bits: int, additive_quirk: bool = False) -> None:
        super().__init__(bits)
        self.additive_quirk = additive_quirk
        self.register_buffer("split", torch.empty(0))

    @property
    def is_calibrated(self) -> bool:
        """True once the split was set (by PTQ4ViT's search through :meth:`set_split`)."""
        return self.split.numel() > 0

    def set_split(self, split: torch.Tensor | float) -> None:
        """Set the boundary s between the fine range [0, s) and the coarse range [s, 1]."""
        self.split = torch.as_tensor(split, dtype=torch.float32, device=self.split.device).reshape(())

    def observe(self, x: torch.Tensor) -> None:
        """Not supported: the split is searched by PTQ4ViT's calibration, so observing always raises."""
        raise NotImplementedError("the twin softmax split is searched (PTQ4ViT calibration), not observed")

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Twin uniform fake quantization of probabilities at the searched split (optionally the additive quirk)."""
        return fake_twin_softmax(x, self.split, self.bits, additive=self.additive_quirk)

    def describe(self) -> dict[str, Any]:
        """The base summary plus the twin ranges and whether the reference code's additive quirk is used."""
        return {**super().describe(), "ranges": "twin", "additive_quirk": self.additive_quirk}


class TwinGeluQuantizer(Quantizer):
    """Twin uniform quantizer for post-GELU activations (fc2 input): fixed negative step, searched positive step."""

    kind: ClassVar[str] = "twin_gelu"

    def __init__(self, bits: int, neg_range: float = GELU_NEG_RANGE) -> None:
        super().__init__(bits)
        self.neg_range = neg_range
        self.register_buffer("pos_scale", torch.empty(0))
        self.register_buffer("neg_scale", torch.empty(0))

    @property
    def is_calibrated(self) -> bool:
        """True once both the positive and the negative step were set (:meth:`set_steps`)."""
        return self.pos_scale.numel() > 0 and self.neg_scale.numel() > 0

    @property
    def default_neg_step(self) -> float:
        """The fixed negative step, |GELU min| / 2^(k-1)."""
        return self.neg_range / 2 ** (self.bits - 1)

    def set_steps(self, pos_step: torch.Tensor | float, neg_step: torch.Tensor | float | None = None) -> None:
        """Set the positive step (and the negative one, default |GELU min| / 2^(k-1))."""
        dev = self.pos_scale.device
        neg = self.default_neg_step if neg_step is None else neg_step
        self.pos_scale = torch.as_tensor(pos_step, dtype=torch.float32, device=dev).reshape(()).clamp_min(1e-8)
        self.neg_scale = torch.as_tensor(neg, dtype=torch.float32, device=dev).reshape(())

    def observe(self, x: torch.Tensor) -> None:
        """Not supported: the positive step is searched by PTQ4ViT's calibration, so observing always raises."""
        raise NotImplementedError("the post-GELU step is searched (PTQ4ViT calibration), not observed")

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize post-GELU values with the positive step for x >= 0 and the fixed negative step below."""
        return fake_twin_gelu(x, self.pos_scale.to(x.dtype), self.neg_scale.to(x.dtype), self.bits)

    def describe(self) -> dict[str, Any]:
        """The base summary plus the twin ranges and the negative range the fixed step is derived from."""
        return {**super().describe(), "ranges": "twin", "neg_range": self.neg_range}


__all__ = [
    "GELU_NEG_RANGE",
    "ChunkedUniformQuantizer",
    "TwinGeluQuantizer",
    "TwinSoftmaxQuantizer",
    "fake_twin_gelu",
    "fake_twin_softmax",
    "fake_uniform",
    "twin_gelu_codes",
    "twin_softmax_codes",
]
