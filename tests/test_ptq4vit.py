"""PTQ4ViT: twin uniform quantizers, search grid and objective, calibration on every family, state, prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, images, install_random_prefix, make_model, reloaded
from torch import nn
from torch.nn import functional as F

from regcache.encoders import adapt
from regcache.quant import (
    METHODS,
    NaiveConfig,
    QuantLinear,
    calibrate_,
    config_from_dict,
    quant_mode,
    quantize_,
)
from regcache.quant.methods.ptq4vit import (
    PTQ4ViTConfig,
    QuantConv2d,
    _capture,
    _Prediction,
    _search_linear,
    _softmax_input_grad,
    _Unit,
    candidate_factors,
    hessian_objective,
    initial_step,
    softmax_split_candidates,
)
from regcache.quant.twin_uniform import (
    GELU_NEG_RANGE,
    ChunkedUniformQuantizer,
    TwinGeluQuantizer,
    TwinSoftmaxQuantizer,
    twin_gelu_codes,
    twin_softmax_codes,
)

# A reduced grid keeps CPU tests fast; the search code path is the same as with the defaults.
FAST = {"eq_n": 10, "search_rounds": 1}


def calib_batches(family: str, n: int = 2, size: int = 8) -> list[torch.Tensor]:
    return [images(family, n=size, seed=200 + i) for i in range(n)]


def cosine_to_float(encoder: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        q = encoder(x)
        with quant_mode(encoder, "float"):
            f = encoder(x)
    return F.cosine_similarity(q, f, dim=-1).mean().item()


# ---- twin uniform quantizers (3 bits: 4 levels per range, level step 1/3 in the coarse range) ----
def test_twin_softmax_disjoint_ranges_hand_computed():
    q = TwinSoftmaxQuantizer(bits=3)
    q.set_split(0.25)  # fine step 0.25/3, coarse step 1/3
    x = torch.tensor([0.0, 0.04, 0.1, 0.2499, 0.25, 0.3, 0.6, 0.9, 1.0])
    expected = torch.tensor([0, 0, 1 / 12, 3 / 12, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    assert torch.allclose(q.fake_quant(x), expected)
    upper, code = twin_softmax_codes(x, 0.25, 3)
    assert upper.tolist() == [False, False, False, False, True, True, True, True, True]
    assert code.tolist() == [0, 0, 1, 3, 1, 1, 2, 3, 3]


def test_twin_softmax_offset_quirk_reproduces_the_reference_sum():
    q = TwinSoftmaxQuantizer(bits=3, additive_quirk=True)
    q.set_split(0.25)
    x = torch.tensor([0.0, 0.1, 0.3, 0.9])
    # reference: high = round(clamp(x, s, 1) * 3) / 3, low = round(clamp(x, 0, s) / (s/3)) * s/3, sum of both
    # below s the high branch adds round(0.75)/3 = 1/3; at or above s the low branch adds s = 1/4
    expected = torch.tensor([1 / 3, 1 / 12 + 1 / 3, 1 / 3 + 1 / 4, 1 + 1 / 4])
    assert torch.allclose(q.fake_quant(x), expected)
    tiny = TwinSoftmaxQuantizer(bits=3, additive_quirk=True)
    tiny.set_split(2.0**-4)  # round(3/16) = 0: no offset below the split (0.05 -> 2 * 1/48), +1/16 above it
    assert torch.allclose(tiny.fake_quant(torch.tensor([0.05, 0.5])), torch.tensor([1 / 24, 2 / 3 + 1 / 16]))


def test_twin_gelu_negative_range_uses_the_fixed_step():
    q = TwinGeluQuantizer(bits=3)
    q.set_steps(0.5)
    neg = GELU_NEG_RANGE / 4
    assert q.neg_scale.item() == pytest.approx(neg)
    x = torch.tensor([-0.5, -0.1, -0.01, 0.0, 0.2, 0.7, 3.0])
    codes = [-4, -2, 0, 0, 0, 1, 3]  # negatives in steps of 0.17/4 clamped at -4; positives 0..3 of 0.5
    assert twin_gelu_codes(x, 0.5, neg, 3).tolist() == codes
    expected = torch.tensor([-4 * neg, -2 * neg, 0, 0, 0, 0.5, 1.5])
    assert torch.allclose(q.fake_quant(x), expected)


# ---- initial steps, grids, objective ----
def test_initial_step_formula_and_qkv_chunks():
    assert initial_step(torch.tensor([-3.0, 1.0, 2.0]), bits=4).item() == pytest.approx(3 / 7.5)
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0], [4.0, 1.0], [0.0, -1.0], [0.1, 0.2], [-8.0, 3.0]])
    steps = initial_step(w, bits=8, groups=3, axis=0)  # rows (0,1) (2,3) (4,5): q, k, v
    assert torch.allclose(steps, torch.tensor([2.0, 4.0, 8.0]) / 127.5)
    q = ChunkedUniformQuantizer(8, chunks=3)
    q.set_scale(steps)
    assert torch.equal(q.quantize_int(w)[:, 0], torch.round(w[:, 0] / steps.repeat_interleave(2)).long())


def test_candidate_grid_and_softmax_splits():
    grid = candidate_factors(0.01, 1.2, 100)
    assert len(grid) == 101 and grid[0].item() == pytest.approx(0.01) and grid[-1].item() == pytest.approx(1.2)
    quirk = candidate_factors(0.01, 1.2, 100, skip_last=True)  # the reference's loops stop before beta
    assert len(quirk) == 100 and quirk[-1].item() == pytest.approx(0.01 + 99 * 1.19 / 100)
    splits = softmax_split_candidates(20)
    assert len(splits) == 20 and splits[0] == 1 and splits[-1] == 2.0**-19


def test_linear_search_equals_brute_force_hessian_argmax():
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(nn.Linear(6, 9))
    config = PTQ4ViTConfig(w_bits=4, a_bits=4, eq_n=12, search_rounds=2, candidate_batch_bytes=600)  # forces chunking
    lin.weight_quantizer = ChunkedUniformQuantizer(4, chunks=3)
    lin.input_quantizer = TwinGeluQuantizer(4)
    x = F.gelu(3 * torch.randn(40, 6))
    out, grad = lin(x).detach(), torch.randn(40, 9)
    _search_linear(_Unit("fc", lin, 0), {"x": x, "out": out, "grad": grad}, config)

    # brute force: loop over candidates, score each with the reference's similarity, keep the argmax
    factors = candidate_factors(0.01, 1.2, 12)
    w, b = lin.weight.detach(), lin.bias.detach()
    w_init, a_init = initial_step(w, 4, groups=3), x.amax() / 7.5
    neg = GELU_NEG_RANGE / 8

    def quant_w(steps):
        s = steps.repeat_interleave(3)[:, None]
        return torch.clamp(torch.round(w / s), -8, 7) * s

    def quant_x(step):
        s = torch.where(x >= 0, step, torch.tensor(neg))
        return torch.clamp(torch.round(x / s), -8, 7) * s

    w_best, a_best = w_init.clone(), a_init
    for _ in range(2):
        for g in range(3):  # chunks are independent: each picks the best of its own candidates
            rows = slice(3 * g, 3 * g + 3)
            scores = []
            for f in factors:
                trial = w_best.clone()
                trial[g] = f * w_init[g]
                scores.append(
                    hessian_objective(
                        out[:, rows], F.linear(quant_x(a_best), quant_w(trial), b)[:, rows], grad[:, rows]
                    )
                )
            w_best[g] = factors[int(torch.stack(scores).argmax())] * w_init[g]
        scores = [hessian_objective(out, F.linear(quant_x(f * a_init), quant_w(w_best), b), grad) for f in factors]
        a_best = factors[int(torch.stack(scores).argmax())] * a_init
    assert torch.allclose(lin.weight_quantizer.scale, w_best)
    assert torch.allclose(lin.input_quantizer.pos_scale, a_best)
    lin.weight_quantizer.mode = lin.input_quantizer.mode = "quant"
    assert torch.allclose(lin(x), F.linear(quant_x(a_best), quant_w(w_best), b), atol=1e-6)


def test_softmax_input_grad_matches_autograd():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    upstream = torch.randn(2, 3, 5)
    (logits.softmax(-1) * upstream).sum().backward()
    assert torch.allclose(_softmax_input_grad(logits.softmax(-1).detach(), upstream), logits.grad, atol=1e-6)


# ---- coverage, calibration, state ----
def expected_manifest(encoder, family: str) -> set[str]:
    tensors = set()
    for i in range(encoder.num_blocks):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            tensors |= {f"blocks.{i}.{lin}.weight", f"blocks.{i}.{lin}.input"}
        tensors |= {f"blocks.{i}.attn.matmul_{m}.{o}" for m in ("qk", "pv") for o in "ab"}
    if family in ("clip", "openclip"):
        tensors |= {"conv1.weight", "proj.weight", "proj.input"}  # patch embedding, final projection
    else:
        tensors |= {"trunk.patch_embed.proj.weight"}  # tiny SigLIP / DINOv2 have no projection linear
    return tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_calibrates_manifest_and_state_roundtrip(tmp_path, family):
    encoder = adapt(make_model(family))
    manifest = quantize_(encoder, PTQ4ViTConfig(w_bits=8, a_bits=8, **FAST))
    assert set(manifest.tensors) == expected_manifest(encoder, family)
    kinds = {e.tensor: e.quantizer for e in manifest.entries}
    assert kinds["blocks.0.attn.qkv.weight"]["kind"] == "uniform_chunked"
    assert kinds["blocks.0.attn.qkv.weight"]["chunks"] == 3
    assert kinds["blocks.0.mlp.fc2.input"]["kind"] == "twin_gelu"
    assert kinds["blocks.0.attn.matmul_pv.a"]["kind"] == "twin_softmax"
    assert kinds["blocks.0.attn.matmul_qk.a"] == {
        "kind": "uniform",
        "bits": 8,
        "symmetric": True,
        "granularity": "channel",
        "axis": 1,
    }
    assert kinds["blocks.0.mlp.fc1.input"]["granularity"] == "tensor"
    calibrate_(encoder, calib_batches(family), progress=False)
    x = images(family, n=4, seed=3)
    assert cosine_to_float(encoder, x) > 0.99
    split = encoder.blocks[0].attn.matmul_pv.a_quantizer.split.item()
    assert split in softmax_split_candidates(20).tolist()

    fresh = reloaded(encoder, family, tmp_path / "ptq4vit.safetensors")
    stem = fresh.conv1 if family in ("clip", "openclip") else fresh.trunk.patch_embed.proj
    assert isinstance(stem, QuantConv2d) and stem.weight_quantizer.scale.shape == (stem.out_channels,)
    with torch.no_grad():
        assert torch.equal(fresh(x), encoder(x))


def test_sequential_calibration_runs():
    encoder = adapt(make_model("dinov2"))
    quantize_(encoder, PTQ4ViTConfig(w_bits=8, a_bits=8, sequential=True, hessian_grad="pseudo_label", **FAST))
    calibrate_(encoder, calib_batches("dinov2"), progress=False)
    assert cosine_to_float(encoder, images("dinov2", n=4, seed=3)) > 0.99


def test_head_and_patch_embed_coverage_flags():
    encoder = adapt(make_model("clip"))
    manifest = quantize_(encoder, PTQ4ViTConfig(quantize_head=False, quantize_patch_embed=False))
    assert not any(t.startswith(("proj.", "conv1.")) for t in manifest.tensors)
    assert not isinstance(encoder.conv1, QuantConv2d)


def add_outlier_channel(encoder, channel: int = 3, factor: float = 50.0):
    """Scale one LayerNorm output channel feeding fc1 by ``factor`` and undo it in fc1: same float model."""
    with torch.no_grad():
        for block in encoder.blocks:
            block.norm2.weight[channel] *= factor
            block.norm2.bias[channel] *= factor
            block.mlp.fc1.weight[:, channel] /= factor
    return encoder


@pytest.mark.parametrize("family", ["clip", "dinov2"])
def test_outlier_channel_ptq4vit_beats_naive_at_w6a6(family):
    x, batches = images(family, n=8, seed=7), calib_batches(family, n=4)
    reference = adapt(make_model(family))
    with torch.no_grad():
        before = reference(x)
        assert torch.allclose(add_outlier_channel(reference)(x), before, atol=1e-4)  # float model unchanged
    cosines = {}
    # naive covers the blocks only: compare PTQ4ViT on the same tensors
    for config in (
        NaiveConfig(w_bits=6, a_bits=6),
        PTQ4ViTConfig(w_bits=6, a_bits=6, quantize_head=False, quantize_patch_embed=False, eq_n=50, search_rounds=2),
    ):
        encoder = add_outlier_channel(adapt(make_model(family)))
        quantize_(encoder, config)
        calibrate_(encoder, batches, progress=False)
        cosines[config.name] = cosine_to_float(encoder, x)
    assert 1 - cosines["ptq4vit"] < 0.5 * (1 - cosines["naive"])


# ---- RegCache prefix present during calibration ----
@pytest.mark.parametrize("family", ["openclip", "siglip"])
def test_calibrates_with_a_register_prefix_installed(family):
    encoder = adapt(make_model(family))
    install_random_prefix(encoder)
    quantize_(encoder, PTQ4ViTConfig(w_bits=8, a_bits=8, **FAST))
    calibrate_(encoder, calib_batches(family), progress=False)
    assert cosine_to_float(encoder, images(family, n=4, seed=3)) > 0.99
    assert encoder.blocks[2].attn.matmul_pv.a_quantizer.split.item() in softmax_split_candidates(20).tolist()


def test_recorded_attention_outputs_match_the_module_with_prefix():
    encoder = adapt(make_model("clip"))
    install_random_prefix(encoder)
    quantize_(encoder, PTQ4ViTConfig())
    attn = encoder.blocks[1].attn
    x = images("clip", n=3, seed=5)
    with torch.no_grad():
        fp = encoder(x)
        h1 = encoder.forward_blocks(encoder.embed(x), end=1)
    seen = {}
    hooks = [
        attn.tap_probs.register_forward_hook(lambda m, i, o: seen.update(probs=o.detach())),
        attn.out_norm.register_forward_hook(lambda m, i, o: seen.update(out=i[0].detach())),
    ]
    target = _Prediction(fp, None, PTQ4ViTConfig(), logits=False)
    units = [
        _Unit("blocks.1.attn.matmul_qk", attn.matmul_qk, 1, attn),
        _Unit("blocks.1.attn.matmul_pv", attn.matmul_pv, 1, attn),
    ]
    qk, pv = _capture(encoder, units, 1, h1, target, chunk=3)  # one chunk: the hooks keep the last call
    for h in hooks:
        h.remove()
    logits = qk["out"] * attn.scale
    logits[..., :2] += attn.prefix.log_multiplicity
    assert torch.allclose(logits.softmax(-1), seen["probs"], atol=1e-6)
    b, n, _ = seen["out"].shape
    assert torch.allclose(pv["out"], seen["out"].reshape(b, n, attn.num_heads, -1).transpose(1, 2))
    recomputed = (pv["a"][..., :2] * pv["mult"]) @ pv["pv"] + pv["a"][..., 2:] @ pv["v"]
    assert torch.allclose(recomputed, pv["out"], atol=1e-6)


# ---- config ----
def test_reference_preset_config_roundtrip_and_classifier():
    ref = PTQ4ViTConfig.reference(6, 6)
    assert (ref.softmax_twin_offset_quirk, ref.skip_last_candidate_quirk, ref.softmax_search_float_v_quirk) == (
        True,
    ) * 3
    assert (ref.hessian_grad, ref.sequential, ref.w_bits, ref.a_bits) == ("kl", False, 6, 6)
    assert not PTQ4ViTConfig().softmax_twin_offset_quirk
    assert METHODS["ptq4vit"] is PTQ4ViTConfig and config_from_dict(ref.to_dict()) == ref
    encoder = adapt(make_model("clip"))
    quantize_(encoder, ref)
    assert encoder.blocks[0].attn.matmul_pv.a_quantizer.additive_quirk
    with pytest.raises(ValueError, match="hessian_grad"):
        PTQ4ViTConfig(hessian_grad="mse")

    classifier = F.normalize(torch.randn(32, 5), dim=0)
    config = PTQ4ViTConfig(zero_shot_classifier=classifier, **FAST)
    assert "zero_shot_classifier" not in config.to_dict()
    encoder = adapt(make_model("clip"))
    quantize_(encoder, config)
    calibrate_(encoder, calib_batches("clip", n=1), progress=False)
    assert cosine_to_float(encoder, images("clip", n=4, seed=3)) > 0.99
    bad = adapt(make_model("clip"))
    quantize_(bad, PTQ4ViTConfig(zero_shot_classifier=torch.randn(7, 5), **FAST))
    with pytest.raises(ValueError, match="embed_dim"):
        calibrate_(bad, calib_batches("clip", n=1), progress=False)
