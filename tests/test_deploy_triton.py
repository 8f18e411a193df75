"""The triton deploy backend against the exact reference backend (CUDA only; CI has no GPU, so these skip there).

Integer parts must be bit-identical (the int32 accumulator, the quantization codes of equal inputs).
Outputs that go through the float32 epilogue may differ from the reference's float64 one by the
epilogue's roundings: a float32 value within a few ulps, so a bf16 rounding or a requantization can
land one step away where the exact value lies that close to a boundary (a small fraction of elements,
one step at most).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton deploy backend needs CUDA")

# pointer loads and tensor descriptors, tiles that do and do not divide the shapes, and the default choice
CONFIGS = [
    None,
    (64, 64, 64, 4, 4, 3, 0),
    (128, 128, 128, 8, 8, 3, 0),
    (64, 64, 64, 4, 4, 3, 1),
    (128, 256, 128, 8, 8, 3, 1),
]


@pytest.fixture(scope="module")
def triton_backend():
    from regcache.deploy.kernels import get_backend

    return get_backend("triton", "cuda")


@pytest.fixture(scope="module")
def ref():
    from regcache.deploy.kernels import get_backend

    return get_backend("reference", "cuda")


def _codes(shape, seed, lo=-128, hi=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g, device="cuda", dtype=torch.int16).to(torch.int8)


def _rand(shape, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, generator=g, device="cuda") * scale


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |v| (2^(e - 7) for |v| in [2^e, 2^(e+1)))."""
    e = torch.floor(torch.log2(v.float().abs().clamp_min(2.0**-126)))
    return torch.exp2(e - 7)


def _assert_one_step(got: torch.Tensor, expected: torch.Tensor, step: torch.Tensor | float, max_fraction: float):
    """Equal, except a fraction <= max_fraction of elements at most one step away."""
    diff = (got.float() - expected.float()).abs()
    differ = diff > 0
    frac = differ.float().mean().item()
    assert frac <= max_fraction, f"{frac:.2e} of the elements differ"
    if differ.any():
        s = step if isinstance(step, float) else step[differ]
        assert torch.all(diff[differ] <= s * 1.0001), diff.max()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize(("m", "n", "k"), [(333, 200, 768), (50, 96, 208), (1030, 320, 3072)])
@pytest.mark.parametrize("with_zero", [False, True])
def test_accumulator_bit_exact(triton_backend, ref, config, m, n, k, with_zero):
    """alpha = 1, beta = 0: the output is acc - b_zero * rowsum(a), integers below 2^24 that float32 holds exactly."""
    hi = 128 if k <= 768 else 40  # |acc| < 2^24 for float32 to hold it: 3072 * 40 * 40 < 2^24
    a, b = _codes((m, k), 0, -hi, hi), _codes((n, k), 1, -hi, hi)
    alpha, beta = torch.ones(n, device="cuda"), torch.zeros(n, device="cuda")
    bz = _codes((n,), 2, -3, 4).float() if with_zero else None
    got = triton_backend.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.float32, config=config)
    expected = ref.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.float32)
    exact = a.double() @ b.double().T  # the hand-computed accumulator
    if bz is not None:
        exact = exact - bz.double() * a.double().sum(1, keepdim=True)
    assert torch.equal(expected.double(), exact)
    assert torch.equal(got.double(), exact)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("with_zero", [False, True])
def test_epilogue_float32_and_bf16(triton_backend, ref, config, with_zero):
    """alpha, beta, b_zero in float32 against the float64 reference: a few float32 ulps; bf16 one ulp, rarely."""
    m, n, k = 700, 384, 768
    a, b = _codes((m, k), 3), _codes((n, k), 4)
    alpha = (torch.rand(n, device="cuda") + 0.5) * 1e-4
    beta = _rand((n,), 5)
    bz = _codes((n,), 6, -3, 4).float() if with_zero else None
    got = triton_backend.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.float32, config=config)
    expected = ref.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.float64)
    acc = a.double() @ b.double().T - (0 if bz is None else bz.double() * a.double().sum(1, keepdim=True))
    # one rounding of alpha * acc and one of the sum (acc itself is exact in float32 below 2^24)
    bound = 2 * 2.0**-24 * ((alpha.double() * acc).abs() + expected.abs())
    assert torch.all((got.double() - expected).abs() <= bound)
    got16 = triton_backend.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.bfloat16, config=config)
    exp16 = ref.int8_linear(a, b, alpha, beta, bz, out_dtype=torch.bfloat16)
    assert got16.dtype == torch.bfloat16 and got16.shape == (m, n)
    _assert_one_step(got16, exp16, _ulp_bf16(exp16), 1e-3)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_activation_and_requantization(triton_backend, ref, activation, out_dtype):
    """The activation on out_dtype, then the next linear's static quantizer: codes one step away, rarely."""
    from regcache.deploy.kernels import int8_range

    m, n, k = 600, 512, 768
    a, b = _codes((m, k), 7), _codes((n, k), 8)
    alpha = (torch.rand(n, device="cuda") + 0.5) * 2e-4
    beta = _rand((n,), 9)
    zp, qmin, qmax = int8_range(21, 0, 255)  # an asymmetric 8-bit quantizer, stored shifted
    out_quant = (0.0125, zp, qmin, qmax)
    got = triton_backend.int8_linear(a, b, alpha, beta, activation=activation, out_quant=out_quant, out_dtype=out_dtype)
    expected = ref.int8_linear(a, b, alpha, beta, activation=activation, out_quant=out_quant, out_dtype=out_dtype)
    assert got.dtype == torch.int8 and got.shape == (m, n)
    assert expected.float().std() > 10  # the codes spread over the range (the test sees real rounding)
    _assert_one_step(got, expected, 1.0, 1e-3)
    got_y = triton_backend.int8_linear(a, b, alpha, beta, activation=activation, out_dtype=out_dtype)
    exp_y = ref.int8_linear(a, b, alpha, beta, activation=activation, out_dtype=out_dtype)
    if out_dtype == torch.bfloat16:
        # one bf16 rounding, plus the negative tail, where 1 + erf(x) (1 + tanh) cancels: a few float32 ulps of
        # erf near -1 (2^-24 each) times |x| / 2 are many bf16 ulps of the tiny result
        pre = ref.int8_linear(a, b, alpha, beta, out_dtype=out_dtype).float()
        _assert_one_step(got_y, exp_y, _ulp_bf16(exp_y) + 2.0**-22 * pre.abs(), 1e-2)
    else:
        torch.testing.assert_close(got_y, exp_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_activation_pass_on_every_16bit_input(triton_backend, ref, dtype):
    """The GELU + requantization pass on all 65,536 inputs: the table lookup equals the arithmetic, and both
    equal torch's activation then the fake quantizer's codes, bit for bit."""
    from regcache.deploy import _triton_int8 as ti
    from regcache.deploy.kernels import ACTIVATIONS

    y = torch.arange(65536, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype)
    y = y[torch.isfinite(y.float())]
    saved = ti.ACT_PASS
    try:
        for activation in ("gelu", "quick_gelu"):
            for out_quant in [(0.0217391, -120, -128, 127), (0.0125, -107, -128, 127), (2.0**-5, 0, -8, 7)]:
                ti.ACT_PASS = (1024, 4, "compute")
                got = ti._activation_pass(y, activation, out_quant, dtype)
                ti.ACT_PASS = (1024, 4, "lut")
                assert torch.equal(ti._activation_pass(y, activation, out_quant, dtype), got)
                expected = ref.quantize_static(ACTIVATIONS[activation](y), *out_quant)
                assert torch.equal(got, expected), (activation, out_quant, int((got != expected).sum()))
    finally:
        ti.ACT_PASS = saved


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_two_pass_epilogue_equals_fused(triton_backend, activation):
    """Config kind 5 (GEMM stores y in bf16, then activation + requantization) gives the fused epilogue's codes."""
    a, b = _codes((500, 768), 20), _codes((384, 768), 21)
    alpha = (torch.rand(384, device="cuda") + 0.5) * 2e-4
    beta = _rand((384,), 22)
    kw = {"activation": activation, "out_quant": (0.0125, -107, -128, 127), "out_dtype": torch.bfloat16}
    fused = triton_backend.int8_linear(a, b, alpha, beta, config=(128, 128, 128, 8, 8, 3, 1), **kw)
    two_pass = triton_backend.int8_linear(a, b, alpha, beta, config=(128, 128, 128, 8, 8, 3, 5), **kw)
    assert torch.equal(fused, two_pass)


def test_residual_and_leading_dims(triton_backend, ref):
    """residual + y (y rounded to bf16 first, as a bf16 model adds the two) over a (B, N, K) input."""
    a, b = _codes((4, 197, 768), 10), _codes((768, 768), 11)
    alpha = (torch.rand(768, device="cuda") + 0.5) * 1e-4
    beta = _rand((768,), 12)
    res = _rand((4, 197, 768), 13, 4.0).bfloat16()
    got = triton_backend.int8_linear(a, b, alpha, beta, out_dtype=torch.bfloat16, residual=res)
    y = ref.int8_linear(a.reshape(-1, 768), b, alpha, beta, out_dtype=torch.bfloat16).reshape(4, 197, 768)
    expected = y + res
    assert got.shape == (4, 197, 768)
    _assert_one_step(got, expected, 2 * _ulp_bf16(expected), 2e-3)


@pytest.mark.parametrize("config", [None, (128, 128, 128, 8, 8, 3, 0), (128, 128, 128, 8, 8, 3, 3)])
def test_out_rows_of_a_larger_buffer(triton_backend, config):
    """out=[B, M / B, N] inside a buffer with P foreign rows per batch: the same values, the other rows kept."""
    a, b = _codes((4 * 197, 768), 23), _codes((2304, 768), 24)
    alpha = (torch.rand(2304, device="cuda") + 0.5) * 1e-4
    beta = _rand((2304,), 25)
    y = triton_backend.int8_linear(a, b, alpha, beta, out_dtype=torch.bfloat16, config=config)
    buf = torch.full((4, 201, 2304), 3.0, device="cuda", dtype=torch.bfloat16)
    triton_backend.int8_linear(a, b, alpha, beta, out_dtype=torch.bfloat16, config=config, out=buf[:, 4:])
    assert torch.equal(buf[:, 4:].reshape(-1, 2304), y)
    assert bool((buf[:, :4] == 3).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("kernel", "rows"), [("block", 1), ("block", 8), ("warp", 1), ("warp", 4)])
def test_layernorm_quantize(triton_backend, ref, dtype, affine, kernel, rows):
    """Codes of the layer norm in x's dtype: one step away where the statistics' rounding moves the value."""
    from regcache.deploy.kernels import int8_range

    c = 768
    x = (_rand((1001, c), 14, 2.0) + _rand((1001, 1), 15, 3.0)).to(dtype)  # 1001: a partial last program
    x[0, 3] = 300.0  # a massive activation in one channel, as in ViT residual streams
    w = (_rand((c,), 16) * 0.5 + 1).to(dtype) if affine else None
    bias = (_rand((c,), 17) * 0.2).to(dtype) if affine else None
    zp, qmin, qmax = int8_range(131, 0, 255)
    got = triton_backend.layernorm_quantize(
        x, w, bias, 1e-5, 0.0234, zp, qmin, qmax, rows_per_program=rows, kernel=kernel
    )
    expected = ref.layernorm_quantize(x, w, bias, 1e-5, 0.0234, zp, qmin, qmax)
    assert got.dtype == torch.int8 and got.shape == x.shape
    _assert_one_step(got, expected, 1.0, 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_static_bit_exact(triton_backend, ref, dtype):
    """Equal codes, ties at .5 rounding half to even, for number and device-tensor parameters, strided input."""
    ties = (torch.arange(-600, 600, device="cuda", dtype=torch.float32) + 0.5) * 0.25
    x = torch.cat([ties, _rand((50_001,), 18, 3.0)]).to(dtype)
    for scale, zp, qmin, qmax in [(0.25, 0, -128, 127), (0.0317, -107, -128, 127), (0.5, 3, -8, 7)]:
        expected = ref.quantize_static(x, scale, zp, qmin, qmax)
        assert torch.equal(triton_backend.quantize_static(x, scale, zp, qmin, qmax), expected)
        st = torch.tensor(scale, device="cuda")
        zt = torch.tensor(float(zp), device="cuda")
        assert torch.equal(triton_backend.quantize_static(x, st, zt, qmin, qmax), expected)
    x2 = _rand((64, 96), 19).to(dtype).t()  # not contiguous
    assert torch.equal(
        triton_backend.quantize_static(x2, 0.02, 5, -128, 127), ref.quantize_static(x2, 0.02, 5, -128, 127)
    )


def test_backend_registered(triton_backend):
    """auto picks triton on CUDA; it declares the activations it fuses."""
    from regcache.deploy.kernels import get_backend

    assert get_backend("auto", "cuda") is triton_backend
    assert set(triton_backend.activations) == {"gelu", "gelu_tanh", "quick_gelu"}
    with pytest.raises(TypeError, match="int8"):
        triton_backend.int8_linear(torch.ones(2, 2, device="cuda"), torch.ones(2, 2, device="cuda"), None, None)


def test_cuda_graph_runner_replays_the_eager_result(triton_backend):
    """A graph of quantize_static + int8_linear equals the eager calls, on new inputs of the captured shape."""
    from regcache.deploy.graphs import CudaGraphRunner

    b = _codes((384, 768), 26)
    alpha = (torch.rand(384, device="cuda") + 0.5) * 1e-4
    beta = _rand((384,), 27)

    def fn(x):
        codes = triton_backend.quantize_static(x, 0.0217391, -3, -128, 127)
        return triton_backend.int8_linear(codes, b, alpha, beta, out_dtype=torch.bfloat16)

    runner = CudaGraphRunner(torch.nn.Module(), fn)
    for seed in (28, 29):
        x = _rand((1200, 768), seed).bfloat16()
        assert torch.equal(runner(x), fn(x))
