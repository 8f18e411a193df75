"""Naive W/A quantization end to end on every family, coverage manifests, state save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, images, make_model, rel_err, reloaded
from torch.nn import functional as F

from regcache.encoders import adapt
from regcache.quant import (
    METHODS,
    NaiveConfig,
    QuantLinear,
    calibrate_,
    load_quant_state,
    quant_mode,
    quantize_,
)


def calib_batches(family: str, n: int = 3) -> list[torch.Tensor]:
    return [images(family, n=4, seed=100 + i) for i in range(n)]


def quantized(family: str, w_bits: int, a_bits: int, seed: int = 0):
    encoder = adapt(make_model(family, seed=seed))
    manifest = quantize_(encoder, NaiveConfig(w_bits=w_bits, a_bits=a_bits))
    calibrate_(encoder, calib_batches(family), progress=False)
    return encoder, manifest


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_covers_every_block_linear_and_both_matmuls(family):
    encoder, manifest = quantized(family, 8, 8)
    expected = set()
    for i in range(encoder.num_blocks):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.input"}
        for mm in ("attn.matmul_qk", "attn.matmul_pv"):
            expected |= {f"blocks.{i}.{mm}.a", f"blocks.{i}.{mm}.b"}
    assert set(manifest.tensors) == expected
    weight = next(e for e in manifest.entries if e.tensor == "blocks.0.attn.qkv.weight")
    assert weight.quantizer == {"kind": "uniform", "bits": 8, "symmetric": True, "granularity": "channel", "axis": 0}
    assert "| blocks.0.mlp.fc2.input |" in manifest.to_markdown()


@pytest.mark.parametrize("family", FAMILIES)
def test_naive_w8a8_close_to_float_and_error_grows_at_low_bits(family):
    x = images(family, n=6, seed=7)
    cosines, errors = {}, {}
    for bits in (8, 6, 4):
        encoder, _ = quantized(family, bits, bits)
        with torch.no_grad():
            q_out = encoder(x).double()
            with quant_mode(encoder, "float"):
                f_out = encoder(x).double()
        cosines[bits] = F.cosine_similarity(q_out, f_out, dim=-1).mean().item()
        errors[bits] = rel_err(q_out, f_out)
    assert cosines[8] > 0.99
    # the ordering on the relative error: tiny SigLIP's cosines differ only in the 8th digit
    assert errors[8] < errors[6] < errors[4]


def test_quantized_forward_uses_quantized_weights_and_inputs():
    encoder, _ = quantized("clip", 4, 8)
    fc1 = encoder.blocks[0].mlp.fc1
    assert isinstance(fc1, QuantLinear)
    x = torch.randn(2, 5, fc1.in_features)
    w_q = fc1.weight_quantizer.fake_quant(fc1.weight)
    x_q = fc1.input_quantizer.fake_quant(x)
    assert len(torch.unique(w_q[0])) <= 16  # 4-bit weights: at most 16 levels per output channel
    assert torch.allclose(fc1(x), F.linear(x_q, w_q, fc1.bias))


def test_shares_parameters_with_original_model():
    model = make_model("openclip")
    visual = model.visual
    encoder = adapt(model)
    assert encoder.blocks[0].attn.qkv.weight is visual.transformer.resblocks[0].attn.in_proj_weight
    quantize_(encoder, NaiveConfig())
    assert encoder.blocks[0].attn.qkv.weight is visual.transformer.resblocks[0].attn.in_proj_weight


def test_quantize_twice_or_calibrate_without_method_is_an_error():
    encoder = adapt(make_model("clip"))
    with pytest.raises(RuntimeError, match="quantize_"):
        calibrate_(encoder, calib_batches("clip"))
    quantize_(encoder, NaiveConfig())
    with pytest.raises(RuntimeError, match="already quantized"):
        quantize_(encoder, NaiveConfig())
    with pytest.raises(ValueError, match="empty"):
        calibrate_(encoder, [], progress=False)


@pytest.mark.parametrize("bits", [1, 9, 6.0])
def test_bits_validation(bits):
    with pytest.raises(ValueError, match="w_bits"):
        NaiveConfig(w_bits=bits)


def test_calibration_inside_inference_mode():
    encoder = adapt(make_model("siglip"))
    quantize_(encoder, NaiveConfig(w_bits=6, a_bits=6))
    with torch.inference_mode():
        calibrate_(encoder, calib_batches("siglip"), progress=False)
    out = encoder(images("siglip"))  # parameters are normal tensors: autograd works afterwards
    out.sum().backward()


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_state_roundtrip(tmp_path, family):
    encoder, _ = quantized(family, 6, 6)
    path = tmp_path / "calib.safetensors"
    fresh = reloaded(encoder, family, path)
    x = images(family, seed=3)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))
    other = adapt(make_model(family, seed=1))
    with pytest.raises(ValueError, match="fingerprint"):
        load_quant_state(other, path)


def test_method_registry():
    assert METHODS["naive"] is NaiveConfig
    assert NaiveConfig(w_bits=6, a_bits=6).tag == "naive-W6A6"
