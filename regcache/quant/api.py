"""Methods as config objects plus a transform (in the spirit of torchao's ``quantize_``).

    manifest = quantize_(encoder, NaiveConfig(w_bits=8, a_bits=8))   # attach quantizers
    calibrate_(encoder, batches)                                       # method's calibration
    encoder(images)                                                    # fake-quantized forward

A method subclasses :class:`QuantConfig` (a dataclass) and implements ``transform`` (attach
quantizers to the modules the filter selects, return the coverage manifest) and ``calibrate``.
Subclasses register themselves under ``name`` in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from regcache.quant.modules import MatMul, QuantLinear, quantizers, set_quant_mode
from regcache.quant.quantizers import Quantizer
from regcache.utils import weights_fingerprint

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder

FilterFn = Callable[[nn.Module, str], bool]
METHODS: dict[str, type[QuantConfig]] = {}
# Where the final projection / classifier ("head") lives in our encoders: open_clip's proj, open_clip's
# TimmModel head, a timm trunk's classifier.
HEAD_MODULES = ("proj", "proj_head", "trunk.head")


def block_linears_and_matmuls(module: nn.Module, fqn: str) -> bool:
    """Default filter: every linear and attention matmul inside the transformer blocks."""
    return fqn.startswith("blocks.") and isinstance(module, (nn.Linear, MatMul))


def head_linear(module: nn.Module, fqn: str) -> bool:
    """The linear(s) of the encoder's head (:data:`HEAD_MODULES`), which methods quantize on request."""
    return isinstance(module, nn.Linear) and any(fqn == p or fqn.startswith(p + ".") for p in HEAD_MODULES)


def block_linears(module: nn.Module, fqn: str) -> bool:
    """Only the linears of the blocks (qkv, proj, fc1, fc2)."""
    return fqn.startswith("blocks.") and isinstance(module, nn.Linear)


@dataclass
class ManifestEntry:
    """One quantized tensor: where it is and how it is quantized."""

    tensor: str
    quantizer: dict[str, Any]


@dataclass
class CoverageManifest:
    """Which tensors a method quantizes, so comparisons between methods are fair."""

    method: str
    entries: list[ManifestEntry] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        """Qualified tensor names, e.g. ``blocks.0.attn.qkv.weight`` or ``blocks.0.attn.matmul_qk.a``."""
        return [e.tensor for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"method": self.method, "entries": [dataclasses.asdict(e) for e in self.entries]}

    def to_markdown(self) -> str:
        """A table of the quantized tensors."""
        rows = ["| tensor | quantizer |", "|---|---|"]
        rows += [f"| {e.tensor} | {json.dumps(e.quantizer, sort_keys=True)} |" for e in self.entries]
        return "\n".join(rows)


_SLOTS = {
    "input": "input_quantizer",
    "weight": "weight_quantizer",
    "a": "a_quantizer",
    "b": "b_quantizer",
}


def coverage(encoder: nn.Module, method: str = "") -> CoverageManifest:
    """The manifest of the quantizers currently attached below ``encoder``."""
    entries = []
    for name, module in encoder.named_modules():
        for suffix, attr in _SLOTS.items():
            q = getattr(module, attr, None)
            if isinstance(q, Quantizer):
                entries.append(ManifestEntry(f"{name}.{suffix}", q.describe()))
    return CoverageManifest(method, entries)


@dataclass
class QuantConfig:
    """Base of all PTQ method configs. ``w_bits`` / ``a_bits`` in 2..8 (e.g. W8A8, W6A6, W4A4, W4A8)."""

    name: ClassVar[str] = ""
    modifies_weights: ClassVar[bool] = False  # True if calibration edits weights (saved with the state)
    w_bits: int = 8
    a_bits: int = 8

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    def __post_init__(self) -> None:
        for k in ("w_bits", "a_bits"):
            bits = getattr(self, k)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{k} must be an integer in [2, 8], got {bits!r}")

    @property
    def tag(self) -> str:
        """E.g. ``naive-W8A8``."""
        return f"{self.name}-W{self.w_bits}A{self.a_bits}"

    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """Which modules the method touches unless the caller passes a filter."""
        return block_linears_and_matmuls(module, fqn)

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Attach this method's quantizers to the selected modules."""
        raise NotImplementedError

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Set every quantizer's parameters from calibration images, leaving the model in quant mode."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form including the method name."""
        return {"method": self.name, **dataclasses.asdict(self)}


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Inverse of :meth:`QuantConfig.to_dict`."""
    d = dict(d)
    name = d.pop("method")
    if name not in METHODS:
        raise KeyError(f"unknown quantization method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](**d)


def swap_linears(encoder: nn.Module, filter_fn: FilterFn) -> list[tuple[str, nn.Module]]:
    """Replace selected ``nn.Linear`` modules by :class:`QuantLinear` (sharing parameters).

    Returns the selected (name, module) pairs after swapping: QuantLinear and MatMul modules.
    """
    selected = []
    for name, module in list(encoder.named_modules()):
        if not name or not filter_fn(module, name):
            continue
        if isinstance(module, nn.Linear) and not isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            module = QuantLinear.from_linear(module)
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, module)
        if isinstance(module, (QuantLinear, MatMul)):
            selected.append((name, module))
    return selected


def quantize_(encoder: VisionEncoder, config: QuantConfig, filter_fn: FilterFn | None = None) -> CoverageManifest:
    """Attach ``config``'s quantizers to ``encoder`` (in place) and return the coverage manifest.

    The model stays in float mode until :func:`calibrate_` runs.
    """
    if getattr(encoder, "quant_config", None) is not None:
        raise RuntimeError(
            f"encoder is already quantized with {encoder.quant_config.tag}; adapt a fresh model to apply another method"
        )
    encoder.float_fingerprint = weights_fingerprint(encoder)
    config.transform(encoder, filter_fn or config.default_filter)
    param = next(encoder.parameters())
    encoder.to(param.device)  # quantizers created after the model moved must follow it
    encoder.quant_config = config
    return coverage(encoder, config.tag)


def calibrate_(encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> VisionEncoder:
    """Run the attached method's calibration on image batches; the model ends in quant mode.

    Works inside ``torch.inference_mode`` (e.g. Lightning's ``validate``): calibration state is
    written as normal tensors.
    """
    config = getattr(encoder, "quant_config", None)
    if config is None:
        raise RuntimeError("encoder has no quantization method attached: call quantize_(encoder, config) first")
    with torch.inference_mode(False):
        config.calibrate(encoder, batches, progress=progress)
    return encoder


def is_calibrated(encoder: nn.Module) -> bool:
    """True when every attached quantizer has parameters."""
    qs = [q for _, q in quantizers(encoder)]
    return bool(qs) and all(q.is_calibrated for q in qs)


__all__ = [
    "HEAD_MODULES",
    "METHODS",
    "CoverageManifest",
    "FilterFn",
    "ManifestEntry",
    "QuantConfig",
    "block_linears",
    "block_linears_and_matmuls",
    "calibrate_",
    "config_from_dict",
    "coverage",
    "head_linear",
    "is_calibrated",
    "quantize_",
    "set_quant_mode",
    "swap_linears",
]
