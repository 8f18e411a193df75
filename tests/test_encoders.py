"""The adapted encoder reproduces the original model for every family (float mode)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, encode, images, make_model, rel_err

from regcache.encoders import ADAPTERS, AttentionPrefix, VisionEncoder, adapt, record


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_matches_original(family):
    model = make_model(family)
    reference = copy.deepcopy(model)
    x = images(family)
    encoder = adapt(model)
    assert isinstance(encoder, VisionEncoder)
    with torch.no_grad():
        expected = encode(reference, x)
        assert rel_err(encoder(x), expected) <= 1e-5
        if hasattr(model, "encode_image"):  # open_clip models keep working through their own API
            assert rel_err(model.encode_image(x), expected) <= 1e-5


@pytest.mark.parametrize("family", ["clip", "openclip", "siglip"])
def test_text_tower_untouched(family):
    import open_clip

    model = make_model(family)
    reference = copy.deepcopy(model)
    adapt(model)
    tokens = open_clip.tokenize(["a photo of a cat", "a dog"], context_length=16)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))
    assert isinstance(model.visual, VisionEncoder)


def test_every_family_has_an_adapter():
    assert {"open_clip", "timm", "open_clip_timm"} <= set(ADAPTERS)
    with pytest.raises(TypeError, match="no encoder adapter"):
        adapt(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_blocks_split_equals_full(family):
    encoder = adapt(make_model(family))
    x = images(family)
    with torch.no_grad():
        tokens = encoder.embed(x)
        mid = encoder.forward_blocks(tokens, 0, 2)
        assert torch.allclose(encoder.pool(encoder.forward_blocks(mid, 2)), encoder(x), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_record_taps(family):
    encoder = adapt(make_model(family))
    x = images(family, n=2)
    with torch.no_grad(), record(encoder, ("block_input", "fc2_input", "attn_probs")) as taps:
        encoder(x)
        block0_input = encoder.embed(x)
    n_tokens = block0_input.shape[1]
    assert torch.allclose(taps["block_input"][0], block0_input)
    assert taps["fc2_input"][1].shape[-1] == encoder.blocks[1].mlp.fc2.in_features
    probs = taps["attn_probs"][2]
    assert probs.shape == (2, encoder.blocks[2].attn.num_heads, n_tokens, n_tokens)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert encoder.num_prefix_tokens == {"clip": 1, "openclip": 1, "siglip": 0, "dinov2": 5}[family]


def _explicit_prefix_attention(attn, x, keys, values, copies):
    """Reference: concatenate `copies` literal copies of the register K/V before the tokens' K/V."""
    q, k, v = attn.project_qkv(x)
    k_all = torch.cat([keys.expand(x.shape[0], -1, -1, -1).repeat_interleave(copies, dim=2), k], dim=2)
    v_all = torch.cat([values.expand(x.shape[0], -1, -1, -1).repeat_interleave(copies, dim=2), v], dim=2)
    p = (q @ k_all.transpose(-2, -1) * attn.scale).softmax(-1)
    out = (p @ v_all).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    return attn.proj(attn.out_norm(out))


@pytest.mark.parametrize("tau", [1, 3, 15])
def test_prefix_log_tau_equals_tau_copies(tau):
    encoder = adapt(make_model("openclip"))
    attn = encoder.blocks[1].attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, encoder.width, generator=g)
    keys = torch.randn(1, attn.num_heads, 1, attn.head_dim, generator=g) * 3
    values = torch.randn(1, attn.num_heads, 1, attn.head_dim, generator=g)
    attn.prefix = AttentionPrefix(keys, values, torch.full((1, 1, 1, 1), float(torch.log(torch.tensor(tau)))))
    with torch.no_grad():
        got = attn(x)
        expected = _explicit_prefix_attention(attn, x, keys, values, tau)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_no_prefix_is_bit_identical():
    model = make_model("clip")
    reference = copy.deepcopy(model)
    encoder = adapt(model)
    x = images("clip")
    with torch.no_grad():
        before = encoder(x)
        for block in encoder.blocks:
            block.attn.prefix = None
            block.input_filter = None
        assert torch.equal(encoder(x), before)
        assert rel_err(before, encode(reference, x)) <= 1e-5
