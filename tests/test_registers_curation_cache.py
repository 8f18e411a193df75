"""Curation against a brute-force pass; register caches against manual forwards; save / load / refusal."""

from __future__ import annotations

import pytest
import torch
from conftest import images, make_model
from torch.nn import functional as F

from regcache.encoders import adapt, record
from regcache.registers import Candidates, RegisterCache, curate_candidates, derive_cache


def _pool(family, batches=3, size=4):
    return [images(family, size, seed=10 + i) for i in range(batches)]


def _brute_force(encoder, pool, layer, k):
    """Every non-prefix token of every image at the input of `layer`, top-k by l-inf norm."""
    rows = []
    image_id = 0
    with torch.no_grad(), record(encoder, ("block_input",), blocks=[layer]) as taps:
        for x in pool:
            encoder(x)
            h = taps["block_input"][layer]
            for b in range(h.shape[0]):
                for t in range(encoder.num_prefix_tokens, h.shape[1]):
                    rows.append((float(h[b, t].abs().max()), image_id + b, t, h[b, t].clone()))
            image_id += h.shape[0]
    return sorted(rows, key=lambda r: -r[0])[:k]


@pytest.mark.parametrize("family", ["openclip", "siglip", "dinov2"])
def test_curation_equals_brute_force(family):
    encoder = adapt(make_model(family))
    pool = _pool(family)
    got = curate_candidates(encoder, pool, layers=[1, 2], k=7, progress=False)
    assert len(got) == 14
    for layer in (1, 2):
        expected = _brute_force(encoder, pool, layer, 7)
        sel = got.layer == layer
        assert got.image_index[sel].tolist() == [r[1] for r in expected]
        assert got.token_index[sel].tolist() == [r[2] for r in expected]
        assert torch.allclose(got.norms[sel], torch.tensor([r[0] for r in expected]))
        assert torch.allclose(got.vectors[sel], torch.stack([r[3] for r in expected]))
    assert got.token_index.min() >= encoder.num_prefix_tokens


def test_curation_runs_only_the_needed_blocks():
    encoder = adapt(make_model("openclip"))

    def fail(*_):
        raise AssertionError("block 1 must not run when curating at its input")

    encoder.blocks[1].register_forward_pre_hook(fail)
    got = curate_candidates(encoder, _pool("openclip", 2), layers=1, k=3, progress=False)
    assert got.layer.tolist() == [1, 1, 1]


def _candidates(encoder, n=3, layer=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Candidates(
        torch.randn(n, encoder.width, generator=g) * 3,
        torch.rand(n, generator=g),
        torch.arange(n),
        torch.arange(n) + 1,
        torch.full((n,), layer),
    )


def _manual_one_token(encoder, z, l_start):
    """K, V per block of the one-token sequence [z], written out with explicit weights."""
    out = {}
    x = z.view(1, 1, -1)
    for layer in range(l_start, encoder.num_blocks):
        block = encoder.blocks[layer]
        attn = block.attn
        h, d = attn.num_heads, attn.head_dim
        qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)[0, 0]
        k = attn.k_norm(qkv[h * d : 2 * h * d].view(h, 1, d))
        v = qkv[2 * h * d :].view(h, 1, d)
        out[layer] = (k, v)
        # one token attends only to itself: the attention output is its own value
        x = x + block.ls1(attn.proj(attn.out_norm(v.reshape(1, 1, h * d))))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return out


@pytest.mark.parametrize("family", ["clip", "siglip", "dinov2"])
def test_propagate_equals_manual_forward(family):
    encoder = adapt(make_model(family))
    cand = _candidates(encoder)
    with torch.no_grad():
        cache = derive_cache(encoder, cand, l_start=1)
        assert cache.layers == list(range(1, encoder.num_blocks)) and cache.num_entries == 3
        for i in range(3):
            expected = _manual_one_token(encoder, cand.vectors[i], 1)
            entry = cache.entry(i)
            for layer, (k, v) in expected.items():
                assert torch.allclose(entry.keys[layer], k, atol=1e-5)
                assert torch.allclose(entry.values[layer], v, atol=1e-5)


def test_in_context_reads_kv_of_source_token():
    encoder = adapt(make_model("openclip"))
    src = images("openclip", 2, seed=4)
    cand = Candidates(torch.zeros(2, 64), torch.ones(2), torch.arange(2), torch.tensor([3, 9]), torch.ones(2))
    seen = {}

    def grab(layer):
        def hook(module, inputs):
            seen[layer] = module.project_qkv(inputs[0])

        return hook

    for layer in (1, 2):
        encoder.blocks[layer].attn.register_forward_pre_hook(grab(layer))
    with torch.no_grad():
        encoder(src)
        cache = derive_cache(encoder, cand, 1, "in_context", source_images=src)
        avg = derive_cache(encoder, cand, 1, "in_context", source_images=src, average=True)
    for layer in (1, 2):
        _, k, v = seen[layer]
        assert torch.allclose(cache.keys[layer][:, 0], k[0, :, 3], atol=1e-6)
        assert torch.allclose(cache.values[layer][:, 1], v[1, :, 9], atol=1e-6)
        assert avg.num_entries == 1
        assert torch.allclose(avg.keys[layer][:, 0], (k[0, :, 3] + k[1, :, 9]) / 2, atol=1e-6)


def test_cache_save_load_and_refusal(tmp_path):
    encoder = adapt(make_model("openclip"))
    cache = derive_cache(encoder, _candidates(encoder), 1, model_name="tiny-openclip")
    path = cache.save(tmp_path / "registers.safetensors")
    loaded = RegisterCache.load(path, encoder)
    assert loaded.layers == cache.layers and loaded.l_start == 1 and loaded.derivation == "propagate"
    assert loaded.provenance == cache.provenance and loaded.model_name == "tiny-openclip"
    for layer in cache.layers:
        assert torch.equal(loaded.keys[layer], cache.keys[layer])
        assert torch.equal(loaded.values[layer], cache.values[layer])
    other = adapt(make_model("openclip", seed=1))
    with pytest.raises(ValueError, match="fingerprint"):
        RegisterCache.load(path, other)


def test_cache_to_moves_keys_and_values_and_keeps_metadata():
    encoder = adapt(make_model("openclip"))
    cache = derive_cache(encoder, _candidates(encoder), 1, model_name="tiny-openclip")
    moved = cache.to("meta")
    assert moved.metadata() == cache.metadata()
    for layer in cache.layers:
        assert moved.keys[layer].is_meta and moved.values[layer].is_meta
        assert moved.keys[layer].shape == cache.keys[layer].shape and not cache.keys[layer].is_meta
