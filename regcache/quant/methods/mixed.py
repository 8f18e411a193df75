"""Mixed precision from the sensitivity sweep: a base method everywhere but the n most sensitive blocks.

The fallback deployment when a whole-model W4A4 fails: the ``keep`` blocks whose quantization alone
hurts most (:func:`regcache.registers.sweep.sensitivity_sweep` with the base method, scored by the
label-free embedding cosine to the float model on the calibration images) stay in float
(``keep_bits=None``) or take the base method at ``keep_bits``; every other block gets the base method
at the config's bits. ``blocks`` names the kept blocks directly; left None, calibration runs the sweep
and fills it in, so the saved state's config names them and reloads without another sweep.

The calibration summary (``encoder.calibration_summary``, saved with the state, in metrics.json under
``calibration.summary``) gives the kept blocks, their sweep drops and their share of the blocks' FLOPs
(:func:`regcache.registers.overhead.block_flops` at the calibration images' token count).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from regcache.quant.api import METHODS, FilterFn, MethodConfigError, QuantConfig, method_config
from regcache.quant.calibration import iter_images
from regcache.quant.modules import quantizers

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder

QUANTIZER_SLOTS = ("weight_quantizer", "input_quantizer", "a_quantizer", "b_quantizer")


def strip_quantizers(module: nn.Module, prefixes: tuple[str, ...] | None = None) -> None:
    """Remove every quantizer below ``module`` (or below the named submodule prefixes): those layers run float."""
    for name, m in module.named_modules():
        if prefixes is None or any(name == p.rstrip(".") or name.startswith(p) for p in prefixes):
            for slot in QUANTIZER_SLOTS:
                if getattr(m, slot, None) is not None:
                    setattr(m, slot, None)


def flop_share(encoder: VisionEncoder, blocks: Iterable[int], num_tokens: int) -> float:
    """The kept blocks' share of all blocks' FLOPs per image at ``num_tokens`` tokens."""
    from regcache.registers.overhead import block_flops  # registers import quant: imported on use

    total = sum(block_flops(encoder, layer, num_tokens) for layer in range(encoder.num_blocks))
    return sum(block_flops(encoder, layer, num_tokens) for layer in blocks) / total


@dataclass
class MixedPrecisionConfig(QuantConfig):
    """A base method with the n most sensitive blocks (by the sensitivity sweep) kept in float or at higher bits."""

    name = "mixed"
    base: str = "naive"
    base_options: dict[str, Any] = field(default_factory=dict)
    keep: int = 1
    keep_bits: int | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base not in METHODS or self.base == self.name:
            raise MethodConfigError(f"mixed.base must be a base method: one of {sorted(set(METHODS) - {self.name})}")
        if self.keep < 0:
            raise ValueError(f"mixed.keep is a number of blocks, >= 0; got {self.keep}")
        if self.keep_bits is not None and not max(self.w_bits, self.a_bits) < self.keep_bits <= 8:
            raise ValueError(f"mixed.keep_bits must lie above the bits, at most 8 (None: float); got {self.keep_bits}")
        if self.blocks is not None:
            self.blocks = tuple(sorted(int(b) for b in self.blocks))
        self.base_config()  # checks the base options now

    @property
    def modifies_weights(self) -> bool:  # type: ignore[override]
        """Whether the base method edits weights (then the state saves the block weights)."""
        return METHODS[self.base].modifies_weights

    def base_config(self, bits: int | None = None) -> QuantConfig:
        """The base method at the config's bits, or at ``bits`` for both weights and activations."""
        w, a = (self.w_bits, self.a_bits) if bits is None else (bits, bits)
        return method_config(self.base, w, a, self.base_options)

    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """The base method's modules."""
        return self.base_config().default_filter(module, fqn)

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """The base method on the selected modules, then the plan on the kept blocks where they are known."""
        self.base_config().transform(encoder, filter_fn)
        self._filter = filter_fn
        if self.blocks is not None:
            self._apply_plan(encoder)

    def _apply_plan(self, encoder: VisionEncoder) -> None:
        """Kept blocks: quantizers removed (float) or replaced by the base method's at ``keep_bits``."""
        for layer in self.blocks or ():
            if not 0 <= layer < encoder.num_blocks:
                raise ValueError(f"mixed.blocks names block {layer}; the encoder has {encoder.num_blocks}")
        prefixes = tuple(f"blocks.{layer}." for layer in self.blocks or ())
        strip_quantizers(encoder, prefixes)
        if self.keep_bits is not None and prefixes:
            selected = getattr(self, "_filter", None) or self.default_filter

            def kept(module: nn.Module, fqn: str) -> bool:
                return fqn.startswith(prefixes) and selected(module, fqn)

            self.base_config(self.keep_bits).transform(encoder, kept)

    def adopt_state_config(self, encoder: VisionEncoder, other: QuantConfig) -> bool:
        """A state of this config with its blocks chosen: take the blocks (and the plan) from it."""
        completes = self.blocks is None and isinstance(other, MixedPrecisionConfig) and other.blocks is not None
        if completes and {**self.to_dict(), "blocks": other.blocks} == other.to_dict():
            self.blocks = other.blocks
            self._apply_plan(encoder)
            return True
        return super().adopt_state_config(encoder, other)

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Choose the kept blocks by the sweep (unless given), apply the plan, calibrate with the base method."""
        batches = list(batches)  # read twice (sweep, calibration)
        first = next(iter(iter_images(encoder, batches[:1], False)), None)
        if first is None:
            raise ValueError("calibration data is empty: pass at least one batch of images")
        with torch.no_grad():
            num_tokens = int(encoder.embed(first[:1]).shape[1])
        summary: dict[str, Any] = {"keep_bits": self.keep_bits, "num_tokens": num_tokens}
        if self.blocks is None:
            sweep = self.sweep(encoder, batches, progress)
            self.blocks = tuple(sorted(sweep.ranking[: self.keep]))
            summary["sweep_drops"] = dict(zip(map(str, sweep.blocks), sweep.drops, strict=True))
            summary["sweep_ranking"] = sweep.ranking
            self._apply_plan(encoder)
        summary["blocks"] = list(self.blocks)
        summary["flop_share"] = flop_share(encoder, self.blocks, num_tokens)
        self.base_config().calibrate(encoder, batches, progress=progress)
        base_summary = getattr(encoder, "calibration_summary", None)  # the base method's own (QDrop's timings)
        encoder.calibration_summary = summary if base_summary is None else {**summary, "base": base_summary}

    def sweep(self, encoder: VisionEncoder, batches: list[Any], progress: bool = True) -> Any:
        """The sensitivity sweep of the base method on a float copy (label-free cosine on the calibration images)."""
        from regcache.registers.objectives import EmbeddingCosine
        from regcache.registers.sweep import sensitivity_sweep

        work = copy.deepcopy(encoder)
        strip_quantizers(work)
        work.quant_config = None
        if any(True for _ in quantizers(work)):
            raise RuntimeError("the float copy for the sweep still holds quantizers")
        return sensitivity_sweep(work, self.base_config(), batches, batches, EmbeddingCosine(), progress=progress)


__all__ = ["MixedPrecisionConfig", "flop_share", "strip_quantizers"]
