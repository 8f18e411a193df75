"""The canonical vision transformer every supported encoder is adapted into.

One block = ``norm1 → qkv → Q·Kᵀ → softmax → P·V → proj → ls1`` (+ residual) then
``norm2 → fc1 → act → fc2 → ls2`` (+ residual), with every linear an ``nn.Linear`` and both
attention products explicit :class:`~regcache.quant.modules.MatMul` modules, so quantization
methods see the same named tensors on every family. Where nothing quantizes or reads an
attention's probabilities (float mode, no hooks) it runs through ``scaled_dot_product_attention``
instead, the same function with fused kernels (a prefix of small integer multiplicities as repeated
keys rather than a mask, which would cost SDPA its flash kernel).

RegCache needs two extension points, both empty by default (the model is then exactly the
original network):

- ``Attention.prefix``: an :class:`AttentionPrefix` of extra key/value entries that every token
  attends to (the register KV cache);
- ``Block.input_filter``: a module applied to the residual stream at the block input (token
  deletion).

``Tap`` modules mark the tensors researchers inspect (residual stream at block input, fc2 input,
attention probabilities); :func:`regcache.encoders.record` hooks them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from regcache import kernels
from regcache.quant import fused_attention
from regcache.quant.modules import MatMul, QuantLinear

# float attention (nothing quantized or hooked) runs through SDPA unless KernelConfig.float_sdpa is false
# (regcache.kernels; REGCACHE_FLOAT_SDPA=0 sets that default, for A/B timing)
# In float SDPA a prefix with integer multiplicities is given as τ physical copies of each entry instead of
# an ``ln τ`` mask: any attn_mask moves SDPA off the flash kernel (with the mask RegCache cost the compiled
# float model more, BENCHMARKS.md §3), while copies only lengthen the key axis by sum(τ) - n, small next to the
# ~200 tokens of a ViT up to this many extra keys; beyond it the mask is kept.
_MAX_EXTRA_REPEATED_KEYS = 64
_EXPLICIT = [False]  # set by explicit_attention()


@contextmanager
def explicit_attention() -> Iterator[None]:
    """Every :class:`Attention` takes its explicit Q·Kᵀ / softmax / P·V path (no SDPA, no fused kernel).

    For computations that compare two forwards and need them to round alike, such as PTQ4ViT's
    loss against the float prediction (the official code's attention is explicit throughout).
    """
    saved = _EXPLICIT[0]
    _EXPLICIT[0] = True
    try:
        yield
    finally:
        _EXPLICIT[0] = saved


class Tap(nn.Identity):
    """An identity marking a tensor of interest; hook it to read the tensor."""


@dataclass
class AttentionPrefix:
    """Extra key/value entries prepended to one attention layer (RegCache's register cache).

    ``keys`` / ``values``: ``(P, heads, n, head_dim)`` with ``P`` 1 (shared by the batch) or the
    batch size (one register set per sample, used to batch search configurations).
    ``log_multiplicity``: ``ln τ`` per entry, shape broadcastable to ``(P, 1, 1, n)``. One entry
    with ``ln τ`` added to its logit is exactly τ identical copies of it; its attention
    probability is quantized as τ copies would be (``p/τ`` quantized, then times τ).
    ``multiplicity``: the same τ per entry as host integers, or None where they are not integers
    shared by the batch (per-sample τ). It must agree with ``log_multiplicity``; it exists so the
    float SDPA path can repeat the entries instead of masking without reading τ off the device
    (a sync, and a graph break under ``torch.compile``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    log_multiplicity: torch.Tensor | None = None
    multiplicity: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.multiplicity is None:
            return
        mult = tuple(int(t) for t in self.multiplicity)
        if len(mult) != self.num_entries or any(t < 1 for t in mult):
            raise ValueError(f"multiplicity needs one τ >= 1 per entry ({self.num_entries}), got {mult}")
        if self.log_multiplicity is None and any(t > 1 for t in mult):
            raise ValueError("a multiplicity above 1 needs its ln τ in log_multiplicity (the explicit paths use it)")
        self.multiplicity = mult

    @property
    def num_entries(self) -> int:
        """Distinct prefix entries n (not counting multiplicity)."""
        return self.keys.shape[-2]

    def entry_log_multiplicity(self) -> torch.Tensor | None:
        """``ln τ`` of every entry as a ``(P or 1, 1, 1, n)`` view, or None without multiplicity."""
        lm = self.log_multiplicity
        if lm is None:
            return None
        return lm.reshape((1,) * (4 - lm.ndim) + tuple(lm.shape)).expand(-1, -1, -1, self.num_entries)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AttentionPrefix:
        """Move/cast the cached tensors."""
        lm = self.log_multiplicity
        return AttentionPrefix(
            self.keys.to(device=device, dtype=dtype),
            self.values.to(device=device, dtype=dtype),
            None if lm is None else lm.to(device=device, dtype=dtype),
            self.multiplicity,
        )

    def repeated_entries(self) -> tuple[int, ...] | None:
        """τ per entry where float SDPA should repeat the entries instead of masking, else None (keep the mask)."""
        mult = self.multiplicity
        if mult is None or self.keys.shape[0] != 1:  # per-sample prefixes would need a key count per sample
            return None
        if sum(mult) - len(mult) > _MAX_EXTRA_REPEATED_KEYS:
            return None
        return mult


def _cat_wide(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)`` along a dim before the last, moved as 16- or 8-byte words where the layout allows.

    The eager concatenation kernel copies one element per thread step: on 2-byte (bf16) K / V it ran at
    ~0.66 TB/s on an H200 (0.23 ms for one (256, 12, 197, 64) prefix concatenation, 2026-12-02), the wider
    words cut its steps 4-8x. A byte copy either way (bit-identical); under ``torch.compile`` Inductor writes
    its own kernel, so the plain op is kept there.
    """
    first = parts[0]
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return torch.cat(parts, dim)  # graph builders: the plain op (no dtype reinterpretation in the graph)
    if dim % first.ndim == first.ndim - 1:
        return torch.cat(parts, dim)
    for wide in (torch.complex128, torch.int64):
        ratio = wide.itemsize // first.element_size()
        if ratio > 1 and all(
            p.dtype == first.dtype
            and p.stride(-1) == 1
            and p.shape[-1] % ratio == 0
            and p.storage_offset() % ratio == 0
            and all(st % ratio == 0 for st in p.stride()[:-1])
            for p in parts
        ):
            return torch.cat([p.view(wide) for p in parts], dim).view(first.dtype)
    return torch.cat(parts, dim)


class Attention(nn.Module):
    """Multi-head self-attention with explicit, quantizable Q·Kᵀ and P·V."""

    def __init__(
        self,
        qkv: nn.Linear,
        proj: nn.Linear,
        num_heads: int,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        out_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = qkv.out_features // (3 * num_heads)
        self.scale = self.head_dim**-0.5
        self.qkv = qkv
        self.q_norm = q_norm or nn.Identity()
        self.k_norm = k_norm or nn.Identity()
        self.matmul_qk = MatMul()
        self.tap_probs = Tap()
        self.matmul_pv = MatMul()
        self.out_norm = out_norm or nn.Identity()
        self.proj = proj
        self.prefix: AttentionPrefix | None = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v of shape (B, heads, N, head_dim), after q/k norms, before any matmul quantizer."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of (B, N, width) tokens plus proj, letting the fused kernel apply proj's quantizer."""
        b, n, _ = x.shape
        out, proj_input_done = self._attend(*self.project_qkv(x), self._proj_input_quantizer())
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        if proj_input_done:  # the kernel's epilogue already applied proj's input quantizer
            return self.proj.forward_prequantized(out)
        return self.proj(self.out_norm(out))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head attention output (B, heads, N, head_dim) of projected q, k, v (with the prefix if set)."""
        return self._attend(q, k, v, None)[0]

    def _proj_input_quantizer(self) -> nn.Module | None:
        """proj's input quantizer where the fused kernel may apply it to its output instead (nothing in between)."""
        proj = self.proj
        if not isinstance(self.out_norm, nn.Identity) or not isinstance(proj, QuantLinear):
            return None
        if type(proj).forward is not QuantLinear.forward:  # e.g. NoisyQuant's: adds its noise before the quantizer
            return None
        if proj.input_quantizer is None or fused_attention.has_hooks(proj):
            return None  # a hook on proj must see its input before quantization: proj runs whole
        return proj.input_quantizer

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_quantizer: nn.Module | None
    ) -> tuple[torch.Tensor, bool]:
        """:meth:`attend`, and whether ``out_quantizer`` was applied to the output (by the fused kernel)."""
        prefix = self.prefix
        explicit = _EXPLICIT[0]
        if kernels.current().float_sdpa and not explicit and self._plain_float():
            return self._sdpa(q, k, v, prefix), False
        fused = fused_attention.enabled() and not explicit
        out = self._fused_attention(q, k, v, prefix, out_quantizer) if fused else None
        if out is not None:
            return out
        if prefix is not None:
            return self._forward_with_prefix(q, k, v, prefix), False
        probs = self.tap_probs((self.matmul_qk(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.matmul_pv(probs, v), False

    def _plain_float(self) -> bool:
        """Whether nothing quantizes or reads this attention's probabilities and operands (float mode, no hooks)."""
        if fused_attention.attention_observed(self):
            return False
        return all(q.mode == "float" for q in self.matmul_quantizers())

    def matmul_quantizers(self) -> list[nn.Module]:
        """The quantizers set on Q·Kᵀ and P·V (operands a and b of each)."""
        pairs = ((mm.a_quantizer, mm.b_quantizer) for mm in (self.matmul_qk, self.matmul_pv))
        return [q for pair in pairs for q in pair if q is not None]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: AttentionPrefix | None) -> torch.Tensor:
        """Float attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels).

        The same function as the explicit path (a prefix is concatenated), rounded differently: the
        float model as fast as open_clip's own, which also uses SDPA. Multiplicity τ is τ physical
        copies of an entry where τ is known on the host and small (no mask, so the flash kernel
        stays eligible), else an additive ``ln τ`` mask. Copies are expanded slices joined by the
        one concatenation with the tokens: no index tensor, whose host-to-device copy would sync.
        """
        if prefix is None:
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        b, n_tok = q.shape[0], k.shape[-2]
        pk, pv = prefix.keys.to(k.dtype), prefix.values.to(v.dtype)
        lm = prefix.entry_log_multiplicity()
        repeats = prefix.repeated_entries() if lm is not None else None
        if repeats is not None:
            keys = _cat_wide([pk[:, :, i : i + 1].expand(b, -1, t, -1) for i, t in enumerate(repeats)] + [k], -2)
            values = _cat_wide([pv[:, :, i : i + 1].expand(b, -1, t, -1) for i, t in enumerate(repeats)] + [v], -2)
            return F.scaled_dot_product_attention(q, keys, values, scale=self.scale)
        keys = _cat_wide([pk.expand(b, -1, -1, -1), k], -2)
        values = _cat_wide([pv.expand(b, -1, -1, -1), v], -2)
        mask = None
        if lm is not None:
            mask = torch.cat([lm.to(q.dtype), lm.new_zeros(lm.shape[0], 1, 1, n_tok).to(q.dtype)], dim=-1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)

    def _fused_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix: AttentionPrefix | None,
        out_quantizer: nn.Module | None = None,
    ) -> tuple[torch.Tensor, bool] | None:
        """The attention as one Triton kernel (on by default on CUDA), or None where it must stay explicit.

        Explicit whenever something reads the probabilities or the matmul operands (hooks on
        ``tap_probs`` such as ``record()``, on the matmuls or their quantizers; an observing
        quantizer during calibration), under autograd, or for shapes / quantizers the kernel lacks.
        Q, K and V go through their quantizers as in the explicit path: inside the kernel where
        :func:`~regcache.quant.fused_attention.operand_fold` allows (all three eager, Q compiled), here
        otherwise. ``out_quantizer`` (proj's input quantizer) is applied to the output in the kernel
        where it folds too; the bool says whether it was.
        """
        pq = self.matmul_pv.a_quantizer
        if not fused_attention.attention_fusable(self) or not fused_attention.supports(q, prefix, pq):
            return None
        operands = (self.matmul_qk.a_quantizer, self.matmul_qk.b_quantizer, self.matmul_pv.b_quantizer, out_quantizer)
        # Per-tensor uniform (or no) quantizers run inside the kernel, saving the pass that writes each quantized
        # tensor. Eager: Q, K, V and the output (BENCHMARKS.md §3).
        # Compiled: Q and the output only; the kernel re-reads every K / V tile once per query block, so
        # quantizing those in registers repeats work that Inductor's one pass does once (folding Q, K and V
        # measured slower than none, BENCHMARKS.md §3)
        rows = (0, 3) if torch.compiler.is_compiling() else (0, 1, 2, 3)
        fold = fused_attention.operand_fold(self, operands, q.device, rows)
        inside = 0 if fold is None else fold[1]  # bit 1 << row: that quantizer runs in the kernel
        qq = q if inside & 1 else self.matmul_qk.quantize_a(q)
        kq = k if inside & 2 else self.matmul_qk.quantize_b(k.transpose(-2, -1)).transpose(-2, -1)
        vq = v if inside & 4 else self.matmul_pv.quantize_b(v)
        out = fused_attention.quantized_attention(qq, kq, vq, self.scale, pq, prefix, operand_fold=fold, checked=True)
        return None if out is None else (out, bool(inside & 8))

    def _forward_with_prefix(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: AttentionPrefix
    ) -> torch.Tensor:
        """Attention over [prefix entries; tokens] as one Q·Kᵀ, one softmax and one P·V.

        Keys are ``[prefix keys (full precision); quantize_b(k)]`` and values ``[prefix values;
        quantize_b(v)]`` (concatenated along the token axis: (B, heads, n + N, head_dim), cheap).
        Multiplicity τ is a per-column logit bias ``[ln τ ..., 0 ...]``; the probabilities are
        quantized as τ copies would be by dividing the prefix columns by τ before the P·V
        quantizer and multiplying them back after it (a per-column factor ``[τ ..., 1 ...]``:
        token columns are divided and multiplied by exactly 1). ``tap_probs`` sees the softmax
        output, prefix columns holding the mass of all τ copies.
        """
        b, _, n_tok, _ = q.shape
        qq = self.matmul_qk.quantize_a(q)
        pk = prefix.keys.to(qq.dtype)  # register keys / values stay in full precision
        keys_t = torch.cat(
            [pk.transpose(-2, -1).expand(b, -1, -1, -1), self.matmul_qk.quantize_b(k.transpose(-2, -1))], -1
        )
        logits = (qq @ keys_t) * self.scale
        lm = prefix.entry_log_multiplicity()  # (P or 1, 1, 1, n)
        if lm is not None:
            zeros = lm.new_zeros(lm.shape[0], 1, 1, n_tok)
            logits = logits + torch.cat([lm.to(logits.dtype), zeros.to(logits.dtype)], dim=-1)
        probs = self.tap_probs(logits.softmax(dim=-1))
        if lm is not None:  # quantize each of the τ copies' share p/τ, exactly as τ real copies would be
            factor = torch.cat([lm.exp().to(probs.dtype), zeros.to(probs.dtype) + 1], dim=-1)
            probs = self.matmul_pv.quantize_a(probs / factor) * factor
        else:
            probs = self.matmul_pv.quantize_a(probs)
        pv = prefix.values.to(probs.dtype)
        values = torch.cat([pv.expand(b, -1, -1, -1), self.matmul_pv.quantize_b(v)], dim=-2)
        return probs @ values


class Mlp(nn.Module):
    """fc1 → activation → (norm) → fc2, with a tap on the fc2 input."""

    def __init__(self, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = act
        self.norm = norm or nn.Identity()
        self.tap_fc2_input = Tap()
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc1, activation and norm, then fc2 with its input passed through the ``fc2_input`` tap."""
        return self.fc2(self.tap_fc2_input(self.norm(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        norm1: nn.Module,
        attn: Attention,
        norm2: nn.Module,
        mlp: Mlp,
        ls1: nn.Module | None = None,
        ls2: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_filter: nn.Module | None = None
        self.tap_input = Tap()
        self.norm1 = norm1
        self.attn = attn
        self.ls1 = ls1 or nn.Identity()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2 or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the input filter (token deletion) if one is installed, then the attention and MLP residuals."""
        if self.input_filter is not None:
            x = self.input_filter(x)
        return self.forward_unfiltered(x)

    def forward_unfiltered(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its input filter (a compiled caller can run the filter, which sets N, eagerly)."""
        x = self.tap_input(x)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionEncoder(nn.Module):
    """A vision tower in canonical form: ``embed`` → ``blocks`` → ``pool``.

    ``forward(images)`` returns what the original tower returned (the pooled, projected
    embedding), so an open_clip model whose ``visual`` was replaced keeps working unchanged.
    """

    family: str = "base"

    def __init__(self, blocks: list[Block], num_prefix_tokens: int, embed_dim: int, source: str = "") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.num_prefix_tokens = num_prefix_tokens
        self.embed_dim = embed_dim
        self.source = source

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks L."""
        return len(self.blocks)

    @property
    def width(self) -> int:
        """Residual stream width."""
        return self.blocks[0].attn.qkv.in_features

    @property
    def outputs_class_logits(self) -> bool:
        """Whether ``forward`` returns a classifier's logits (a timm ImageNet model) rather than an embedding."""
        return False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images → token sequence entering block 0, shape (B, N, width)."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token sequence after the last block → final embedding (B, embed_dim)."""
        raise NotImplementedError

    def forward_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run blocks ``start .. end-1`` on the residual stream x (lets callers cache a prefix of the network).

        An input filter that keeps token positions (``TokenDeletion(mode="keep")``) and ran in this
        call gets its tokens back after the last block (``restore``), so the output is the full grid.
        """
        keeping = []
        for block in self.blocks[start:end]:
            x = block(x)
            if getattr(block.input_filter, "keeps_positions", False):
                keeping.append(block.input_filter)
        if keeping and (end is None or end >= len(self.blocks)):
            for filt in reversed(keeping):
                x = filt.restore(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images to the pooled embedding the original tower returned, through embed, every block and pool."""
        return self.pool(self.forward_blocks(self.embed(images)))

    def flops_per_image(self, num_tokens: int) -> int:
        """Multiply-accumulate count x2 of the blocks' linears and attention matmuls for N tokens."""
        total = 0
        for block in self.blocks:
            attn, mlp = block.attn, block.mlp
            d = attn.num_heads * attn.head_dim
            for lin in (attn.qkv, attn.proj, mlp.fc1, mlp.fc2):
                total += 2 * num_tokens * lin.in_features * lin.out_features
            total += 2 * 2 * num_tokens * num_tokens * d
        return total


TAP_NAMES = {"block_input": "tap_input", "fc2_input": "mlp.tap_fc2_input", "attn_probs": "attn.tap_probs"}


@contextmanager
def record(
    encoder: VisionEncoder, what: tuple[str, ...] = ("block_input",), blocks: list[int] | None = None
) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Capture tapped tensors during forwards: ``out[what][block_index]`` is the last one seen.

    ``what`` ⊂ {"block_input", "fc2_input", "attn_probs"}.
    """
    unknown = set(what) - set(TAP_NAMES)
    if unknown:
        raise ValueError(f"unknown taps {sorted(unknown)}; choose from {sorted(TAP_NAMES)}")
    out: dict[str, dict[int, torch.Tensor]] = {w: {} for w in what}
    handles = []
    indices = range(encoder.num_blocks) if blocks is None else blocks
    for w in what:
        for i in indices:
            tap = encoder.blocks[i].get_submodule(TAP_NAMES[w])

            def hook(_m, _inp, output, w=w, i=i):
                out[w][i] = output.detach()

            handles.append(tap.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
