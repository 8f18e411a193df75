"""Float attention runs through scaled_dot_product_attention; anything quantized or hooked keeps the explicit path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import regcache.encoders.base as base
from regcache.encoders.base import Attention, AttentionPrefix
from regcache.quant import UniformQuantizer


def _attention(heads: int = 3, head_dim: int = 8) -> Attention:
    torch.manual_seed(0)
    return Attention(
        nn.Linear(heads * head_dim, 3 * heads * head_dim), nn.Linear(heads * head_dim, heads * head_dim), heads
    )


def _explicit(attn: Attention, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(base, "_FLOAT_SDPA", False)
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
    calls = []
    monkeypatch.setattr(base.F, "scaled_dot_product_attention", _counting(base.F.scaled_dot_product_attention, calls))
    with torch.no_grad():
        fast = attn(x)
        assert len(calls) == 1
        slow = _explicit(attn, x, monkeypatch)
        assert len(calls) == 1  # the explicit run did not go through SDPA
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_quantizers_and_hooks_keep_the_explicit_path(monkeypatch):
    """A quantizer in quant or observe mode, or a hook on the probabilities, needs the explicit softmax."""
    attn = _attention()
    x = torch.randn(2, 7, 24)
    calls = []
    monkeypatch.setattr(base.F, "scaled_dot_product_attention", _counting(base.F.scaled_dot_product_attention, calls))
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
