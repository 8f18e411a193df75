"""The deployed (integer) encoder against the fake-quant simulation it replaces, on CPU (reference backend).

Two comparisons, each with its own tolerance:

- exact: the model in float64 and the simulation's dequantization ``(q - z) Δ`` evaluated in float64
  (:func:`exact_dequantization`; the quantizer's codes are its own, computed as always: float32
  division, round half to even). The simulated function is then computed to ~1e-16, and the integer path
  computes it exactly, so the embeddings agree to float64 rounding of the float parts
  (``||Δe|| / ||e|| <= 1e-11``: LayerNorm, softmax, residuals, ~1e-15 per op through six blocks; a wrong
  zero point, shift or rounding moves the codes by whole steps, >= 1e-4 relative);
- float32: the simulation as it runs. Its dequantized operands are rounded to float32 and its GEMMs
  accumulate in float32, so one linear differs from the exact integer result by at most the float32
  dot-product bound ``|Δy| <= K 2^-23 Σ_k |x̂_k ŵ_k| + 2^-23 |y|`` (tested per linear on equal inputs).
  Through the network such differences move an activation across a rounding boundary now and then
  (one code, one step), which the testbed's planted mechanism can amplify, so end to end the float32
  paths agree to float32 rounding on most images (the median image within 2e-6), not on all.

Token deletion compares l-inf norms: where two tokens tie to ~1e-15 (the testbed's sinks do) either
choice is right and the two paths may pick differently; those images are checked to be such ties.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import images, make_model
from torch import nn
from torch.nn import functional as F

from regcache.deploy import DeployConfig, DeployError, Int8Attention, Int8Block, Int8Linear, deploy_, simulate_
from regcache.deploy import kernels as K
from regcache.encoders import adapt
from regcache.quant import METHODS, QuantLinear, calibrate_, quantize_
from regcache.quant.quantizers import UniformQuantizer
from regcache.registers import curate_candidates, derive_cache, install_deletion, install_prefix
from regcache.testbed import CIFAR10_SAMPLE, load_testbed

pytestmark = pytest.mark.usefixtures("single_thread")
EXACT_TOL = 1e-11
# NoisyQuant's searches at a few candidates: the noise it finds is what matters here, not how good it is
FAST = {
    "noisyquant": {"clip_candidates": 50, "mean_candidates": 20, "amplitude_candidates": 50, "search_tokens": 256},
    "qdrop": {"iterations": 20, "batch_size": 4, "init_images": 8, "amp": False},
}


@contextlib.contextmanager
def exact_dequantization():
    """The fake quantizers' ``(q - z) Δ`` in float64, not float32 (same codes): the simulation without its rounding."""
    original = UniformQuantizer.plain_fake_quant

    def exact(self, x):
        assert self.granularity != "group"
        shape, dtype = x.shape, x.dtype
        xf = x.float()
        scale, zp = self._broadcast(self.scale, xf), self._broadcast(self.zero_point, xf)
        q = torch.clamp(torch.round(xf / scale) + zp, self.qmin, self.qmax)
        return ((q.double() - zp.double()) * scale.double()).reshape(shape).to(dtype)

    UniformQuantizer.plain_fake_quant = exact
    try:
        yield
    finally:
        UniformQuantizer.plain_fake_quant = original


# ---- the kernels ---------------------------------------------------------------------------------


def test_quantize_static_is_the_fake_quantizers_rounding_ties_included():
    g = torch.Generator().manual_seed(0)
    q = UniformQuantizer(8, symmetric=False).calibrate_(torch.randn(4096, generator=g) * 3)
    x = torch.cat([torch.randn(4096, generator=g) * 4, torch.tensor([1e9, -1e9])])
    codes = K.quantize_static(x, float(q.scale), *K.int8_range(int(q.zero_point), q.qmin, q.qmax))
    assert codes.dtype == torch.int8  # [0, 255] stored as int8 - 128
    assert torch.equal(codes.long() + 128, q.quantize_int(x))
    q.set_scale(torch.tensor(2.0**-4), torch.tensor(128.0))  # a power-of-two step: (k + 1/2) steps are exact ties
    ties = (torch.arange(-40, 40).float() + 0.5) * 2**-4
    codes = K.quantize_static(ties, 2.0**-4, *K.int8_range(128, q.qmin, q.qmax))
    assert torch.equal(codes.long() + 128, q.quantize_int(ties))
    half_even = torch.round(torch.arange(-40, 40) + 0.5).long()  # 0.5 -> 0, 1.5 -> 2
    assert torch.equal(codes.long(), half_even)
    assert torch.equal(torch.round(torch.tensor([0.5, 1.5, 2.5, -0.5])), torch.tensor([0.0, 2.0, 2.0, -0.0]))
    sym = UniformQuantizer(6, symmetric=True).calibrate_(x[:4096])
    assert K.int8_range(0, sym.qmin, sym.qmax) == (0, -32, 31)  # a signed range is not shifted
    assert torch.equal(K.quantize_static(x, float(sym.scale), 0, -32, 31).long(), sym.quantize_int(x))


def test_int8_linear_and_matmul_against_int64_arithmetic():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (7, 300), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (5, 300), generator=g, dtype=torch.int8)
    za, zb = -3, torch.tensor([0.0, 5.0, -128.0, 127.0, 1.0])
    sa, sb, bias = 0.02, torch.rand(5, generator=g) + 0.1, torch.randn(5, generator=g)
    exact = (a.long().unsqueeze(1) - za) * (b.long().unsqueeze(0) - zb.long().view(1, 5, 1))  # int64
    expected = sa * sb.double() * exact.sum(-1).double() + bias.double()
    alpha, beta = K.fold_epilogue(b, sa, za, sb, zb, bias)
    y = K.int8_linear(a, b, alpha, beta, zb, out_dtype=torch.float64)
    assert (y - expected).abs().max() <= 1e-12 * expected.abs().max()
    y32 = K.int8_linear(a, b, alpha, beta, zb)
    assert y32.dtype == torch.float32 and torch.equal(y32, y.float())
    gelu_q = K.int8_linear(a, b, alpha, beta, zb, activation="gelu", out_quant=(0.05, -100, -128, 127))
    assert torch.equal(gelu_q, K.quantize_static(F.gelu(y.float()), 0.05, -100, -128, 127))
    # the block's skip connection: y rounded to the model's dtype, then one rounded add (as x + linear(x))
    r = (torch.randn(7, 5, generator=g) * 30).bfloat16()
    y_res = K.int8_linear(a, b, alpha, beta, zb, out_dtype=torch.bfloat16, residual=r)
    assert torch.equal(y_res, (expected.bfloat16().float() + r.float()).bfloat16())
    assert not torch.equal(y_res, expected.bfloat16())
    # out=: rows of a larger buffer ([B, M / B, N] with a gap per batch, as the keys after a register prefix)
    buf = torch.full((7, 3, 5), -1.0, dtype=torch.float64)
    assert K.int8_linear(a, b, alpha, beta, zb, out_dtype=torch.float64, out=buf[:, 2:]) is not None
    assert torch.equal(buf[:, 2], y) and bool((buf[:, :2] == -1).all())
    # batched operands with per-tensor zero points (attention)
    p = torch.randint(-128, 128, (2, 3, 6, 40), generator=g, dtype=torch.int8)
    v = torch.randint(-128, 128, (2, 3, 9, 40), generator=g, dtype=torch.int8)
    m = K.int8_matmul(p, v, 0.5, 7, -2, out_dtype=torch.float64)
    ref = 0.5 * ((p.long() - 7).unsqueeze(-2) * (v.long() + 2).unsqueeze(-3)).sum(-1).double()
    assert torch.equal(m, ref)


def test_layernorm_quantize_and_backends():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(4, 10, 32, generator=g), torch.rand(32, generator=g), torch.randn(32, generator=g)
    q = UniformQuantizer(8, symmetric=False).calibrate_(F.layer_norm(x, (32,), w, b, 1e-5))
    args = (float(q.scale), *K.int8_range(int(q.zero_point), q.qmin, q.qmax))
    codes = K.layernorm_quantize(x, w, b, 1e-5, *args)
    assert torch.equal(codes.long() + 128, q.quantize_int(F.layer_norm(x, (32,), w, b, 1e-5)))
    assert K.get_backend("auto", "cpu").name == "reference"
    with pytest.raises(ValueError, match="unknown deploy backend"):
        K.get_backend("fast")
    with pytest.raises(K.BackendUnavailableError, match="reference"):
        K.get_backend("triton", "cpu")


# ---- deploy on tiny random models ---------------------------------------------------------------


def _calibrated(family: str, method: str = "naive", bits: int = 8, prefix: bool = False):
    encoder = adapt(make_model(family))
    if prefix:
        from conftest import install_random_prefix

        install_random_prefix(encoder)
    quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits, **FAST.get(method, {})))
    calibrate_(encoder, [images(family, n=8, seed=100 + i) for i in range(2)], progress=False)
    return encoder


def _pair(encoder, config: DeployConfig, dtype=torch.float32):
    encoder = encoder.to(dtype)
    sim = simulate_(copy.deepcopy(encoder), config)
    dep = copy.deepcopy(encoder)
    report = deploy_(dep, config)
    return sim, dep, report


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / a.norm(dim=-1)


@pytest.mark.parametrize(
    ("family", "method", "attention", "prefix"),
    [
        ("clip", "naive", "float", False),
        ("clip", "naive", "int8", True),
        ("openclip", "repq_vit", "float", True),
        ("dinov2", "naive", "int8", False),
        ("siglip", "noisyquant", "float", False),
        ("clip", "qdrop", "int8", True),  # block reconstruction: rounding baked into the weights, LSQ steps
    ],
)
def test_tiny_models_equal_the_simulation_exactly(family, method, attention, prefix):
    encoder = _calibrated(family, method, prefix=prefix)
    sim, dep, report = _pair(encoder, DeployConfig(attention, "reference"), torch.float64)
    assert report.linears and all(isinstance(dep.get_submodule(n), Int8Linear) for n in report.linears)
    assert all(isinstance(b.attn, Int8Attention) == (attention == "int8") for b in dep.blocks)
    assert not any(isinstance(m, QuantLinear) for m in dep.modules())  # no float weight left behind
    assert all(dep.get_submodule(n).weight_codes.dtype == torch.int8 for n in report.linears)
    # the skip adds run in proj / fc2's epilogues wherever no layer scale sits between (dinov2 has one)
    assert all(isinstance(b, Int8Block) == isinstance(b.ls1, nn.Identity) for b in dep.blocks)
    assert len(report.fused_residuals) == (0 if family == "dinov2" else len(dep.blocks))
    if prefix and attention == "float":  # qkv writes next to the register K / V (no concatenation)
        assert any(b._writes_prefix_kv() for b in dep.blocks if isinstance(b, Int8Block))
    x = images(family, n=6, seed=7).double()
    with torch.no_grad(), exact_dequantization():
        a, b = sim(x), dep(x)
    assert float(_rel(a, b).max()) <= EXACT_TOL


def test_each_linear_within_the_float32_dot_product_bound():
    encoder = _calibrated("clip")
    sim, dep, _ = _pair(encoder, DeployConfig("float", "reference"))
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(3)) * 2
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.2.attn.proj"):
        lin, int8 = sim.get_submodule(name), dep.get_submodule(name)
        assert isinstance(lin, QuantLinear) and isinstance(int8, Int8Linear)
        with torch.no_grad():
            y_sim, y_int = lin(x if "fc2" not in name else x.repeat(1, 1, 4)), None
            xin = x if "fc2" not in name else x.repeat(1, 1, 4)
            y_int = int8(xin)
            xh, wh = lin.input_quantizer(xin), lin.weight_quantizer(lin.weight)
        k = xin.shape[-1]
        bound = k * 2**-23 * (xh.abs() @ wh.abs().T) + 2**-23 * y_int.abs()
        assert bool(((y_sim - y_int).abs() <= bound + 1e-30).all()), name
        assert float((y_sim - y_int).abs().max()) > 0  # the paths do differ: exact against float32 sums


def test_float32_paths_agree_to_rounding_on_most_inputs():
    sim, dep, _ = _pair(_calibrated("clip", prefix=True), DeployConfig("int8", "reference"))
    x = images("clip", n=16, seed=9)
    with torch.no_grad():
        r = _rel(sim(x), dep(x))
    assert float(r.median()) <= 2e-6


# ---- errors -------------------------------------------------------------------------------------


def test_unsupported_methods_and_states_raise_naming_the_fix():
    enc = adapt(make_model("clip"))
    with pytest.raises(DeployError, match="quantize_"):
        deploy_(enc)
    quantize_(enc, METHODS["naive"](w_bits=8, a_bits=8))
    with pytest.raises(DeployError, match="calibrate"):
        deploy_(enc, DeployConfig(backend="reference"))
    twin = adapt(make_model("clip"))  # PTQ4ViT refuses by the form of its quantizers (no slow calibration needed)
    quantize_(twin, METHODS["ptq4vit"](w_bits=8, a_bits=8))
    with pytest.raises(DeployError, match=r"blocks\.0\.\S+ is a \w+ quantizer .*not plain uniform.*naive, repq_vit"):
        deploy_(twin, DeployConfig(backend="reference"))
    repq = _calibrated("clip", "repq_vit")
    with pytest.raises(DeployError, match=r"blocks\.0\.attn\.matmul_pv\.a \(P\) is a log_sqrt2"):
        deploy_(repq, DeployConfig(attention="int8", backend="reference"))
    no_mm = adapt(make_model("clip"))
    quantize_(no_mm, METHODS["naive"](w_bits=8, a_bits=8, quantize_matmuls=False))
    calibrate_(no_mm, [images("clip", n=8, seed=100)], progress=False)
    with pytest.raises(DeployError, match="attention='float'"):
        deploy_(no_mm, DeployConfig(attention="int8", backend="reference"))
    deploy_(no_mm, DeployConfig(backend="reference"))
    with pytest.raises(DeployError, match="already deployed"):
        deploy_(no_mm)
    half = _calibrated("clip")
    half.blocks[0].attn.qkv.input_quantizer.set_mode("float")
    with pytest.raises(DeployError, match=r"blocks\.0\.attn\.qkv has some quantizers on and some off"):
        deploy_(half, DeployConfig(backend="reference"))
    wide = _calibrated("clip")
    wide.blocks[2].mlp.fc1.weight_quantizer = UniformQuantizer(10, granularity="channel").calibrate_(
        wide.blocks[2].mlp.fc1.weight
    )
    with pytest.raises(DeployError, match=r"blocks\.2\.mlp\.fc1\.weight quantizes to 10 bits.*bits <= 8"):
        deploy_(wide, DeployConfig(backend="reference"))
    with pytest.raises(ValueError, match="attention must be one of"):
        DeployConfig(attention="bf16")
    with pytest.raises(K.BackendUnavailableError):
        deploy_(_calibrated("clip"), DeployConfig(backend="triton"))


# ---- the testbed: demo data, RegCache prefix and deletion, zero-shot --------------------------------


@pytest.fixture(scope="module")
def testbed():
    from regcache.demo import load_images, load_texts
    from regcache.eval import build_zeroshot_classifier

    loaded = load_testbed()
    encoder = adapt(loaded.model).eval()
    x, y = load_images(CIFAR10_SAMPLE, "test", loaded.preprocess)
    calib, _ = load_images(CIFAR10_SAMPLE, "train", loaded.preprocess, 64)
    classnames, templates = load_texts(CIFAR10_SAMPLE)
    with torch.no_grad():
        classifier = build_zeroshot_classifier(loaded.model, loaded.tokenizer, classnames, templates, progress=False)
    cache = derive_cache(encoder, curate_candidates(encoder, [calib[:32]], layers=2, k=8, progress=False), l_start=2)
    return encoder, x[:200], y[:200], calib, classifier, cache


def _testbed_pair(testbed, method, bits, attention, regcache, dtype):
    encoder, _, _, calib, _, cache = testbed
    enc = copy.deepcopy(encoder)
    if regcache:
        install_prefix(enc, cache, 4)
        install_deletion(enc, 2, 2)
    quantize_(enc, METHODS[method](w_bits=bits, a_bits=bits))
    calibrate_(enc, [calib], progress=False)
    return _pair(enc, DeployConfig(attention, "reference"), dtype)


def _top1(emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    return (F.normalize(emb, dim=-1) @ classifier.to(emb.dtype)).argmax(-1)


@pytest.mark.parametrize(
    ("method", "bits", "attention", "regcache"),
    [
        ("naive", 6, "float", False),  # the demo's naive W6A6 row
        ("naive", 6, "float", True),  # its + RegCache row (a prefix at l >= 2 and k̃ = 2 deleted at l_q = 2)
        ("naive", 8, "int8", True),
        ("repq_vit", 6, "float", True),  # the demo's stronger base method with RegCache
        ("repq_vit", 8, "float", False),
    ],
)
def test_testbed_equals_the_simulation_and_its_zero_shot(testbed, method, bits, attention, regcache):
    _, x, y, _, classifier, _ = testbed
    sim, dep, _ = _testbed_pair(testbed, method, bits, attention, regcache, torch.float64)
    x = x.double()
    with torch.no_grad(), exact_dequantization():
        a = sim(x)
        kept_sim = [b.input_filter.last_kept for b in sim.blocks if b.input_filter is not None]
        pre = {}
        hook = sim.blocks[2].register_forward_pre_hook(lambda m, args: pre.__setitem__("x", args[0]))
        sim(x)
        hook.remove()
        b = dep(x)
        kept_dep = [b_.input_filter.last_kept for b_ in dep.blocks if b_.input_filter is not None]
    same = torch.ones(len(x), dtype=torch.bool)
    for ks, kd in zip(kept_sim, kept_dep, strict=True):
        same &= (ks == kd).all(-1)
    if not same.all():  # a different deletion is a tie in l-inf norm between the k-th and (k+1)-th token
        norms = pre["x"][~same, 1:].abs().amax(-1).sort(dim=1, descending=True).values
        gap = (norms[:, 1] - norms[:, 2]) / norms[:, 1]
        assert float(gap.max()) <= 1e-12
    assert int(same.sum()) >= len(x) // 2
    assert float(_rel(a[same], b[same]).max()) <= EXACT_TOL
    assert torch.equal(_top1(a[same], classifier), _top1(b[same], classifier))
    accuracy = float((_top1(a[same], classifier) == y[same]).float().mean())
    assert 0.05 < accuracy < 0.95  # a real classifier, not a degenerate one


def test_testbed_float32_deployed_zero_shot(testbed):
    _, x, y, _, classifier, _ = testbed
    sim, dep, report = _testbed_pair(testbed, "naive", 6, "float", True, torch.float32)
    assert report.fused_norms and report.fused_activations
    with torch.no_grad():
        a, b = sim(x), dep(x)
    assert float(_rel(a, b).median()) <= 2e-6
    pa, pb = _top1(a, classifier), _top1(b, classifier)
    assert int((pa != pb).sum()) <= 2, "a float32 code flip changes at most a near-tied prediction or two"
    assert abs(float((pa == y).float().mean()) - float((pb == y).float().mean())) <= 2 / len(y)


def test_mixed_precision_plan_keeps_its_float_block_float_in_both_attention_modes():
    encoder = adapt(make_model("clip"))
    quantize_(encoder, METHODS["mixed"](w_bits=8, a_bits=8, blocks=(1,)))  # block 1 stays float
    calibrate_(encoder, [images("clip", n=8, seed=100)], progress=False)
    for attention in ("float", "int8"):
        sim, dep, report = _pair(copy.deepcopy(encoder), DeployConfig(attention, "reference"), torch.float64)
        assert report.left_float == [f"blocks.1.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
        assert not isinstance(dep.blocks[1].attn, Int8Attention)
        assert isinstance(dep.blocks[0].attn, Int8Attention) == (attention == "int8")
        x = images("clip", n=4, seed=3).double()
        with torch.no_grad(), exact_dequantization():
            assert float(_rel(sim(x), dep(x)).max()) <= EXACT_TOL


def test_cuda_graph_runner_keys_on_regcache_state_and_refuses_cpu():
    from regcache.deploy.graphs import CudaGraphRunner

    encoder = _calibrated("clip")
    deploy_(encoder, DeployConfig("float", "reference"))
    runner = CudaGraphRunner(encoder)
    with pytest.raises(ValueError, match="CUDA input"):
        runner(images("clip", n=1, seed=1))
    before = runner._state()
    install_deletion(encoder, 1, 2)
    assert runner._state() != before  # a new deletion (or prefix) is a new graph
