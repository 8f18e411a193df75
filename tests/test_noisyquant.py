"""NoisyQuant: searches against brute force, noise cancellation, seeding, end to end on every family."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    FAMILIES,
    calib_batches,
    images,
    install_random_prefix,
    make_model,
    quantized_cosine,
    rel_err,
    reloaded,
)
from torch.nn import functional as F

from regcache.encoders import adapt
from regcache.quant import (
    METHODS,
    NaiveConfig,
    calibrate_,
    config_from_dict,
    quant_mode,
    quantize_,
)
from regcache.quant.methods.noisyquant import (
    NoisyQuantConfig,
    NoisyQuantLinear,
    TokenSample,
    search_clip_scale,
    search_noise,
    symmetric_fake_quant,
)

# the reference grids are 1000 / 400 / 2000 candidates; smaller ones keep CPU tests fast
FAST = {"clip_candidates": 60, "mean_candidates": 20, "amplitude_candidates": 40, "search_tokens": 256}


pytestmark = pytest.mark.usefixtures("single_thread")


def calibrated(family: str, bits: int = 6, prefix: bool = False, **kwargs):
    encoder = adapt(make_model(family))
    if prefix:
        install_random_prefix(encoder)
    manifest = quantize_(encoder, NoisyQuantConfig(w_bits=bits, a_bits=bits, **{**FAST, **kwargs}))
    calibrate_(encoder, calib_batches(family), progress=False)
    return encoder, manifest


# ---- the searches against plain loops written like the reference --------------------------------


def output_loss(x, xq, w):
    return ((F.linear(xq, w) - F.linear(x, w)) ** 2).mean().item()


@pytest.mark.parametrize("c_out", [6, 12], ids=["direct", "gram"])
def test_clip_search_matches_brute_force(c_out):
    g = torch.Generator().manual_seed(c_out)
    x = torch.randn(40, 8, generator=g) * torch.exp(torch.randn(8, generator=g))
    w = torch.randn(c_out, 8, generator=g)
    bits, k = 4, 30
    absmax = x.abs().max()
    n = 2 ** (bits - 1) - 1
    losses = {}
    for i in range(k, 0, -1):
        clip = absmax / k * i
        scale = clip / n
        losses[scale.item()] = output_loss(x, symmetric_fake_quant(x.clamp(-clip, clip), scale, bits), w)
    got = search_clip_scale(x, w, bits, absmax, candidates=k).item()
    nearest = min(losses, key=lambda s: abs(s - got))
    assert got == pytest.approx(nearest, rel=1e-6)  # one of the candidates
    assert losses[nearest] <= min(losses.values()) * (1 + 1e-5)


@pytest.mark.parametrize("c_out", [6, 12], ids=["direct", "gram"])
def test_noise_search_matches_brute_force(c_out):
    g = torch.Generator().manual_seed(c_out)
    x = torch.randn(40, 8, generator=g) * 3
    w = torch.randn(c_out, 8, generator=g)
    bits, scale = 4, torch.tensor(0.5)
    base = (torch.rand(8, generator=g) * 2 - 1) * scale

    def loss(noise):
        return output_loss(x, symmetric_fake_quant(x + noise, scale, bits) - noise, w)

    means = [scale * i / 10 for i in range(-10, 10)]
    best_mean = min(means, key=loss)  # first minimum, like the reference's strict "<"
    amplitudes = [best_mean + base * i / 15 for i in range(30)]
    best = min(loss(n) for n in amplitudes)
    got = search_noise(x, w, bits, scale, base, mean_candidates=20, amplitude_candidates=30)
    assert loss(got) <= best * (1 + 1e-5)
    assert any(torch.allclose(got, n) for n in amplitudes)  # it is one of the candidates
    mean_only = search_noise(x, w, bits, scale, base, 20, 30, search_amplitude=False)
    assert torch.allclose(mean_only, best_mean.expand(8))


def test_token_sample_keeps_a_subset_and_the_full_absmax():
    chunks = [torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    everything = torch.cat([c.reshape(-1, 4) for c in chunks])
    full, sampled = TokenSample(None, torch.Generator()), TokenSample(16, torch.Generator().manual_seed(0))
    for c in chunks:
        full.add(c)
        sampled.add(c)
    assert torch.equal(full.rows, everything)
    assert sampled.rows.shape == (16, 4)
    assert all((everything == row).all(dim=1).any() for row in sampled.rows)
    assert len({tuple(r.tolist()) for r in sampled.rows}) == 16  # without replacement
    assert sampled.absmax == full.absmax == everything.abs().max()


# ---- the noisy linear ---------------------------------------------------------------------------


def test_noise_cancels_in_float_mode_and_matches_bias_correction_form():
    encoder, _ = calibrated("clip")
    original = make_model("clip")  # same seed: the untouched float weights
    fc2 = encoder.blocks[1].mlp.fc2
    assert isinstance(fc2, NoisyQuantLinear) and fc2.noise is not None and fc2.noise.abs().max() > 0
    weight = original.visual.transformer.resblocks[1].mlp.c_proj.weight.detach()
    bias = original.visual.transformer.resblocks[1].mlp.c_proj.bias.detach()
    x = torch.randn(2, 5, fc2.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with quant_mode(encoder, "float"):  # noise added, then removed through the bias
            assert rel_err(fc2(x), F.linear(x, weight, bias)) <= 1e-6
        w_q = fc2.weight_quantizer.fake_quant(weight)
        scale, noise = fc2.input_quantizer.scale, fc2.noise
        deployed = F.linear(symmetric_fake_quant(x + noise, scale, 6), w_q, bias - w_q @ noise)
        assert rel_err(fc2(x), deployed) <= 1e-5
        assert torch.allclose(fc2.corrected_bias(), bias - w_q @ noise, atol=1e-6)
        noise_free = F.linear(symmetric_fake_quant(x, scale, 6), w_q, bias)
        assert rel_err(fc2(x), noise_free) > 1e-4  # the noise does change the quantized result


def test_noise_is_reproducible_with_the_seed():
    def noises(seed):
        encoder, _ = calibrated("dinov2", seed=seed)
        return [m.noise.clone() for m in encoder.modules() if isinstance(m, NoisyQuantLinear)]

    a, b, c = noises(0), noises(0), noises(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, z) for x, z in zip(a, c, strict=True))


# ---- end to end -------------------------------------------------------------------------------


def expected_manifest(encoder) -> set[str]:
    return {
        f"blocks.{i}.{lin}.{slot}"
        for i in range(encoder.num_blocks)
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        for slot in ("weight", "input")
    }


@pytest.mark.parametrize("with_prefix", [False, True], ids=["plain", "prefix"])
@pytest.mark.parametrize("family", FAMILIES)
def test_noisyquant_end_to_end(family, with_prefix, tmp_path):
    x = images(family, n=4, seed=7)
    encoder, manifest = calibrated(family, bits=8, prefix=with_prefix)
    assert set(manifest.tensors) == expected_manifest(encoder)
    kinds = {e.tensor: e.quantizer for e in manifest.entries}
    assert kinds["blocks.0.mlp.fc2.weight"] == {
        "kind": "uniform",
        "bits": 8,
        "symmetric": True,
        "granularity": "channel",
        "axis": 0,
    }
    assert kinds["blocks.0.attn.qkv.input"]["symmetric"] and kinds["blocks.0.attn.qkv.input"]["granularity"] == "tensor"
    with torch.no_grad():
        quantized = encoder(x)
        with quant_mode(encoder, "float"):
            reference = encoder(x)
    assert F.cosine_similarity(quantized, reference, dim=-1).min() > 0.98

    fresh = reloaded(encoder, family, tmp_path / "noisy.safetensors", with_prefix)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized)


def test_calibration_shows_progress(capsys):
    encoder = adapt(make_model("siglip"))
    quantize_(encoder, NoisyQuantConfig(w_bits=6, a_bits=6, **FAST))
    calibrate_(encoder, calib_batches("siglip"), progress=True)
    err = capsys.readouterr().err
    assert "NoisyQuant: clip search" in err and "NoisyQuant: noise search" in err


def inject_fc2_input_outlier(encoder, channel: int = 3, factor: float = 50.0) -> None:
    """One hidden MLP channel 50x larger (fc1 row scaled up, fc2 column scaled down)."""
    with torch.no_grad():
        for block in encoder.blocks:
            block.mlp.fc1.weight[channel] *= factor
            block.mlp.fc1.bias[channel] *= factor
            block.mlp.fc2.weight[:, channel] /= factor


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_noisyquant_beats_naive_with_outlier_channel(family):
    x = images(family, n=8, seed=9)
    cosines = {
        config.name: quantized_cosine(family, config, calib_batches(family, 4), x, inject_fc2_input_outlier)
        for config in (
            NaiveConfig(w_bits=6, a_bits=6, quantize_matmuls=False),  # the same tensors as NoisyQuant
            NoisyQuantConfig(w_bits=6, a_bits=6, **FAST),
        )
    }
    assert cosines["noisyquant"] > cosines["naive"], cosines


def test_reference_preset_and_registry():
    assert METHODS["noisyquant"] is NoisyQuantConfig
    ref = NoisyQuantConfig.reference(6, 6)
    assert (ref.seeded_noise, ref.gaussian_noise) == (False, True)
    assert ref.search_tokens is None
    default = NoisyQuantConfig()
    assert (default.seeded_noise, default.gaussian_noise) == (True, False)
    assert (default.clip_candidates, default.mean_candidates, default.amplitude_candidates) == (1000, 400, 2000)
    assert config_from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


def test_reference_noise_follows_the_global_rng():
    def noises(global_seed):
        encoder = adapt(make_model("dinov2"))
        quantize_(encoder, NoisyQuantConfig(w_bits=6, a_bits=6, seeded_noise=False, gaussian_noise=True, **FAST))
        torch.manual_seed(global_seed)  # the official draw uses whatever state the global RNG is in
        calibrate_(encoder, calib_batches("dinov2"), progress=False)
        return [m.noise.clone() for m in encoder.modules() if isinstance(m, NoisyQuantLinear)]

    a, b, c = noises(1), noises(1), noises(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(x, z) for x, z in zip(a, c, strict=True))


# ---- the bf16x3 tensor-core search selects what the float32 search selects ------------------------


@pytest.mark.parametrize("c_out", [64, 256], ids=["direct", "gram"])
def test_bf16x3_search_selects_the_float32_candidates(c_out):
    g = torch.Generator().manual_seed(c_out)
    x = torch.randn(512, 128, generator=g) * torch.exp(torch.randn(128, generator=g) * 0.5)
    w = torch.randn(c_out, 128, generator=g) / 128**0.5
    absmax = x.abs().max()
    scales = [search_clip_scale(x, w, 8, absmax, 200, precision=p) for p in ("fp32", "bf16x3")]
    assert torch.equal(scales[0], scales[1])
    base = (torch.rand(128, generator=g) * 2 - 1) * scales[0]
    noises = [search_noise(x, w, 8, scales[0], base, 100, 400, precision=p) for p in ("fp32", "bf16x3")]
    assert torch.equal(noises[0], noises[1])


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_bf16x3_calibration_chooses_the_float32_parameters(family):
    def chosen(precision):
        encoder, _ = calibrated(family, bits=8, search_precision=precision)
        return [
            (m.input_quantizer.scale.clone(), m.noise.clone())
            for m in encoder.modules()
            if isinstance(m, NoisyQuantLinear)
        ]

    for (s32, n32), (s16, n16) in zip(chosen("fp32"), chosen("bf16x3"), strict=True):
        assert torch.equal(s32, s16) and torch.equal(n32, n16)
    assert NoisyQuantConfig().search_precision == "auto" and NoisyQuantConfig.reference().search_precision == "fp32"


# ---- bf16x2 (integer codes times B_hi + B_lo) and the fused Triton kernels ------------------------


def exact_choices(x, w, bits, absmax, base_draw, clips=1000, means=400, amplitudes=2000):
    """The clip step and noise of least output MSE, by brute force in float64 over the same float32 candidates.

    Also asserts each optimum beats the runner-up by > 1e-6 relative: closer calls are decided by rounding.
    """
    n = 2 ** (bits - 1) - 1
    x64, w64 = x.double(), w.double()

    def argmin(losses):
        best, second = losses.sort().values[:2]
        assert second - best > 1e-6 * best, "near tie: pick other test data"
        return torch.argmin(losses)

    def mse(xq):  # xq (K, T, C) float64
        return ((xq - x64) @ w64.t()).pow(2).mean(dim=(1, 2))

    scales = absmax * torch.arange(clips, 0, -1, dtype=torch.float32) / clips / n  # as the search builds them
    s64 = scales.double().view(-1, 1, 1)
    clip_loss = mse(torch.round(torch.minimum(torch.maximum(x64 / s64, torch.tensor(-n)), torch.tensor(n))) * s64)
    scale = scales[argmin(clip_loss)]
    base = (base_draw * 2 - 1) * scale

    def noisy(noises):  # noises (K, C or 1) float32: Q(x + N) - N
        nz = noises.double().unsqueeze(1)
        return torch.clamp(torch.round((x64 + nz) / scale.double()), -n - 1, n) * scale.double() - nz

    half = means // 2
    mean_cands = (scale * torch.arange(-half, means - half, dtype=torch.float32) / half).view(-1, 1)
    mean = mean_cands[argmin(mse(noisy(mean_cands)))]
    amp = torch.arange(amplitudes, dtype=torch.float32) / (amplitudes // 2)
    amp_cands = mean + amp.view(-1, 1) * base.view(1, -1)
    return scale, amp_cands[argmin(mse(noisy(amp_cands)))], base


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("c_out", [24, 96], ids=["direct", "gram"])
def test_searches_choose_the_exact_optimum_in_every_precision(c_out, bits):
    g = torch.Generator().manual_seed(c_out + bits)
    x = torch.randn(96, 32, generator=g) * torch.exp(torch.randn(32, generator=g) * 0.5)
    x[:, 0] *= 10  # an outlier channel, as in ViTs: codes far from zero, where bf16x2 cancels
    w = torch.randn(c_out, 32, generator=g) / 32**0.5
    absmax, draw = x.abs().max(), torch.rand(32, generator=g)
    scale, noise, base = exact_choices(x, w, bits, absmax, draw)
    for precision in ("fp32", "bf16x3", "bf16x2"):
        got = search_clip_scale(x, w, bits, absmax, budget=1 << 18, precision=precision)
        assert torch.equal(got, scale), precision
        got = search_noise(x, w, bits, scale, base, budget=1 << 18, precision=precision)
        assert torch.equal(got, noise), precision


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("c_out", [24, 96], ids=["direct", "gram"])
def test_bf16_search_is_exact_for_the_rounded_weight_factor(c_out, bits):
    """precision="bf16" finds the exact optimum of the output MSE with B = bf16(B), B Bᵀ = WᵀW (brute force)."""
    from regcache.quant.methods.noisyquant import _output_factor

    g = torch.Generator().manual_seed(c_out + bits)
    x = torch.randn(96, 32, generator=g) * torch.exp(torch.randn(32, generator=g) * 0.5)
    x[:, 0] *= 10
    w = torch.randn(c_out, 32, generator=g) / 32**0.5
    w_rounded = _output_factor(w).bfloat16().float().t()  # E Bᵀ... as a weight: its Gram matrix is B_hi B_hiᵀ
    absmax, draw = x.abs().max(), torch.rand(32, generator=g)
    scale, noise, base = exact_choices(x, w_rounded, bits, absmax, draw)
    assert torch.equal(search_clip_scale(x, w, bits, absmax, budget=1 << 18, precision="bf16"), scale)
    assert torch.equal(search_noise(x, w, bits, scale, base, budget=1 << 18, precision="bf16"), noise)


def test_bf16x2_refuses_codes_that_bfloat16_cannot_hold():
    x, w = torch.randn(8, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="bf16x3"):
        search_clip_scale(x, w, 10, x.abs().max(), 10, precision="bf16x2")
    assert NoisyQuantConfig(a_bits=8)._precision(torch.device("cuda")) == "bf16x2"
    assert NoisyQuantConfig(a_bits=8)._precision(torch.device("cpu")) == "fp32"


_INTERPRETER_SCRIPT = """
import torch
from regcache.quant.methods import noisyquant as nq
from test_noisyquant import exact_choices

g = torch.Generator().manual_seed(0)
x = torch.randn(40, 24, generator=g) * torch.exp(torch.randn(24, generator=g) * 0.5) * 20
x[3, 5] = 0.5 * 2.0  # exactly half a step for the divisor 2 below: round half to even
divisors = torch.tensor([2.0, 0.37, 1.1])
shifts = torch.randn(3, 24, generator=g)
cases = ((divisors, True, -127, 127), (shifts, False, -128, 127), (shifts[:, :1], False, -32, 31))
for params, divide, lo, hi in cases:
    u = x.unsqueeze(0) / params.view(-1, 1, 1) if divide else x.unsqueeze(0) + params.unsqueeze(1)
    r = u.round().clamp(lo, hi)
    codes = nq._fused_lhs(x, params, lo, hi, divide, split3=False)
    assert torch.equal(codes.float(), torch.cat([r, r], dim=-1))
    assert torch.equal(nq._fused_lhs(x, params, lo, hi, divide, split3=False, copies=1).float(), r)
    e = r - u
    hi_ = e.bfloat16()
    lo_ = (e - hi_.float()).bfloat16()
    assert torch.equal(nq._fused_lhs(x, params, lo, hi, divide, split3=True), torch.cat([hi_, lo_, hi_], dim=-1))

h = torch.randn(3, 40 * 7, generator=g)
shared = torch.randn(40, 7, generator=g)
offsets = torch.randn(3, 7, generator=g)
sq = nq._fused_sq_dist(h, shared, divisors, None)
ref = (h.view(3, 40, 7) - shared / divisors.view(-1, 1, 1)).pow(2).sum(dim=(1, 2))
assert torch.allclose(sq, ref, rtol=1e-5), (sq, ref)
sq = nq._fused_sq_dist(h, shared, None, offsets)
ref = (h.view(3, 40, 7) - shared - offsets.unsqueeze(1)).pow(2).sum(dim=(1, 2))
assert torch.allclose(sq, ref, rtol=1e-5), (sq, ref)

# whole searches through the kernels (small chunks: several launches per candidate set)
x = torch.randn(256, 16, generator=g) * torch.exp(torch.randn(16, generator=g) * 0.5)
w = torch.randn(48, 16, generator=g) / 4
absmax, draw = x.abs().max(), torch.rand(16, generator=g)
scale, noise, base = exact_choices(x, w, 8, absmax, draw, 200, 40, 100)
for precision in ("bf16x3", "bf16x2"):
    assert torch.equal(nq.search_clip_scale(x, w, 8, absmax, 200, 1 << 14, precision), scale), precision
    got = nq.search_noise(x, w, 8, scale, base, 40, 100, budget=1 << 14, precision=precision)
    assert torch.equal(got, noise), precision
# bf16 through the kernels equals bf16 through the op-by-op formulas (the rounded factor's optimum)
from regcache import kernels
kernels.set_kernel_config(fused_noisyquant=False)
def bf16_choices():
    return (nq.search_clip_scale(x, w, 8, absmax, 200, 1 << 14, "bf16"),
            nq.search_noise(x, w, 8, scale, base, 40, 100, budget=1 << 14, precision="bf16"))
ref = bf16_choices()
kernels.set_kernel_config(fused_noisyquant=True)
got = bf16_choices()
assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
assert kernels.active("fused_noisyquant") and not kernels.fallbacks()
print("ok")
"""


def test_fused_search_kernels_under_triton_interpreter():
    """The kernels' indexing, rounding and bf16 splitting on CPU (Triton's interpreter), and searches through them."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    tests, root = Path(__file__).parent, Path(__file__).parent.parent
    path = os.pathsep.join(p for p in (str(root), str(tests), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    script = textwrap.dedent(_INTERPRETER_SCRIPT)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tests)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_search_chunk_default_depends_on_the_device():
    """search_chunk_elements None: 2^28 elements per search matmul on CUDA, 2^26 elsewhere; a set value wins."""
    from regcache.quant.methods.noisyquant import NoisyQuantConfig

    config = NoisyQuantConfig()
    assert config.search_chunk_elements is None
    assert config._chunk_elements(torch.device("cuda")) == 1 << 28
    assert config._chunk_elements(torch.device("cpu")) == 1 << 26
    config.search_chunk_elements = 12345
    assert config._chunk_elements(torch.device("cuda")) == config._chunk_elements(torch.device("cpu")) == 12345


@pytest.mark.parametrize("regcache", [False, True], ids=["plain", "prefix+deletion"])
@pytest.mark.parametrize("family", FAMILIES)
def test_staged_blocks_calibrate_exactly_as_the_hooked_forwards(family, regcache):
    """Each block part run once (staged) gives the very clips, noises and outputs of re-running the block per linear."""
    from regcache.quant.methods import noisyquant as nq
    from regcache.registers.deletion import install_deletion

    x = images(family, n=4, seed=7)
    runs = []
    for staged in (True, False):
        encoder = adapt(make_model(family))
        if regcache:  # a register prefix on every block, and token deletion at block 1's input
            install_random_prefix(encoder)
            install_deletion(encoder, 1, 2)
        quantize_(encoder, NoisyQuantConfig(w_bits=6, a_bits=6, staged_blocks=staged, **FAST))
        calibrate_(encoder, calib_batches(family), progress=False)
        assert all(nq._stageable(b) for b in encoder.blocks)  # the staged path really ran where asked
        linears = [m for m in encoder.modules() if isinstance(m, NoisyQuantLinear)]
        with torch.no_grad():
            runs.append(([(m.input_quantizer.scale, m.noise) for m in linears], encoder(x)))
    (staged_params, staged_out), (hooked_params, hooked_out) = runs
    assert len(staged_params) == 4 * len(encoder.blocks)
    for (s_scale, s_noise), (h_scale, h_noise) in zip(staged_params, hooked_params, strict=True):
        assert torch.equal(s_scale, h_scale) and torch.equal(s_noise, h_noise)
    assert torch.equal(staged_out, hooked_out)


def test_blocks_with_hooks_or_extra_linears_are_not_staged():
    """A hook on the block or a NoisyQuant linear outside qkv / proj / fc1 / fc2 keeps the hooked path."""
    from torch import nn

    from regcache.quant.methods import noisyquant as nq

    encoder, _ = calibrated("clip", bits=8)
    block = encoder.blocks[0]
    assert nq._stageable(block)
    handle = block.register_forward_hook(lambda m, i, o: None)
    assert not nq._stageable(block)
    handle.remove()
    block.mlp.norm = nq.NoisyQuantLinear.from_linear(nn.Linear(block.mlp.fc1.out_features, block.mlp.fc1.out_features))
    assert not nq._stageable(block)
