"""transformers vision towers (CLIP, SigLIP, SigLIP2, DINOv2 with / without registers): adapters, loading,
every method calibrating on them and the RegCache hooks, both deletion modes and patch-token fidelity."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from conftest import rel_err
from hf_tiny import HF_FAMILIES, hf_call, hf_embedding, hf_images, make_hf
from torch.nn import functional as F

import regcache as rc
from regcache.encoders import AttentionPrefix, adapt
from regcache.encoders.base import explicit_attention
from regcache.encoders.hf_vit import HFVisionEncoder
from regcache.eval.patch_tokens import PatchTokenFidelity, encode_patch_tokens
from regcache.loading import WeightsUnavailableError, load_model
from regcache.registers import TokenDeletion, install_deletion, plain_float

PREFIX = {"clip": 1, "clip_proj": 1, "siglip": 0, "siglip2": 0, "dinov2": 1, "dinov2_reg": 3}


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_adapted_matches_the_transformers_model(family, single_thread):
    model = make_hf(family)
    reference = copy.deepcopy(model)
    x = hf_images()
    encoder = adapt(model)
    assert isinstance(encoder, HFVisionEncoder) and encoder.num_prefix_tokens == PREFIX[family]
    with torch.no_grad():
        out = hf_call(reference, x)
        for explicit in (False, True):  # SDPA and the explicit (quantizable) attention path
            with explicit_attention() if explicit else torch.no_grad():
                pooled, tokens, positions = encode_patch_tokens(encoder, x)
            assert positions is None
            assert rel_err(pooled, hf_embedding(out)) <= 1e-5
            assert rel_err(tokens, out.last_hidden_state[:, PREFIX[family] :]) <= 1e-5
        assert rel_err(encoder(x), hf_embedding(out)) <= 1e-5


@pytest.mark.parametrize("family", ["clip", "siglip2", "dinov2_reg"])
def test_feature_layer_is_the_hidden_state_a_vlm_reads(family, single_thread):
    model = make_hf(family)
    reference = copy.deepcopy(model)
    x = hf_images()
    encoder = HFVisionEncoder(model, feature_layer=-2)
    assert encoder.num_blocks == 1
    with torch.no_grad():
        hidden = hf_call(reference, x, output_hidden_states=True).hidden_states[-2]
        _, tokens, _ = encode_patch_tokens(encoder, x)
    assert rel_err(tokens, hidden[:, PREFIX[family] :]) <= 1e-5
    with pytest.raises(ValueError, match=r"feature_layer must be in -2\.\.-1"):
        HFVisionEncoder(make_hf(family), feature_layer=-3)


@pytest.mark.parametrize(
    ("family", "method"),
    [(f, m) for f in ("clip_proj", "siglip", "dinov2_reg") for m in ("naive", "ptq4vit", "repq_vit", "noisyquant")]
    + [("siglip2", "naive"), ("clip", "naive"), ("dinov2", "naive")],
)
def test_every_method_calibrates_on_hf_towers(family, method, single_thread):
    options = {
        "ptq4vit": {"eq_n": 10, "search_rounds": 1},
        "noisyquant": {"clip_candidates": 30, "mean_candidates": 10, "amplitude_candidates": 20, "search_tokens": 128},
    }.get(method, {})
    encoder = adapt(make_hf(family))
    x = hf_images(n=4, seed=7)
    with torch.no_grad():
        float_out = encoder(x)
    manifest = rc.quantize_(encoder, rc.METHODS[method](w_bits=8, a_bits=8, **options))
    tensors = {e.tensor for e in manifest.entries}
    assert any("blocks.0.attn.qkv" in t for t in tensors) and any("blocks.1.mlp.fc2" in t for t in tensors)
    rc.calibrate_(encoder, [hf_images(n=8, seed=s) for s in (2, 3)])
    with torch.no_grad():
        quantized = encoder(x)
    assert not torch.equal(quantized, float_out)  # the quantizers act
    assert F.cosine_similarity(quantized, float_out, dim=-1).min() > 0.9


@pytest.mark.parametrize("family", ["clip_proj", "siglip2", "dinov2_reg"])
def test_register_prefix_on_hf_towers_matches_literal_copies(family, single_thread):
    encoder = adapt(make_hf(family))
    x = hf_images(n=2)
    attn = encoder.blocks[1].attn
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, attn.num_heads, 1, attn.head_dim, generator=g)
    values = torch.randn(1, attn.num_heads, 1, attn.head_dim, generator=g)
    with torch.no_grad():
        h = encoder.forward_blocks(encoder.embed(x), 0, 1)
        q, k, v = attn.project_qkv(encoder.blocks[1].norm1(h))
        k3 = torch.cat([keys.expand(2, -1, 3, -1), k], dim=2)  # three literal copies of the register
        v3 = torch.cat([values.expand(2, -1, 3, -1), v], dim=2)
        expected = ((q @ k3.transpose(-2, -1)) * attn.scale).softmax(-1) @ v3
        attn.prefix = AttentionPrefix(keys, values, torch.log(torch.tensor([3.0])), (3,))
        with explicit_attention():
            assert rel_err(attn.attend(q, k, v), expected) <= 1e-5
        assert rel_err(attn.attend(q, k, v), expected) <= 1e-5  # SDPA path


def _with_outliers(family: str):
    """A tiny tower whose block-1 input carries two planted massive tokens per image (the sinks to delete)."""
    encoder = adapt(make_hf(family))
    npre = encoder.num_prefix_tokens

    def plant(_m, args):
        (h,) = args
        h = h.clone()
        h[:, npre + 2] += 40.0
        h[:, npre + 9] -= 40.0
        return (h,)

    encoder.blocks[1].register_forward_pre_hook(plant)  # before the block's input filter
    return encoder


@pytest.mark.parametrize("family", ["clip_proj", "siglip", "dinov2_reg"])
def test_keep_mode_keeps_the_grid_and_matches_drop_on_the_kept_tokens(family, single_thread):
    encoder = _with_outliers(family)
    npre = encoder.num_prefix_tokens
    x = hf_images(n=3)
    with torch.no_grad():
        h1 = encoder.forward_blocks(encoder.embed(x), 0, 1)
        h1[:, npre + 2] += 40.0  # the stream block 1 sees (the hook plants it)
        h1[:, npre + 9] -= 40.0
        install_deletion(encoder, 1, 2)  # drop: the paper's shorter sequence
        dropped = encoder.forward_blocks(encoder.embed(x))
        _, drop_tokens, positions = encode_patch_tokens(encoder, x)
        install_deletion(encoder, 1, 2, mode="keep", refill="input")
        kept = encoder.forward_blocks(encoder.embed(x))
        _, keep_tokens, keep_positions = encode_patch_tokens(encoder, x)
        install_deletion(encoder, 1, 2, mode="keep", refill="mean")
        mean_filled = encoder.forward_blocks(encoder.embed(x))
    n = encoder.embed(x).shape[1]
    assert dropped.shape[1] == n - 2 and kept.shape[1] == n and keep_positions is None
    others = [i for i in range(n) if i not in (npre + 2, npre + 9)]
    # the deleted tokens are keys / values of no later block: the kept tokens are drop mode's, exactly
    torch.testing.assert_close(kept[:, others], dropped, rtol=0, atol=0)
    # refilled with their own pre-deletion state, or the mean kept patch token
    torch.testing.assert_close(kept[:, [npre + 2, npre + 9]], h1[:, [npre + 2, npre + 9]], rtol=1e-6, atol=1e-5)
    mean = dropped[:, npre:].mean(dim=1, keepdim=True).expand(-1, 2, -1)
    torch.testing.assert_close(mean_filled[:, [npre + 2, npre + 9]], mean, rtol=1e-6, atol=1e-6)
    assert keep_tokens.shape[1] == n - npre
    expected_positions = torch.tensor([i - npre for i in others[npre:]]).expand(3, -1)
    assert torch.equal(positions, expected_positions) and drop_tokens.shape[1] == n - npre - 2


def test_keep_mode_leaves_the_quantizer_statistics_of_drop_mode(single_thread):
    calib = [hf_images(n=8, seed=s) for s in (2, 3)]
    scales = {}
    for mode in ("drop", "keep"):
        encoder = _with_outliers("clip_proj")
        install_deletion(encoder, 1, 2, mode=mode)
        rc.quantize_(encoder, rc.NaiveConfig(w_bits=8, a_bits=8))
        rc.calibrate_(encoder, calib)
        scales[mode] = {k: v.clone() for k, v in encoder.state_dict().items() if "quantizer" in k}
    assert scales["drop"].keys() == scales["keep"].keys() and scales["drop"]
    for key, value in scales["drop"].items():
        torch.testing.assert_close(scales["keep"][key], value, rtol=0, atol=0)
    # and with the sinks inside the statistics, block 1's input range differs: the test can fail
    encoder = _with_outliers("clip_proj")
    rc.quantize_(encoder, rc.NaiveConfig(w_bits=8, a_bits=8))
    rc.calibrate_(encoder, calib)
    full = {k: v for k, v in encoder.state_dict().items() if "quantizer" in k}
    assert any(not torch.equal(full[k], scales["drop"][k]) for k in full if k.startswith("blocks.1."))


def test_token_deletion_restore_by_hand():
    x = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [9.0, 0.0], [2.0, 2.0], [0.0, -8.0]]])  # CLS + 4 patches
    deletion = TokenDeletion(2, num_prefix_tokens=1, mode="keep", refill="mean")
    short = deletion(x)
    assert torch.equal(short, x[:, [0, 1, 3]])
    restored = deletion.restore(short * 10)
    expected = torch.tensor([[[0.0, 0.0], [10.0, 10.0], [15.0, 15.0], [20.0, 20.0], [15.0, 15.0]]])
    assert torch.equal(restored, expected)
    with pytest.raises(RuntimeError, match="without a forward"):
        deletion.restore(short)
    with pytest.raises(ValueError, match="unknown deletion mode 'shrink'"):
        TokenDeletion(1, 1, mode="shrink")
    with pytest.raises(ValueError, match="unknown refill"):
        install_deletion(adapt(make_hf("clip")), 1, 0, mode="keep", refill="zeros")


def test_patch_token_fidelity_by_hand():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, -1.0]]])  # cosines 1, 1/√2, -1
    metric = PatchTokenFidelity()
    metric.update(tokens, torch.tensor([0]), reference=ref)
    metric.update(tokens[:, [0, 2]], torch.tensor([1]), reference=ref, positions=torch.tensor([[0, 2]]))
    out = metric.compute()
    per_image = [(1 + 2**-0.5 - 1) / 3, (1 - 1) / 2]
    assert out["mean_token_cosine"].item() == pytest.approx(sum(per_image) / 2)
    assert out["min_token_cosine"].item() == pytest.approx(-1.0)
    pooled_0 = F.cosine_similarity(torch.tensor([1 / 3, 0.0]), torch.tensor([2 / 3, 2 / 3]), dim=0).item()
    pooled_1 = 0.0  # mean of [1, 0] and [-1, -1] is [0, -1/2]; the float mean is [2/3, 2/3]
    pooled_1 = F.cosine_similarity(torch.tensor([0.0, -0.5]), torch.tensor([2 / 3, 2 / 3]), dim=0).item()
    assert out["pooled_cosine"].item() == pytest.approx((pooled_0 + pooled_1) / 2)
    assert out["coverage"].item() == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="pass their grid positions"):
        PatchTokenFidelity().update(tokens[:, :2], torch.tensor([0]), reference=ref)


def test_load_model_hf_folder_full_clip_checkpoint(tmp_path, single_thread):
    import transformers as tf

    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=32)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, intermediate_size=64)
    clip = tf.CLIPModel(
        tf.CLIPConfig(vision_config={**vision, "intermediate_size": 64}, text_config=text, projection_dim=24)
    )
    clip.eval().save_pretrained(tmp_path / "clip")
    loaded = load_model(f"hf:{tmp_path / 'clip'}")
    assert type(loaded.model).__name__ == "CLIPVisionModelWithProjection" and loaded.tokenizer is None
    x = hf_images(n=2)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=x)
        expected = getattr(expected, "pooler_output", expected)
        encoder = adapt(loaded.model)
        assert rel_err(encoder(x), expected) <= 1e-5
    from PIL import Image

    image = loaded.preprocess(Image.new("RGB", (40, 50), (120, 30, 200)))
    assert image.shape == (3, 32, 32)
    loaded = load_model(f"hf:{tmp_path / 'clip'}", feature_layer=-2)
    assert adapt(loaded.model).num_blocks == 1
    with pytest.raises(ValueError, match="transformers towers"):
        load_model("regcache-tiny-vit", feature_layer=-2)


def test_load_model_hf_offline_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"hf download openai/clip-vit-large-patch14-336.*hf:/path"):
        load_model("hf:openai/clip-vit-large-patch14-336")
    assert time.monotonic() - start < 15
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(f"hf:{tmp_path / 'missing'}")


def test_plain_float_pass_sees_the_full_grid_under_drop_mode(single_thread):
    encoder = _with_outliers("siglip2")
    install_deletion(encoder, 1, 3)
    x = hf_images(n=2)
    with plain_float(encoder):
        _, tokens, positions = encode_patch_tokens(encoder, x)
    assert positions is None and tokens.shape[1] == 16
