"""Fast paths that must not change numbers: fused fake quantization, cached quantized weights,
one-matmul prefix attention, sort-free token deletion, and no graph breaks under torch.compile."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import images, install_random_prefix, make_model

from regcache.encoders import AttentionPrefix, adapt
from regcache.quant import NaiveConfig, UniformQuantizer, calibrate_, quantize_
from regcache.quant.modules import QuantLinear, quantized_weight, set_quant_mode
from regcache.registers import TokenDeletion, install_deletion

ROOT = Path(__file__).resolve().parents[1]


# ---- fused fake quantization ------------------------------------------------------------------


def _quantizer_cases():
    """(quantizer, input) pairs: ties at .5, per tensor / channel / group, asymmetric, bf16 / fp16."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 32, generator=g) * 3
    w = torch.randn(16, 64, generator=g)
    cases = []
    for sym in (True, False):
        cases.append((UniformQuantizer(8, symmetric=sym).calibrate_(x), x))
        cases.append((UniformQuantizer(8, symmetric=sym).calibrate_(x), x.transpose(0, 2)))  # strided
        cases.append((UniformQuantizer(4, symmetric=sym, granularity="channel", axis=1).calibrate_(x), x))
        cases.append((UniformQuantizer(6, symmetric=sym, granularity="channel", axis=-1).calibrate_(x), x))
        cases.append((UniformQuantizer(4, symmetric=sym, granularity="group", group_size=16).calibrate_(w), w))
    ties = UniformQuantizer(8)
    ties.set_scale(torch.tensor(0.5))  # x / s = k + 0.5 exactly: round half to even
    cases.append((ties, torch.arange(-300, 300, dtype=torch.float32) * 0.25))
    asym = UniformQuantizer(8, symmetric=False)
    asym.set_scale(torch.tensor(0.25), torch.tensor(17.0))
    cases.append((asym, torch.arange(-200, 200, dtype=torch.float32) * 0.125))
    return cases


def _check_fused_equals_plain(launch) -> None:
    for q, x in _quantizer_cases():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            got = launch(q, xd)
            assert got is not None, (q, dtype)
            expected = q.plain_fake_quant(xd)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected), (q, dtype, (got.float() - expected.float()).abs().max())


_INTERPRETER_SCRIPT = """
import torch
from regcache.quant import UniformQuantizer, fused

torch.manual_seed(0)
checks = 0
for sym in (True, False):
    for q, x in [
        (UniformQuantizer(8, symmetric=sym), torch.randn(6, 8, 32) * 3),
        (UniformQuantizer(4, symmetric=sym, granularity="channel", axis=1), torch.randn(6, 8, 32)),
        (UniformQuantizer(4, symmetric=sym, granularity="group", group_size=16), torch.randn(16, 64)),
    ]:
        q.calibrate_(x)
        for xin in (x, x.transpose(0, -1)) if q.granularity == "tensor" else (x,):
            out = fused.launch(xin, q.scale, q.zero_point, q.qmin, q.qmax, q.granularity, q.axis, q.group_size)
            assert torch.equal(out, q.plain_fake_quant(xin)), (q, xin.shape)
            checks += 1
ties = UniformQuantizer(8)
ties.set_scale(torch.tensor(0.5))
x = torch.arange(-300, 300, dtype=torch.float32) * 0.25
assert torch.equal(fused.launch(x, ties.scale, ties.zero_point, -128, 127, "tensor"), ties.plain_fake_quant(x))
# bf16 in: power-of-two step, so the result is exact in bf16 (the interpreter truncates on store)
p2 = UniformQuantizer(8, symmetric=False)
p2.set_scale(torch.tensor(2.0**-4), torch.tensor(9.0))
xb = (torch.randn(4, 40) * 3).bfloat16()
assert torch.equal(fused.launch(xb, p2.scale, p2.zero_point, 0, 255, "tensor"), p2.plain_fake_quant(xb))
print("ok", checks)
"""


def test_fused_kernel_logic_under_triton_interpreter():
    """The kernel's indexing, clamping and parameter layout on CPU (Triton's interpreter)."""
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_INTERPRETER_SCRIPT)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_cuda_bit_identical():
    from regcache.quant import fused

    def launch(q, x):
        q = copy.deepcopy(q).cuda()  # the plain formula runs on the CPU original
        return fused.fake_quant_uniform(
            x.cuda(), q.scale, q.zero_point, q.qmin, q.qmax, q.granularity, q.axis, q.group_size
        )

    _check_fused_equals_plain(lambda q, x: None if (out := launch(q, x)) is None else out.cpu())
    # and against the plain formula run on the GPU, on a large random tensor
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 12, 197, 197, generator=g) * 0.05).cuda().bfloat16()
    q = UniformQuantizer(8, symmetric=False).cuda().calibrate_(x)
    assert torch.equal(launch(q, x), q.plain_fake_quant(x))


def test_fused_not_used_where_it_does_not_apply():
    from regcache.quant import fused

    q = UniformQuantizer(8).calibrate_(torch.randn(4, 4))
    x = torch.randn(4, 4)
    assert fused.fake_quant_uniform(x, q.scale, q.zero_point, q.qmin, q.qmax, "tensor") is None  # CPU
    assert fused.launch(x.double(), q.scale, q.zero_point, q.qmin, q.qmax, "tensor") is None
    assert fused.launch(x.requires_grad_(), q.scale, q.zero_point, q.qmin, q.qmax, "tensor") is None
    assert fused.launch(torch.randn(4, 4), q.scale, q.zero_point, q.qmin, q.qmax, "chunk") is None
    from regcache.quant.methods.noisyquant import NoisyUniformQuantizer
    from regcache.quant.twin_uniform import ChunkedUniformQuantizer

    assert UniformQuantizer._fusable and NoisyUniformQuantizer._fusable
    assert not ChunkedUniformQuantizer._fusable


# ---- cached quantized weights -------------------------------------------------------------------


def _qlinear():
    lin = QuantLinear.from_linear(torch.nn.Linear(16, 8))
    lin.weight_quantizer = UniformQuantizer(4, granularity="channel").calibrate_(lin.weight.detach())
    set_quant_mode(lin, "quant")
    return lin


def _fresh(lin):
    return lin.weight_quantizer.plain_fake_quant(lin.weight.detach())


def test_weight_cache_reused_and_invalidated():
    lin = _qlinear()
    x = torch.randn(3, 16)
    with torch.no_grad():
        w1 = quantized_weight(lin, lin.weight_quantizer, lin.weight)
        assert quantized_weight(lin, lin.weight_quantizer, lin.weight) is w1  # reused
        assert torch.equal(w1, _fresh(lin))
        lin.weight.mul_(2)  # in-place edit (RepQ-ViT style folding)
        w2 = quantized_weight(lin, lin.weight_quantizer, lin.weight)
        assert w2 is not w1 and torch.equal(w2, _fresh(lin))
        lin.weight_quantizer.set_scale(lin.weight_quantizer.scale * 3)  # new scale tensor
        w3 = quantized_weight(lin, lin.weight_quantizer, lin.weight)
        assert torch.equal(w3, _fresh(lin)) and not torch.equal(w3, w2)
        lin.weight_quantizer.scale.mul_(0.5)  # in-place scale edit
        assert torch.equal(quantized_weight(lin, lin.weight_quantizer, lin.weight), _fresh(lin))
        sd = copy.deepcopy(lin.state_dict())
        lin.weight_quantizer.calibrate_(lin.weight * 0.1)  # re-calibration
        assert torch.equal(quantized_weight(lin, lin.weight_quantizer, lin.weight), _fresh(lin))
        lin.load_state_dict(sd)  # copy_ into existing buffers / parameters
        assert torch.equal(quantized_weight(lin, lin.weight_quantizer, lin.weight), _fresh(lin))
        lin.weight_quantizer.qmax = 3  # any plain attribute
        assert torch.equal(quantized_weight(lin, lin.weight_quantizer, lin.weight), _fresh(lin))
        lin.weight_quantizer.mode = "float"
        assert quantized_weight(lin, lin.weight_quantizer, lin.weight) is lin.weight
        lin.weight_quantizer.mode = "quant"
        lin.weight = torch.nn.Parameter(torch.randn(8, 16))  # a new parameter
        assert torch.equal(lin(x), torch.nn.functional.linear(x, _fresh(lin), lin.bias))
        lin.double()  # .to(): params / buffers converted
        assert torch.equal(lin(x.double()), torch.nn.functional.linear(x.double(), _fresh(lin), lin.bias))
    # with autograd on, nothing is cached and gradients flow
    y = lin(x.double()).sum()
    y.backward()
    assert lin.weight.grad is not None


def test_weight_cache_quantized_model_unchanged():
    encoder = adapt(make_model("openclip"))
    quantize_(encoder, NaiveConfig(8, 8))
    calibrate_(encoder, [images("openclip", 4, seed=3)], progress=False)
    x = images("openclip", 2)
    with torch.no_grad():
        first = encoder(x)
        assert torch.equal(encoder(x), first)
        calibrate_(encoder, [images("openclip", 4, seed=4)], progress=False)  # new parameters
        second = encoder(x)
    with torch.enable_grad():
        uncached = encoder(x)
    assert torch.equal(second, uncached)
    assert not torch.equal(second, first)


# ---- prefix attention ---------------------------------------------------------------------------


def _old_prefix_attention(attn, q, k, v, prefix):
    """The previous implementation (separate prefix matmuls and concatenated logits / probabilities)."""
    qq = attn.matmul_qk.quantize_a(q)
    logits_tokens = qq @ attn.matmul_qk.quantize_b(k.transpose(-2, -1))
    logits_prefix = qq @ prefix.keys.to(qq.dtype).transpose(-2, -1)
    logits = torch.cat([logits_prefix, logits_tokens], dim=-1) * attn.scale
    npre, lm = prefix.num_entries, prefix.log_multiplicity
    if lm is not None:
        logits = torch.cat([logits[..., :npre] + lm.to(logits.dtype), logits[..., npre:]], dim=-1)
    probs = logits.softmax(dim=-1)
    if lm is not None:
        probs = torch.cat([probs[..., :npre] / lm.exp().to(probs.dtype), probs[..., npre:]], dim=-1)
    probs = attn.matmul_pv.quantize_a(probs)
    p_prefix, p_tokens = probs[..., :npre], probs[..., npre:]
    if lm is not None:
        p_prefix = p_prefix * lm.exp().to(probs.dtype)
    return p_prefix @ prefix.values.to(probs.dtype) + p_tokens @ attn.matmul_pv.quantize_b(v)


def _copies_prefix_attention(attn, q, k, v, keys, values, taus):
    """τ real copies of each entry, quantized like tokens' probabilities (register K/V in full precision)."""
    b = q.shape[0]
    reps = torch.tensor(taus)
    k_all = torch.cat([keys.expand(b, -1, -1, -1).repeat_interleave(reps, dim=2), attn.matmul_qk.quantize_b(k)], 2)
    v_all = torch.cat([values.expand(b, -1, -1, -1).repeat_interleave(reps, dim=2), attn.matmul_pv.quantize_b(v)], 2)
    p = (attn.matmul_qk.quantize_a(q) @ k_all.transpose(-2, -1) * attn.scale).softmax(-1)
    return attn.matmul_pv.quantize_a(p) @ v_all


def _quantized_encoder():
    encoder = adapt(make_model("openclip"))
    quantize_(encoder, NaiveConfig(8, 8))
    calibrate_(encoder, [images("openclip", 4, seed=3)], progress=False)
    return encoder


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("taus", [None, (1, 3), (4, 4)])
def test_prefix_attention_equals_old_formula(quantized, per_sample, taus):
    encoder = _quantized_encoder()
    if not quantized:
        set_quant_mode(encoder, "float")
    attn = encoder.blocks[1].attn
    g = torch.Generator().manual_seed(0)
    b, n = 3, 2
    x = torch.randn(b, 17, encoder.width, generator=g)
    p = b if per_sample else 1
    keys = torch.randn(p, attn.num_heads, n, attn.head_dim, generator=g) * 3
    values = torch.randn(p, attn.num_heads, n, attn.head_dim, generator=g)
    lm = None if taus is None else torch.log(torch.tensor(taus, dtype=torch.float32)).view(1, 1, 1, n)
    if lm is not None and per_sample:
        lm = lm.expand(p, 1, 1, n) + torch.arange(p).view(p, 1, 1, 1) * math.log(2)
    prefix = AttentionPrefix(keys, values, lm)
    with torch.no_grad():
        q, k, v = attn.project_qkv(x)
        new = attn._forward_with_prefix(q, k, v, prefix)
        old = _old_prefix_attention(attn, q, k, v, prefix)
    assert torch.allclose(new, old, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("taus", [(1, 1), (1, 3), (5, 2)])
def test_quantized_prefix_attention_equals_real_copies(taus):
    encoder = _quantized_encoder()
    attn = encoder.blocks[1].attn
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 17, encoder.width, generator=g)
    keys = torch.randn(1, attn.num_heads, 2, attn.head_dim, generator=g) * 2
    values = torch.randn(1, attn.num_heads, 2, attn.head_dim, generator=g)
    lm = torch.log(torch.tensor(taus, dtype=torch.float32)).view(1, 1, 1, 2)
    with torch.no_grad():
        q, k, v = attn.project_qkv(x)
        got = attn._forward_with_prefix(q, k, v, AttentionPrefix(keys, values, lm))
        expected = _copies_prefix_attention(attn, q, k, v, keys, values, taus)
    # identical up to float rounding; a probability on a rounding boundary may move by one level
    step = float(attn.matmul_pv.a_quantizer.scale)
    assert (got - expected).abs().max() <= 2 * step * values.abs().max() + 1e-5
    assert (got - expected).abs().mean() <= 1e-4


def test_tap_probs_still_records_full_prefix_mass():
    encoder = adapt(make_model("openclip"))
    attn = encoder.blocks[1].attn
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, attn.num_heads, 1, attn.head_dim, generator=g)
    attn.prefix = AttentionPrefix(keys, torch.randn_like(keys), torch.full((1, 1, 1, 1), math.log(3.0)))
    seen = {}
    attn.tap_probs.register_forward_hook(lambda m, i, o: seen.update(p=o))
    x = torch.randn(2, 17, encoder.width, generator=g)
    with torch.no_grad():
        attn(x)
        q, k, _ = attn.project_qkv(x)
    logits = torch.cat([q @ keys.transpose(-2, -1) + math.log(3.0) / attn.scale, q @ k.transpose(-2, -1)], -1)
    expected = (logits * attn.scale).softmax(-1)
    assert seen["p"].shape == (2, attn.num_heads, 17, 18)
    assert torch.allclose(seen["p"], expected, atol=1e-6)


# ---- token deletion ------------------------------------------------------------------------------


def _old_deletion(x, k, npre):
    prefix, patches = x[:, :npre], x[:, npre:]
    b, n, c = patches.shape
    dropped = patches.abs().amax(dim=-1).topk(k, dim=1).indices
    position = torch.arange(n).expand(b, n).clone()
    position.scatter_(1, dropped, n)
    kept = position.sort(dim=1).values[:, : n - k]
    return torch.cat([prefix, patches.gather(1, kept.unsqueeze(-1).expand(b, n - k, c))], dim=1)


@pytest.mark.parametrize("npre", [0, 1, 5])
@pytest.mark.parametrize("k", [1, 4, 15])
def test_deletion_equals_sort_based(npre, k):
    g = torch.Generator().manual_seed(k + npre)
    x = torch.randn(4, npre + 16, 8, generator=g)
    x[:, npre + 3] *= 50  # clear winners plus random ones
    got = TokenDeletion(k, npre)(x)
    assert torch.equal(got, _old_deletion(x, k, npre))


# ---- torch.compile -----------------------------------------------------------------------------


def test_quantized_regcache_model_compiles_without_graph_breaks():
    encoder = adapt(make_model("openclip")).eval()
    install_random_prefix(encoder)
    install_deletion(encoder, 1, 2)
    quantize_(encoder, NaiveConfig(8, 8))
    calibrate_(encoder, [images("openclip", 4, seed=3)], progress=False)
    x = images("openclip", 2)
    with torch.no_grad():
        explanation = torch._dynamo.explain(encoder)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
