"""PTQ4ViT (Yuan et al., ECCV 2022; hahnyuan/PTQ4ViT): twin uniform quantization + Hessian-guided scale search.

    quantize_(encoder, PTQ4ViTConfig(w_bits=6, a_bits=6))
    calibrate_(encoder, batches)          # 32 seed-fixed images in the reference

Coverage (the reference's ``configs/PTQ4ViT.py``): every block linear (weight + input), the head
linear (``quantize_head``), Q and Kᵀ of ``matmul_qk``, softmax output and V of ``matmul_pv``, and
the patch-embedding conv weight per output channel (``quantize_patch_embed``; its input stays float).
Steps are symmetric signed: per tensor for linear weights except qkv (one step each for q, k, v),
per tensor for linear inputs, per head for Q, K and V (the reference's batching matmul quantizes
head-wise), per output channel for the stem conv. Twin uniform quantizers take the softmax output
and the post-GELU fc2 input (:mod:`regcache.quant.twin_uniform`).

Calibration, module by module in forward order: record the module's float input, output O and the
gradient g of a loss on the encoder's prediction w.r.t. O; start from ``max|x| / (2^(k-1) - 0.5)``;
search each step among ``init * (alpha + i (beta - alpha) / n)`` (the softmax split among ``2^-i``)
maximizing ``-mean((g * (O - Ô))^2)``, alternating weight / activation (A / B) for ``search_rounds``.
With ``sequential=False`` (reference) every other module runs in float while one is calibrated.

The loss whose output gradients weight the error is taken on a prediction (``prediction``). An
encoder that returns a classifier's logits (a timm ImageNet model) predicts ``softmax(logits)``, as
the reference does for its classifiers. An embedding tower (CLIP, SigLIP, DINOv2) has no classes:
its prediction is ``logit_scale * normalize(f) @ W``, with ``W`` the zero-shot classifier passed as
``zero_shot_classifier`` (embed_dim x classes), else the normalized float features of the
calibration images themselves (each image classifies the calibration set: a self-similarity
distribution). ``hessian_grad`` picks the loss; see :data:`HESSIAN_GRADS` and
``PTQ4ViTConfig.reference`` for the reference's choices.

The reference's Hessian weighting is numerically degenerate. Its loss is KL(float prediction on the
whole calibration batch ‖ prediction on sub-batches of 4) while every other module runs in float,
i.e. the float model against itself: the gradient is ``softmax(p) - p_fp`` of two roundings of one
function (and of ``log_softmax``'s backward), rounding noise at least four orders of magnitude
below a Fisher estimate's, set by the kernels of the device (hahnyuan/PTQ4ViT#23). The
reference's outputs are therefore not reproducible on another device; where the gradients are all
exactly zero, every search keeps the first candidate of its grid. ``reference()`` reproduces the
procedure, not those numbers; the default (``hessian_grad="fisher"``) weights by a proper Fisher
estimate instead.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from regcache.quant.api import FilterFn, QuantConfig, block_linears_and_matmuls, head_linear, swap_linears
from regcache.quant.calibration import iter_images
from regcache.quant.modules import MatMul, QuantConv2d, QuantLinear, quantizers, set_quant_mode
from regcache.quant.quantizers import Quantizer, UniformQuantizer
from regcache.quant.twin_uniform import (
    ChunkedUniformQuantizer,
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    fake_twin_gelu,
    fake_twin_softmax,
    fake_uniform,
)

if TYPE_CHECKING:
    from regcache.encoders.base import Attention, VisionEncoder

# Activations whose output is GELU-shaped (minimum about -0.17), so fc2's input gets the twin quantizer.
# (transformers' own classes: GELUActivation, QuickGELUActivation)
GELU_ACTIVATIONS = ("GELU", "GELUTanh", "QuickGELU", "GELUActivation", "QuickGELUActivation")

# Where the patch-embedding conv and the final projection ("head") live in our encoders.
STEM_CONVS = ("conv1", "trunk.patch_embed.proj", "embeddings.patch_embedding", "embeddings.patch_embeddings.projection")
REFERENCE_INITIAL_SPLIT = 0.01  # the reference's split before its first search (overwritten by it)


# ---------------------------------------------------------------------------------------------
# Search grids and the objective
# ---------------------------------------------------------------------------------------------
def initial_step(x: torch.Tensor, bits: int, groups: int = 1, axis: int = 0) -> torch.Tensor:
    """PTQ4ViT's starting step ``max|x| / (2^(bits-1) - 0.5)`` per equal group of ``axis``, shape (groups,)."""
    absmax = x.detach().float().movedim(axis % x.ndim, 0).reshape(groups, -1).abs().amax(dim=1)
    return (absmax / (2 ** (bits - 1) - 0.5)).clamp_min(1e-8)


def candidate_factors(alpha: float, beta: float, n: int, skip_last: bool = False) -> torch.Tensor:
    """``alpha + i (beta - alpha) / n`` for i in 0..n (0..n-1 with ``skip_last``, as the reference's loops do)."""
    count = n if skip_last else n + 1
    return torch.tensor([alpha + i * (beta - alpha) / n for i in range(count)], dtype=torch.float32)


def softmax_split_candidates(count: int = 20) -> torch.Tensor:
    """The twin softmax split points ``2^-i`` for i in 0..count-1."""
    return torch.tensor([2.0**-i for i in range(count)], dtype=torch.float32)


def hessian_objective(out: torch.Tensor, out_q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """PTQ4ViT's Hessian-guided similarity ``-mean((g * (O - Ô))^2)`` (higher is better)."""
    return -((grad * (out - out_q)) ** 2).mean()


# ---------------------------------------------------------------------------------------------
# Losses whose output gradients weight the error
# ---------------------------------------------------------------------------------------------
def _sampled_labels(fp_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(fp_probs.cpu().double(), 1, generator=generator).squeeze(1).to(fp_probs.device)


def _argmax_labels(fp_probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return fp_probs.argmax(dim=-1)


def _cross_entropy(logits: torch.Tensor, fp_probs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


def _kl_to_fp(logits: torch.Tensor, fp_probs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return F.kl_div(logits.log_softmax(dim=-1), fp_probs, reduction="batchmean")  # the reference's reduction


@dataclass(frozen=True)
class HessianGrad:
    """A loss on the prediction (and how its labels are drawn from the float prediction)."""

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    labels: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    doc: str


HESSIAN_GRADS: dict[str, HessianGrad] = {
    # The Hessian of KL(p_fp || p) at the float model is the Fisher information of p_fp; its
    # diagonal is estimated, as BRECQ does, by squared gradients of -log p(y) with y ~ p_fp.
    "fisher": HessianGrad(_cross_entropy, _sampled_labels, "-log p(y), y ~ float prediction (seeded)"),
    "pseudo_label": HessianGrad(_cross_entropy, _argmax_labels, "-log p(argmax float prediction)"),
    # The reference: KL(p_fp || p) at the current model. With sequential=False the model is float
    # while gradients are taken, so this gradient is zero up to rounding (hahnyuan/PTQ4ViT#23).
    "kl": HessianGrad(_kl_to_fp, None, "KL(float prediction || prediction), the reference's loss"),
}


PREDICTIONS = ("auto", "logits", "embedding")


class _Prediction:
    """The prediction (the encoder's logits, or ``logit_scale * normalize(f) @ W``) and its float value."""

    def __init__(
        self, fp_features: torch.Tensor, classifier: torch.Tensor | None, config: PTQ4ViTConfig, logits: bool
    ) -> None:
        fp_features = fp_features.float()
        self.weights: torch.Tensor | None = None
        if logits:
            if classifier is not None:
                raise ValueError("zero_shot_classifier is for embedding towers; this encoder returns class logits")
        elif classifier is None:
            self.weights = F.normalize(fp_features, dim=-1).T  # self-similarity over the calibration set
        else:
            if classifier.shape[0] != fp_features.shape[-1]:
                expected = f"(embed_dim={fp_features.shape[-1]}, classes)"
                raise ValueError(f"zero_shot_classifier must be {expected}, got {tuple(classifier.shape)}")
            self.weights = classifier.detach().to(fp_features.device, torch.float32)
        self.logit_scale = config.logit_scale
        self.grad = HESSIAN_GRADS[config.hessian_grad]
        self.fp_probs = self.logits(fp_features).softmax(dim=-1)
        generator = torch.Generator().manual_seed(config.seed)
        self.labels = None if self.grad.labels is None else self.grad.labels(self.fp_probs, generator)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return features.float()
        return self.logit_scale * F.normalize(features.float(), dim=-1) @ self.weights

    def loss(self, features: torch.Tensor, rows: slice) -> torch.Tensor:
        labels = None if self.labels is None else self.labels[rows]
        return self.grad.loss(self.logits(features), self.fp_probs[rows], labels)


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------
@dataclass
class PTQ4ViTConfig(QuantConfig):
    """PTQ4ViT: twin uniform quantizers + Hessian-guided search of every step.

    Coverage: ``quantize_head`` (final projection linear), ``quantize_patch_embed`` (stem conv
    weights per output channel), ``twin_softmax`` / ``twin_gelu`` (False = the reference's
    ``no_softmax`` / ``no_postgelu`` ablations), ``matmul_head_wise`` (per-head Q/K/V steps).
    Search: grid ``eq_alpha, eq_beta, eq_n``, ``softmax_splits`` powers of two, ``search_rounds``.
    Hessian: ``hessian_grad`` in :data:`HESSIAN_GRADS`, on the ``prediction`` (``"logits"``: softmax of
    the encoder's output, for classifiers; ``"embedding"``: ``logit_scale`` times cosine to
    ``zero_shot_classifier`` (not serialized) or to the calibration images; ``"auto"``: logits when
    :attr:`~regcache.encoders.base.VisionEncoder.outputs_class_logits`), ``seed`` (label sampling),
    ``grad_batch_size`` images per backward pass.
    ``sequential``: keep calibrated modules quantized while calibrating later ones (reference: False).
    ``candidate_batch_bytes``: memory budget for evaluating candidate steps at once.
    Official-code quirks (all False by default, all True in :meth:`reference`):
    ``softmax_twin_offset_quirk`` (the two softmax ranges are added without masking),
    ``skip_last_candidate_quirk`` (the grid's last point, beta, is never evaluated),
    ``softmax_search_float_v_quirk`` (the split is searched against float V, not quantized V).
    """

    name = "ptq4vit"
    quantize_head: bool = True
    quantize_patch_embed: bool = True
    twin_softmax: bool = True
    twin_gelu: bool = True
    matmul_head_wise: bool = True
    search_rounds: int = 3
    eq_alpha: float = 0.01
    eq_beta: float = 1.2
    eq_n: int = 100
    softmax_splits: int = 20
    hessian_grad: str = "fisher"
    prediction: str = "auto"
    logit_scale: float = 100.0
    seed: int = 0
    sequential: bool = False
    grad_batch_size: int = 8
    candidate_batch_bytes: int = 1 << 30
    softmax_twin_offset_quirk: bool = False
    skip_last_candidate_quirk: bool = False
    softmax_search_float_v_quirk: bool = False
    zero_shot_classifier: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hessian_grad not in HESSIAN_GRADS:
            raise ValueError(f"hessian_grad must be one of {sorted(HESSIAN_GRADS)}, got {self.hessian_grad!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.search_rounds < 1 or self.eq_n < 1 or self.softmax_splits < 1 or self.grad_batch_size < 1:
            raise ValueError("search_rounds, eq_n, softmax_splits and grad_batch_size must be >= 1")

    @classmethod
    def reference(cls, w_bits: int = 8, a_bits: int = 8, **overrides: Any) -> PTQ4ViTConfig:
        """hahnyuan/PTQ4ViT as run by its ``test_all.py``: every official quirk on, KL loss, parallel calibration."""
        flags: dict[str, Any] = {
            "hessian_grad": "kl",
            "sequential": False,
            "grad_batch_size": 4,
            "softmax_twin_offset_quirk": True,
            "skip_last_candidate_quirk": True,
            "softmax_search_float_v_quirk": True,
        }
        return cls(w_bits=w_bits, a_bits=a_bits, **{**flags, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the zero-shot classifier is a calibration input and is left out)."""
        fields = (f.name for f in dataclasses.fields(self) if f.name != "zero_shot_classifier")
        return {"method": self.name, **{k: getattr(self, k) for k in fields}}

    # ---- coverage -------------------------------------------------------------------------
    def default_filter(self, module: nn.Module, fqn: str) -> bool:
        """Block linears and matmuls, plus the projection head and the patch-embedding conv when enabled."""
        if block_linears_and_matmuls(module, fqn):
            return True
        if self.quantize_head and head_linear(module, fqn):
            return True
        return self.quantize_patch_embed and isinstance(module, nn.Conv2d) and fqn in STEM_CONVS

    def transform(self, encoder: VisionEncoder, filter_fn: FilterFn) -> None:
        """Attach PTQ4ViT's quantizers (chunked qkv, twin softmax / GELU, per-head matmuls) and swap stem convs."""
        for name, module in swap_linears(encoder, filter_fn):
            if isinstance(module, QuantLinear):
                module.weight_quantizer = self._weight_quantizer(name)
                module.input_quantizer = self._input_quantizer(encoder, name)
            elif isinstance(module, MatMul):
                pv = name.endswith("matmul_pv")
                module.a_quantizer = self._softmax_quantizer() if pv and self.twin_softmax else self._head_quantizer()
                module.b_quantizer = self._head_quantizer()
        for name, module in list(encoder.named_modules()):
            if isinstance(module, nn.Conv2d) and not isinstance(module, QuantConv2d) and filter_fn(module, name):
                conv = QuantConv2d.from_conv(module)
                conv.weight_quantizer = UniformQuantizer(self.w_bits, symmetric=True, granularity="channel", axis=0)
                parent, _, child = name.rpartition(".")
                setattr(encoder.get_submodule(parent) if parent else encoder, child, conv)

    def _weight_quantizer(self, fqn: str) -> Quantizer:
        if fqn.endswith("attn.qkv"):
            return ChunkedUniformQuantizer(self.w_bits, chunks=3, axis=0)  # q, k, v rows
        return UniformQuantizer(self.w_bits, symmetric=True, granularity="tensor")

    def _input_quantizer(self, encoder: nn.Module, fqn: str) -> Quantizer:
        if self.twin_gelu and fqn.endswith("mlp.fc2"):
            mlp = encoder.get_submodule(fqn.rpartition(".")[0])
            gelu_fed = type(getattr(mlp, "act", None)).__name__ in GELU_ACTIVATIONS
            if gelu_fed and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
                return TwinGeluQuantizer(self.a_bits)
        return UniformQuantizer(self.a_bits, symmetric=True, granularity="tensor")

    def _head_quantizer(self) -> Quantizer:
        if self.matmul_head_wise:  # operands are (B, heads, ...): one step per head
            return UniformQuantizer(self.a_bits, symmetric=True, granularity="channel", axis=1)
        return UniformQuantizer(self.a_bits, symmetric=True, granularity="tensor")

    def _softmax_quantizer(self) -> Quantizer:
        return TwinSoftmaxQuantizer(self.a_bits, additive_quirk=self.softmax_twin_offset_quirk)

    # ---- calibration ----------------------------------------------------------------------
    def calibrate(self, encoder: VisionEncoder, batches: Iterable[torch.Tensor], progress: bool = True) -> None:
        """Run PTQ4ViT's Hessian-guided step search (:func:`calibrate_ptq4vit`) on ``batches``."""
        calibrate_ptq4vit(encoder, batches, self, progress=progress)


# ---------------------------------------------------------------------------------------------
# How the search reads and writes each quantizer kind
# ---------------------------------------------------------------------------------------------
def _grid(init: torch.Tensor, config: PTQ4ViTConfig) -> torch.Tensor:
    """Candidate steps (C, G): the factor grid times each group's initial step."""
    grid = candidate_factors(config.eq_alpha, config.eq_beta, config.eq_n, config.skip_last_candidate_quirk)
    return grid.to(init.device)[:, None] * init[None, :]


class _UniformRule:
    """Symmetric uniform steps per tensor, per channel (head) or per chunk."""

    def groups(self, q: UniformQuantizer, x: torch.Tensor) -> tuple[int, int]:
        if isinstance(q, ChunkedUniformQuantizer):
            return q.chunks, q.axis % x.ndim
        if q.granularity == "tensor":
            return 1, 0
        axis = q.axis % x.ndim
        return x.shape[axis], axis

    def initial(self, q: UniformQuantizer, x: torch.Tensor) -> torch.Tensor:
        groups, axis = self.groups(q, x)
        return initial_step(x, q.bits, groups, axis)

    def candidates(self, q: UniformQuantizer, init: torch.Tensor, config: PTQ4ViTConfig) -> torch.Tensor:
        return _grid(init, config)

    def fake(self, q: UniformQuantizer, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        groups, axis = self.groups(q, x)
        k = steps.shape[0]
        shape = [k] + [1] * x.ndim
        if groups > 1:
            steps = steps.repeat_interleave(x.shape[axis] // groups, dim=1)
            shape[axis + 1] = x.shape[axis]
        return fake_uniform(x, steps.reshape(shape).to(x.dtype), q.qmin, q.qmax)

    def assign(self, q: UniformQuantizer, step: torch.Tensor) -> None:
        q.set_scale(step.reshape(()) if q.granularity == "tensor" else step)


class _TwinGeluRule:
    """Post-GELU twin uniform: the positive step is searched, the negative one fixed."""

    def initial(self, q: TwinGeluQuantizer, x: torch.Tensor) -> torch.Tensor:
        return (x.detach().float().amax() / (2 ** (q.bits - 1) - 0.5)).clamp_min(1e-8).reshape(1)

    def candidates(self, q: TwinGeluQuantizer, init: torch.Tensor, config: PTQ4ViTConfig) -> torch.Tensor:
        return _grid(init, config)

    def fake(self, q: TwinGeluQuantizer, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        pos = steps.reshape([steps.shape[0]] + [1] * x.ndim).to(x.dtype)
        return fake_twin_gelu(x, pos, x.new_tensor(q.default_neg_step), q.bits)

    def assign(self, q: TwinGeluQuantizer, step: torch.Tensor) -> None:
        q.set_steps(step.reshape(()))


class _TwinSoftmaxRule:
    """Twin softmax: the split point is searched among powers of two."""

    def initial(self, q: TwinSoftmaxQuantizer, x: torch.Tensor) -> torch.Tensor:
        return x.new_tensor([REFERENCE_INITIAL_SPLIT], dtype=torch.float32)

    def candidates(self, q: TwinSoftmaxQuantizer, init: torch.Tensor, config: PTQ4ViTConfig) -> torch.Tensor:
        return softmax_split_candidates(config.softmax_splits).to(init.device)[:, None]

    def fake(self, q: TwinSoftmaxQuantizer, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        split = steps.reshape([steps.shape[0]] + [1] * x.ndim).to(x.dtype)
        return fake_twin_softmax(x, split, q.bits, additive=q.additive_quirk)

    def assign(self, q: TwinSoftmaxQuantizer, step: torch.Tensor) -> None:
        q.set_split(step.reshape(()))


_RULES: dict[str, Any] = {
    "uniform": _UniformRule(),
    "uniform_chunked": _UniformRule(),
    "twin_gelu": _TwinGeluRule(),
    "twin_softmax": _TwinSoftmaxRule(),
}


class _Operand:
    """One quantized operand under search: its quantizer, data, candidate steps and current step."""

    def __init__(self, quantizer: Quantizer, x: torch.Tensor, config: PTQ4ViTConfig) -> None:
        if quantizer.kind not in _RULES:
            raise TypeError(f"PTQ4ViT cannot search a {type(quantizer).__name__}")
        self.q, self.x, self.rule = quantizer, x, _RULES[quantizer.kind]
        self.step = self.rule.initial(quantizer, x)
        self.candidates = self.rule.candidates(quantizer, self.step, config)

    def fake(self, steps: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The operand (rows of it) fake-quantized with each candidate step: (k, *x.shape)."""
        return self.rule.fake(self.q, self.x if rows is None else self.x[rows], steps)

    def quantized(self) -> torch.Tensor:
        """The operand under the current step."""
        return self.fake(self.step[None])[0]

    def assign(self) -> None:
        self.rule.assign(self.q, self.step)


def _group_sum(err: torch.Tensor, groups: int) -> torch.Tensor:
    """(k, n) errors → (k, groups) by summing equal consecutive parts."""
    return err.reshape(err.shape[0], groups, -1).sum(dim=-1)


def _search(
    operand: _Operand,
    error: Callable[[torch.Tensor, slice], torch.Tensor],
    rows: int,
    row_bytes: int,
    fixed_bytes: int,
    budget: int,
) -> None:
    """Set ``operand.step`` to the candidate with the least summed error, per group.

    ``error(steps (k, G), rows)`` returns the (k, G) error of k candidates on a slice of the data;
    ``row_bytes`` / ``fixed_bytes`` are the memory of one candidate's main tensors per data row /
    once; candidates (then rows) are chunked to keep them under ``budget``. Transient temporaries
    of the elementwise fake quantization can add up to about as much again at peak.
    """
    cands = operand.candidates
    per_candidate = fixed_bytes + rows * row_bytes
    if per_candidate <= budget:
        cand_chunk, row_chunk = max(1, min(len(cands), budget // per_candidate)), rows
    else:
        cand_chunk, row_chunk = 1, max(1, (budget - fixed_bytes) // max(row_bytes, 1))
    errs = []
    for c0 in range(0, len(cands), cand_chunk):
        steps = cands[c0 : c0 + cand_chunk]
        errs.append(sum(error(steps, slice(r0, r0 + row_chunk)) for r0 in range(0, rows, row_chunk)))
    best = torch.cat(errs).argmin(dim=0)  # first minimum, like the reference's argmax of -error
    operand.step = cands.gather(0, best[None]).squeeze(0)


def _weighted_sq(out_q: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(g * (Ô - O))^2 computed in place in ``out_q`` (a fresh candidate output)."""
    return out_q.sub_(out).mul_(grad).square_()


class _Alternation:
    """Which searches of the alternating rounds can change anything.

    A search's result is a function of the steps of the operands its error depends on; run again
    against the same steps it picks the same candidate, so it is skipped (the rounds stop early once
    no search can move). The choices are those of running every round.
    """

    def __init__(self) -> None:
        self.seen: dict[str, list[torch.Tensor | None]] = {}

    def needed(self, name: str, *deps: _Operand | None) -> bool:
        """Whether search ``name`` has not yet run against the current steps of ``deps`` (recorded if not)."""
        key = [None if d is None else d.step.clone() for d in deps]
        old = self.seen.get(name)
        if old is not None and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(old, key, strict=True)
        ):
            return False
        self.seen[name] = key
        return True


# ---------------------------------------------------------------------------------------------
# Units: one module calibrated at a time
# ---------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    """A module whose quantizers are searched together, and where its forward starts."""

    name: str
    module: nn.Module
    stage: int  # -1: from the images; i: from the input of block i; num_blocks: after the blocks
    attn: Attention | None = None

    @property
    def kind(self) -> str:
        if isinstance(self.module, QuantConv2d):
            return "conv"
        if isinstance(self.module, QuantLinear):
            return "linear"
        return "qk" if self.name.endswith("matmul_qk") else "pv"


def _units(encoder: VisionEncoder) -> list[_Unit]:
    """Modules carrying quantizers, in forward order (stem, blocks, head)."""
    units = []
    for name, m in encoder.named_modules():
        slots = ("input_quantizer", "weight_quantizer", "a_quantizer", "b_quantizer")
        if not isinstance(m, (QuantLinear, MatMul, QuantConv2d)) or all(getattr(m, s, None) is None for s in slots):
            continue
        if isinstance(m, QuantConv2d):
            stage = -1
        elif name.startswith("blocks."):
            stage = int(name.split(".")[1])
        else:
            stage = encoder.num_blocks
        attn = encoder.get_submodule(name.rpartition(".")[0]) if isinstance(m, MatMul) else None
        both = m.a_quantizer is not None and m.b_quantizer is not None if isinstance(m, MatMul) else True
        if isinstance(m, MatMul) and not (name.endswith(("matmul_qk", "matmul_pv")) and both):
            raise NotImplementedError(f"PTQ4ViT calibrates attention matmuls with both operands quantized, not {name}")
        units.append(_Unit(name, m, stage, attn))
    return sorted(units, key=lambda u: u.stage)  # stable: forward order inside a stage


def _forward_from(encoder: VisionEncoder, stage: int, x: torch.Tensor) -> torch.Tensor:
    out = encoder(x) if stage < 0 else encoder.pool(encoder.forward_blocks(x, start=stage))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _advance(encoder: VisionEncoder, stage: int, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Input of stage + 1 from the input of ``stage`` under the current quantizer modes."""
    step = encoder.embed if stage < 0 else encoder.blocks[stage]
    return torch.cat([step(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])


def _softmax_input_grad(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the softmax input from the gradient w.r.t. its output."""
    return probs * (grad_probs - (probs * grad_probs).sum(dim=-1, keepdim=True))


def _expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.expand(rows, *t.shape[1:]) if t.shape[0] == 1 else t


class _Recorder:
    """Forward hooks collecting what one unit's search needs; ``finish`` adds the output gradients."""

    def __init__(self, unit: _Unit) -> None:
        self.unit, self.seen, self.handles = unit, {}, []
        m, attn = unit.module, unit.attn
        if unit.kind in ("linear", "conv"):
            self._hook(m, lambda i, o: {"x": i[0], "out": o})
        elif unit.kind == "qk":
            self._hook(m.a_quantizer, lambda i, o: {"q": i[0]})
            self._hook(m.b_quantizer, lambda i, o: {"kt": i[0]})
            self._hook(attn.tap_probs, lambda i, o: {"probs": o})
        else:
            self._hook(m.a_quantizer, lambda i, o: {"a": i[0]})
            self._hook(m.b_quantizer, lambda i, o: {"v": i[0]})
            self._hook(attn.out_norm, lambda i, o: {"attn_out": i[0]})

    def _hook(self, module: nn.Module, take: Callable) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, i, o: self.seen.update(take(i, o))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def grad_targets(self) -> list[torch.Tensor]:
        key = {"linear": "out", "conv": "out", "qk": "probs", "pv": "attn_out"}[self.unit.kind]
        return [self.seen[key]]

    def finish(self, grads: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached float32 data of this chunk: operands, float output O and its gradient g."""
        s, (g,), kind = self.seen, grads, self.unit.kind
        f32 = {k: v.detach().float() for k, v in s.items()}
        if kind == "linear":
            x, out = f32["x"], f32["out"]
            n_out = out.shape[-1]
            return {
                "x": x.reshape(-1, x.shape[-1]),
                "out": out.reshape(-1, n_out),
                "grad": g.float().reshape(-1, n_out),
            }
        if kind == "conv":
            return {"x": f32["x"], "out": f32["out"], "grad": g.float()}
        attn, b = self.unit.attn, next(iter(f32.values())).shape[0]
        prefix = attn.prefix
        if kind == "qk":
            q, kt = f32["q"], f32["kt"]
            data = {"q": q, "kt": kt}
            keys = kt
            if prefix is not None:
                data["pkt"] = _expand_rows(prefix.keys.detach().float(), b).transpose(-2, -1)
                keys = torch.cat([data["pkt"], kt], dim=-1)
            data["out"] = q @ keys
            data["grad"] = _softmax_input_grad(f32["probs"], g.float()) * attn.scale
            return data
        bsz, n, _ = f32["attn_out"].shape
        v = f32["v"]
        data = {"a": f32["a"], "v": v}
        data["out"] = f32["attn_out"].reshape(bsz, n, v.shape[1], v.shape[-1]).transpose(1, 2)
        data["grad"] = g.float().reshape(bsz, n, v.shape[1], v.shape[-1]).transpose(1, 2)
        if prefix is not None:
            data["pv"] = _expand_rows(prefix.values.detach().float(), b)
            n_pre, lm = prefix.num_entries, prefix.log_multiplicity
            lm = torch.zeros(1, 1, 1, n_pre, device=v.device) if lm is None else lm.detach().float()
            lm = torch.broadcast_to(lm, (lm.shape[0] if lm.ndim == 4 else 1, 1, 1, n_pre))
            data["mult"] = _expand_rows(lm.exp(), b)  # τ per prefix column
        return data


def _capture(
    encoder: VisionEncoder, units: list[_Unit], stage: int, x: torch.Tensor, target: _Prediction, chunk: int
) -> list[dict[str, torch.Tensor]]:
    """Run the calibration images from ``stage`` and record each unit's operands, outputs and output gradients."""
    parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in units]
    for r0 in range(0, x.shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        recorders = [_Recorder(u) for u in units]
        try:
            with torch.enable_grad():
                inp = x[rows].detach().clone().requires_grad_(True)  # builds the graph even if weights are frozen
                loss = target.loss(_forward_from(encoder, stage, inp), rows)
                targets = [t for r in recorders for t in r.grad_targets()]
                grads = torch.autograd.grad(loss, targets)
        finally:
            for r in recorders:
                r.remove()
        for i, r in enumerate(recorders):
            parts[i].append(r.finish([grads[i]]))
    return [{k: torch.cat([p[k] for p in unit_parts]) for k in unit_parts[0]} for unit_parts in parts]


# ---------------------------------------------------------------------------------------------
# Per-unit searches
# ---------------------------------------------------------------------------------------------
def _search_linear(unit: _Unit, d: dict[str, torch.Tensor], config: PTQ4ViTConfig) -> None:
    m: QuantLinear = unit.module
    weight, bias = m.weight.detach().float(), None if m.bias is None else m.bias.detach().float()
    x, out, grad = d["x"], d["out"], d["grad"]
    rows, n_in, n_out, budget = x.shape[0], weight.shape[1], weight.shape[0], config.candidate_batch_bytes
    w = _Operand(m.weight_quantizer, weight, config) if m.weight_quantizer is not None else None
    a = _Operand(m.input_quantizer, x, config) if m.input_quantizer is not None else None

    def linear(inp: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        o = inp @ wt.transpose(-2, -1)
        return o if bias is None else o.add_(bias)

    rounds = _Alternation()
    for _ in range(config.search_rounds):
        ran = False
        if w is not None and rounds.needed("w", a):
            ran = True
            xq = x if a is None else a.quantized()
            groups = w.candidates.shape[1]

            def w_error(steps: torch.Tensor, r: slice, xq=xq, groups=groups) -> torch.Tensor:
                err = _weighted_sq(linear(xq[r], w.fake(steps)), out[r], grad[r]).sum(dim=1)
                return _group_sum(err, groups)

            _search(w, w_error, rows, 4 * n_out, 4 * n_out * n_in, budget)
        if a is not None and rounds.needed("a", w):
            ran = True
            wq = weight if w is None else w.quantized()

            def a_error(steps: torch.Tensor, r: slice, wq=wq) -> torch.Tensor:
                return _weighted_sq(linear(a.fake(steps, r), wq), out[r], grad[r]).sum(dim=(1, 2))[:, None]

            _search(a, a_error, rows, 4 * (n_in + n_out), 0, budget)
        if not ran:
            break
    for op in (w, a):
        if op is not None:
            op.assign()


def _search_conv(unit: _Unit, d: dict[str, torch.Tensor], config: PTQ4ViTConfig) -> None:
    m: QuantConv2d = unit.module
    if m.input_quantizer is not None or m.groups != 1:
        raise NotImplementedError("PTQ4ViT's stem conv quantizes weights only (input float), groups=1")
    weight = m.weight.detach().float()
    bias = None if m.bias is None else m.bias.detach().float()
    x, out, grad = d["x"], d["out"], d["grad"]
    w = _Operand(m.weight_quantizer, weight, config)
    n_out, groups = weight.shape[0], w.candidates.shape[1]

    def w_error(steps: torch.Tensor, r: slice) -> torch.Tensor:
        k = steps.shape[0]
        wk = w.fake(steps).reshape(k * n_out, *weight.shape[1:])
        o = m._conv_forward(x[r], wk, None if bias is None else bias.repeat(k)).unflatten(1, (k, n_out))
        err = _weighted_sq(o, out[r][:, None], grad[r][:, None]).sum(dim=(0, 3, 4))
        return _group_sum(err, groups)

    # Weights only and one step per output channel: the objective is separable, one pass is exact.
    _search(w, w_error, x.shape[0], 4 * out[0].numel(), 4 * weight.numel(), config.candidate_batch_bytes)
    w.assign()


def _search_qk(unit: _Unit, d: dict[str, torch.Tensor], config: PTQ4ViTConfig) -> None:
    m: MatMul = unit.module
    q, kt, out, grad, pkt = d["q"], d["kt"], d["out"], d["grad"], d.get("pkt")
    n_pre = 0 if pkt is None else pkt.shape[-1]
    a, b = _Operand(m.a_quantizer, q, config), _Operand(m.b_quantizer, kt, config)
    bsz, heads, n_q, dim = q.shape
    n_k, budget = kt.shape[-1], config.candidate_batch_bytes
    out_tok, grad_tok = out[..., n_pre:], grad[..., n_pre:]
    rounds = _Alternation()
    for _ in range(config.search_rounds):
        ran = False
        if rounds.needed("a", b):
            ran = True
            keys = b.quantized() if pkt is None else torch.cat([pkt, b.quantized()], dim=-1)

            def a_error(steps: torch.Tensor, r: slice, keys=keys) -> torch.Tensor:
                err = _weighted_sq(a.fake(steps, r) @ keys[r], out[r], grad[r]).sum(dim=(1, 3, 4))
                return _group_sum(err, a.candidates.shape[1])

            _search(a, a_error, bsz, 4 * heads * n_q * (dim + n_pre + n_k), 0, budget)
        if rounds.needed("b", a):
            ran = True
            qq = a.quantized()  # prefix keys stay float: their logits do not depend on the K step

            def b_error(steps: torch.Tensor, r: slice, qq=qq) -> torch.Tensor:
                err = _weighted_sq(qq[r] @ b.fake(steps, r), out_tok[r], grad_tok[r]).sum(dim=(1, 3, 4))
                return _group_sum(err, b.candidates.shape[1])

            _search(b, b_error, bsz, 4 * heads * (dim * n_k + n_q * n_k), 0, budget)
        if not ran:
            break
    a.assign()
    b.assign()


def _prefix_output(probs_q: torch.Tensor, d: dict[str, torch.Tensor], r: slice) -> torch.Tensor | None:
    """The register part of P·V: prefix columns (quantized as p/τ) times τ against float register values."""
    if "pv" not in d:
        return None
    n_pre = d["pv"].shape[-2]
    return (probs_q[..., :n_pre] * d["mult"][r]) @ d["pv"][r]


def _attention_output(probs_q: torch.Tensor, v: torch.Tensor, d: dict[str, torch.Tensor], r: slice) -> torch.Tensor:
    """P·V as ``Attention`` computes it, with or without a register prefix."""
    prefix = _prefix_output(probs_q, d, r)
    tokens = probs_q[..., probs_q.shape[-1] - v.shape[-2] :] @ v
    return tokens if prefix is None else tokens.add_(prefix)


def _search_pv(unit: _Unit, d: dict[str, torch.Tensor], config: PTQ4ViTConfig) -> None:
    m: MatMul = unit.module
    probs, v, out, grad = d["a"], d["v"], d["out"], d["grad"]
    a, b = _Operand(m.a_quantizer, probs, config), _Operand(m.b_quantizer, v, config)
    bsz, heads, n_q, n_cols = probs.shape
    dim, budget = v.shape[-1], config.candidate_batch_bytes
    n_pre = n_cols - v.shape[-2]
    rounds = _Alternation()
    float_v = config.softmax_search_float_v_quirk  # the split's error then does not depend on the V step
    for _ in range(config.search_rounds):
        ran = False
        if rounds.needed("a", *(() if float_v else (b,))):
            ran = True
            v_seen = v if float_v else b.quantized()

            def a_error(steps: torch.Tensor, r: slice, v_seen=v_seen) -> torch.Tensor:
                err = _weighted_sq(_attention_output(a.fake(steps, r), v_seen[r], d, r), out[r], grad[r])
                return _group_sum(err.sum(dim=(1, 3, 4)), a.candidates.shape[1])

            _search(a, a_error, bsz, 4 * heads * n_q * (n_cols + dim), 0, budget)
        if rounds.needed("b", a):
            ran = True
            pq = a.quantized()
            fixed = _prefix_output(pq, d, slice(None))  # the register part does not depend on the V step
            p_tok = pq[..., n_pre:]

            def b_error(steps: torch.Tensor, r: slice, p_tok=p_tok, fixed=fixed) -> torch.Tensor:
                o = p_tok[r] @ b.fake(steps, r)
                o = o if fixed is None else o.add_(fixed[r])
                return _group_sum(_weighted_sq(o, out[r], grad[r]).sum(dim=(1, 3, 4)), b.candidates.shape[1])

            _search(b, b_error, bsz, 4 * heads * (v.shape[-2] * dim + n_q * dim), 0, budget)
        if not ran:
            break
    a.assign()
    b.assign()


def _first_candidates(unit: _Unit, d: dict[str, torch.Tensor], config: PTQ4ViTConfig) -> None:
    """What every search picks when all output gradients are zero: each error is 0, so the first candidate."""
    m = unit.module
    if unit.kind in ("linear", "conv"):
        operands = [(m.weight_quantizer, m.weight.detach().float()), (getattr(m, "input_quantizer", None), d["x"])]
    else:
        a, b = ("q", "kt") if unit.kind == "qk" else ("a", "v")
        operands = [(m.a_quantizer, d[a]), (m.b_quantizer, d[b])]
    for quantizer, x in operands:
        if quantizer is not None:
            op = _Operand(quantizer, x, config)
            op.step = op.candidates[0]
            op.assign()


_SEARCHES: dict[str, Callable[[_Unit, dict[str, torch.Tensor], PTQ4ViTConfig], None]] = {
    "linear": _search_linear,
    "conv": _search_conv,
    "qk": _search_qk,
    "pv": _search_pv,
}


def calibrate_ptq4vit(
    encoder: VisionEncoder, batches: Iterable[Any], config: PTQ4ViTConfig, progress: bool = True
) -> None:
    """PTQ4ViT calibration of the quantizers ``config.transform`` attached; the model ends in quant mode."""
    from regcache.encoders.base import explicit_attention

    with explicit_attention():  # the target and every capture through the same attention arithmetic
        _calibrate(encoder, batches, config, progress)


def _calibrate(encoder: VisionEncoder, batches: Iterable[Any], config: PTQ4ViTConfig, progress: bool) -> None:
    images = [x.clone() for x in iter_images(encoder, batches, progress, "loading calibration images")]
    if not images:
        raise ValueError("calibration data is empty: pass at least one batch of images")
    images = torch.cat(images)
    chunk = config.grad_batch_size
    set_quant_mode(encoder, "float")
    with torch.no_grad():  # the target from one forward of the whole calibration batch, as the reference
        fp_features = _forward_from(encoder, -1, images)
    logits = config.prediction == "logits" or (config.prediction == "auto" and encoder.outputs_class_logits)
    target = _Prediction(fp_features, config.zero_shot_classifier, config, logits)
    units = _units(encoder)
    stage, x = -1, images
    bar = tqdm(total=len(units), desc="PTQ4ViT", disable=not progress, leave=False)
    for unit_stage in sorted({u.stage for u in units}):
        while stage < unit_stage:
            x, stage = _advance(encoder, stage, x, chunk), stage + 1
        stage_units = [u for u in units if u.stage == unit_stage]
        groups = [[u] for u in stage_units] if config.sequential else [stage_units]
        for group in groups:  # sequential: each unit sees the ones before it quantized
            for unit, data in zip(group, _capture(encoder, group, stage, x, target, chunk), strict=True):
                bar.set_postfix_str(unit.name)
                zero = not bool(data["grad"].abs().amax() > 0)
                if zero:
                    warnings.warn(
                        f"PTQ4ViT: output gradients of {unit.name} are all zero (hessian_grad={config.hessian_grad!r}; "
                        "KL to the float prediction vanishes on a float model, hahnyuan/PTQ4ViT#23): "
                        "the search picks the first candidate",
                        stacklevel=2,
                    )
                with torch.no_grad():
                    (_first_candidates if zero else _SEARCHES[unit.kind])(unit, data, config)
                for _, q in quantizers(unit.module):
                    q.set_mode("quant" if config.sequential else "float")
                bar.update()
                del data
    bar.close()
    set_quant_mode(encoder, "quant")


__all__ = [
    "GELU_ACTIVATIONS",
    "HESSIAN_GRADS",
    "PREDICTIONS",
    "HessianGrad",
    "PTQ4ViTConfig",
    "calibrate_ptq4vit",
    "candidate_factors",
    "hessian_objective",
    "initial_step",
    "softmax_split_candidates",
]
