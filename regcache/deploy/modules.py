"""The integer modules a deployed encoder is made of (built by :func:`regcache.deploy.deploy_`).

Every module holds its weight as int8 codes once, its input's static per-tensor scale / zero point
(int8-shifted, :func:`~regcache.deploy.kernels.int8_range`) and the folded epilogue (``alpha``,
``beta`` in float64, :func:`~regcache.deploy.kernels.fold_epilogue`), and calls the backend its
``backend`` names for the tensor's device. A module that receives int8 codes (its producer
quantized them in an epilogue: LayerNorm, or fc1 → GELU) skips its own input quantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from regcache.deploy import kernels
from regcache.encoders.base import Attention, Block, Mlp
from regcache.quant.fused_attention import has_hooks


@dataclass(frozen=True)
class StaticQuant:
    """A static per-tensor activation quantizer in int8 terms: ``clamp(round(x / scale) + zero_point, qmin, qmax)``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @classmethod
    def from_quantizer(cls, quantizer: nn.Module) -> StaticQuant:
        """The (int8-shifted) parameters of a calibrated per-tensor UniformQuantizer."""
        zp, qmin, qmax = kernels.int8_range(int(quantizer.zero_point), quantizer.qmin, quantizer.qmax)
        return cls(float(quantizer.scale), zp, qmin, qmax)

    def as_tuple(self) -> kernels.OutQuant:
        """``(scale, zero_point, qmin, qmax)``, the ``out_quant`` form."""
        return (self.scale, self.zero_point, self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(q - zero_point) * scale`` as ``dtype``: exact in float64, else rounded to float32 first.

        The product of a 9-bit integer and a float32 scale is exact in float64, so rounding it to float32
        gives the fake quantizer's float32 product bit for bit (one IEEE rounding either way); a float64
        model keeps it exact.
        """
        y = (codes.double() - float(self.zero_point)) * self.scale
        return y if dtype == torch.float64 else y.float().to(dtype)


_BACKENDS: dict[tuple[str, str], kernels.Backend] = {}


def backend_for(name: str, device: torch.device) -> kernels.Backend:
    """``kernels.get_backend(name, device)``, memoized per (name, device type)."""
    key = (name, device.type)
    if key not in _BACKENDS:
        _BACKENDS[key] = kernels.get_backend(name, device)
    return _BACKENDS[key]


class Int8Linear(nn.Module):
    """A deployed ``QuantLinear``: int8 weight codes, static input quantizer, integer GEMM, folded epilogue.

    ``forward(x)``: float ``x`` is quantized with the input quantizer (after adding NoisyQuant's fixed
    noise ``input_offset``, as the simulation does); int8 ``x`` is taken as the codes already. The output
    is ``compute_dtype`` (the model's), or int8 codes when ``out_quant`` is set (the next linear's input
    quantizer fused into this epilogue, after ``activation``).
    """

    def __init__(
        self,
        weight_codes: torch.Tensor,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        weight_zero: torch.Tensor | None,
        input_quant: StaticQuant,
        compute_dtype: torch.dtype,
        backend: str,
        input_offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_codes.shape
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("alpha", alpha)
        self.register_buffer("beta", beta)
        self.register_buffer("weight_zero", weight_zero)
        self.register_buffer("input_offset", input_offset)
        self.input_quant = input_quant
        self.compute_dtype = compute_dtype
        self.backend = backend
        self.activation: str | None = None
        self.out_quant: StaticQuant | None = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes of a float input (the simulated input quantizer's codes, shifted into int8)."""
        if self.input_offset is not None:
            x = x + self.input_offset.to(x.dtype)
        return backend_for(self.backend, x.device).quantize_static(x, *self.input_quant.as_tuple())

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The linear on float inputs or int8 codes (see the class docstring), ``+ residual`` in its epilogue,
        written into ``out`` where given (the kernels' ``out=``: rows of a larger buffer)."""
        codes = x if x.dtype == torch.int8 else self.quantize_input(x)
        lead = codes.shape[:-1]
        extra = {} if residual is None else {"residual": residual.reshape(-1, self.out_features)}
        if out is not None:
            extra["out"] = out
        out = backend_for(self.backend, codes.device).int8_linear(
            codes.reshape(-1, self.in_features),
            self.weight_codes,
            self.alpha,
            self.beta,
            self.weight_zero,
            activation=self.activation,
            out_quant=None if self.out_quant is None else self.out_quant.as_tuple(),
            out_dtype=self.compute_dtype,
            **extra,
        )
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape, input quantizer, fusions and backend, for ``print(model)``."""
        extra = f", activation={self.activation}" if self.activation else ""
        extra += f", out_quant={self.out_quant}" if self.out_quant else ""
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, input={self.input_quant}{extra}, backend={self.backend}"


class QuantizingNorm(nn.Module):
    """A norm whose output feeds only a deployed linear: it returns that linear's int8 input codes.

    A plain LayerNorm (torch's or open_clip's: computed in the input's dtype) runs as the backend's
    fused ``layernorm_quantize``; any other norm, or a consumer with a NoisyQuant offset, runs the
    norm module and then the consumer's quantization (the same ops as the simulation).
    """

    def __init__(self, norm: nn.Module, consumer: Int8Linear, fused: bool) -> None:
        super().__init__()
        self.norm = norm
        self.consumer_quant = consumer.input_quant
        self.fused = fused and consumer.input_offset is None
        self.backend = consumer.backend
        self._consumer = [consumer]  # not a submodule: it stays where it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes of ``norm(x)`` under the consumer's static input quantizer."""
        if not self.fused:
            return self._consumer[0].quantize_input(self.norm(x))
        n = self.norm
        return backend_for(self.backend, x.device).layernorm_quantize(
            x, n.weight, n.bias, n.eps, *self.consumer_quant.as_tuple()
        )


class Int8PatchEmbed(nn.Module):
    """A deployed patchify ``QuantConv2d`` (kernel = stride, no padding): int8 image codes times int8 weights.

    The image is quantized per tensor, cut into patches (integer codes, so the reshape is exact) and
    multiplied as one ``int8_linear``; returns (B, O, H/p, W/p) like the convolution.
    """

    def __init__(self, linear: Int8Linear, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        self.linear = linear
        self.kernel_size = kernel_size
        self.out_channels = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch codes × weight codes, as the convolution's (B, O, H/p, W/p) output."""
        kh, kw = self.kernel_size
        b, c, h, w = x.shape
        gh, gw = h // kh, w // kw
        codes = self.linear.quantize_input(x[:, :, : gh * kh, : gw * kw])
        patches = codes.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh, gw, c * kh * kw)
        return self.linear(patches).permute(0, 3, 1, 2)


class Int8Block(Block):
    """A block whose skip connections run inside proj's and fc2's epilogues (``int8_linear(..., residual=x)``).

    The same function as :class:`~regcache.encoders.base.Block` (``x + proj(attn(norm1(x)))``, then
    ``x + fc2(...)``: the kernel adds the residual to the linear's output rounded to the model's dtype,
    one rounding, as the model's own add), saving the separate add's pass over the residual stream.
    :func:`regcache.deploy.deploy_` swaps a block's class to this one where :meth:`applies` (layer scales
    identity, the standard attention / MLP forwards, proj and fc2 deployed, no hooks that must see the
    unfused tensors); everything else about the block (prefix, deletion filter, taps) is unchanged.
    """

    @staticmethod
    def applies(block: nn.Module) -> bool:
        """Whether ``block`` computes exactly what this class's forward computes, with the residuals fusable."""
        if type(block) is not Block:
            return False
        attn, mlp = block.attn, block.mlp
        if not (isinstance(block.ls1, nn.Identity) and isinstance(block.ls2, nn.Identity)):
            return False
        if type(attn).forward is not Attention.forward or type(mlp) is not Mlp:
            return False
        if not (isinstance(attn.proj, Int8Linear) and isinstance(mlp.fc2, Int8Linear)):
            return False
        return not any(has_hooks(m) for m in (block.ls1, block.ls2, attn, attn.proj, mlp, mlp.fc2))

    def forward_unfiltered(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`Block.forward_unfiltered` with the two residual adds in the linears' epilogues."""
        x = self.tap_input(x)
        attn, mlp = self.attn, self.mlp
        b, n, _ = x.shape
        h = self.norm1(x)
        out = self._prefix_sdpa(h, b, n) if self._writes_prefix_kv() else None
        if out is None:
            out, _ = attn._attend(*attn.project_qkv(h), None)
        out = out.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
        x = attn.proj(attn.out_norm(out), residual=x)
        return mlp.fc2(mlp.tap_fc2_input(mlp.norm(mlp.act(mlp.fc1(self.norm2(x))))), residual=x)

    def _writes_prefix_kv(self) -> bool:
        """Whether the attention is float SDPA over a prefix of repeated entries that qkv can write next to."""
        from regcache import kernels as float_kernels
        from regcache.encoders import base

        attn = self.attn
        prefix = attn.prefix
        if prefix is None or type(attn) is not Attention or not isinstance(attn.qkv, Int8Linear):
            return False
        if prefix.keys.shape[0] != 1 or prefix.values.shape[0] != 1:  # one register set per sample
            return False
        if attn.qkv.out_quant is not None or attn.qkv.activation is not None:
            return False
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            return False
        if base._EXPLICIT[0] or not float_kernels.current().float_sdpa or not attn._plain_float():
            return False
        return prefix.log_multiplicity is None or prefix.repeated_entries() is not None

    def _prefix_sdpa(self, h: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """SDPA over [prefix entries (τ copies each); tokens] with qkv writing its rows after the prefix rows.

        The same keys / values as ``Attention._sdpa``'s concatenation, without it: one buffer (B, P + N, 3,
        heads, head_dim) whose first P rows of the K and V slots hold the register entries (a 3 MB copy at
        ViT-B/16, batch 256) and whose other rows the qkv GEMM writes (``out=``), so K and V are strided views
        and nothing of the size of K / V is copied (the concatenation moved 2 x 78 MB per block).
        """
        attn = self.attn
        prefix, qkv = attn.prefix, attn.qkv
        heads, d = attn.num_heads, attn.head_dim
        dtype = qkv.compute_dtype
        reps = prefix.repeated_entries() if prefix.log_multiplicity is not None else None
        reps = reps or (1,) * prefix.num_entries
        pk, pv = prefix.keys.to(dtype)[0], prefix.values.to(dtype)[0]  # (heads, entries, d), shared by the batch
        entries = torch.stack(
            [torch.cat([t[:, i : i + 1].expand(-1, r, -1) for i, r in enumerate(reps)], dim=1) for t in (pk, pv)]
        )  # (2, heads, P, d)
        p = entries.shape[2]
        buf = torch.empty((b, p + n, 3, heads, d), device=h.device, dtype=dtype)
        buf[:, :p, 1:] = entries.permute(2, 0, 1, 3)
        qkv(h, out=buf[:, p:].view(b, n, 3 * heads * d))
        q, k, v = (buf[:, p:, 0], buf[:, :, 1], buf[:, :, 2])
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scale)


class Int8Attention(Attention):
    """Attention with Q·Kᵀ and P·V as integer matmuls (the naive method's per-tensor operand quantizers).

    Without a prefix: ``softmax(s_q s_k (Q - z_q)(K - z_k)ᵀ · d^-1/2)`` and ``s_p s_v (P - z_p)(V - z_v)``
    on int8 codes. With a RegCache prefix it follows the simulation (``Attention._forward_with_prefix``)
    term by term: the register keys / values stay in full precision, so their columns are products of
    the dequantized query / probability codes (the simulation's exact operands) with the float
    registers, the token columns integer matmuls; the probabilities are quantized as one tensor
    over all columns (prefix columns divided by τ first, multiplied back after), as there.
    """

    @classmethod
    def from_attention(
        cls, attn: Attention, q: StaticQuant, k: StaticQuant, p: StaticQuant, v: StaticQuant, backend: str
    ) -> Int8Attention:
        """The same submodules and prefix as ``attn``, with its four operand quantizers as static int8 ones."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update({k_: v_ for k_, v_ in attn.__dict__.items() if not k_.startswith("_")})
        for name, module in attn.named_children():
            setattr(new, name, module)
        new.matmul_qk.a_quantizer = new.matmul_qk.b_quantizer = None
        new.matmul_pv.a_quantizer = new.matmul_pv.b_quantizer = None
        new.q_quant, new.k_quant, new.p_quant, new.v_quant = q, k, p, v
        new.backend = backend
        return new

    def _attend(self, q, k, v, out_quantizer):
        be = backend_for(self.backend, q.device)
        dtype = q.dtype
        qc = be.quantize_static(q, *self.q_quant.as_tuple())
        kc = be.quantize_static(k, *self.k_quant.as_tuple())
        vc = be.quantize_static(v, *self.v_quant.as_tuple())
        qs, ks, ps, vs = self.q_quant, self.k_quant, self.p_quant, self.v_quant
        logits = be.int8_matmul(qc, kc, qs.scale * ks.scale, qs.zero_point, ks.zero_point, out_dtype=dtype)
        prefix = self.prefix
        lm = None
        if prefix is not None:
            b, n_tok = q.shape[0], k.shape[-2]
            pk = prefix.keys.to(dtype).expand(b, -1, -1, -1)
            logits = torch.cat([qs.dequantize(qc, dtype) @ pk.transpose(-2, -1), logits], dim=-1)
        logits = logits * self.scale
        if prefix is not None:
            lm = prefix.entry_log_multiplicity()
            if lm is not None:
                zeros = lm.new_zeros(lm.shape[0], 1, 1, n_tok)
                logits = logits + torch.cat([lm.to(logits.dtype), zeros.to(logits.dtype)], dim=-1)
        probs = self.tap_probs(logits.softmax(dim=-1))
        vt = vc.transpose(-2, -1)
        if prefix is None:
            pc = be.quantize_static(probs, *ps.as_tuple())
            return be.int8_matmul(pc, vt, ps.scale * vs.scale, ps.zero_point, vs.zero_point, out_dtype=dtype), False
        n = prefix.num_entries
        if lm is not None:
            factor = torch.cat([lm.exp().to(probs.dtype), zeros.to(probs.dtype) + 1], dim=-1)
            pc = be.quantize_static(probs / factor, *ps.as_tuple())
            prefix_probs = ps.dequantize(pc[..., :n], dtype) * factor[..., :n]
        else:
            pc = be.quantize_static(probs, *ps.as_tuple())
            prefix_probs = ps.dequantize(pc[..., :n], dtype)
        token_codes = pc[..., n:].contiguous()
        out = be.int8_matmul(token_codes, vt, ps.scale * vs.scale, ps.zero_point, vs.zero_point, out_dtype=dtype)
        return prefix_probs @ prefix.values.to(dtype).expand(b, -1, -1, -1) + out, False


__all__ = ["Int8Attention", "Int8Block", "Int8Linear", "Int8PatchEmbed", "QuantizingNorm", "StaticQuant", "backend_for"]
