"""Sensitivity sweep finds a planted outlier block; its shortcut equals a full forward; objectives; FLOP overhead."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import images, make_model
from torch import nn

from regcache.encoders import adapt, record
from regcache.quant import NaiveConfig, block_linears_and_matmuls, calibrate_, quantize_
from regcache.registers import (
    EmbeddingCosine,
    EmbeddingMSE,
    ZeroShotTop1,
    block_flops,
    regcache_flops,
    sensitivity_sweep,
    token_norm_profile,
)


class ChannelScale(nn.Module):
    """Multiplies one channel: planted in front of fc2, with fc2's column divided, so float is unchanged."""

    def __init__(self, channel: int, factor: float) -> None:
        super().__init__()
        self.channel, self.factor = channel, factor

    def forward(self, x):
        scale = torch.ones(x.shape[-1], dtype=x.dtype)
        scale[self.channel] = self.factor
        return x * scale


def _plant_outlier(encoder, layer, factor=1e4):
    mlp = encoder.blocks[layer].mlp
    mlp.norm = ChannelScale(5, factor)
    with torch.no_grad():
        mlp.fc2.weight[:, 5] /= factor


@pytest.mark.parametrize(("family", "layer"), [("openclip", 1), ("siglip", 2), ("dinov2", 0)])
def test_sweep_finds_planted_block(family, layer, tmp_path):
    encoder = adapt(make_model(family))
    x = images(family, 6)
    with torch.no_grad():
        before = encoder(x)
        _plant_outlier(encoder, layer)
        assert torch.allclose(encoder(x), before, atol=1e-4)  # the float model is unchanged
    calib = [images(family, 4, seed=2)]
    ref = [images(family, 3, seed=3), images(family, 3, seed=4)]
    result = sensitivity_sweep(encoder, NaiveConfig(8, 8), calib, ref, EmbeddingCosine(), progress=False)
    assert result.l_q == layer
    assert result.float_score == pytest.approx(1.0)
    assert len(result.table()) == encoder.num_blocks
    json_path, png_path = result.save(tmp_path)
    saved = json.loads(json_path.read_text())
    assert saved["l_q"] == layer and png_path.stat().st_size > 0
    assert saved["table"][0]["block"] == layer


def test_sweep_score_equals_full_forward_of_one_block_quantized():
    encoder = adapt(make_model("clip"))
    calib = [images("clip", 4, seed=2)]
    ref = [images("clip", 3, seed=3), images("clip", 2, seed=4)]
    result = sensitivity_sweep(encoder, NaiveConfig(6, 6), calib, ref, EmbeddingMSE(), progress=False)
    work = copy.deepcopy(encoder)
    only_block_2 = lambda m, n: n.startswith("blocks.2.") and block_linears_and_matmuls(m, n)  # noqa: E731
    quantize_(work, NaiveConfig(6, 6), filter_fn=only_block_2)
    with torch.no_grad():
        calibrate_(work, calib, progress=False)
        mse = float(torch.cat([(work(x) - encoder(x)).pow(2).mean(-1) for x in ref]).mean())
    assert result.scores[2] == pytest.approx(mse, rel=1e-4)
    assert result.drops[2] == pytest.approx(mse, rel=1e-4)
    # profile: max l-inf token norm at each block input, against a recorded forward
    with torch.no_grad(), record(encoder) as taps:
        maxima = [0.0] * encoder.num_blocks
        for x in ref:
            encoder(x)
            for layer, h in taps["block_input"].items():
                maxima[layer] = max(maxima[layer], float(h.abs().max()))
    assert result.profile["max_linf"] == pytest.approx(maxima)
    assert token_norm_profile(encoder, ref, progress=False)["max_linf"] == pytest.approx(maxima)


def test_zero_shot_objective_hand_example():
    classifier = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (D, C)
    emb = torch.tensor([[2.0, 1.0], [0.1, 3.0], [5.0, 4.0], [1.0, 2.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert ZeroShotTop1(labels, classifier)(emb, emb) == pytest.approx(75.0)


def test_flop_overhead_hand_count():
    encoder = adapt(make_model("openclip"))  # 3 blocks, width 64, 4 heads x 16, mlp 256
    n = 17

    def block(t):  # qkv + proj + fc1 + fc2, then Q·Kᵀ and P·V, counted as 2 x MACs
        return 2 * t * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) + 2 * 2 * t * t * 64

    assert block_flops(encoder, 0, n) == block(n)
    plain = 3 * block(n)
    out = regcache_flops(encoder, n, prefix_layers=[1, 2], num_entries=1, l_q=1, delete_k=2)
    prefix = 2 * (2 * 2 * (n - 2) * 1 * 64)  # logits + values for the 15 remaining tokens, blocks 1 and 2
    assert out["plain"] == plain
    assert out["prefix_added"] == prefix
    assert out["regcache"] == block(n) + 2 * block(n - 2) + prefix
    assert out["deletion_saved"] == 2 * (block(n) - block(n - 2))
    only_prefix = regcache_flops(encoder, n, prefix_layers=[1, 2])
    assert only_prefix["relative_added"] == pytest.approx(2 * 4 * n * 64 / plain)
