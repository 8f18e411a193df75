"""Token deletion on hand-built inputs and through every pooling head; prefix install / τ = 0; batched prefixes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, images, make_model

from regcache.encoders import adapt
from regcache.quant import NaiveConfig, calibrate_, quantize_
from regcache.registers import (
    Candidates,
    TokenDeletion,
    derive_cache,
    install_batched_prefix,
    install_deletion,
    install_prefix,
    remove_prefix,
)


def test_deletion_hand_built():
    x = torch.zeros(2, 6, 3)
    x[:, :, 0] = torch.arange(6.0)  # token t has l-inf norm t, in both images
    x[0, 0] = 100.0  # a huge CLS must survive
    x[0, 3, 2] = -50.0  # image 0: token 3 is the biggest patch (by |.|), then 5, 4
    x[1, 2, 1] = 40.0  # image 1: token 2 is the biggest patch, then 5, 4
    out = TokenDeletion(2, num_prefix_tokens=1)(x)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[0], x[0, [0, 1, 2, 4]])
    assert torch.equal(out[1], x[1, [0, 1, 3, 4]])
    assert torch.equal(TokenDeletion(0, 1)(x), x)


def test_deletion_without_prefix_tokens():
    x = torch.tensor([[[1.0], [-9.0], [3.0], [2.0]]])
    assert torch.equal(TokenDeletion(1, num_prefix_tokens=0)(x), torch.tensor([[[1.0], [3.0], [2.0]]]))
    assert torch.equal(TokenDeletion(1, num_prefix_tokens=2)(x), torch.tensor([[[1.0], [-9.0], [2.0]]]))


def _delete_by_hand(h: torch.Tensor, k: int, npre: int) -> torch.Tensor:
    rows = []
    for img in h:
        norms = [float(t.abs().max()) for t in img[npre:]]
        drop = {npre + i for i in sorted(range(len(norms)), key=lambda i: -norms[i])[:k]}
        rows.append(torch.stack([t for i, t in enumerate(img) if i not in drop]))
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_deletion_in_model_every_pooling(family):
    encoder = adapt(make_model(family))
    x = images(family, 3)
    with torch.no_grad():
        h = encoder.forward_blocks(encoder.embed(x), 0, 1)
        expected = encoder.pool(encoder.forward_blocks(_delete_by_hand(h, 3, encoder.num_prefix_tokens), 1))
        install_deletion(encoder, 1, 3)
        got = encoder(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_deletion_with_mean_pooling_averages_remaining_patches():
    encoder = adapt(make_model("openclip"))
    encoder.pool_type = "avg"
    x = images("openclip", 2)
    with torch.no_grad():
        kept = _delete_by_hand(encoder.forward_blocks(encoder.embed(x), 0, 2), 4, 1)
        tokens = encoder.forward_blocks(kept, 2)
        expected = encoder.ln_post(tokens)[:, 1:].mean(dim=1) @ encoder.proj.weight.T
        install_deletion(encoder, 2, 4)
        got = encoder(x)
    assert kept.shape[1] == 17 - 4
    assert torch.allclose(got, expected, atol=1e-5)


def _quantized(family="openclip"):
    encoder = adapt(make_model(family))
    float_encoder = copy.deepcopy(encoder)
    quantize_(encoder, NaiveConfig(8, 8))
    calibrate_(encoder, [images(family, 4, seed=3)], progress=False)
    return float_encoder, encoder


def _cache(float_encoder, l_start, n=3):
    g = torch.Generator().manual_seed(5)
    c = Candidates(
        torch.randn(n, float_encoder.width, generator=g) * 4,
        torch.ones(n),
        torch.arange(n),
        torch.ones(n, dtype=torch.long),
        torch.full((n,), l_start),
    )
    return derive_cache(float_encoder, c, l_start)


def test_tau_zero_is_bit_identical_to_plain_quantized():
    float_encoder, encoder = _quantized()
    x = images("openclip", 3)
    cache = _cache(float_encoder, 1, n=1)
    with torch.no_grad():
        plain = encoder(x)
        assert install_prefix(encoder, cache, 0) == []
        assert torch.equal(encoder(x), plain)
        assert install_prefix(encoder, cache, 3) == [1, 2]
        with_prefix = encoder(x)
        install_prefix(encoder, cache, 0)  # τ = 0 removes what was there
        install_deletion(encoder, 1, 0)
        again = encoder(x)
    assert not torch.allclose(with_prefix, plain)
    assert torch.equal(again, plain)
    assert all(b.attn.prefix is None and b.input_filter is None for b in encoder.blocks)


def test_prefix_only_at_one_block():
    float_encoder, encoder = _quantized()
    cache = _cache(float_encoder, 1, n=1)
    assert install_prefix(encoder, cache, 2, only=2) == [2]
    assert encoder.blocks[1].attn.prefix is None and encoder.blocks[2].attn.prefix is not None
    with pytest.raises(ValueError):
        install_prefix(encoder, cache, 2, only=0)


def test_batched_prefixes_equal_one_configuration_at_a_time():
    float_encoder, encoder = _quantized()
    cache = _cache(float_encoder, 1, n=3)
    x = images("openclip", 2)
    configs = [(0, 1), (1, 4), (2, 15), (0, 7)]
    with torch.no_grad():
        expected = []
        for r, tau in configs:
            install_prefix(encoder, cache.entry(r), tau)
            expected.append(encoder(x))
        install_batched_prefix(encoder, [cache.entry(r) for r, _ in configs], [t for _, t in configs], repeat=2)
        got = encoder(x.repeat(len(configs), 1, 1, 1)).view(len(configs), 2, -1)
        remove_prefix(encoder)
    for p in range(len(configs)):
        assert torch.allclose(got[p], expected[p], atol=1e-5)
