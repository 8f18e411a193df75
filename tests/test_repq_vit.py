"""RepQ-ViT: log-√2 codes, percentile init, LayerNorm reparameterization, end to end on every family."""

from __future__ import annotations

import math

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
    UniformQuantizer,
    calibrate_,
    config_from_dict,
    load_quant_state,
    quant_mode,
    quantize_,
    save_quant_state,
)
from regcache.quant.init import percentile_affine_search, percentile_calibrate_, quantiles
from regcache.quant.log_quantizers import LogSqrt2Quantizer
from regcache.quant.methods.repq_vit import RepQViTConfig, fold_layernorm_

PCTS = (0.999, 0.9999, 0.99999)


pytestmark = pytest.mark.usefixtures("single_thread")


# ---- log-√2 quantizer -------------------------------------------------------------------------


def test_log_sqrt2_codes_and_values_at_4_bits():
    q = LogSqrt2Quantizer(4)
    q.scale = torch.tensor(1.0)
    # x → -2 log2 x → code → value Δ 2^(-q/2), worked by hand
    x = torch.tensor([2.0, 1.0, 0.7, 0.5, 0.3, 0.01, 0.0052, 0.0045, 0.0])
    expected_codes = [0, 0, 1, 2, 3, 13, 15, -1, -1]  # 2.0 saturates; 0.0045 → 15.58 → 16 ≥ 2^4 → zero
    expected_values = [1.0, 1.0, 2**-0.5, 0.5, 2**-1.5, 2**-6.5, 2**-7.5, 0.0, 0.0]
    codes, values = q.codes_and_values(x, q.scale)
    assert codes.tolist() == expected_codes
    assert torch.allclose(values, torch.tensor(expected_values), rtol=1e-6, atol=0)
    q.set_mode("quant")
    assert torch.allclose(q(x), torch.tensor(expected_values), rtol=1e-6, atol=0)
    assert torch.isfinite(q(x)).all()
    # strict 4-bit codebook: code 15 now means zero
    strict = LogSqrt2Quantizer(4, reserve_zero_code=True)
    strict.scale = torch.tensor(1.0)
    codes, values = strict.codes_and_values(x, strict.scale)
    assert codes.tolist() == [0, 0, 1, 2, 3, 13, -1, -1, -1]
    assert values[6] == 0


def test_log_sqrt2_straight_through_gradient_is_finite():
    q = LogSqrt2Quantizer(4)
    q.scale = torch.tensor(1.0)
    q.set_mode("quant")
    x = torch.tensor([0.0, 0.3, 0.9], requires_grad=True)
    q(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_log_sqrt2_init_picks_lowest_mse_percentile():
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(3 * torch.randn(64, 50, generator=g), dim=-1)
    q = LogSqrt2Quantizer(4).calibrate_(x, PCTS)
    errors = {}
    for p in PCTS:
        delta = torch.quantile(x.reshape(-1), p)
        errors[p] = ((q.codes_and_values(x, delta)[1] - x) ** 2).mean().item()
    best = min(PCTS, key=lambda p: errors[p])
    assert torch.allclose(q.scale, torch.quantile(x.reshape(-1), best))


# ---- percentile init --------------------------------------------------------------------------


def brute_force_percentile(row: torch.Tensor, bits: int) -> tuple[float, float]:
    """The reference's per-tensor search written as a plain loop over candidates (in float64)."""
    row = row.double()
    best = None
    for p in PCTS:
        hi, lo = torch.quantile(row, p), torch.quantile(row, 1 - p)
        scale = (hi - lo) / (2**bits - 1)
        zp = torch.round(-lo / scale)
        xq = (torch.clamp(torch.round(row / scale) + zp, 0, 2**bits - 1) - zp) * scale
        err = ((xq - row) ** 2).mean().item()
        if best is None or err < best[0]:
            best = (err, scale.item(), zp.item())
    return best[1], best[2]


@pytest.mark.parametrize("bits", [4, 6])
def test_percentile_init_picks_lowest_mse_candidate(bits):
    g = torch.Generator().manual_seed(bits)
    # heavy tails per row so that the candidates really differ
    x = torch.randn(6, 20000, generator=g) * torch.exp(torch.randn(6, 20000, generator=g))
    scale, zp = percentile_affine_search(x, bits, PCTS)
    for r in range(x.shape[0]):
        s, z = brute_force_percentile(x[r], bits)
        assert scale[r].item() == pytest.approx(s, rel=1e-5)
        assert zp[r].item() == z
    per_tensor = percentile_calibrate_(UniformQuantizer(bits, symmetric=False), x)
    s, z = brute_force_percentile(x.reshape(-1), bits)
    assert per_tensor.scale.item() == pytest.approx(s, rel=1e-5) and per_tensor.zero_point.item() == z
    per_channel = percentile_calibrate_(UniformQuantizer(bits, symmetric=False, granularity="channel", axis=0), x)
    assert torch.allclose(per_channel.scale, scale)


def test_quantiles_beyond_torch_quantile_size_limit():
    n = 16_800_001  # older torch.quantile refuses more than 2^24 = 16,777,216 elements
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    got = quantiles(x.view(1, -1), [0.999, 0.00001])[:, 0]
    for value, q in zip(got, [0.999, 0.00001], strict=True):  # linear interpolation between order statistics
        pos = q * (n - 1)
        lo = x.kthvalue(math.floor(pos) + 1).values
        hi = x.kthvalue(math.floor(pos) + 2).values
        assert value.item() == pytest.approx((lo + (hi - lo) * (pos - math.floor(pos))).item(), rel=1e-6)
    quantizer = percentile_calibrate_(UniformQuantizer(6, symmetric=False), x)
    assert quantizer.is_calibrated and 0 < quantizer.scale.item() < 8 / 63


# ---- reparameterization ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_keeps_float_output_and_turns_per_channel_into_per_tensor(family):
    encoder = adapt(make_model(family))
    block = encoder.blocks[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, encoder.width, generator=g) * (1 + 5 * torch.rand(encoder.width, generator=g))
    for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
        with torch.no_grad():
            act = norm(x)
            out_before = linear(act)
            per_channel = UniformQuantizer(6, symmetric=False, granularity="channel", axis=-1)
            percentile_calibrate_(per_channel, act)
            scale, zp = fold_layernorm_(norm, linear, per_channel.scale, per_channel.zero_point)
            folded = norm(x)
            assert rel_err(linear(folded), out_before) <= 1e-5
            per_tensor = UniformQuantizer(6, symmetric=False)
            per_tensor.set_scale(scale, zp)
            assert zp == zp.round()
            # the same integer codes, up to ties flipped by float rounding
            same = per_tensor.quantize_int(folded) == per_channel.quantize_int(act)
            assert same.float().mean() > 0.9995
            # and the same dequantized values once mapped back: x = r · x_folded + r · b
            r = per_channel.scale / scale
            b = scale * (zp - per_channel.zero_point)
            back = (per_tensor.fake_quant(folded) + b) * r
            close = torch.isclose(back, per_channel.fake_quant(act), rtol=1e-4, atol=1e-5)
            assert close.float().mean() > 0.9995


def test_reference_keeps_fractional_zero_point():
    encoder = adapt(make_model("clip"))
    block = encoder.blocks[0]
    scale = torch.tensor([0.1, 0.2, 0.3] * (encoder.width // 3) + [0.1] * (encoder.width % 3))
    zp = torch.arange(encoder.width).float() % 7
    _, z_ref = fold_layernorm_(block.norm1, block.attn.qkv, scale, zp, round_zero_point=False)
    assert z_ref.item() == pytest.approx(zp.mean().item()) and z_ref != z_ref.round()
    assert RepQViTConfig.reference(6, 6).round_zero_point is False
    assert RepQViTConfig().round_zero_point is True


# ---- end to end -------------------------------------------------------------------------------


def expected_manifest(encoder) -> set[str]:
    names = set()
    for i in range(encoder.num_blocks):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.input"}
        for mm in ("attn.matmul_qk", "attn.matmul_pv"):
            names |= {f"blocks.{i}.{mm}.a", f"blocks.{i}.{mm}.b"}
    stem = "conv1" if hasattr(encoder, "conv1") else "trunk.patch_embed.proj"
    return names | {f"{stem}.input", f"{stem}.weight"}


@pytest.mark.parametrize("with_prefix", [False, True], ids=["plain", "prefix"])
@pytest.mark.parametrize("family", FAMILIES)
def test_repq_end_to_end(family, with_prefix, tmp_path):
    x = images(family, n=4, seed=7)
    encoder = adapt(make_model(family))
    if with_prefix:
        install_random_prefix(encoder)
    with torch.no_grad():
        reference = encoder(x)
    manifest = quantize_(encoder, RepQViTConfig(w_bits=8, a_bits=8))
    assert set(manifest.tensors) == expected_manifest(encoder)
    kinds = {e.tensor: e.quantizer for e in manifest.entries}
    assert kinds["blocks.0.attn.matmul_pv.a"]["kind"] == "log_sqrt2"
    assert kinds["blocks.0.attn.qkv.input"]["granularity"] == "tensor"
    assert kinds["blocks.0.mlp.fc1.weight"] == {
        "kind": "uniform",
        "bits": 8,
        "symmetric": False,
        "granularity": "channel",
        "axis": 0,
    }
    assert kinds[next(t for t in kinds if t.endswith(".input") and not t.startswith("blocks."))]["bits"] == 8

    norm_before = encoder.blocks[0].norm1.weight.detach().clone()
    calibrate_(encoder, calib_batches(family), progress=False)
    assert not torch.equal(encoder.blocks[0].norm1.weight, norm_before)  # the scales were folded
    with torch.no_grad():
        quantized = encoder(x)
        with quant_mode(encoder, "float"):
            assert rel_err(encoder(x), reference) <= 1e-5  # folding kept the float function
    assert F.cosine_similarity(quantized, reference, dim=-1).min() > 0.98

    fresh = reloaded(encoder, family, tmp_path / "repq.safetensors", with_prefix)
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized)


def test_calibration_shows_progress_and_refuses_twice(capsys):
    encoder = adapt(make_model("dinov2"))
    quantize_(encoder, RepQViTConfig(w_bits=6, a_bits=6))
    calibrate_(encoder, calib_batches("dinov2"), progress=True)
    assert "RepQ-ViT" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="once"):
        calibrate_(encoder, calib_batches("dinov2"), progress=False)


def inject_post_norm_outlier(encoder, channel: int = 5, factor: float = 50.0) -> None:
    """Make one LayerNorm output channel an outlier in every block, as in real ViTs.

    γ_c, β_c are scaled up and the consuming linear's input column scaled down by the same factor,
    so the float function is unchanged and only the activation range grows.
    """
    with torch.no_grad():
        for block in encoder.blocks:
            for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.fc1)):
                norm.weight[channel] *= factor
                norm.bias[channel] *= factor
                linear.weight[:, channel] /= factor


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_repq_beats_naive_with_outlier_channel(family):
    x = images(family, n=8, seed=9)
    cosines = {
        config.name: quantized_cosine(family, config, calib_batches(family, 4), x, inject_post_norm_outlier)
        for config in (NaiveConfig(w_bits=6, a_bits=6), RepQViTConfig(w_bits=6, a_bits=6))
    }
    assert cosines["repq_vit"] > cosines["naive"], cosines


def test_config_registry_and_roundtrip():
    assert METHODS["repq_vit"] is RepQViTConfig
    config = RepQViTConfig.reference(4, 4)
    assert config.tag == "repq_vit-W4A4"
    back = config_from_dict(__import__("json").loads(__import__("json").dumps(config.to_dict())))
    assert back == config


def test_fold_into_linear_without_bias(tmp_path):
    import timm

    def model():
        torch.manual_seed(0)
        kw = {"img_size": 28, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 0}
        return timm.create_model("vit_small_patch14_dinov2", qkv_bias=False, **kw).eval()

    x = images("dinov2", n=4, seed=7)
    encoder = adapt(model())
    assert encoder.blocks[0].attn.qkv.bias is None
    with torch.no_grad():
        reference = encoder(x)
    quantize_(encoder, RepQViTConfig(w_bits=8, a_bits=8))
    calibrate_(encoder, calib_batches("dinov2"), progress=False)
    assert encoder.blocks[0].attn.qkv.bias.abs().max() > 0  # the folded shift lives in the new bias
    with torch.no_grad(), quant_mode(encoder, "float"):
        assert rel_err(encoder(x), reference) <= 1e-5
    fresh = adapt(model())
    load_quant_state(fresh, save_quant_state(encoder, tmp_path / "s.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))
