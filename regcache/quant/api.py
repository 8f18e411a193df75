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
import numbers
import types
import typing
from collections.abc import Callable, Iterable, Mapping
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


BITS_FIELDS = ("w_bits", "a_bits")


class MethodConfigError(ValueError):
    """A method name, option key or option value that the method's config does not accept."""


def _matches(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the type hint (int / float / bool / str, None, unions, tuples, classes)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(h, value) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(args[0], v) for v in value)
        return len(args) == len(value) and all(_matches(h, v) for h, v in zip(args, value, strict=True))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def field_types(cls: type[QuantConfig]) -> dict[str, Any]:
    """The resolved type hint of each dataclass field of a method config, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(hint: Any) -> str:
    """``int``, ``int | None``, ``tuple[float, ...]``: a type hint as written."""
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


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
        for name, hint in field_types(type(self)).items():
            value = getattr(self, name)
            if not _matches(hint, value):
                raise MethodConfigError(
                    f"{self.name or type(self).__name__}.{name} must be {_type_name(hint)}, got {value!r}"
                )
        for k in BITS_FIELDS:
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

    def adopt_state_config(self, encoder: VisionEncoder, other: QuantConfig) -> bool:
        """Whether a state calibrated with ``other`` fits this attached config (a config that completes its own
        fields at calibration, such as the mixed-precision plan's blocks, takes them from ``other`` here)."""
        return self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form including the method name."""
        return {"method": self.name, **dataclasses.asdict(self)}

    def options(self) -> dict[str, Any]:
        """The fields of :meth:`to_dict` besides the bits, defaults included, as ``model.method_options`` holds them."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in self.to_dict().items()
            if k not in ("method", *BITS_FIELDS)
        }


def method_config(
    method: str, w_bits: int = 8, a_bits: int = 8, options: Mapping[str, Any] | None = None
) -> QuantConfig:
    """The registered method's config from its name, bits and options; unknown names, keys and bad values raise.

    Raises :class:`MethodConfigError` naming the method's valid names / fields, or the field whose value
    is of the wrong type; the method's own ``__post_init__`` checks the values further (bits in 2..8, ...).
    """
    if method not in METHODS:
        raise MethodConfigError(f"unknown quantization method {method!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    options = dict(options or {})
    valid = [name for name in field_types(cls) if name not in BITS_FIELDS]
    for key in options:
        if key in BITS_FIELDS:
            raise MethodConfigError(f"{key} of method {method!r} is set with the bits (w_bits / a_bits), not an option")
        if key not in valid:
            raise MethodConfigError(
                f"unknown option {key!r} of method {method!r}; its fields: {', '.join(valid) or '(none)'}"
            )
    return cls(w_bits=w_bits, a_bits=a_bits, **options)


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Inverse of :meth:`QuantConfig.to_dict`."""
    d = dict(d)
    name = d.pop("method")
    return method_config(name, d.pop("w_bits", 8), d.pop("a_bits", 8), d)


def describe_methods(names: Iterable[str] | None = None) -> str:
    """A listing of the methods (all, or ``names``): each one's summary and fields with their types and defaults."""
    names = list(names) if names is not None else sorted(METHODS)
    for name in names:
        if name not in METHODS:
            raise MethodConfigError(f"unknown quantization method {name!r}; available: {', '.join(sorted(METHODS))}")
    lines = []
    for name in names:
        cls = METHODS[name]
        defaults = cls()
        lines.append(f"{name} ({cls.__name__}): {(cls.__doc__ or '').strip().splitlines()[0]}")
        for field_name, hint in field_types(cls).items():
            where = "model." + field_name if field_name in BITS_FIELDS else "model.method_options." + field_name
            value = getattr(defaults, field_name)
            lines.append(f"  {field_name}: {_type_name(hint)} = {value!r}    ({where})")
        lines.append("")
    return "\n".join(lines)


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
    "MethodConfigError",
    "QuantConfig",
    "block_linears",
    "block_linears_and_matmuls",
    "calibrate_",
    "config_from_dict",
    "coverage",
    "describe_methods",
    "field_types",
    "head_linear",
    "is_calibrated",
    "method_config",
    "quantize_",
    "set_quant_mode",
    "swap_linears",
]
