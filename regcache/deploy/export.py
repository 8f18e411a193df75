"""ONNX export of a calibrated encoder in the standard QDQ form (what TensorRT and ONNX Runtime consume).

Every active activation quantizer becomes a ``QuantizeLinear → DequantizeLinear`` pair holding its
calibrated scale and zero point (uint8 storage for an unsigned 8-bit range, int8 for a signed one); one
without an exact 8-bit pair (fewer levels, or a zero point outside the storage type) is written as its
formula in float ops (``_ActivationQDQ``). Every quantized weight is an int8 initializer (its codes, shifted into
int8 like :func:`~regcache.deploy.deploy_`'s) read by a per-axis ``DequantizeLinear`` (per output
channel). RegCache's register keys / values are constants of the graph (the ``Concat`` of the prefix
attention), token deletion its ``TopK`` / ``Gather``. NoisyQuant's noise is an ``Add`` before its QDQ and
its bias correction is folded into the bias.

``export_onnx(encoder, path, example, config)``: with a :class:`~regcache.deploy.DeployConfig` the graph is
the one ``deploy_(encoder, config)`` computes (``attention="float"``: no QDQ on the attention operands;
``"int8"``: Q, K, V and P through QDQ), checked by running ``deploy_`` on a copy first (same refusals);
without one, the encoder's current quantizer modes (the simulation as it runs). It takes the calibrated
fake-quant encoder, not a deployed one: the QDQ graph is the interchange form of the deployment, and the
runtime that reads it builds its own integer kernels. The graph is traced by ``torch.onnx.export``'s
TorchScript exporter (``dynamo=False``: the QDQ pairs are emitted by ``symbolic`` functions, which it
supports on torch 2.x without onnxscript), attention in its explicit form (no SDPA).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from regcache.deploy import DeployConfig, DeployError, deploy_, is_deployed, simulate_
from regcache.encoders.base import VisionEncoder, explicit_attention
from regcache.quant.modules import QuantConv2d, QuantLinear, quantizers
from regcache.quant.quantizers import UniformQuantizer
from regcache.registers.deletion import TokenDeletion

ONNX_INT8, ONNX_UINT8 = 3, 2  # TensorProto element types


def _storage(qmin: int, qmax: int) -> tuple[int, int, int, torch.dtype]:
    """(ONNX element type, storage min, storage max, torch dtype) holding the levels [qmin, qmax]."""
    if qmin >= 0 and qmax > 127:
        return ONNX_UINT8, 0, 255, torch.uint8
    return ONNX_INT8, -128, 127, torch.int8


class _ActivationQDQ(torch.autograd.Function):
    """Fake quantization in eager (the quantizer's formula); QuantizeLinear → DequantizeLinear in ONNX.

    A quantizer without an exact 8-bit QDQ form is written as its formula in float ops (Div, Round, Add,
    Clip, Sub, Mul: the same IEEE operations, round half to even) and listed in the export summary: a zero
    point outside the storage type (RepQ-ViT's per-tensor mean of per-channel zero points can leave [0,
    255]), or fewer levels than 8 bits (a pair with a clip before it is exact, but ONNX Runtime's extended
    graph optimizations fuse it into something else: 1e-2 off on a W6A6 model, 2026-12-02, onnxruntime
    1.32; and no int8 runtime has 6-bit kernels).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        """``(clamp(round(x / s) + z, qmin, qmax) - z) s`` in float32, back in x's dtype."""
        q = torch.clamp(torch.round(x.float() / scale) + zero_point, qmin, qmax)
        return ((q - zero_point) * scale).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        """The QDQ pair with the storage type's zero point, or the formula (class docstring)."""
        _, lo, hi, dtype = _storage(qmin, qmax)

        def const(v: float):
            return g.op("Constant", value_t=torch.tensor(float(v)))

        if not lo <= zero_point <= hi or (qmin, qmax) != (lo, hi):
            q = g.op("Add", g.op("Round", g.op("Div", x, scale)), const(zero_point))
            q = g.op("Clip", q, const(qmin), const(qmax))
            return g.op("Mul", g.op("Sub", q, const(zero_point)), scale)
        zp = g.op("Constant", value_t=torch.tensor(int(zero_point), dtype=dtype))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zp), scale, zp)


class _WeightDQ(torch.autograd.Function):
    """int8 weight codes dequantized per output channel: ``(c - z) s``; a per-axis DequantizeLinear in ONNX."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):
        """The float weight the simulation uses, from its int8 codes (output channels on axis 0)."""
        view = (-1,) + (1,) * (codes.ndim - 1)
        return (codes.float() - zero_point.view(view)) * scale.view(view)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        """DequantizeLinear(codes, scale, zero point, axis=0)."""
        zp = g.op("Cast", zero_point, to_i=ONNX_INT8)
        return g.op("DequantizeLinear", codes, scale, zp, axis_i=0)


def _activation_forward(q: UniformQuantizer):
    scale = q.scale.detach().float().reshape(())
    zp = float(q.zero_point)
    qmin, qmax = q.qmin, q.qmax

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _ActivationQDQ.apply(x, scale, zp, qmin, qmax)

    return forward


def _weight_dq(module: nn.Module):
    """A function giving the weight through int8 codes and a per-axis DQ (the codes as ``deploy_`` stores them).

    The codes are computed here, before tracing, so the graph holds them as int8 constants.
    """
    from regcache.deploy import _weight_codes

    weight = module.weight.detach()
    codes, scale, zero = _weight_codes(module.weight_quantizer, weight.reshape(weight.shape[0], -1))
    zero = torch.zeros_like(scale) if zero is None else zero.float()
    codes, scale, dtype = codes.reshape(weight.shape).contiguous(), scale.float().contiguous(), weight.dtype
    return lambda: _WeightDQ.apply(codes, scale, zero).to(dtype)


def _linear_forward(module: QuantLinear):
    noise = getattr(module, "noise", None)
    bias = module.bias
    if noise is not None:  # NoisyQuant: W Q(x + N) + (b - W N), the correction folded into the bias
        from regcache.quant.modules import quantized_weight

        bias = module.corrected_bias(quantized_weight(module, module.weight_quantizer, module.weight)).detach()

    weight = _weight_dq(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            x = x + noise.to(x.dtype)
        return F.linear(module.input_quantizer(x), weight(), bias)

    return forward


def _conv_forward(module: QuantConv2d):
    weight = _weight_dq(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            module.input_quantizer(x), weight(), module.bias, module.stride, module.padding, module.dilation
        )

    return forward


def _deletion_forward(filt: nn.Module):
    """TokenDeletion's drop as traceable ops: the same top-k, the kept positions in order by a sort, one gather."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        npre, k = filt.num_prefix_tokens, filt.k
        b, total, c = x.shape
        n = total - npre
        dropped = x[:, npre:].abs().amax(dim=-1).topk(k, dim=1).indices
        flag = torch.zeros(b, n, dtype=x.dtype).scatter(1, dropped, torch.ones(b, k, dtype=x.dtype))
        # kept positions first, in ascending order (a sort key: dropped ones go after every kept one)
        order = torch.argsort(flag * n + torch.arange(n, dtype=x.dtype), dim=1)[:, : n - k] + npre
        index = torch.cat([torch.arange(npre).expand(b, npre), order], dim=1)
        return x.gather(1, index.unsqueeze(-1).expand(b, total - k, c))

    return forward


@contextlib.contextmanager
def qdq_forwards(encoder: nn.Module) -> Iterator[int]:
    """In the block every active quantizer and quantized linear of ``encoder`` runs its QDQ form (yields the count)."""
    patched: list[nn.Module] = []
    try:
        for name, q in quantizers(encoder):
            if q.mode != "quant":
                continue
            if not isinstance(q, UniformQuantizer) or not type(q)._fusable or q.granularity != "tensor":
                if name.endswith("weight_quantizer"):
                    continue  # checked with its linear below
                raise DeployError(f"{name} ({q.kind}, {getattr(q, 'granularity', '')}) has no QDQ form here")
            q.forward = _activation_forward(q)
            patched.append(q)
        for m in encoder.modules():
            if not isinstance(m, (QuantLinear, QuantConv2d)) or m.weight_quantizer is None:
                continue
            if m.weight_quantizer.mode != "quant":
                continue
            m.forward = _conv_forward(m) if isinstance(m, QuantConv2d) else _linear_forward(m)
            patched.append(m)
        for i, block in enumerate(getattr(encoder, "blocks", [])):
            filt = block.input_filter
            if isinstance(filt, TokenDeletion) and filt.k > 0:
                if filt.keeps_positions:
                    raise DeployError(
                        f"blocks.{i}: token deletion mode='keep' (tokens restored after the last block) has no ONNX "
                        "form here; export with mode='drop'"
                    )
                filt.forward = _deletion_forward(filt)
                patched.append(filt)
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _has_qdq(q: UniformQuantizer) -> bool:
    """Whether a per-tensor quantizer is an exact 8-bit QDQ pair (full storage range, zero point inside it)."""
    _, lo, hi, _ = _storage(q.qmin, q.qmax)
    return (q.qmin, q.qmax) == (lo, hi) and lo <= float(q.zero_point) <= hi


def _active_quantizers(encoder: nn.Module) -> tuple[int, int, list[tuple[str, UniformQuantizer]]]:
    acts = [(n, q) for n, q in quantizers(encoder) if q.mode == "quant" and not n.endswith("weight_quantizer")]
    return len(acts), 0, acts


def export_onnx(
    encoder: VisionEncoder,
    path: str | Path,
    example: torch.Tensor,
    config: DeployConfig | None = None,
    opset: int = 17,
) -> dict[str, Any]:
    """Write ``encoder`` (calibrated, fake-quant) as a QDQ ONNX graph to ``path``; returns a summary (module docstring).

    ``example``: an image batch of the input size (the batch axis is dynamic in the graph).
    """
    if is_deployed(encoder):
        raise DeployError(
            "export_onnx takes the calibrated fake-quant encoder (deploy_'s input) with the DeployConfig, "
            "not a deployed one: export before deploy_, or a copy"
        )
    encoder = copy.deepcopy(encoder).cpu().float()  # traced on the CPU in float32, the caller's model untouched
    if config is not None:
        deploy_(copy.deepcopy(encoder), config)  # the same refusals as deploying it
        simulate_(encoder, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.eval()
    with torch.no_grad(), explicit_attention(), qdq_forwards(encoder) as count, warnings_quiet():
        torch.onnx.export(
            encoder,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    import onnx

    graph = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    int8 = [t for t in graph.initializer if t.data_type == ONNX_INT8 and len(t.dims) >= 2]
    int8 += [
        a.t
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value" and a.t.data_type == ONNX_INT8 and len(a.t.dims) >= 2
    ]
    int8_weights = len(int8)
    _, _, qs = _active_quantizers(encoder)
    formula = [n for n, q in qs if not _has_qdq(q)]
    return {
        "path": str(path),
        "opset": opset,
        "attention": None if config is None else config.attention,
        "quantized_modules": count,
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "int8_weight_initializers": int8_weights,
        # quantizers whose zero point leaves the storage type: written as their formula, not as a QDQ pair
        "formula_quantizers": formula,
        "ops": ops,
    }


def reference_output(encoder: VisionEncoder, images: torch.Tensor, config: DeployConfig | None = None) -> torch.Tensor:
    """The project's own output for ``images`` that an exported graph reproduces (CPU, float32, explicit attention)."""
    encoder = copy.deepcopy(encoder).cpu().float().eval()
    if config is not None:
        simulate_(encoder, config)
    with torch.no_grad(), explicit_attention():
        return encoder(images.cpu().float())


def check_onnx(
    path: str | Path, encoder: VisionEncoder, images: torch.Tensor, config: DeployConfig | None = None
) -> dict[str, Any]:
    """Run the exported graph in ONNX Runtime (CPU) on ``images`` against :func:`reference_output`.

    Returns the per-image relative L2 differences (median, max); ``skipped`` where onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        return {"skipped": "onnxruntime is not installed (pip install 'regcache[onnx]')"}
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    # the graph as written (constant folding, no fused integer kernels): ONNX Runtime 1.32's extended QDQ
    # fusions move asymmetric per-channel weights (RepQ-ViT) by ~1e-2 relative (tests/test_deploy_export.py)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.cpu().float().numpy()})[0])
    want = reference_output(encoder, images, config)
    rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
    return {
        "onnxruntime": ort.__version__,
        "images": len(images),
        "median_rel_diff": float(rel.median()),
        "max_rel_diff": float(rel.max()),
    }


def main(argv: list[str] | None = None) -> int:
    """``regcache export --output FILE.onnx [validate options]``: a validate run that writes its encoder as QDQ ONNX.

    The encoder is built, searched (RegCache) and calibrated exactly as ``regcache validate`` with the same
    options does (reusing its artifacts where the keys match), written on the first evaluation batch and
    checked in ONNX Runtime on it; ``--model.deploy.attention=int8`` exports that deployment's graph.
    """
    import importlib
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv or not any(a == "--output" or a.startswith("--output=") for a in argv):
        print(
            "usage: regcache export --output FILE.onnx [regcache validate options: --config FILE, --model.* ...]\n"
            "  writes the calibrated encoder (RegCache prefix / deletion included) as a QDQ ONNX graph on the first\n"
            "  evaluation batch, checked in ONNX Runtime on it (metrics.json: export)",
            file=sys.stderr if "-h" not in argv and "--help" not in argv else sys.stdout,
        )
        return 0 if ("-h" in argv or "--help" in argv) else 2
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--output":
            out.append(f"--model.export_onnx={next(it)}")
        elif a.startswith("--output="):
            out.append(f"--model.export_onnx={a.split('=', 1)[1]}")
        else:
            out.append(a)
    # the Lightning CLI runs the pipeline (imported by name: the library itself stays Lightning-free)
    return importlib.import_module("regcache.lightning_cli").main(out)


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """The TorchScript exporter's deprecation and tracer warnings are expected here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


__all__ = ["check_onnx", "export_onnx", "main", "qdq_forwards", "reference_output"]
