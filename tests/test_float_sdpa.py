"""Float attention runs through scaled_dot_product_attention; anything quantized or hooked keeps the explicit path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regcache.encoders.base as base
from regcache.encoders.base import Attention, AttentionPrefix
from regcache.kernels import kernel_config
from regcache.quant import UniformQuantizer


def _attention(heads: int = 3, head_dim: int = 8) -> Attention:
    torch.manual_seed(0)
    return Attention(
        nn.Linear(heads * head_dim, 3 * heads * head_dim), nn.Linear(heads * head_dim, heads * head_dim), heads
    )


def _explicit(attn: Attention, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with kernel_config(float_sdpa=False):
        return attn(x)


@pytest.mark.parametrize("prefix", ["none", "tau", "per-sample tau", "no tau"])
def test_sdpa_matches_the_explicit_float_attention(monkeypatch, prefix):
    """Same function, fp32, with and without a prefix (ln τ as an additive mask), to float rounding."""
    attn = _attention()
    x = torch.randn(2, 7, 24)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)
    if prefix == "tau":
        attn.prefix = AttentionPrefix(keys, values, torch.full((1, 1, 1, 1), math.log(4.0)))
    elif prefix == "per-sample tau":
        lm = torch.log(torch.tensor([[1.0, 3.0], [2.0, 5.0]])).view(2, 1, 1, 2)
        attn.prefix = AttentionPrefix(keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1), lm)
    elif prefix == "no tau":
        attn.prefix = AttentionPrefix(keys, values)
    calls = _spy_sdpa(monkeypatch)
    with torch.no_grad():
        fast = attn(x)
        assert len(calls) == 1
        slow = _explicit(attn, x, monkeypatch)
        assert len(calls) == 1  # the explicit run did not go through SDPA
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_quantizers_and_hooks_keep_the_explicit_path(monkeypatch):
    """A quantizer in quant or observe mode, or a hook on the probabilities, needs the explicit softmax."""
    attn = _attention()
    x = torch.randn(2, 7, 24)
    calls = _spy_sdpa(monkeypatch)
    q = UniformQuantizer(8, symmetric=False)
    attn.matmul_pv.a_quantizer = q
    with torch.no_grad():
        q.set_mode("observe")
        attn(x)
        q.finalize()
        q.set_mode("quant")
        attn(x)
        assert calls == []
        q.set_mode("float")
        attn(x)
        assert len(calls) == 1
        seen = []
        handle = attn.tap_probs.register_forward_hook(lambda m, i, o: seen.append(o))
        attn(x)
        handle.remove()
    assert len(calls) == 1 and len(seen) == 1


def _spy_sdpa(monkeypatch) -> list:
    """Record the attn_mask of every SDPA call made by the encoder module (one entry per call)."""
    masks, sdpa = [], base.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(base.F, "scaled_dot_product_attention", spy)
    return masks


def _duplicated_by_hand(attn: Attention, x: torch.Tensor, keys, values, taus) -> torch.Tensor:
    """The attention over [τ physical copies of every prefix entry; tokens], written out with softmax."""
    b, n, _ = x.shape
    q, k, v = attn.project_qkv(x)
    pk = torch.cat([keys[:, :, i : i + 1].expand(b, -1, t, -1) for i, t in enumerate(taus)], dim=-2)
    pv = torch.cat([values[:, :, i : i + 1].expand(b, -1, t, -1) for i, t in enumerate(taus)], dim=-2)
    probs = ((q @ torch.cat([pk, k], -2).transpose(-2, -1)) * attn.scale).softmax(-1)
    out = (probs @ torch.cat([pv, v], -2)).transpose(1, 2).reshape(b, n, -1)
    return attn.proj(attn.out_norm(out))


@pytest.mark.parametrize("taus", [(3, 3), (1, 4), (1, 1)])
def test_integer_multiplicity_repeats_keys_without_a_mask(monkeypatch, taus):
    """Host τ: SDPA gets τ copies of each entry and no mask; equal to the explicit path and to real copies."""
    attn = _attention().double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 3, 2, 8, generator=g, dtype=torch.float64)
    values = torch.randn(1, 3, 2, 8, generator=g, dtype=torch.float64)
    lm = torch.log(torch.tensor(taus, dtype=torch.float64)).view(1, 1, 1, 2)
    attn.prefix = AttentionPrefix(keys, values, lm, taus)
    masks = _spy_sdpa(monkeypatch)
    with torch.no_grad():
        fast = attn(x)
        assert masks == [None]
        slow = _explicit(attn, x, monkeypatch)
        by_hand = _duplicated_by_hand(attn, x, keys, values, taus)
        q, k, v = attn.project_qkv(x)
        explicit_attend = attn._forward_with_prefix(q, k, v, attn.prefix)
        assert len(masks) == 1
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, by_hand, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn.attend(q, k, v), explicit_attend, rtol=1e-10, atol=1e-10)


def test_float32_repeated_keys_match_the_explicit_path(monkeypatch):
    """The same in float32, to float rounding."""
    attn = _attention()
    x = torch.randn(3, 9, 24)
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 3, 2, 8, generator=g) * 3, torch.randn(1, 3, 2, 8, generator=g)
    attn.prefix = AttentionPrefix(keys, values, torch.full((1, 1, 1, 1), math.log(3.0)), (3, 3))
    masks = _spy_sdpa(monkeypatch)
    with torch.no_grad():
        fast = attn(x)
        slow = _explicit(attn, x, monkeypatch)
        by_hand = _duplicated_by_hand(attn, x, keys, values, (3, 3))
    assert masks == [None]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["no host tau", "per-sample", "over the threshold"])
def test_the_mask_stays_where_entries_cannot_be_repeated(monkeypatch, case):
    """Without host τ, with per-sample entries (P = batch) or too many copies, SDPA keeps the ln τ mask."""
    attn = _attention()
    x = torch.randn(2, 7, 24)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 3, 1, 8, generator=g), torch.randn(1, 3, 1, 8, generator=g)
    if case == "no host tau":
        attn.prefix = AttentionPrefix(keys, values, torch.full((1, 1, 1, 1), math.log(4.0)))
    elif case == "per-sample":
        lm = torch.full((2, 1, 1, 1), math.log(4.0))
        attn.prefix = AttentionPrefix(keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1), lm, (4,))
    else:
        tau = base._MAX_EXTRA_REPEATED_KEYS + 2
        attn.prefix = AttentionPrefix(keys, values, torch.full((1, 1, 1, 1), math.log(tau)), (tau,))
    masks = _spy_sdpa(monkeypatch)
    with torch.no_grad():
        fast = attn(x)
        slow = _explicit(attn, x, monkeypatch)
    assert len(masks) == 1 and masks[0] is not None
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_threshold_counts_extra_keys():
    """Exactly _MAX_EXTRA_REPEATED_KEYS extra copies still repeat; one more keeps the mask."""
    keys = torch.zeros(1, 1, 2, 4)
    lm = torch.zeros(1, 1, 1, 2)
    limit = base._MAX_EXTRA_REPEATED_KEYS
    at = (1, limit + 1)
    assert AttentionPrefix(keys, keys, lm, at).repeated_entries() == at
    assert AttentionPrefix(keys, keys, lm, (2, limit + 1)).repeated_entries() is None


def test_multiplicity_is_checked():
    """One τ >= 1 per entry, and τ > 1 only alongside its ln τ (the explicit paths read that)."""
    keys = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError):
        AttentionPrefix(keys, keys, torch.zeros(1, 1, 1, 1), (2,))
    with pytest.raises(ValueError):
        AttentionPrefix(keys, keys, torch.zeros(1, 1, 1, 1), (0, 2))
    with pytest.raises(ValueError):
        AttentionPrefix(keys, keys, None, (1, 2))
    assert AttentionPrefix(keys, keys, None, (1, 1)).multiplicity == (1, 1)


def _tiny_cache():
    from conftest import make_model

    from regcache.encoders import adapt
    from regcache.registers import Candidates, derive_cache

    encoder = adapt(make_model("openclip"))
    g = torch.Generator().manual_seed(5)
    n = 2
    c = Candidates(
        torch.randn(n, encoder.width, generator=g) * 4,
        torch.ones(n),
        torch.arange(n),
        torch.ones(n, dtype=torch.long),
        torch.full((n,), 1),
    )
    return encoder, derive_cache(encoder, c, 1)


def test_register_cache_prefix_carries_host_multiplicity():
    """RegisterCache.prefix(layer, τ) gives (τ,) * n on the host, agreeing with ln τ; .to() keeps it."""
    _, cache = _tiny_cache()
    prefix = cache.prefix(1, 3)
    assert prefix.multiplicity == (3, 3)
    assert torch.allclose(prefix.entry_log_multiplicity().exp(), torch.full((1, 1, 1, 2), 3.0))
    moved = prefix.to(dtype=torch.float64)
    assert moved.keys.dtype == torch.float64 and moved.multiplicity == (3, 3)


def test_installed_float_prefixes_take_the_right_sdpa_path(monkeypatch):
    """A float encoder: install_prefix repeats keys (no mask); install_batched_prefix (per-sample τ) masks;
    both equal the explicit attention."""
    from conftest import images

    from regcache.registers import install_batched_prefix, install_prefix

    encoder, cache = _tiny_cache()
    x = images("openclip", 2)
    masks = _spy_sdpa(monkeypatch)
    with torch.no_grad():
        install_prefix(encoder, cache, 3)
        fast = encoder(x)
        assert masks and all(m is None for m in masks)
        slow = _explicit(encoder, x, monkeypatch)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)

        masks.clear()
        configs = [(0, 2), (1, 5)]
        install_batched_prefix(encoder, [cache.entry(r) for r, _ in configs], [t for _, t in configs], repeat=2)
        assert all(b.attn.prefix.multiplicity is None for b in encoder.blocks[1:])
        xb = x.repeat(len(configs), 1, 1, 1)
        fast = encoder(xb)
        n_prefixed = sum(b.attn.prefix is not None for b in encoder.blocks)
        assert sum(m is not None for m in masks) == n_prefixed
        slow = _explicit(encoder, xb, monkeypatch)
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
        for p, (r, tau) in enumerate(configs):  # and each configuration alone (repeated keys) agrees
            install_prefix(encoder, cache.entry(r), tau)
            torch.testing.assert_close(fast[2 * p : 2 * p + 2], encoder(x), rtol=1e-4, atol=1e-5)
