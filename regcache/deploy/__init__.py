"""Real integer inference of a calibrated encoder: ``deploy_(encoder, DeployConfig())``.

The calibrated fake-quant model simulates integer arithmetic; :func:`deploy_` replaces its
quantized modules by modules that compute it (:mod:`regcache.deploy.modules`, kernels behind the
interface of :mod:`regcache.deploy.kernels`):

- every ``QuantLinear`` whose weight and input quantizers are on → :class:`Int8Linear`: the weight's
  int8 codes stored once (per-channel scale and zero point folded into the epilogue), the input's
  static per-tensor scale / zero point, int32-exact accumulation, dequantization and bias in the
  epilogue;
- ``norm1 → qkv`` and ``norm2 → fc1``: the LayerNorm quantizes its output for the linear
  (:class:`QuantizingNorm`, ``layernorm_quantize``); ``fc1 → GELU → fc2``: fc1's epilogue applies the
  activation and fc2's input quantizer and hands it int8 codes;
- RepQ-ViT's patchify stem (``QuantConv2d``) → :class:`Int8PatchEmbed`;
- attention: ``attention="float"`` keeps Q·Kᵀ / P·V in floating point (SDPA; the SmoothQuant-style
  linear-only deployment) and turns the matmul quantizers off; ``attention="int8"`` runs them as
  integer matmuls (:class:`Int8Attention`) where all four operand quantizers are static per-tensor
  uniform ones (the naive method's; RepQ-ViT's log-√2 softmax quantizer is not uniform and refuses).

What deploys: naive (any bits <= 8), RepQ-ViT (after its reparameterization its post-LayerNorm
inputs are per tensor; its weights asymmetric per channel: ``b_zero``), NoisyQuant (its fixed noise N
is added before the input quantizer as in the simulation, since ``Q(x + N)`` is not a function of
``Q(x)``; its bias correction ``-W N`` folds into the epilogue's ``beta`` exactly). What refuses, with
the module, the quantizer and the fix named: PTQ4ViT (twin-uniform activations, chunked weight
steps), any non-uniform, per-channel / per-group activation, or group-wise weight quantizer, bits > 8,
an uncalibrated encoder, quantizers in ``observe`` mode or half on. Quantized modules whose
quantizers are all in ``float`` mode stay float (that is what the simulation computes).

The deployed model computes what the simulation computes with the same quantizers on
(:func:`simulate_` sets the simulation's modes to match a config: ``attention="float"`` turns the
matmul quantizers off): the same integer codes, sums exact instead of float32-rounded
(tests/test_deploy.py states the tolerances). The RegCache prefix (``attn.prefix``) and token
deletion (``block.input_filter``) are untouched attributes, so installing / removing them works on
the deployed encoder as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from regcache.deploy import kernels
from regcache.deploy.modules import (
    Int8Attention,
    Int8Block,
    Int8Linear,
    Int8PatchEmbed,
    QuantizingNorm,
    StaticQuant,
)
from regcache.encoders.base import Attention, Block, VisionEncoder
from regcache.quant.modules import QuantConv2d, QuantLinear, quantized_weight
from regcache.quant.quantizers import Quantizer, UniformQuantizer

ATTENTION_MODES = ("float", "int8")


class DeployError(ValueError):
    """An encoder (or a part of it) that cannot run on integer kernels; the message names the part and the fix."""


@dataclass(frozen=True)
class DeployConfig:
    """How :func:`deploy_` turns a calibrated fake-quant encoder into integer modules.

    Args:
        attention: ``"float"``: only the linears are integer, Q·Kᵀ / P·V run in floating point (SDPA), the
            method's matmul quantizers off; ``"int8"``: Q·Kᵀ and P·V as integer matmuls with the method's
            per-tensor operand quantizers (refused where they are not static per-tensor uniform).
        backend: ``"auto"`` (triton on CUDA where it imports, else reference), ``"reference"`` (exact
            integer arithmetic on any device, slow) or ``"triton"`` (CUDA).
    """

    attention: Literal["float", "int8"] = "float"
    backend: Literal["auto", "reference", "triton"] = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"DeployConfig.attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.backend not in kernels.BACKEND_NAMES:
            raise ValueError(f"DeployConfig.backend must be one of {kernels.BACKEND_NAMES}, got {self.backend!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return dataclasses.asdict(self)


@dataclass
class DeployReport:
    """What :func:`deploy_` did: the modules it replaced, fused, left float, and the backend it resolved."""

    config: DeployConfig
    backend: str  # the backend the encoder's device resolves to now
    method: str
    linears: list[str] = field(default_factory=list)
    fused_norms: list[str] = field(default_factory=list)
    fused_activations: list[str] = field(default_factory=list)
    fused_residuals: list[str] = field(default_factory=list)  # blocks whose skip adds run in proj / fc2
    int8_attention: list[str] = field(default_factory=list)
    float_attention: list[str] = field(default_factory=list)
    patch_embed: str | None = None
    left_float: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (metrics.json's ``deploy``)."""
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d


# ---- checks ------------------------------------------------------------------------------------


def _fix(method: str) -> str:
    return (
        "integer deployment needs static per-tensor uniform activation quantizers and per-channel (or per-tensor) "
        f"uniform weight quantizers of <= 8 bits: deploy a naive, repq_vit or noisyquant model, or keep {method} "
        "in simulation (no deploy)"
    )


def _plain_uniform(q: Quantizer) -> bool:
    # UniformQuantizer's own formula (subclasses that change broadcasting or the formula are not)
    return isinstance(q, UniformQuantizer) and type(q)._fusable


def _check_kind(q: Quantizer, where: str, role: str, method: str, ndim: int = 2) -> None:
    """Whether the quantizer's form has an integer equivalent (kind, granularity, bits); parameters not needed."""
    if q.bits > 8:
        raise DeployError(f"{where} quantizes to {q.bits} bits; int8 kernels hold at most 8: use bits <= 8")
    if not _plain_uniform(q):
        raise DeployError(f"{where} is a {q.kind} quantizer ({type(q).__name__}), not plain uniform; {_fix(method)}")
    if role == "activation" and q.granularity != "tensor":
        raise DeployError(
            f"{where} is a {q.granularity}-wise activation quantizer; the integer path needs one static scale per "
            f"tensor; {_fix(method)}"
        )
    if role == "weight" and (q.granularity == "group" or (q.granularity == "channel" and q.axis not in (0, -ndim))):
        raise DeployError(f"{where} is a {q.granularity} (axis {q.axis}) weight quantizer; {_fix(method)}")


def _check_quantizer(q: Quantizer, where: str, role: str, method: str, ndim: int = 2) -> None:
    _check_kind(q, where, role, method, ndim)
    if not q.is_calibrated:
        raise DeployError(f"{where} has no quantization parameters: calibrate the encoder (calibrate_) before deploy_")
    if role == "activation" and q.scale.numel() != 1:
        raise DeployError(f"{where} holds {q.scale.numel()} scales, not one static per-tensor scale; {_fix(method)}")


def _modes(where: str, quantizers: dict[str, Quantizer | None]) -> str:
    """``"quant"`` when every quantizer is on, ``"float"`` when all are off (or absent), else a DeployError."""
    present = {k: q for k, q in quantizers.items() if q is not None}
    modes = {q.mode for q in present.values()}
    if not present or modes == {"float"}:
        return "float"
    if modes == {"quant"}:
        return "quant"
    if "observe" in modes:
        raise DeployError(f"{where} has quantizers in observe mode (calibration in progress): finish calibrate_ first")
    detail = ", ".join(f"{k}={q.mode}" for k, q in present.items())
    raise DeployError(f"{where} has some quantizers on and some off ({detail}): set them all to quant or all to float")


# ---- builders ----------------------------------------------------------------------------------


def _weight_codes(q: UniformQuantizer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes [N, K], scale [N], zero point [N] shifted into int8, None when all zero) of a 2-D weight."""
    n = weight.shape[0]
    codes = q.quantize_int(weight.detach().float())
    shift = -128 if q.qmax > 127 else 0
    scale = q.scale.detach().float().reshape(-1).expand(n) if q.scale.numel() == 1 else q.scale.reshape(n)
    zp = q.zero_point.detach().float().reshape(-1)
    zp = (zp.expand(n) if zp.numel() == 1 else zp.reshape(n)) + shift
    codes = (codes + shift).to(torch.int8)
    return codes.reshape(n, -1), scale.clone(), None if bool((zp == 0).all()) else zp.double()


def _int8_linear(
    where: str, module: QuantLinear | QuantConv2d, backend: str, method: str, dtype: torch.dtype
) -> Int8Linear:
    wq, iq = module.weight_quantizer, module.input_quantizer
    _check_quantizer(wq, f"{where}.weight", "weight", method, module.weight.ndim)
    _check_quantizer(iq, f"{where}.input", "activation", method)
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    codes, scale, zero = _weight_codes(wq, weight)
    inq = StaticQuant.from_quantizer(iq)
    bias = module.bias
    offset = None
    noise = getattr(module, "noise", None)  # NoisyQuant: y = W Q(x + N) + (b - W N)
    if isinstance(module, QuantLinear) and noise is not None:
        offset = noise.detach().clone()
        w_used = quantized_weight(module, wq, module.weight).detach()
        bias = module.corrected_bias(w_used).detach()
    alpha, beta = kernels.fold_epilogue(codes, inq.scale, inq.zero_point, scale, zero, bias)
    return Int8Linear(codes, alpha, beta, zero, inq, dtype, backend, input_offset=offset)


def _activation_name(act: nn.Module, dtype: torch.dtype) -> str | None:
    """The kernels' name of ``act`` where it computes that function bit for bit on a probe, else None."""
    probe = torch.linspace(-8, 8, 4097, dtype=dtype)
    with torch.no_grad():
        out = act(probe)
        for name, fn in kernels.ACTIVATIONS.items():
            if torch.equal(out, fn(probe)):
                return name
    return None


def _plain_layernorm(norm: nn.Module) -> bool:
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    forward = type(norm).forward
    if forward is nn.LayerNorm.forward:
        return True
    try:  # open_clip's LayerNorm: F.layer_norm in the input's dtype, cast back (a no-op)
        from open_clip.transformer import LayerNorm as OpenClipLayerNorm
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    return forward is OpenClipLayerNorm.forward


def _attention_quants(attn: Attention, where: str, method: str) -> tuple[StaticQuant, ...] | None:
    """The four operand quantizers of an int8 attention, or None where all are off (the block's attention is float)."""
    qs = {
        "matmul_qk.a (Q)": attn.matmul_qk.a_quantizer,
        "matmul_qk.b (K)": attn.matmul_qk.b_quantizer,
        "matmul_pv.a (P)": attn.matmul_pv.a_quantizer,
        "matmul_pv.b (V)": attn.matmul_pv.b_quantizer,
    }
    missing = [k for k, q in qs.items() if q is None or q.mode != "quant"]
    if len(missing) == len(qs):
        return None  # none on (e.g. a mixed-precision plan's float block): the simulation's attention is float
    if missing:
        raise DeployError(
            f"{where}: attention='int8' needs all four attention operands quantized or none, but {', '.join(missing)} "
            "is not: quantize them all, or use attention='float'"
        )
    for k, q in qs.items():
        if not _plain_uniform(q) or q.granularity != "tensor":
            raise DeployError(
                f"{where}.{k} is a {q.kind} quantizer ({type(q).__name__}, {getattr(q, 'granularity', '')}), not "
                "static per-tensor uniform, so its matmul has no integer form here: use attention='float' "
                "(integer linears)"
            )
        _check_quantizer(q, f"{where}.{k}", "activation", method)
    return tuple(StaticQuant.from_quantizer(q) for q in qs.values())


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _model_dtype(encoder: nn.Module) -> torch.dtype:
    for p in encoder.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# ---- the transform -----------------------------------------------------------------------------


def simulate_(encoder: VisionEncoder, config: DeployConfig) -> VisionEncoder:
    """Set a calibrated fake-quant encoder's quantizer modes to what ``deploy_(encoder, config)`` computes.

    ``attention="float"`` switches every attention matmul quantizer to ``float`` mode (the linear-only
    deployment's simulation); ``"int8"`` leaves them as calibrated. Returns the encoder.
    """
    if config.attention == "float":
        for block in encoder.blocks:
            for q in block.attn.matmul_quantizers():
                q.set_mode("float")
    return encoder


def deploy_(encoder: VisionEncoder, config: DeployConfig | None = None) -> DeployReport:
    """Replace a calibrated encoder's quantized modules by integer ones in place (module docstring); the report.

    Raises :class:`DeployError` naming the module, the quantizer and the fix for what cannot deploy,
    and :class:`~regcache.deploy.kernels.BackendUnavailableError` for a backend that cannot run on the
    encoder's device.
    """
    config = config or DeployConfig()
    if getattr(encoder, "deploy_report", None) is not None:
        raise DeployError("encoder is already deployed: deploy a freshly calibrated encoder")
    qc = getattr(encoder, "quant_config", None)
    if qc is None:
        raise DeployError("encoder has no quantization method: quantize_(encoder, config) and calibrate_ it first")
    method = qc.name
    linears = {name: m for name, m in encoder.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    for name, m in linears.items():  # the method's form first: a PTQ4ViT model refuses calibrated or not
        if isinstance(m, QuantLinear) and type(m).forward not in _LINEAR_FORWARDS:
            raise DeployError(f"{name} is a {type(m).__name__} with its own forward; {_fix(method)}")
        if m.weight_quantizer is not None:
            _check_kind(m.weight_quantizer, f"{name}.weight", "weight", method, m.weight.ndim)
        if m.input_quantizer is not None:
            _check_kind(m.input_quantizer, f"{name}.input", "activation", method)
    quantized = [
        (name, m)
        for name, m in linears.items()
        if _modes(name, {"weight": m.weight_quantizer, "input": m.input_quantizer}) == "quant"
    ]
    if not quantized:
        raise DeployError(
            f"{qc.tag}: no quantized linear is on (uncalibrated encoder, or every quantizer in float mode): "
            "calibrate_ the encoder before deploy_"
        )
    device = next(encoder.parameters()).device
    resolved = kernels.get_backend(config.backend, device).name  # raises where the backend cannot run here
    dtype = _model_dtype(encoder)
    report = DeployReport(config, resolved, qc.tag)
    report.left_float = [n for n in linears if n not in dict(quantized)]
    # attention first: its checks read the method's matmul quantizers before any module changes
    attn_quants: dict[int, tuple[StaticQuant, ...] | None] = {}
    for i, block in enumerate(encoder.blocks):
        where = f"blocks.{i}.attn"
        if config.attention == "int8":
            attn_quants[i] = _attention_quants(block.attn, where, method)
    if config.attention == "int8" and all(q is None for q in attn_quants.values()):
        raise DeployError(
            f"{qc.tag}: attention='int8' but no block's attention operands are quantized: use attention='float'"
        )
    with torch.no_grad():
        deployed: dict[str, Int8Linear] = {}
        for name, module in quantized:
            if isinstance(module, QuantConv2d):
                deployed[name] = _int8_patch_embed(name, module, config.backend, method, dtype)
            else:
                deployed[name] = _int8_linear(name, module, config.backend, method, dtype)
        for name, module in deployed.items():
            if isinstance(module, Int8PatchEmbed):
                report.patch_embed = name
            else:
                report.linears.append(name)
            _replace(encoder, name, module)
        for i, block in enumerate(encoder.blocks):
            _fuse_block(encoder, i, block, report, dtype)
            attn = block.attn
            if config.attention == "int8" and attn_quants[i] is not None:
                block.attn = Int8Attention.from_attention(attn, *attn_quants[i], backend=config.backend)
                report.int8_attention.append(f"blocks.{i}.attn")
            else:
                for mm in (attn.matmul_qk, attn.matmul_pv):
                    mm.a_quantizer = mm.b_quantizer = None
                report.float_attention.append(f"blocks.{i}.attn")
            if Int8Block.applies(block):  # the skip connections into proj's / fc2's epilogues
                block.__class__ = Int8Block
                report.fused_residuals.append(f"blocks.{i}")
    encoder.deploy_report = report
    encoder.deploy_config = config
    return report


def _int8_patch_embed(name: str, conv: QuantConv2d, backend: str, method: str, dtype: torch.dtype) -> Int8PatchEmbed:
    kh, kw = conv.kernel_size
    if conv.stride != (kh, kw) or conv.groups != 1 or conv.dilation != (1, 1) or conv.padding not in ("valid", (0, 0)):
        raise DeployError(
            f"{name} is a quantized convolution that is not a patchify stem (kernel = stride, no padding); "
            "quantize_patch_embed=False keeps the stem float"
        )
    return Int8PatchEmbed(_int8_linear(name, conv, backend, method, dtype), (kh, kw))


def _fuse_block(encoder: VisionEncoder, i: int, block: Block, report: DeployReport, dtype: torch.dtype) -> None:
    """Let norm1 / norm2 quantize for qkv / fc1 and fc1's epilogue apply the activation and fc2's quantizer."""
    from regcache.quant.fused_attention import has_hooks

    attn, mlp = block.attn, block.mlp
    for norm_name, consumer in (("norm1", attn.qkv), ("norm2", mlp.fc1)):
        norm = getattr(block, norm_name)
        if isinstance(consumer, Int8Linear) and not has_hooks(norm) and not isinstance(norm, QuantizingNorm):
            setattr(block, norm_name, QuantizingNorm(norm, consumer, fused=_plain_layernorm(norm)))
            report.fused_norms.append(f"blocks.{i}.{norm_name}")
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (isinstance(fc1, Int8Linear) and isinstance(fc2, Int8Linear)):
        return
    if not isinstance(mlp.norm, nn.Identity) or fc2.input_offset is not None:
        return
    if any(has_hooks(m) for m in (mlp.act, mlp.tap_fc2_input, fc1)):
        return
    name = _activation_name(mlp.act, dtype)
    backend = kernels.get_backend(fc1.backend, fc1.weight_codes.device)
    if name is None or name not in backend.activations:
        return
    fc1.activation, fc1.out_quant = name, fc2.input_quant
    mlp.act = nn.Identity()
    report.fused_activations.append(f"blocks.{i}.mlp.fc1")


def _linear_forwards() -> tuple[Any, ...]:
    forwards = [QuantLinear.forward]
    from regcache.quant.methods.noisyquant import NoisyQuantLinear

    forwards.append(NoisyQuantLinear.forward)
    return tuple(forwards)


_LINEAR_FORWARDS = _linear_forwards()


def is_deployed(encoder: nn.Module) -> bool:
    """Whether :func:`deploy_` ran on ``encoder``."""
    return getattr(encoder, "deploy_report", None) is not None


__all__ = [
    "ATTENTION_MODES",
    "DeployConfig",
    "DeployError",
    "DeployReport",
    "Int8Attention",
    "Int8Block",
    "Int8Linear",
    "Int8PatchEmbed",
    "QuantizingNorm",
    "deploy_",
    "is_deployed",
    "simulate_",
]
