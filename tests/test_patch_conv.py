"""The ViT stem as a matmul over patches (PatchConv2d) against the convolution it replaces."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, images, make_model
from torch import nn
from torch.nn import functional as F

from regcache.encoders import adapt
from regcache.quant.modules import PatchConv2d, QuantConv2d, patchify_conv2d
from regcache.quant.quantizers import UniformQuantizer


@pytest.mark.parametrize(
    ("size", "patch", "bias"),
    [((32, 32), 8, True), ((30, 27), 8, False), ((16, 24), (4, 6), True)],  # exact, trailing pixels, non-square
)
def test_patchify_equals_conv2d(size, patch, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 10, patch, stride=patch, bias=bias).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    out = patchify_conv2d(conv, x, conv.weight, conv.bias)
    ref = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # tokens: the (B, O, h, w) result flattens into (B, h·w, O) with no copy
    tokens = out.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "stride": 1},
        {"kernel_size": 4, "stride": 4, "padding": 1},
        {"kernel_size": 4, "stride": 4, "dilation": 2},
        {"kernel_size": 4, "stride": 4, "groups": 3},
        {"kernel_size": 4, "stride": 2},
    ],
)
def test_other_convs_keep_the_convolution(kwargs, matmul_on_cpu):
    torch.manual_seed(0)
    conv = PatchConv2d(3, 6, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    assert patchify_conv2d(conv, x, conv.weight, conv.bias) is None
    torch.testing.assert_close(
        conv(x), F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    )
    assert len(matmul_on_cpu) == 1  # the forward asked for the patch path and fell back to the convolution


@pytest.fixture
def matmul_on_cpu(monkeypatch):
    """PatchConv2d's matmul path on CPU too (it is CUDA-only by default); yields a list of its calls."""
    from regcache.quant import modules

    calls = []
    real = modules.patchify_conv2d
    monkeypatch.setattr(modules, "patchify_conv2d", lambda *a: calls.append(a[1].shape) or real(*a))
    monkeypatch.setattr(PatchConv2d, "matmul_devices", ("cpu", "cuda"))
    return calls


def test_quant_conv_uses_the_patch_path_with_quantized_operands(matmul_on_cpu):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    q = QuantConv2d.from_conv(conv)
    q.input_quantizer = UniformQuantizer(8, symmetric=False).calibrate_(torch.randn(2, 3, 16, 16))
    q.weight_quantizer = UniformQuantizer(8, granularity="channel").calibrate_(conv.weight.detach())
    for m in (q.input_quantizer, q.weight_quantizer):
        m.set_mode("quant")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = F.conv2d(q.input_quantizer(x), q.weight_quantizer(conv.weight), conv.bias, stride=4)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
    assert len(matmul_on_cpu) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_stem_is_a_patch_conv(family, matmul_on_cpu):
    encoder = adapt(make_model(family))
    stem = encoder.conv1 if hasattr(encoder, "conv1") else encoder.trunk.patch_embed.proj
    assert type(stem) is PatchConv2d
    x = images(family, n=2)
    with torch.no_grad():  # the stem's output through the patch matmul equals the convolution's
        torch.testing.assert_close(stem(x), F.conv2d(x, stem.weight, stem.bias, stem.stride), rtol=1e-5, atol=1e-6)
    assert matmul_on_cpu == [x.shape]


def test_cpu_keeps_the_convolution_by_default():
    torch.manual_seed(0)
    conv = PatchConv2d(3, 8, 4, stride=4)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # bit for bit the convolution: CPU numbers stay those of the original model
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=4))
