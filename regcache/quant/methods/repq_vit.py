"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterization, after the official zkkli/RepQ-ViT code.

What is quantized (coverage manifest):

- every selected block linear: weights asymmetric per output channel, inputs asymmetric per tensor;
- Q·Kᵀ: both operands uniform asymmetric per tensor; P·V: the softmax output with a log-√2
  quantizer, V uniform asymmetric per tensor;
- the patch embedding (``quantize_patch_embed``): its input (the image) at 8 bits per tensor and
  its weight at ``w_bits`` per output channel;
- the head linear (``quantize_head``: a timm classifier, open_clip's projection), as the official
  code quantizes every ``nn.Linear`` of the model: input per tensor, weight per output channel.

Calibration (one forward pass over all calibration images at once, no backprop, as the reference):

1. weights: per-row percentile search (:func:`regcache.quant.init.percentile_affine_search`);
2. one pass in which every activation quantizer initialises itself, on first use, from the tensor
   it sees (percentile search, lowest MSE) and quantizes it for the layers after it, so each
   quantizer is calibrated on the output of the already quantized layers before it. The inputs of
   ``attn.qkv`` and ``mlp.fc1`` (LayerNorm outputs) are calibrated per channel in this pass;
3. reparameterization: each per-channel (Δ_c, z_c) becomes per tensor (Δ̃ = mean Δ_c, z̃ = mean z_c)
   with r = Δ_c / Δ̃ and b = Δ̃ (z̃ - z_c) (the official ``act_min / r - target_min``); the LayerNorm
   gets γ/r, β/r - b, the linear W·diag(r) and bias + (W·diag(r)) b, so the float function is
   unchanged and per-tensor codes of the folded activation equal per-channel codes of the original
   one; the linear's weight quantizer is then re-initialised on the folded weight.

The LayerNorm → linear pairs come from the canonical block structure (``norm1 → attn.qkv``,
``norm2 → mlp.fc1``), never from module names (timm's ``q_norm``/``k_norm`` are not folded). A
LayerNorm on the residual stream (CLIP's ``ln_pre``) lies outside the blocks and is never folded; a
norm without affine weight and bias cannot absorb the shift, so its linear keeps an ordinary
per-tensor input quantizer.

Departures from the official code, each behind a flag that :meth:`RepQViTConfig.reference` sets:

- ``round_zero_point`` (default True; reference False): the official per-tensor zero point is the
  plain mean of the per-channel zero points, usually fractional, so codes are no longer integers
  and the per-channel → per-tensor equivalence is only approximate. Rounding it makes the
  equivalence exact and the zero point a valid integer.
- ``quantize_head`` (default False; reference True): the other methods here leave the head float,
  and so does the default, so that methods are compared on the same tensors.
- ``official_arithmetic`` (default False; reference True): the official code searches each
  channel in a Python loop and takes quantiles with ``torch.quantile``, whose rank ``q (n - 1)`` is
  rounded to float32 (numpy's ``percentile`` above its size limit). The default searches all
  channels at once at exact ranks: the same method, differently rounded, and much faster on many
  channels. The difference matters for parity only: a calibration is chaotic at low bits (moving
  every calibration pixel by one float32 ulp moves a W6A6 ViT-Ti's logits to cosine 0.995 of
  themselves), so only the official operations in the official order reproduce its outputs.
- ``reserve_zero_code`` (default False = reference): see :mod:`regcache.quant.log_quantizers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from regcache.quant.api import FilterFn, QuantConfig, block_linears_and_matmuls, head_linear, swap_linears
from regcache.quant.calibration import init_on_first_use, iter_images
from regcache.quant.init import REPQ_PERCENTILES, percentile_calibrate_
from regcache.quant.log_quantizers import LogSqrt2Quantizer
from regcache.quant.modules import MatMul, QuantConv2d, QuantLinear, quantizers, set_quant_mode
from regcache.quant.quantizers import Quantizer, UniformQuantizer

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder


def patch_embed_conv(encoder: nn.Module) -> tuple[nn.Module, str, nn.Conv2d] | None:
    """(parent, attribute, conv) of the patch-embedding convolution: the first Conv2d outside the blocks."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d) and not name.startswith("blocks."):
            parent_name, _, attr = name.rpartition(".")
            return (encoder.get_submodule(parent_name) if parent_name else encoder), attr, module
    return None


def can_fold(norm: nn.Module) -> bool:
    """Whether a norm can absorb a per-channel scale and shift (LayerNorm with affine weight and bias)."""
    return isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None


def norm_linear_pairs(encoder: VisionEncoder) -> list[tuple[nn.LayerNorm, QuantLinear]]:
    """The (post-LayerNorm, consuming linear) pairs to reparameterize, by block structure."""
    pairs = []
    for block in encoder.blocks:
        for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
            if isinstance(linear, QuantLinear) and linear.input_quantizer is not None and can_fold(norm):
                pairs.append((norm, linear))
    return pairs


@torch.no_grad()
def fold_layernorm_(
    norm: nn.LayerNorm,
    linear: nn.Linear,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    round_zero_point: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel quantization parameters of ``linear``'s input into ``norm`` and ``linear``.

    Returns the per-tensor (scale, zero point) that quantizes the folded activation exactly as
    (scale, zero_point) quantized the original one per channel (exactly when the zero point is rounded).
    """
    scale, zero_point = scale.reshape(-1).float(), zero_point.reshape(-1).float()
    target_scale = scale.mean()
    target_zp = zero_point.mean().round() if round_zero_point else zero_point.mean()
    # Operations in the official order (b = Δ̃ (z̃ - z_c), rounded as the official code rounds it)
    r = scale / target_scale
    b = (-zero_point * scale) / r - (-target_zp * target_scale)
    dtype = norm.weight.dtype
    norm.weight.copy_((norm.weight.float() / r).to(dtype))
    norm.bias.copy_((norm.bias.float() / r - b).to(dtype))
    linear.weight.copy_((linear.weight.float() * r).to(linear.weight.dtype))
    shift = torch.mm(linear.weight.float(), b.reshape(-1, 1)).reshape(-1)
    linear.bias.copy_((linear.bias.float() + shift).to(linear.bias.dtype))
    return target_scale, target_zp


def percentile_init_(
    quantizer: Quantizer, x: torch.Tensor, percentiles: Sequence[float], official_arithmetic: bool = False
) -> None:
    """Initialise a RepQ-ViT quantizer from a tensor by its percentile / MSE search."""
    if isinstance(quantizer, LogSqrt2Quantizer):
        quantizer.calibrate_(x, percentiles, official_arithmetic=official_arithmetic)
    elif isinstance(quantizer, UniformQuantizer):
        percentile_calibrate_(quantizer, x, percentiles, official_arithmetic=official_arithmetic)
    else:
        raise TypeError(f"RepQ-ViT cannot initialise a {type(quantizer).__name__}")


@contextmanager
def calibrate_on_first_use(
    encoder: nn.Module, percentiles: Sequence[float], official_arithmetic: bool = False
) -> Iterator[None]:
    """All quantizers quantize; an uncalibrated one first initialises itself from its first input."""
    qs = [q for _, q in quantizers(encoder)]
    with init_on_first_use(qs, lambda q, x: percentile_init_(q, x, percentiles, official_arithmetic)):
        yield


@dataclass
class RepQViTConfig(QuantConfig):
    """RepQ-ViT: percentile-initialised uniform quantizers, log-√2 softmax, LayerNorm reparameterization."""

    name = "repq_vit"
    modifies_weights = True
    quantize_patch_embed: bool = True
    patch_embed_input_bits: int = 8
    quantize_head: bool = False
    round_zero_point: bool = True
    official_arithmetic: bool = False
    reserve_zero_code: bool = False
    percentiles: tuple[float, ...] = REPQ_PERCENTILES

    def __post_init__(self) -> None:
        super().__post_init__()
        self.percentiles = tuple(float(p) for p in self.percentiles)

    @classmethod
    def reference(cls, w_bits: int = 4, a_bits: int = 4) -> RepQViTConfig:
        """The official zkkli/RepQ-ViT behaviour: its arithmetic, its coverage (head) and its quirks."""
        return cls(
            w_bits=w_bits,
            a_bits=a_bits,
            quantize_head=True,
            round_zero_point=False,
            official_arithmetic=True,
            reserve_zero_code=False,
        )

    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """Block linears and matmuls, plus the head linear with ``quantize_head``."""
        return block_linears_and_matmuls(module, fqn) or (self.quantize_head and head_linear(module, fqn))

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Attach asymmetric quantizers (log-√2 on softmax outputs), give folded linears a bias, quantize the stem."""
        softmax_matmuls = {id(block.attn.matmul_pv) for block in encoder.blocks}
        for _, module in swap_linears(encoder, filter_fn):
            if isinstance(module, QuantLinear):
                module.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=False, granularity="channel")
                module.input_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
            elif isinstance(module, MatMul):
                if id(module) in softmax_matmuls:
                    module.a_quantizer = LogSqrt2Quantizer(self.a_bits, reserve_zero_code=self.reserve_zero_code)
                else:
                    module.a_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
                module.b_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
        for _, linear in norm_linear_pairs(encoder):
            if linear.bias is None:  # the folded shift needs a bias; zero keeps the function unchanged
                linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
        stem = patch_embed_conv(encoder) if self.quantize_patch_embed else None
        if stem is not None:
            parent, attr, conv = stem
            qconv = conv if isinstance(conv, QuantConv2d) else QuantConv2d.from_conv(conv)
            qconv.input_quantizer = UniformQuantizer(self.patch_embed_input_bits, symmetric=False)
            qconv.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=False, granularity="channel")
            setattr(parent, attr, qconv)

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Calibrate post-LayerNorm inputs per channel, fold them into per-tensor LayerNorm / weights (once only)."""
        if any(q.is_calibrated for _, q in quantizers(encoder)):
            raise RuntimeError("RepQ-ViT folds weights during calibration: calibrate a freshly quantized model once")
        chunks = list(iter_images(encoder, batches, progress, desc="RepQ-ViT: calibration images"))
        if not chunks:
            raise ValueError("calibration data is empty: pass at least one batch of images")
        images = torch.cat(chunks)  # the reference calibrates on one batch
        with torch.no_grad():
            self._init_weights(encoder)
            pairs = norm_linear_pairs(encoder)
            per_tensor = {}
            for _, linear in pairs:  # LayerNorm outputs are first calibrated per channel
                per_tensor[linear] = linear.input_quantizer
                linear.input_quantizer = UniformQuantizer(self.a_bits, symmetric=False, granularity="channel", axis=-1)
            try:
                with calibrate_on_first_use(encoder, self.percentiles, self.official_arithmetic):
                    x = encoder.embed(images)
                    for block in tqdm(encoder.blocks, desc="RepQ-ViT: calibrating blocks", disable=not progress):
                        x = block(x)
                    encoder.pool(x)
                for norm, linear in tqdm(pairs, desc="RepQ-ViT: reparameterizing", disable=not progress):
                    channel_q = linear.input_quantizer
                    scale, zp = fold_layernorm_(
                        norm, linear, channel_q.scale, channel_q.zero_point, self.round_zero_point
                    )
                    per_tensor[linear].set_scale(scale, zp)
                    self._init_weight(linear)
            finally:
                for linear, q in per_tensor.items():
                    linear.input_quantizer = q
        set_quant_mode(encoder, "quant")

    def _init_weights(self, encoder: nn.Module) -> None:
        for module in encoder.modules():
            if isinstance(module, (QuantLinear, QuantConv2d)) and module.weight_quantizer is not None:
                self._init_weight(module)

    def _init_weight(self, module: QuantLinear | QuantConv2d) -> None:
        percentile_calibrate_(module.weight_quantizer, module.weight, self.percentiles, self.official_arithmetic)


__all__ = [
    "RepQViTConfig",
    "calibrate_on_first_use",
    "can_fold",
    "fold_layernorm_",
    "norm_linear_pairs",
    "patch_embed_conv",
    "percentile_init_",
]
