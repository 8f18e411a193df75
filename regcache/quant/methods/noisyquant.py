"""NoisyQuant (Liu et al., CVPR 2023): a fixed noisy bias before activation quantization.

After the official kriskrisliu/NoisyQuant code (``fast_quant.py``, ``validate.py``):

- quantized tensors: the weights and inputs of the block linears qkv / proj / fc1 / fc2 only (not
  the head, not the patch embedding, not the attention matmuls);
- weights: symmetric, per output channel, min-max. The reference fake-quantizes them in place;
  here a weight quantizer computes exactly the same values, so float mode stays the float model
  and nothing but quantizer buffers needs saving (``modifies_weights = False``);
- inputs: symmetric, per tensor; clip = absmax · i / 1000 (i = 1000 .. 1) of least output MSE
  ``mean((W_q Q(x) - W_q x)^2)`` (x clamped to ±clip in the search, as the reference);
- a fixed noise vector N (length C_in) per linear: y = W_q Q(x + N) + (b - W_q N). Its mean shift
  m ∈ Δ · {-200 .. 199} / 200 and then its amplitude k ∈ {0 .. 1999} / 1000 (N = m + k N₀) are
  searched by the same output MSE;
- calibration is sequential as in the reference: a first sweep sets every clip on inputs produced
  by the already quantized (noise-free) layers before it, a second sweep searches every noise on
  inputs produced by the already noisy-quantized layers before it. Each block's parts run once per
  sweep (``staged_blocks``, default on for the canonical unhooked block: norm1 → attention → proj,
  norm2 → fc1 → fc2, each searched linear applied to exactly the input it receives in the block's
  forward); otherwise the block runs again up to each linear (forward pre-hooks), the same values
  at ~2.6× the forward work.

The candidate evaluation is batched (many candidates per matmul, memory bounded by
``search_chunk_elements``, default 2^28 elements on CUDA and 2^26 elsewhere; the output MSE goes
through WᵀW when C_out > C_in). ``search_precision`` picks how: ``fp32``, ``bf16x3`` (E_hi B_hi +
E_lo B_hi + E_hi B_lo), ``bf16x2`` (integer codes R times B_hi + B_lo, minus the candidate-affine u
B computed once; see :class:`_CodeProducts`) or ``bf16`` (R times B_hi only: half bf16x2's
tensor-core work, the objective of the weight factor B rounded to bfloat16, an opt-in speed /
fidelity trade-off, BENCHMARKS.md §2); ``auto`` is bf16x2 on CUDA and fp32 elsewhere. On CUDA the
per-chunk operands are built by Triton kernels. ``search_tokens`` evaluates the objective on a
seeded uniform sample of that many input tokens per linear; the reference uses every token
(``search_tokens=None``, ~25x more work for ViT-B/16 at 1024 images). This sampling is a speed
departure from the reference, not a quirk fix. The clip search's absmax always comes from all
tokens.

Departures from the official code, each behind a flag that :meth:`NoisyQuantConfig.reference` sets:

- ``seeded_noise`` (default True; reference False): N₀ is drawn from a generator seeded by
  ``seed`` instead of the unseeded global RNG;
- ``gaussian_noise`` (default False; reference True): the paper samples N₀ from a uniform
  distribution, U(-Δ, Δ); the official code draws ``(randn * 2 - 1) · Δ`` (Gaussian, mean -Δ).

The calibration set is the data configuration's, not the method's: this method uses the batches
it is given. The paper calibrates on 1024 images (``calib_size: 1024``, drawn class-balanced);
the official loader takes the first 256 files, i.e. one class (docs/methods.md says how to
reproduce that by configuration).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from regcache import kernels
from regcache.quant.api import FilterFn, QuantConfig
from regcache.quant.calibration import iter_images
from regcache.quant.modules import QuantLinear, quantized_weight, set_quant_mode
from regcache.quant.quantizers import UniformQuantizer

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the block's forward is not needed."""


class NoisyUniformQuantizer(UniformQuantizer):
    """Symmetric per-tensor uniform quantizer that also holds its linear's fixed noisy bias ``noise``.

    The quantizer itself only quantizes; :class:`NoisyQuantLinear` adds ``noise`` before it and
    removes it through the bias. Keeping ``noise`` here saves it with the quantizer state.
    """

    kind: ClassVar[str] = "noisy_uniform"

    def __init__(self, bits: int) -> None:
        super().__init__(bits, symmetric=True, granularity="tensor")
        self.register_buffer("noise", torch.empty(0))

    def describe(self) -> dict[str, Any]:
        """The uniform summary, marked as carrying a noisy bias (so manifests tell it from a plain quantizer)."""
        return {**super().describe(), "noisy_bias": True}


class NoisyQuantLinear(QuantLinear):
    """Linear computing ``W Q(x + N) + (b - W N)``, with W the weight as used (quantized or not).

    Once a noise is set it is applied in every mode, so with the quantizers in float mode the
    output equals the original linear up to float rounding (the noise cancels through the bias).
    """

    @property
    def noise(self) -> torch.Tensor | None:
        """The fixed noisy bias N (length in_features), or None before calibration."""
        q = self.input_quantizer
        return q.noise if isinstance(q, NoisyUniformQuantizer) and q.noise.numel() else None

    def corrected_bias(self, weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """``b - W N`` for the given weight (default: the weight as the forward uses it)."""
        w = self._effective_weight() if weight is None else weight
        n = self.noise
        if n is None:
            return self.bias
        correction = -(w @ n.to(w.dtype))
        return correction if self.bias is None else self.bias + correction

    def _effective_weight(self) -> torch.Tensor:
        return quantized_weight(self, self.weight_quantizer, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the noise N, quantize the input, and cancel N through the corrected bias ``b - W N``."""
        w = self._effective_weight()
        n = self.noise
        if n is not None:
            x = x + n.to(x.dtype)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, w, self.corrected_bias(w))


# ---- the searches (pure functions of the captured input and the quantized weight) ---------------


def symmetric_fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)`` times scale (the reference's activation quantizer)."""
    n = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(x / scale), -n - 1, n) * scale


def _split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) bfloat16 with hi + lo = t to ~2^-17 relative (t float32)."""
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bfloat16 (M, K) @ (K, N) with float32 accumulation and output (tensor cores on CUDA).

    Products of two bfloat16 values are exact in float32, so the CPU fallback computes the same sums.
    """
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=): the same sums, CUDA cores
            pass
    return a.float() @ b.float()


def _output_factor(weight: torch.Tensor) -> torch.Tensor:
    """B (C_in, N) float32 with B Bᵀ = WᵀW: Wᵀ, or a square root of WᵀW (float64 eigh) when C_out > C_in."""
    c_out, c_in = weight.shape
    w = weight.float()
    if c_out > c_in:
        evals, evecs = torch.linalg.eigh(w.double().t() @ w.double())
        return (evecs * evals.clamp_min(0).sqrt()).float().contiguous()
    return w.t().contiguous()


def output_mse(weight: torch.Tensor, precision: str = "fp32") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping input errors E (K, T, C_in) to ``mean((E Wᵀ)^2)`` per candidate (K,).

    ``precision="fp32"``: float32 matmuls; uses the Gram matrix WᵀW when C_out > C_in (T·C_in² instead
    of T·C_in·C_out work). ``precision="bf16x3"``: the sum of squares of E B with B = Wᵀ, or a square
    root of WᵀW (B Bᵀ = WᵀW, from an eigendecomposition in float64) when C_out > C_in, computed as
    E_hi B_hi + E_lo B_hi + E_hi B_lo in one bfloat16 tensor-core matmul with float32 accumulation
    (E = E_hi + E_lo, B = B_hi + B_lo): ~float32 accuracy at a fraction of its cost on GPUs.
    The function may overwrite E (callers pass temporaries).
    """
    c_out, c_in = weight.shape
    w = weight.float()
    if precision == "bf16x3":
        b_hi, b_lo = _split_bf16(_output_factor(weight))
        rhs = torch.cat([b_hi, b_hi, b_lo])  # [E_hi | E_lo | E_hi] @ rhs

        def split(err: torch.Tensor) -> torch.Tensor:
            if err.dtype == torch.bfloat16:  # already [E_hi | E_lo | E_hi] (the fused builder)
                k, t, c3 = err.shape
                h = _mm_fp32(err.view(k * t, c3), rhs)
                return h.square_().view(k, -1).sum(dim=1) / (t * c_out)
            k, t, c = err.shape
            a = torch.empty(k, t, 3 * c, device=err.device, dtype=torch.bfloat16)
            hi = a[..., :c]
            hi.copy_(err)
            a[..., c : 2 * c].copy_(err.sub_(hi))
            a[..., 2 * c :].copy_(hi)
            h = _mm_fp32(a.view(k * t, 3 * c), rhs)
            return h.square_().view(k, -1).sum(dim=1) / (t * c_out)

        return split
    if precision != "fp32":
        raise ValueError(f"unknown search precision {precision!r} (fp32, bf16x3, bf16x2, bf16)")
    if c_out > c_in:
        gram = w.t() @ w

        def via_gram(err: torch.Tensor) -> torch.Tensor:
            return ((err @ gram) * err).sum(dim=(1, 2)) / (err.shape[1] * c_out)

        return via_gram

    def direct(err: torch.Tensor) -> torch.Tensor:
        return (err @ w.t()).pow(2).mean(dim=(1, 2))

    return direct


def _losses_batched(
    num: int, errors: Callable[[slice], torch.Tensor], loss: Callable[[torch.Tensor], torch.Tensor], chunk: int
) -> torch.Tensor:
    """Loss of candidates 0..num-1, evaluating ``chunk`` candidates per call of ``errors(slice)``."""
    return torch.cat([loss(errors(slice(i, min(i + chunk, num)))) for i in range(0, num, chunk)])


def _chunk(x: torch.Tensor, weight: torch.Tensor, budget: int) -> int:
    return max(1, budget // (x.shape[0] * max(weight.shape)))


# ---- fused Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for the tests) ----------------
# Building the per-candidate operands op by op costs ~10 full-size float32 passes per chunk; the
# kernels read x once and write the bfloat16 operand once. KernelConfig.fused_noisyquant (default from
# REGCACHE_FUSED_NOISYQUANT=0) turns them off.
_LHS_BLOCK = 1024
_SQ_BLOCK = 4096


@functools.cache
def _kernels() -> Any:
    """The Triton kernel module, or None without Triton."""
    try:
        from regcache.quant import _triton_noisyquant
    except (ImportError, AttributeError):  # pragma: no cover - depends on the install
        return None
    return _triton_noisyquant


def _fused_applies(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors on t's device."""
    if not kernels.active("fused_noisyquant") or torch.compiler.is_compiling():
        return False
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return _kernels() is not None


def _launch(kernel: Any, grid: tuple[int], device: torch.device, *args: Any) -> bool:
    """Run a kernel; on a build or launch failure warn once and use the op-by-op formulas from then on."""
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[grid](*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        kernels.record_fallback("fused_noisyquant", repr(exc))
        return False
    return True


def _fused_lhs(
    x: torch.Tensor, params: torch.Tensor, lo: int, hi: int, divide: bool, split3: bool, copies: int = 2
) -> torch.Tensor | None:
    """bfloat16 (K, T, copies·C) [R | R] / [R] or (K, T, 3C) [E_hi | E_lo | E_hi] of ``params`` (None: not run).

    u = x / params[k] (divide; params (K,)) or x + params[k] (params (K, C) or (K, 1)), R = clamp(round(u)),
    E = R - u: the float32 operations of the op-by-op formulas, in the same order.
    """
    if not _fused_applies(x):
        return None
    k_mod = _kernels()
    x, params = x.contiguous(), params.contiguous()
    k, (t, c) = params.shape[0], x.shape
    out = torch.empty(k, t, (3 if split3 else copies) * c, device=x.device, dtype=torch.bfloat16)
    n = k * t * c
    stride_c = 0 if divide or params.shape[1] == 1 else 1
    grid = (k_mod.cdiv(n, _LHS_BLOCK),)
    args = (x, params, out, n, t * c, c, params.stride(0), stride_c, float(lo), float(hi), divide, split3)
    args += (copies == 2, _LHS_BLOCK)
    return out if _launch(k_mod.lhs_kernel, grid, x.device, *args) else None


def _fused_sq_dist(
    h: torch.Tensor, shared: torch.Tensor, divisors: torch.Tensor | None, offsets: torch.Tensor | None
) -> torch.Tensor | None:
    """Per k: sum over (t, n) of (h - shared / divisors[k])^2, or of (h - shared - offsets[k, n])^2 (None: not run).

    h (K, T·N), shared (T, N), divisors (K,), offsets (K, N).
    """
    if not _fused_applies(h):
        return None
    k_mod = _kernels()
    k, tn, cols = h.shape[0], shared.numel(), shared.shape[-1]
    nblk = k_mod.cdiv(tn, _SQ_BLOCK)
    partial = torch.empty(k, nblk, device=h.device, dtype=torch.float32)
    divide = divisors is not None
    d = (divisors if divide else offsets).contiguous()
    v_stride = 0 if divide else d.stride(0)
    args = (h.contiguous(), shared.contiguous(), d, d, partial, tn, cols, v_stride, nblk, divide, _SQ_BLOCK)
    if not _launch(k_mod.sq_dist_kernel, (k * nblk,), h.device, *args):
        return None
    return partial.sum(dim=1)


class _CodeProducts:
    """bf16x2 output errors: (R - u) B = R B - u B, with R = clamp(round(u)) the integer codes.

    |R| <= 256 is exact in bfloat16, so R B_hi + R B_lo is one bfloat16 tensor-core matmul over
    [R | R] with float32 accumulation (two products, not bf16x3's three, and no float32 error tensor);
    u B is affine in the candidate (x B / Δ_k, or x_steps B + N_k B), so its parts are computed once,
    in float64, against the same B = B_hi + B_lo. Both terms use that B, so the difference is E B up
    to float32 rounding: the precision of bf16x3 (whose E_lo B_lo term is dropped instead).
    ``products=1`` (precision ``bf16``): B = B_hi, R B_hi alone, half the work; exact for that B,
    i.e. the output MSE of a weight factor rounded to bfloat16.
    """

    def __init__(self, weight: torch.Tensor, bits: int, products: int = 2) -> None:
        if bits > 9:
            raise ValueError(f"bf16x2 / bf16 need codes exact in bfloat16 (bits <= 9), got {bits}: use bf16x3")
        b_hi, b_lo = _split_bf16(_output_factor(weight))
        self.copies = products
        if products == 2:
            self.b64 = b_hi.double() + b_lo.double()
            self.rhs = torch.cat([b_hi, b_lo])  # [R | R] @ rhs
        else:  # bf16: B is B_hi exactly, R B_hi one product, u B_hi in float64 as below
            self.b64 = b_hi.double()
            self.rhs = b_hi
        self.b32 = self.b64.float()  # exact: hi + lo spans at most 24 significant bits
        self.c_out = weight.shape[0]

    def times_b(self, u: torch.Tensor) -> torch.Tensor:
        """u B in float64, rounded to float32 (the shared part of the output errors)."""
        return (u.double() @ self.b64).float()

    def losses(
        self,
        x: torch.Tensor,
        params: torch.Tensor,
        lo: int,
        hi: int,
        shared: torch.Tensor,
        offsets: torch.Tensor | None,
        chunk: int,
    ) -> torch.Tensor:
        """``mean((E Wᵀ)^2)`` per candidate; divisors ``params`` (K,) if ``offsets`` is None, else shifts (K, C|1)."""
        divide = offsets is None
        return torch.cat([
            self._chunk_losses(x, params[i : i + chunk], lo, hi, shared, None if divide else offsets[i : i + chunk])
            for i in range(0, params.shape[0], chunk)
        ])  # fmt: skip

    def _chunk_losses(
        self,
        x: torch.Tensor,
        p: torch.Tensor,
        lo: int,
        hi: int,
        shared: torch.Tensor,
        offsets: torch.Tensor | None,
    ) -> torch.Tensor:
        divide = offsets is None
        (k, (t, c)), n_cols = (p.shape[0], x.shape), shared.shape[1]
        a = _fused_lhs(x, p, lo, hi, divide, split3=False, copies=self.copies)
        if a is not None:
            h = _mm_fp32(a.view(k * t, self.copies * c), self.rhs)
        else:
            u = x.unsqueeze(0) / p.view(-1, 1, 1) if divide else x.unsqueeze(0) + p.unsqueeze(1)
            r = u.round_().clamp_(lo, hi)
            if r.is_cuda:  # tensor cores: [R | R] @ [B_hi; B_lo] (or R @ B_hi)
                a = torch.empty(k, t, self.copies * c, device=r.device, dtype=torch.bfloat16)
                for i in range(self.copies):
                    a[..., i * c : (i + 1) * c].copy_(r)
                h = _mm_fp32(a.view(k * t, self.copies * c), self.rhs)
            else:  # the same B in float32, one product
                h = r.view(k * t, c) @ self.b32
        h = h.view(k, t * n_cols)
        sq = _fused_sq_dist(h, shared, p if divide else None, offsets)
        if sq is None:
            h = h.view(k, t, n_cols)
            if divide:
                h.addcdiv_(shared, p.view(-1, 1, 1), value=-1)
            else:
                h.sub_(shared).sub_(offsets.unsqueeze(1))
            sq = h.square_().view(k, -1).sum(dim=1)
        return sq / (t * self.c_out)


_CODE_PRODUCTS = {"bf16x2": 2, "bf16": 1}  # precisions computed as integer codes times B, and their products


@torch.no_grad()
def search_clip_scale(
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    absmax: torch.Tensor,
    candidates: int = 1000,
    budget: int = 1 << 26,
    precision: str = "fp32",
) -> torch.Tensor:
    """Step Δ = clip / (2^(b-1) - 1) for clip = absmax · i / candidates of least output MSE (ties: larger clip).

    As the reference, x is clamped to ±clip before quantization and the error is measured against x.
    """
    x = x.float()
    n = 2 ** (bits - 1) - 1
    clips = absmax.float() * torch.arange(candidates, 0, -1, device=x.device, dtype=torch.float32) / candidates
    scales = clips / n

    chunk = _chunk(x, weight, budget)
    if precision in _CODE_PRODUCTS:
        codes = _CodeProducts(weight, bits, _CODE_PRODUCTS[precision])
        losses = codes.losses(x, scales, -n, n, codes.times_b(x), None, chunk)
        return scales[torch.argmin(losses * scales.pow(2))]

    def scaled_errors(s: slice) -> torch.Tensor:  # (Q(clamp(x)) - x) / Δ, computed with few full-size temporaries
        if precision == "bf16x3" and (a := _fused_lhs(x, scales[s], -n, n, divide=True, split3=True)) is not None:
            return a
        u = x.unsqueeze(0) / scales[s].view(-1, 1, 1)
        return u.clamp(-n, n).round_().sub_(u)

    losses = _losses_batched(candidates, scaled_errors, output_mse(weight, precision), chunk)
    return scales[torch.argmin(losses * scales.pow(2))]


@torch.no_grad()
def search_noise(
    x: torch.Tensor,
    weight: torch.Tensor,
    bits: int,
    scale: torch.Tensor,
    base_noise: torch.Tensor,
    mean_candidates: int = 400,
    amplitude_candidates: int = 2000,
    search_mean: bool = True,
    search_amplitude: bool = True,
    budget: int = 1 << 26,
    precision: str = "fp32",
) -> torch.Tensor:
    """The noisy bias N = m + k · base_noise of least output MSE ``mean((W (Q(x + N) - N - x))^2)``.

    m ∈ Δ · {-M/2 .. M/2 - 1} / (M/2) first, then k ∈ {0 .. K - 1} / (K/2), as the reference
    (M = 400, K = 2000); ties keep the earlier candidate.
    """
    n_max = 2 ** (bits - 1) - 1
    scale = scale.float()
    x_steps = x.float() / scale  # errors are measured in units of Δ: the same Δ for every candidate
    chunk = _chunk(x, weight, budget)
    if precision in _CODE_PRODUCTS:
        codes = _CodeProducts(weight, bits, _CODE_PRODUCTS[precision])
        shared = codes.times_b(x_steps)

        def best(noises: torch.Tensor) -> torch.Tensor:  # noises (K, C_in) or (K, 1)
            noise_steps = (noises / scale).contiguous()
            offsets = codes.times_b(noise_steps.expand(-1, x.shape[1]))
            losses = codes.losses(x_steps, noise_steps, -n_max - 1, n_max, shared, offsets, chunk)
            return noises[torch.argmin(losses)]
    else:
        loss = output_mse(weight, precision)

        def best(noises: torch.Tensor) -> torch.Tensor:  # noises (K, C_in) or (K, 1)
            noise_steps = noises / scale

            def scaled_errors(s: slice) -> torch.Tensor:  # (Q(x + N) - (x + N)) / Δ
                if precision == "bf16x3":
                    a = _fused_lhs(x_steps, noise_steps[s], -n_max - 1, n_max, divide=False, split3=True)
                    if a is not None:
                        return a
                u = x_steps.unsqueeze(0) + noise_steps[s].unsqueeze(1)
                return u.round().clamp_(-n_max - 1, n_max).sub_(u)

            return noises[torch.argmin(_losses_batched(noises.shape[0], scaled_errors, loss, chunk))]

    mean = torch.zeros(1, device=x.device)
    if search_mean:
        half = mean_candidates // 2
        steps = torch.arange(-half, mean_candidates - half, device=x.device, dtype=torch.float32)
        mean = best((scale * steps / half).view(-1, 1))
    noise = mean.expand_as(base_noise).clone()
    if search_amplitude:
        half = amplitude_candidates // 2
        amplitudes = torch.arange(amplitude_candidates, device=x.device, dtype=torch.float32) / half
        noise = best(mean + amplitudes.view(-1, 1) * base_noise.float().view(1, -1))
    return noise


def _stageable(block: nn.Module) -> bool:
    """Whether ``block`` is the canonical Block(Attention, Mlp), unhooked, with NoisyQuant linears only at
    qkv / proj / fc1 / fc2 (then :func:`_calibrate_block_staged` computes exactly what the hooked forwards do)."""
    from regcache.encoders.base import Attention, Block, Mlp
    from regcache.quant import fused_attention

    if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
        return False
    attn, mlp = block.attn, block.mlp
    if any(fused_attention.has_hooks(m) for m in (block, attn, mlp)):
        return False  # the staged path calls the parts, not these modules' forwards: their hooks would not fire
    if not isinstance(attn.out_norm, nn.Identity) or attn._proj_input_quantizer() is not None:
        return False  # proj must be applied last, to exactly the input its pre-hook sees
    stages = {id(attn.qkv), id(attn.proj), id(mlp.fc1), id(mlp.fc2)}
    return all(id(m) in stages for m in block.modules() if isinstance(m, NoisyQuantLinear))


def _feed_inputs(
    linear: nn.Module, module: nn.Module, chunks: list[torch.Tensor], consume: Callable[[torch.Tensor], Any]
) -> None:
    """Run ``module`` on each chunk up to ``linear`` (the forward stops there), handing ``consume`` its input."""

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        consume(args[0])
        raise _StopForward

    handle = linear.register_forward_pre_hook(hook)
    try:
        for chunk in chunks:
            with contextlib.suppress(_StopForward):
                module(chunk)
    finally:
        handle.remove()


def _inputs_of(linear: nn.Module, module: nn.Module, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``linear`` receives when ``module`` runs on each chunk."""
    seen: list[torch.Tensor] = []
    _feed_inputs(linear, module, chunks, seen.append)
    return seen


def _calibrate_block_staged(
    block: nn.Module,
    x: list[torch.Tensor],
    search: Callable[[nn.Module, TokenSample], None],
    new_sample: Callable[[], TokenSample],
) -> list[torch.Tensor]:
    """Search the block's linears in order on activations computed once (returns the block's output chunks).

    The hooked path runs the block up to each linear again (about 2.6 block forwards per block and
    phase); here each part runs once, on the inputs the previous, already searched parts produce:
    the same tensors, so the same searches (tests/test_noisyquant.py checks equality).
    """
    attn, mlp = block.attn, block.mlp

    def searched(linear: nn.Module, inputs: list[torch.Tensor]) -> None:
        if isinstance(linear, NoisyQuantLinear):
            sample = new_sample()
            for chunk in inputs:
                sample.add(chunk)
            search(linear, sample)

    if block.input_filter is not None:
        x = [block.input_filter(chunk) for chunk in x]
    x = [block.tap_input(chunk) for chunk in x]
    a = [block.norm1(chunk) for chunk in x]
    searched(attn.qkv, a)
    proj_in = _inputs_of(attn.proj, attn, a)
    del a
    searched(attn.proj, proj_in)
    x = [chunk + block.ls1(attn.proj(p)) for chunk, p in zip(x, proj_in, strict=True)]
    del proj_in
    f = [block.norm2(chunk) for chunk in x]
    searched(mlp.fc1, f)
    h = _inputs_of(mlp.fc2, mlp, f)
    del f
    searched(mlp.fc2, h)
    return [chunk + block.ls2(mlp.fc2(g)) for chunk, g in zip(x, h, strict=True)]


class TokenSample:
    """Streams a linear's inputs: running absmax plus a uniform sample of ``size`` token rows (all if None)."""

    def __init__(self, size: int | None, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.absmax: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Take the tokens of one input tensor (..., C)."""
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        amax = rows.abs().amax()
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.size is None:
            self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
            return
        # bottom-k of i.i.d. uniform keys = a uniform sample without replacement, in bounded memory
        keys = torch.rand(rows.shape[0], generator=self.generator).to(rows.device)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.size:
            keep = keys.topk(self.size, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


@dataclass
class NoisyQuantConfig(QuantConfig):
    """NoisyQuant on linear-only W/A quantization (EasyQuant-style clip search + searched noisy bias)."""

    name = "noisyquant"
    seed: int = 0
    seeded_noise: bool = True
    gaussian_noise: bool = False
    search_mean: bool = True
    search_amplitude: bool = True
    clip_candidates: int = 1000
    mean_candidates: int = 400
    amplitude_candidates: int = 2000
    search_tokens: int | None = 8192
    search_chunk_elements: int | None = None
    search_precision: str = "auto"
    staged_blocks: bool = True

    @classmethod
    def reference(cls, w_bits: int = 6, a_bits: int = 6) -> NoisyQuantConfig:
        """The official kriskrisliu/NoisyQuant behaviour, quirks included."""
        return cls(
            w_bits=w_bits,
            a_bits=a_bits,
            seeded_noise=False,
            gaussian_noise=True,
            search_tokens=None,
            search_precision="fp32",
        )

    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """qkv, proj, fc1 and fc2 of every block (no head, no patch embedding, no attention matmuls)."""
        return fqn.startswith("blocks.") and isinstance(module, nn.Linear)

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Replace the selected block linears with NoisyQuant linears (per-channel weights, noisy input quantizer)."""
        for name, module in list(encoder.named_modules()):
            if not name.startswith("blocks.") or not isinstance(module, nn.Linear) or not filter_fn(module, name):
                continue  # the sequential calibration runs block by block: only block linears qualify
            parent_name, _, child = name.rpartition(".")
            linear = NoisyQuantLinear.from_linear(module)
            linear.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=True, granularity="channel", axis=0)
            linear.input_quantizer = NoisyUniformQuantizer(self.a_bits)
            setattr(encoder.get_submodule(parent_name), child, linear)

    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Quantize the weights, then block by block search each linear's clip range and then its noise."""
        with torch.no_grad():
            streams = [
                encoder.embed(images) for images in iter_images(encoder, batches, progress, "NoisyQuant: images")
            ]
            if not streams:
                raise ValueError("calibration data is empty: pass at least one batch of images")
            linears = [m for m in encoder.modules() if isinstance(m, NoisyQuantLinear)]
            for linear in linears:
                linear.weight_quantizer.calibrate_(linear.weight)
                linear.weight_quantizer.mode = "quant"
                linear.input_quantizer.mode = "float"
                linear.input_quantizer.noise = torch.empty(0, device=linear.weight.device)  # no stale noise
            noise_rng = torch.Generator().manual_seed(self.seed)
            sample_rng = torch.Generator().manual_seed(self.seed + 1)
            new_sample = functools.partial(TokenSample, self.search_tokens, sample_rng)
            for phase in ("clip", "noise"):
                x = streams
                search = self._set_clip if phase == "clip" else functools.partial(self._set_noise, rng=noise_rng)
                bar = tqdm(encoder.blocks, desc=f"NoisyQuant: {phase} search", disable=not progress)
                for block in bar:
                    if self.staged_blocks and _stageable(block):
                        x = _calibrate_block_staged(block, x, search, new_sample)
                        continue
                    for linear in (m for m in block.modules() if isinstance(m, NoisyQuantLinear)):
                        search(linear, self._capture(block, linear, x, sample_rng))
                    x = [block(chunk) for chunk in x]
        set_quant_mode(encoder, "quant")

    def _precision(self, device: torch.device) -> str:
        """``search_precision``, with ``auto`` = bf16x2 on CUDA (tensor cores, fused kernels) and fp32 elsewhere."""
        if self.search_precision == "auto":
            if device.type != "cuda":
                return "fp32"
            return "bf16x2" if self.a_bits <= 9 else "bf16x3"
        return self.search_precision

    def _chunk_elements(self, device: torch.device) -> int:
        """``search_chunk_elements``, with None = 2^28 on CUDA (fewer, larger matmuls: the search is then
        GPU-bound and faster than 2^26 for about a GiB more, BENCHMARKS.md §2) and 2^26 elsewhere."""
        if self.search_chunk_elements is not None:
            return self.search_chunk_elements
        return 1 << 28 if device.type == "cuda" else 1 << 26

    def _capture(
        self, block: nn.Module, linear: NoisyQuantLinear, streams: list[torch.Tensor], rng: torch.Generator
    ) -> TokenSample:
        """The linear's inputs over all streams; each block forward stops at the linear (nothing after it is needed)."""
        sample = TokenSample(self.search_tokens, rng)
        _feed_inputs(linear, block, streams, sample.add)
        return sample

    def _set_clip(self, linear: NoisyQuantLinear, sample: TokenSample) -> None:
        w = linear.weight_quantizer(linear.weight)
        scale = search_clip_scale(
            sample.rows,
            w,
            self.a_bits,
            sample.absmax,
            self.clip_candidates,
            self._chunk_elements(w.device),
            self._precision(w.device),
        )
        linear.input_quantizer.set_scale(scale)
        linear.input_quantizer.mode = "quant"

    def _set_noise(self, linear: NoisyQuantLinear, sample: TokenSample, rng: torch.Generator) -> None:
        q = linear.input_quantizer
        device = q.scale.device
        c_in = linear.in_features
        if self.gaussian_noise:  # the official (randn * 2 - 1) · Δ
            draw = torch.randn(c_in, generator=rng) if self.seeded_noise else torch.randn(c_in, device=device)
        else:  # the paper's U(-Δ, Δ)
            draw = torch.rand(c_in, generator=rng) if self.seeded_noise else torch.rand(c_in, device=device)
        base = (draw.to(device) * 2 - 1) * q.scale
        w = linear.weight_quantizer(linear.weight)
        q.noise = search_noise(
            sample.rows,
            w,
            self.a_bits,
            q.scale,
            base,
            self.mean_candidates,
            self.amplitude_candidates,
            self.search_mean,
            self.search_amplitude,
            self._chunk_elements(w.device),
            self._precision(w.device),
        ).to(linear.weight.dtype)


__all__ = [
    "NoisyQuantConfig",
    "NoisyQuantLinear",
    "NoisyUniformQuantizer",
    "TokenSample",
    "output_mse",
    "search_clip_scale",
    "search_noise",
    "symmetric_fake_quant",
]
