"""QDrop (Wei et al., ICLR 2022): block-wise output reconstruction with learned rounding and dropped quantization.

After the official wimh966/QDrop code (its ImageNet recipe, ``QDropConfig.reference``), on the canonical
ViT blocks:

1. initialisation (``init_method``): ``mse`` (the official one: weights asymmetric per output channel
   and activations asymmetric per tensor, each range from a least-Lp search, p = 2.4, 100 candidates;
   an activation quantizer is initialised on the block's cached quantized input the first time the
   block runs, after the quantizers before it), ``rtn`` (the naive method's min-max round-to-nearest)
   or ``repq`` (RepQ-ViT's calibration, LayerNorm reparameterization and log-√2 softmax quantizer
   included, as the starting point);
2. for each block in order: the float model's block input and output and the quantized model's block
   input (the blocks before it already reconstructed) are cached over the calibration set; for
   ``iterations`` steps a random batch of ``batch_size`` cached inputs goes through the block in
   ``quant`` mode and the squared error to the float output (summed over channels, averaged over
   tokens and images) is minimised by Adam over
   - AdaRound rounding variables V of every weight: ``W_q = s · (clamp(floor(W / s) + h(V) + z) - z)``,
     ``h(V) = clamp(sigmoid(V) (ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1, V initialised so that
     h(V) is the fractional part of W / s (the float weight), learning rate ``weight_lr``; after
     ``warmup`` of the steps the regulariser ``reg_weight · Σ (1 - |2 h(V) - 1|^b)`` joins, b
     annealed linearly from ``b_range[0]`` to ``b_range[1]``;
   - the step sizes of the block's uniform activation quantizers (LSQ: straight-through rounding,
     the gradient reaches the step), learning rate ``act_lr`` with cosine decay to 0;
   QDrop: every activation quantizer's output keeps its quantized value with probability
   ``drop_prob`` per element and the float value otherwise, and the block input mixes the quantized
   and the float cached inputs the same way (``drop_prob = 1``: BRECQ-style, no dropping);
3. the rounding is made hard (``h(V) → [V ≥ 0]``) and baked into the weights: each weight becomes its
   quantized value ``W_q``, which its weight quantizer (same step and zero point) maps to itself, so
   the calibration state (``modifies_weights``: the block weights are saved) reloads to the same outputs.

RegCache: a register prefix installed before calibration (``Attention.prefix``) and token deletion
(``Block.input_filter``) are part of every block forward, so the reconstruction sees the prefix
keys / values in both the float targets and the quantized blocks.

On CUDA (``FAST_STEP_DEVICES``) a step's forward, loss and backward run as one ``torch.compile`` graph
(eagerly, with a recorded warning, if compilation fails), with no host sync: the batch indices and
drop masks are drawn from the seeded generator outside the graph in the eager loop's order and fed to
the quantizers' hooks, b is a device scalar, the step clamps are foreach ops. The same function as the
eager loop (CPU) up to float rounding (tested on CPU without the compiler).

``objective_on="embedding"`` (CLIP / SigLIP towers): the last block's loss is on the pooled embedding
(``encoder.pool``: CLS + projection, or SigLIP's MAP head run in float) instead of its output tokens,
whose patch tokens the embedding never reads. docs/methods.md lists the departures from the official code.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from regcache.quant.api import FilterFn, QuantConfig, swap_linears
from regcache.quant.calibration import init_on_first_use, iter_images, observe_activations
from regcache.quant.init import quantizer_rows
from regcache.quant.methods.naive import NaiveConfig
from regcache.quant.methods.repq_vit import RepQViTConfig
from regcache.quant.modules import MatMul, QuantLinear, clear_weight_cache, quant_mode, quantizers, set_quant_mode
from regcache.quant.quantizers import Quantizer, UniformQuantizer

if TYPE_CHECKING:
    from regcache.encoders.base import Block, VisionEncoder

INIT_METHODS = ("mse", "rtn", "repq")
OBJECTIVES = ("block", "embedding")
ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid (official values)
MSE_P, MSE_CANDIDATES = 2.4, 100  # the official MSEObserver's norm and candidate count
MSE_MAX_ELEMENTS = 1 << 22  # activation elements scored per candidate (a strided subsample; ranges use all)


@torch.no_grad()
def mse_calibrate_(quantizer: UniformQuantizer, x: torch.Tensor, max_elements: int | None = None) -> UniformQuantizer:
    """Set an asymmetric uniform quantizer's range by the least-Lp (p = 2.4) search over 100 shrunk ranges.

    Candidate i of 1..100 clips to ``[min · i/100, max · i/100]`` (one-sided data keeps its zero end),
    per row of the quantizer's granularity; the score is the mean ``|Q(x) - x|^2.4`` (on at most
    ``max_elements`` evenly strided elements of a row, the range from all of them).
    """
    rows = quantizer_rows(quantizer, x.detach()).float()
    lo, hi = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
    if max_elements is not None and rows.shape[1] > max_elements:
        rows = rows[:, :: math.ceil(rows.shape[1] / max_elements)]
    best_err = best_lo = best_hi = None
    for i in range(1, MSE_CANDIDATES + 1):
        c_lo, c_hi = lo * (i / MSE_CANDIDATES), hi * (i / MSE_CANDIDATES)
        scale, zp = UniformQuantizer._range_params(
            c_lo, c_hi, quantizer.symmetric, quantizer.qmin, quantizer.qmax, quantizer.eps
        )
        q = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], quantizer.qmin, quantizer.qmax)
        err = ((q - zp[:, None]) * scale[:, None] - rows).abs().pow(MSE_P).mean(dim=1)
        if best_err is None:
            best_err, best_lo, best_hi = err, c_lo, c_hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    if quantizer.granularity == "tensor":
        best_lo, best_hi = best_lo[0], best_hi[0]
    quantizer.set_range(best_lo, best_hi)
    return quantizer


class AdaRoundWeight(nn.Module):
    """A weight quantizer's stand-in during reconstruction: ``s · (clamp(floor(W/s) + h(V) + z) - z)``."""

    mode = "quant"  # read by modules.quantized_weight, which then calls this module on the weight

    def __init__(self, quantizer: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__()
        shape = [-1] + [1] * (weight.ndim - 1)  # per output channel (axis 0) or one step per tensor
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.register_buffer("scale", quantizer.scale.detach().float().reshape(shape if quantizer.scale.ndim else []))
        self.register_buffer("zero_point", quantizer.zero_point.detach().float().reshape(self.scale.shape))
        scaled = weight.detach().float() / self.scale
        self.register_buffer("floor", torch.floor(scaled))
        rest = (scaled - self.floor).clamp(1e-6, 1 - 1e-6)  # h(V) = rest: V = -ln((ζ - γ) / (rest - γ) - 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft(self) -> torch.Tensor:
        """h(V), the rounding up of each element in [0, 1]."""
        return ((ZETA - GAMMA) * torch.sigmoid(self.alpha) + GAMMA).clamp(0, 1)

    def quantized(self, hard: bool) -> torch.Tensor:
        """The fake-quantized weight with soft (training) or hard (``V ≥ 0``) rounding, in float32."""
        up = (self.alpha >= 0).float() if hard else self.soft()
        q = torch.clamp(self.floor + up + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The soft-rounded weight in the layer's dtype (the argument's values are the cached float weight's)."""
        return self.quantized(hard=False).to(weight.dtype)


class LinearTempDecay:
    """The rounding regulariser's exponent b: ``start`` until ``warmup · iterations``, then linear to ``end``."""

    def __init__(self, iterations: int, warmup: float, start: float, end: float) -> None:
        self.t_max, self.start_decay, self.start, self.end = iterations, warmup * iterations, start, end

    def __call__(self, t: int) -> float:
        """b at step t (1-based, as the official count)."""
        if t < self.start_decay:
            return self.start
        rel = (t - self.start_decay) / max(self.t_max - self.start_decay, 1)
        return self.end + (self.start - self.end) * max(0.0, 1 - rel)


def block_weight_layers(block: nn.Module) -> list[QuantLinear]:
    """The block's linears with a uniform weight quantizer (the ones AdaRound learns)."""
    return [
        m for m in block.modules() if isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, UniformQuantizer)
    ]


def block_activation_quantizers(block: nn.Module) -> list[Quantizer]:
    """Every quantizer of the block except the weight quantizers (linear inputs and matmul operands)."""
    weight_qs = {id(m.weight_quantizer) for m in block.modules() if isinstance(m, QuantLinear)}
    return [q for _, q in quantizers(block) if id(q) not in weight_qs]


@contextmanager
def mse_init_on_first_use(block: nn.Module) -> Iterator[None]:
    """The block's uncalibrated activation quantizers initialise themselves (least-Lp search) from their first input."""
    with init_on_first_use(block_activation_quantizers(block), lambda q, x: mse_calibrate_(q, x, MSE_MAX_ELEMENTS)):
        yield


@contextmanager
def dropped_quantization(qs: Sequence[Quantizer], prob: float, generator: torch.Generator) -> Iterator[None]:
    """QDrop: each quantizer's output keeps its quantized value with probability ``prob`` per element."""

    def hook(_q: Quantizer, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(out.shape, generator=generator, device=out.device) < prob
        return torch.where(keep, out, args[0].to(out.dtype))

    handles = [q.register_forward_hook(hook) for q in qs] if prob < 1.0 else []
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _map_chunks(fn: Any, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks along the first dim, concatenated."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


@dataclass
class QDropConfig(QuantConfig):
    """QDrop: block reconstruction with AdaRound weights, LSQ activation steps and randomly dropped quantization."""

    name = "qdrop"
    modifies_weights = True
    iterations: int = 20000
    batch_size: int = 32
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    drop_prob: float = 0.5
    reg_weight: float = 0.01
    b_range: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    init_method: str = "mse"
    init_images: int = 256
    objective_on: str = "block"
    amp: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.b_range = tuple(float(b) for b in self.b_range)
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"qdrop.init_method must be one of {INIT_METHODS}, got {self.init_method!r}")
        if self.objective_on not in OBJECTIVES:
            raise ValueError(f"qdrop.objective_on must be one of {OBJECTIVES}, got {self.objective_on!r}")
        if not 0.0 < self.drop_prob <= 1.0:
            raise ValueError(f"qdrop.drop_prob (keep a quantized value) must lie in (0, 1], got {self.drop_prob}")
        if self.iterations < 0 or self.batch_size < 1 or self.init_images < 1:
            raise ValueError("qdrop.iterations must be >= 0, batch_size and init_images >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"qdrop.warmup is a fraction of the iterations in [0, 1), got {self.warmup}")

    @classmethod
    def reference(cls, w_bits: int = 4, a_bits: int = 4) -> QDropConfig:
        """The official ImageNet recipe: 20k steps of batch 32, weight lr 1e-3, LSQ lr 4e-5, drop 0.5, float32."""
        return cls(
            w_bits=w_bits,
            a_bits=a_bits,
            iterations=20000,
            batch_size=32,
            weight_lr=1e-3,
            act_lr=4e-5,
            drop_prob=0.5,
            reg_weight=0.01,
            b_range=(20.0, 2.0),
            warmup=0.2,
            init_method="mse",
            init_images=256,
            objective_on="block",
            amp=False,
        )

    def _repq(self) -> RepQViTConfig:
        return RepQViTConfig(w_bits=self.w_bits, a_bits=self.a_bits)

    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """The init method's modules (RepQ-ViT's with ``repq``: its stem and head options)."""
        if self.init_method == "repq":
            return self._repq().default_filter(module, fqn)
        return super().default_filter(module, fqn)

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Attach the init method's quantizers: naive's (``rtn``), RepQ-ViT's (``repq``), asymmetric ones (``mse``)."""
        if self.init_method == "rtn":
            NaiveConfig(w_bits=self.w_bits, a_bits=self.a_bits).transform(encoder, filter_fn)
            return
        if self.init_method == "repq":
            self._repq().transform(encoder, filter_fn)
            return
        for _, module in swap_linears(encoder, filter_fn):
            if isinstance(module, QuantLinear):
                module.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=False, granularity="channel", axis=0)
                module.input_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
            elif isinstance(module, MatMul):
                module.a_quantizer = UniformQuantizer(self.a_bits, symmetric=False)
                module.b_quantizer = UniformQuantizer(self.a_bits, symmetric=False)

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Initialise by ``init_method``, then reconstruct block after block on the cached calibration streams."""
        if any(q.is_calibrated for _, q in quantizers(encoder)):
            raise RuntimeError("QDrop edits weights during calibration: calibrate a freshly quantized model once")
        chunks = list(iter_images(encoder, batches, progress, desc="QDrop: calibration images"))
        if not chunks:
            raise ValueError("calibration data is empty: pass at least one batch of images")
        images = torch.cat(chunks)
        if self.init_method == "rtn":
            with torch.no_grad():
                for layer in encoder.modules():
                    if isinstance(layer, QuantLinear) and layer.weight_quantizer is not None:
                        layer.weight_quantizer.calibrate_(layer.weight)
            observe_activations(encoder, [images[i : i + 64] for i in range(0, len(images), 64)], progress=False)
        elif self.init_method == "repq":
            self._repq().calibrate(encoder, [images], progress=progress)
        else:
            with torch.no_grad():
                for layer in encoder.modules():
                    if isinstance(layer, QuantLinear) and layer.weight_quantizer is not None:
                        mse_calibrate_(layer.weight_quantizer, layer.weight)
        encoder.calibration_summary = {"reconstruction": self.reconstruct(encoder, images, progress)}
        set_quant_mode(encoder, "quant")

    def reconstruct(
        self, encoder: VisionEncoder, images: torch.Tensor, progress: bool = True, budget_s: float | None = None
    ) -> dict[str, Any]:
        """Block-wise reconstruction of every block with quantizers, in order; returns per-block seconds and losses.

        ``budget_s`` (benchmarks): stop where one more block (as long as the last) would end past that many
        seconds, the blocks after it left as the init method set them.
        """
        device = images.device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        chunk = max(self.batch_size, 64)
        start = _synced_clock(device)
        outside = [q for name, q in quantizers(encoder) if not name.startswith("blocks.")]
        self._init_outside_blocks(encoder, images, [q for q in outside if not q.is_calibrated])
        for q in outside:  # the stem's (and head's) quantizers quantize from here on, as in the final model
            q.set_mode("quant")
        with torch.no_grad():
            with quant_mode(encoder, "float"):
                fp_x = _map_chunks(encoder.embed, images, chunk)
            q_x = _map_chunks(encoder.embed, images, chunk) if outside else fp_x
        stats: dict[str, Any] = {"images": int(images.shape[0]), "iterations": self.iterations, "blocks": {}}
        stats["setup_s"] = _synced_clock(device) - start
        last = encoder.num_blocks - 1
        for index, block in enumerate(tqdm(encoder.blocks, desc="QDrop: reconstructing blocks", disable=not progress)):
            if not any(True for _ in quantizers(block)):
                with torch.no_grad():  # a float block (the caller's filter): both streams go through it
                    same = q_x is fp_x
                    fp_x = _map_chunks(block, fp_x, chunk)
                    q_x = fp_x if same else _map_chunks(block, q_x, chunk)
                continue
            t0 = _synced_clock(device)
            with torch.no_grad(), quant_mode(block, "float"):
                fp_out = _map_chunks(block, fp_x, chunk)
            if self.init_method == "mse":
                self._init_block_activations(block, q_x)
            embedding = self.objective_on == "embedding" and index == last
            row = self._reconstruct_block(encoder, block, q_x, fp_x, fp_out, embedding, generator)
            with torch.no_grad(), quant_mode(block, "quant"):
                q_x = _map_chunks(block, q_x, chunk)
            fp_x = fp_out
            row["seconds"] = _synced_clock(device) - t0
            stats["blocks"][str(index)] = row
            if budget_s is not None and _synced_clock(device) - start + row["seconds"] > budget_s:
                break  # the next block would end past the budget
        stats["total_s"] = _synced_clock(device) - start
        return stats

    @torch.no_grad()
    def _init_outside_blocks(self, encoder: VisionEncoder, images: torch.Tensor, qs: list[Quantizer]) -> None:
        """Min-max init of uncalibrated quantizers outside the blocks (a caller's filter with ``mse``) on the images."""
        if not qs:
            return
        weights = {id(m.weight_quantizer): m for m in encoder.modules() if isinstance(m, QuantLinear)}
        acts = [q for q in qs if id(q) not in weights]
        for q in qs:
            if id(q) in weights:
                q.calibrate_(weights[id(q)].weight)
        with quant_mode(encoder, "float"):
            for q in acts:
                q.reset_observer()
                q.mode = "observe"
            for i in range(0, len(images), 64):
                encoder(images[i : i + 64])
        for q in acts:
            q.finalize()

    @torch.no_grad()
    def _init_block_activations(self, block: Block, q_x: torch.Tensor) -> None:
        """Least-Lp init of the block's activation quantizers on its first ``init_images`` quantized inputs."""
        with mse_init_on_first_use(block), _weights_quantized(block):  # on the output of the quantized layers before
            block(q_x[: self.init_images])

    def _reconstruct_block(
        self,
        encoder: VisionEncoder,
        block: Block,
        q_in: torch.Tensor,
        fp_in: torch.Tensor,
        fp_out: torch.Tensor,
        embedding: bool,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """Optimise the block's rounding and activation steps for ``iterations`` steps, then bake the rounding."""
        device = q_in.device
        layers = block_weight_layers(block)
        acts = [q for q in block_activation_quantizers(block) if isinstance(q, UniformQuantizer) and q.is_calibrated]
        drop_qs = block_activation_quantizers(block)
        target = fp_out
        if embedding:
            with torch.no_grad(), quant_mode(encoder, "float"):
                target = _map_chunks(encoder.pool, fp_out, max(self.batch_size, 64))
        saved_grad = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in saved_grad:
            p.requires_grad_(False)
        rounding = {layer: AdaRoundWeight(layer.weight_quantizer, layer.weight).to(device) for layer in layers}
        originals = {layer: layer.weight_quantizer for layer in layers}
        steps = {q: q.scale.detach().clone().requires_grad_(True) for q in acts}
        for layer, ada in rounding.items():
            layer.weight_quantizer = ada
        for q, s in steps.items():
            q.scale = s
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and device.type == "cuda" else nullcontext()
        fused = {"fused": True} if device.type == "cuda" else {}
        w_opt = torch.optim.Adam([a.alpha for a in rounding.values()], lr=self.weight_lr, **fused) if rounding else None
        a_opt = torch.optim.Adam(list(steps.values()), lr=self.act_lr, **fused) if steps else None
        a_sched = None
        if a_opt is not None:
            a_sched = torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=max(self.iterations, 1), eta_min=0.0)
        temp = LinearTempDecay(self.iterations, self.warmup, *self.b_range)
        loss_start = self.iterations * self.warmup
        n = q_in.shape[0]
        rec = reg = None
        fast = device.type in FAST_STEP_DEVICES
        timing: dict[str, Any] = {}
        try:
            if fast:
                with quant_mode(block, "quant"):
                    calls = _probe_drop_calls(block, drop_qs, q_in[: self.batch_size], autocast, self.drop_prob)
                    fast = calls is not None
                if fast:
                    with quant_mode(block, "quant"):
                        rec, reg, timing = self._fast_loop(
                            encoder,
                            block,
                            drop_qs,
                            calls,
                            rounding,
                            steps,
                            (q_in, fp_in, target),
                            embedding,
                            generator,
                            (w_opt, a_opt, a_sched),
                            autocast,
                        )
        finally:
            if fast:
                self._bake(block, rounding, originals, steps, saved_grad)
        if fast:
            return {
                "final_loss": None if rec is None else float(rec.detach()),
                "final_round_reg": None if reg is None else float(reg.detach()),
                **timing,
            }
        mark, t_mark = min(100, self.iterations // 2), None  # steady time from step mark + 1 (one sync)
        t0 = _synced_clock(device)
        try:
            with quant_mode(block, "quant"), dropped_quantization(drop_qs, self.drop_prob, generator):
                for step in range(1, self.iterations + 1):
                    if step == mark + 1:
                        t_mark = _synced_clock(device)
                    idx = torch.randint(0, n, (self.batch_size,), generator=generator, device=device)
                    x = q_in[idx]
                    if self.drop_prob < 1.0:
                        keep = torch.rand(x.shape, generator=generator, device=device) < self.drop_prob
                        x = torch.where(keep, x, fp_in[idx])
                    with autocast:
                        out = block(x)
                        if embedding:
                            out = encoder.pool(out)
                    rec = (out.float() - target[idx].float()).pow(2).sum(-1).mean()
                    loss = rec
                    if step >= loss_start and rounding:
                        b = temp(step)
                        reg = sum((1 - (2 * a.soft() - 1).abs().pow(b)).sum() for a in rounding.values())
                        loss = rec + self.reg_weight * reg
                    for opt in (w_opt, a_opt):
                        if opt is not None:
                            opt.zero_grad(set_to_none=True)
                    loss.backward()
                    for opt in (w_opt, a_opt):
                        if opt is not None:
                            opt.step()
                    if a_sched is not None:
                        a_sched.step()
                    with torch.no_grad():
                        for s in steps.values():  # the official LSQ keeps the step positive
                            s.abs_().clamp_(min=1e-8)
        finally:
            self._bake(block, rounding, originals, steps, saved_grad)
        end = _synced_clock(device)
        timing = {"step": "eager", "loop_s": end - t0}
        if t_mark is not None and self.iterations > mark:
            timing["steady_ms_per_step"] = 1000 * (end - t_mark) / (self.iterations - mark)
        return {
            "final_loss": None if rec is None else float(rec.detach()),
            "final_round_reg": None if reg is None else float(reg.detach()),
            **timing,
        }

    @staticmethod
    def _bake(
        block: nn.Module,
        rounding: dict[QuantLinear, AdaRoundWeight],
        originals: dict[QuantLinear, Quantizer],
        steps: dict[Quantizer, torch.Tensor],
        saved_grad: list[tuple[torch.Tensor, bool]],
    ) -> None:
        """Hard rounding baked into the weights, learned steps kept, the block's own quantizers and grad flags back."""
        with torch.no_grad():
            for layer, ada in rounding.items():
                layer.weight.copy_(ada.quantized(hard=True).to(layer.weight.dtype))
                layer.weight_quantizer = originals[layer]
            for q, s in steps.items():
                q.scale = s.detach().clone()
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        clear_weight_cache(block)

    def _fast_loop(
        self,
        encoder: VisionEncoder,
        block: Block,
        drop_qs: list[Quantizer],
        calls: list[tuple[int, torch.Size]],
        rounding: dict[QuantLinear, AdaRoundWeight],
        steps: dict[Quantizer, torch.Tensor],
        streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        embedding: bool,
        generator: torch.Generator,
        optim: tuple[Any, Any, Any],
        autocast: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
        """The reconstruction steps with the forward and loss compiled and no host sync (CUDA; see ``_FastStep``).

        The same function as the eager loop, drawing the same random numbers in the same order: the batch
        indices, the input mix and then each dropped quantizer's mask in the order the forward calls them
        (probed once), drawn eagerly from ``generator`` and fed to the graph as tensors.
        """
        q_in, fp_in, target = streams
        w_opt, a_opt, a_sched = optim
        device = q_in.device
        n, prob, iters = q_in.shape[0], self.drop_prob, self.iterations
        feed = _MaskFeed()
        temp = LinearTempDecay(iters, self.warmup, *self.b_range)
        b_values = [temp(t) for t in range(1, iters + 1)]  # python floats: no per-step device work
        b_now = torch.zeros((), device=device)
        params = [a.alpha for a in rounding.values()] + list(steps.values())
        step_list = list(steps.values())
        loss_start = iters * self.warmup
        reg_weight = self.reg_weight

        def loss_fn(idx, keep_in, masks, b, q_in, fp_in, target, with_reg: bool):
            feed.masks = masks
            x = q_in[idx]
            if keep_in is not None:
                x = torch.where(keep_in < prob, x, fp_in[idx])
            with autocast:
                out = block(x)
                if embedding:
                    out = encoder.pool(out)
            rec = (out.float() - target[idx].float()).pow(2).sum(-1).mean()
            if not with_reg:
                return rec, rec, None
            reg = sum((1 - (2 * a.soft() - 1).abs().pow(b)).sum() for a in rounding.values())
            return rec + reg_weight * reg, rec, reg

        step_fn = _FastStep(loss_fn, params)
        hooks = [drop_qs[q].register_forward_hook(feed.hook(pos, prob)) for pos, (q, _) in enumerate(calls)]
        x_shape = (self.batch_size, *q_in.shape[1:])
        rec = reg = None
        mark = min(100, iters // 2)
        t_mark = None
        t0 = _synced_clock(device)
        room = _recompile_room()
        try:
            room.__enter__()
            for step in range(1, iters + 1):
                if step == mark + 1:
                    t_mark = _synced_clock(device)
                idx = torch.randint(0, n, (self.batch_size,), generator=generator, device=device)
                keep_in = torch.rand(x_shape, generator=generator, device=device) if prob < 1.0 else None
                masks = [torch.rand(shape, generator=generator, device=device) for _, shape in calls]
                with_reg = step >= loss_start and bool(rounding)
                if with_reg:
                    b_now.fill_(b_values[step - 1])
                for opt in (w_opt, a_opt):
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                _, rec, reg_t = step_fn(idx, keep_in, masks, b_now, q_in, fp_in, target, with_reg)
                reg = reg_t if reg_t is not None else reg
                for opt in (w_opt, a_opt):
                    if opt is not None:
                        opt.step()
                if a_sched is not None:
                    a_sched.step()
                if step_list:
                    with torch.no_grad():  # the official LSQ keeps the step positive
                        torch._foreach_abs_(step_list)
                        torch._foreach_clamp_min_(step_list, 1e-8)
        finally:
            room.__exit__(None, None, None)
            for h in hooks:
                h.remove()
        end = _synced_clock(device)
        timing = {"step": step_fn.kind, "loop_s": end - t0}
        if step_fn.warning:
            timing["compile_warning"] = step_fn.warning
        if t_mark is not None and iters > mark:
            timing["steady_ms_per_step"] = 1000 * (end - t_mark) / (iters - mark)
        return rec, reg, timing


FAST_STEP_DEVICES: tuple[str, ...] = ("cuda",)  # device types whose steps run through _FastStep
COMPILE_STEP = True  # whether _FastStep compiles the forward and loss (False: the same loop eagerly)


class _MaskFeed:
    """The drop masks of one step, drawn outside the compiled graph and read by the quantizers' hooks in it."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []

    def hook(self, position: int, prob: float) -> Any:
        """A forward hook keeping the quantized output where mask ``position`` of the step is below ``prob``."""

        def hook(_q: Quantizer, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            return torch.where(self.masks[position] < prob, out, args[0].to(out.dtype))

        return hook


def _probe_drop_calls(
    block: nn.Module, qs: Sequence[Quantizer], x: torch.Tensor, autocast: Any, prob: float
) -> list[tuple[int, torch.Size]] | None:
    """``(quantizer index, output shape)`` per call of the dropped quantizers in one forward, in call order.

    None where a quantizer runs twice in one forward (its masks would need a per-call count: the eager loop
    then runs). Run with autograd on, as the steps are (the fused attention kernel, which hides quantizer
    calls, is then off).
    """
    if prob >= 1.0:
        return []
    calls: list[tuple[int, torch.Size]] = []

    def record(i: int) -> Any:
        def hook(_q: Quantizer, _args: tuple[Any, ...], out: torch.Tensor) -> None:
            calls.append((i, out.shape))

        return hook

    handles = [q.register_forward_hook(record(i)) for i, q in enumerate(qs)]
    try:
        with torch.enable_grad(), autocast:
            block(x)
    finally:
        for h in handles:
            h.remove()
    return calls if len({i for i, _ in calls}) == len(calls) else None


@contextmanager
def _recompile_room() -> Iterator[None]:
    """Room for one graph per block and loss variant (the same code compiles again for each block's modules)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    with cfg.patch(**{name: max(getattr(cfg, name), 128)}):
        yield


class _FastStep:
    """Forward, loss and backward of one reconstruction step: compiled by ``torch.compile``, eager if that fails.

    Compilation failing (at the first call of a loss variant, where Inductor compiles) is recorded in
    ``warning`` and warned once; that step and all later ones then run eagerly, with the same inputs
    (the random draws of the step are reused), so the sequence of steps is unchanged.
    """

    def __init__(self, loss_fn: Any, params: list[torch.Tensor]) -> None:
        self.loss_fn, self.params = loss_fn, params
        self.compiled = torch.compile(loss_fn) if COMPILE_STEP else None
        self.kind = "compiled" if COMPILE_STEP else "uncompiled"
        self.warning: str | None = None

    def __call__(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(loss, reconstruction error, rounding regulariser or None)`` after ``loss.backward()``."""
        if self.compiled is not None:
            try:
                loss, rec, reg = self.compiled(*args)
                loss.backward()
                return loss, rec, reg
            except Exception as exc:  # any compiler failure: the eager step is the same function
                self.compiled, self.kind = None, "eager (compile failed)"
                self.warning = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
                warnings.warn(
                    f"QDrop: torch.compile of the reconstruction step failed, running it eagerly ({self.warning})",
                    stacklevel=2,
                )
                for p in self.params:
                    p.grad = None
        loss, rec, reg = self.loss_fn(*args)
        loss.backward()
        return loss, rec, reg


def _synced_clock(device: torch.device) -> float:
    """Wall seconds after the device's queued work (one sync per block, none per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextmanager
def _weights_quantized(block: nn.Module) -> Iterator[None]:
    """The block's weight quantizers in ``quant`` mode (activation quantizers keep theirs)."""
    qs = [m.weight_quantizer for m in block.modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    saved = [(q, q.mode) for q in qs]
    for q in qs:
        q.set_mode("quant")
    try:
        yield
    finally:
        for q, mode in saved:
            q.mode = mode


__all__ = [
    "INIT_METHODS",
    "AdaRoundWeight",
    "LinearTempDecay",
    "QDropConfig",
    "block_activation_quantizers",
    "block_weight_layers",
    "mse_calibrate_",
]
