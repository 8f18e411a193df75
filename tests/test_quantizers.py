"""Quantizer math against hand-computed values."""

from __future__ import annotations

import itertools

import pytest
import torch

from regcache.quant import UniformQuantizer, round_ste
from regcache.quant.quantizers import quantization_error


def test_symmetric_per_tensor_hand_computed():
    x = torch.tensor([-1.0, 0.3, 0.5, 2.1])
    q = UniformQuantizer(4, symmetric=True).calibrate_(x)
    # absmax 2.1, qmax 7 → scale 0.3; x/scale = [-3.33, 1, 1.67, 7] → [-3, 1, 2, 7]
    assert q.scale.item() == pytest.approx(0.3)
    assert q.quantize_int(x).tolist() == [-3, 1, 2, 7]
    assert torch.allclose(q.fake_quant(x), torch.tensor([-0.9, 0.3, 0.6, 2.1]))
    # clamping: levels stop at -8 and 7
    assert q.quantize_int(torch.tensor([-10.0, 10.0])).tolist() == [-8, 7]
    assert torch.allclose(q.fake_quant(torch.tensor([-10.0, 10.0])), torch.tensor([-2.4, 2.1]))


def test_asymmetric_zero_point_hand_computed():
    x = torch.tensor([-1.0, 0.0, 0.4, 2.0])
    q = UniformQuantizer(2, symmetric=False).calibrate_(x)
    # range [-1, 2] over 3 steps → scale 1, zero point round(0 - (-1)/1) = 1, levels 0..3
    assert q.scale.item() == pytest.approx(1.0)
    assert q.zero_point.item() == 1
    assert q.quantize_int(x).tolist() == [0, 1, 1, 3]
    assert torch.allclose(q.fake_quant(x), torch.tensor([-1.0, 0.0, 0.0, 2.0]))
    assert torch.allclose(q.fake_quant(torch.tensor([-5.0, 7.0])), torch.tensor([-1.0, 2.0]))


def test_asymmetric_range_includes_zero():
    x = torch.tensor([1.0, 2.0, 4.0])  # all positive: range widened to [0, 4]
    q = UniformQuantizer(8, symmetric=False).calibrate_(x)
    assert q.zero_point.item() == 0
    assert q.scale.item() == pytest.approx(4.0 / 255)
    assert q.fake_quant(torch.zeros(1)).item() == 0.0


def test_per_channel_scales():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.5, 0.25, -0.1]])
    q = UniformQuantizer(8, symmetric=True, granularity="channel", axis=0).calibrate_(w)
    assert torch.allclose(q.scale, torch.tensor([2.0 / 127, 0.5 / 127]))
    expected = torch.round(w / q.scale[:, None]) * q.scale[:, None]
    assert torch.allclose(q.fake_quant(w), expected)
    # per-channel on the last axis of an activation (B, N, C)
    a = torch.randn(2, 5, 3)
    qa = UniformQuantizer(8, symmetric=True, granularity="channel", axis=-1).calibrate_(a)
    assert torch.allclose(qa.scale, a.abs().amax(dim=(0, 1)) / 127)


def test_per_group_scales():
    w = torch.tensor([[1.2, -2.0, 4.0, 0.5]])
    q = UniformQuantizer(4, symmetric=True, granularity="group", group_size=2).calibrate_(w)
    assert torch.allclose(q.scale, torch.tensor([[2.0 / 7, 4.0 / 7]]))
    expected = torch.tensor([[4 * 2 / 7, -2.0, 4.0, 1 * 4 / 7]])  # 1.2/(2/7) = 4.2 → 4; 0.5/(4/7) = 0.875 → 1
    assert torch.allclose(q.fake_quant(w), expected)


def test_straight_through_gradient():
    x = torch.tensor([0.26, 0.74], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]
    q = UniformQuantizer(4, symmetric=True).calibrate_(torch.tensor([-1.0, 1.0]))
    y = torch.tensor([0.3, 5.0, -5.0], requires_grad=True)
    q.fake_quant(y).sum().backward()
    assert y.grad.tolist() == [1.0, 0.0, 0.0]  # clamped values get no gradient


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_error_shrinks_with_bits(symmetric, granularity):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errors = [
        quantization_error(x, UniformQuantizer(b, symmetric=symmetric, granularity=granularity).calibrate_(x))
        for b in range(2, 9)
    ]
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.01


def test_modes_and_observer():
    q = UniformQuantizer(8, symmetric=False)
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="no quantization parameters"):
        q.set_mode("quant")
    q.set_mode("observe")
    assert torch.equal(q(x), x)
    q(torch.tensor([5.0, -3.0]))
    assert q.max_val.item() == 5.0 and q.min_val.item() == -3.0
    q.finalize()
    q.set_mode("quant")
    assert q.scale.item() == pytest.approx(8.0 / 255)
    q.set_mode("float")
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError, match="unknown quantizer mode"):
        q.set_mode("int8")


def test_state_dict_roundtrip_resizes_buffers():
    a = UniformQuantizer(6, granularity="channel", axis=0).calibrate_(torch.randn(4, 3))
    b = UniformQuantizer(6, granularity="channel", axis=0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scale, b.scale) and b.is_calibrated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_tensor_observe_reduces_before_the_cast(dtype):
    """One aminmax pass on x in its own dtype: the same float32 range as reducing x.float()."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, 6, generator=g) * 3 + i).to(dtype) for i in range(3)]
    q = UniformQuantizer(8, symmetric=False)
    for x in batches:
        q.observe(x)
    ref = torch.cat([x.float().flatten() for x in batches])
    assert q.min_val.dtype == q.max_val.dtype == torch.float32
    assert torch.equal(q.min_val, ref.amin()) and torch.equal(q.max_val, ref.amax())


def test_finalize_all_equals_finalize_bit_for_bit():
    from regcache.quant.quantizers import finalize_all

    g = torch.Generator().manual_seed(1)

    def observed():
        qs = [UniformQuantizer(b, symmetric=s) for b in (4, 6, 8) for s in (True, False) for _ in range(3)]
        qs.append(UniformQuantizer(8, granularity="channel", axis=0))  # not per tensor: its own finalize
        return qs

    xs = [
        torch.randn(7, 9, generator=g) * torch.rand(1, generator=g) * 10 + torch.randn(1, generator=g)
        for _ in range(19)
    ]
    xs[0] = torch.zeros(7, 9)  # all-zero range: the eps clamp
    one, together = observed(), observed()
    for a, b, x in zip(one, together, xs, strict=True):
        a.observe(x)
        b.observe(x)
    for q in one:
        q.finalize()
    finalize_all(together)
    for a, b in zip(one, together, strict=True):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
        assert a.scale.shape == b.scale.shape and b.scale.untyped_storage().nbytes() == b.scale.numel() * 4
