"""Acceptance of the embedded outlier testbed (docs: testbed.md), on the committed weights and samples."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from regcache.encoders import AttentionPrefix, adapt, record
from regcache.quant import NaiveConfig, calibrate_, quantize_
from regcache.quant.modules import MatMul
from regcache.testbed import (
    CIFAR10_SAMPLE,
    IMAGENET_SAMPLE,
    WEIGHTS_PATH,
    load_split,
    load_testbed,
    loaded_spec,
    read_lines,
)
from regcache.testbed.data import iter_shard_samples
from regcache.testbed.diagnostics import block_outputs

QUICK = 250  # test images for the quantized runs (CPU time)
OUTLIER_FACTOR = 5.0  # a token is an outlier when its norm exceeds 5x the image's median token norm


@pytest.fixture(scope="module")
def spec():
    return loaded_spec()


@pytest.fixture(scope="module")
def loaded():
    return load_testbed()


@pytest.fixture(scope="module")
def test_set(loaded):
    x, y, _ = load_split(CIFAR10_SAMPLE, "test", loaded.preprocess)
    return x, y


@pytest.fixture(scope="module")
def calib(loaded):
    x, _, _ = load_split(CIFAR10_SAMPLE, "train", loaded.preprocess, limit=128)
    return x


@pytest.fixture(scope="module")
def classifier(loaded):
    """Zero-shot classifier: templates x class names -> normalized mean text embedding per class."""
    names = read_lines(CIFAR10_SAMPLE / "classnames.txt")
    templates = read_lines(CIFAR10_SAMPLE / "zeroshot_classification_templates.txt")
    with torch.no_grad():
        cols = []
        for c in names:
            emb = loaded.model.encode_text(loaded.tokenizer([t.replace("{c}", c) for t in templates]))
            cols.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(cols, dim=1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classifier: torch.Tensor) -> float:
    with torch.no_grad():
        feats = torch.cat([model.encode_image(x[i : i + 250]) for i in range(0, len(x), 250)])
    return (F.normalize(feats, dim=-1) @ classifier).argmax(-1).eq(y).float().mean().item()


def outlier_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) mask of patch tokens (CLS excluded) with norm > OUTLIER_FACTOR x the image's median."""
    norms = tokens.norm(dim=-1)
    mask = norms > OUTLIER_FACTOR * norms[:, 1:].median(dim=1, keepdim=True).values
    mask[:, 0] = False
    return mask


class DropTopLinf(nn.Module):
    """Delete the k patch tokens of largest l-inf norm per image (CLS kept)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 1:]
        keep = patches.abs().amax(-1).argsort(dim=1, descending=True)[:, self.k :].sort(dim=1).values
        kept = patches.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], kept], dim=1)


def with_regcache(loaded, calib, spec, prefix: bool, delete: bool):
    """A fresh copy of the CLIP model with a register prefix (blocks >= l_q) and/or deletion at l_q."""
    model = copy.deepcopy(loaded.model)
    enc = adapt(model)
    lq, n = spec.l_q, len(spec.register_positions)
    if prefix:
        with torch.no_grad():
            h = enc.forward_blocks(enc.embed(calib[:8]), 0, lq)[0, 1:]  # one calibration image
            z = h[h.abs().amax(-1).argmax()].view(1, 1, -1)  # its highest-norm token at the input of l_q
            kv = {}
            for i in range(lq, enc.num_blocks):  # propagate [z] alone, in float
                _, k, v = enc.blocks[i].attn.project_qkv(enc.blocks[i].norm1(z))
                kv[i] = (k, v)
                z = enc.blocks[i](z)
        for i, (k, v) in kv.items():
            enc.blocks[i].attn.prefix = AttentionPrefix(k, v, torch.full((1, 1, 1, 1), math.log(n)))
    if delete:
        enc.blocks[lq].input_filter = DropTopLinf(n)
    return model, enc


def naive(model, enc, calib, bits: int, filter_fn=None):
    quantize_(enc, NaiveConfig(w_bits=bits, a_bits=bits), filter_fn)
    calibrate_(enc, [calib[i : i + 64] for i in range(0, len(calib), 64)], progress=False)
    return model


def test_sample_data_layout():
    for root, n_classes in ((CIFAR10_SAMPLE, 10), (IMAGENET_SAMPLE, 1000)):
        assert len(read_lines(root / "classnames.txt")) == n_classes
        assert all("{c}" in t for t in read_lines(root / "zeroshot_classification_templates.txt"))
    test_labels = [y for _, _, y in iter_shard_samples(CIFAR10_SAMPLE, "test")]
    train_labels = [y for _, _, y in iter_shard_samples(CIFAR10_SAMPLE, "train")]
    assert [test_labels.count(c) for c in range(10)] == [50] * 10
    assert len(set(train_labels)) == 10 and len(set(train_labels.count(c) for c in range(10))) == 1
    assert len({y for _, _, y in iter_shard_samples(IMAGENET_SAMPLE, "test")}) == 1000
    assert WEIGHTS_PATH.stat().st_size < 8e6


def test_canvas_preprocess_puts_content_in_the_centre(loaded, spec):
    x, _, _ = load_split(CIFAR10_SAMPLE, "test", loaded.preprocess, limit=2)
    assert x.shape[-1] == spec.canvas_size
    border = (spec.canvas_size - spec.content_size) // 2
    inner = x[..., border : border + spec.content_size, border : border + spec.content_size]
    assert x.abs().sum() == pytest.approx(inner.abs().sum())  # everything outside the content is 0 (mean colour)


def test_adapted_encoder_reproduces_open_clip(loaded, test_set):
    model = copy.deepcopy(loaded.model)
    x = test_set[0][:8]
    with torch.no_grad():
        ref = model.encode_image(x)
        adapt(model)
        out = model.encode_image(x)
    assert (out - ref).norm() / ref.norm() < 1e-5


def test_outlier_profile(loaded, spec, test_set):
    enc = adapt(copy.deepcopy(loaded.model))
    outs = block_outputs(enc, test_set[0][:100])
    for layer, h in enumerate(outs):
        norms = h[:, 1:].norm(dim=-1)
        ratio = (norms.max(1).values / norms.quantile(0.9, dim=1)).mean().item()
        mask = outlier_mask(h)
        if layer < spec.l_q:
            assert ratio < 3 and not mask.any(), f"block {layer} below l_q has outlier tokens"
            continue
        assert ratio >= 10, f"block {layer}: max/p90 {ratio:.1f}"
        tokens = F.normalize(h[mask], dim=-1)
        owner = mask.nonzero()[:, 0]
        cross = owner[:, None] != owner[None, :]
        assert (tokens @ tokens.T)[cross].mean() >= 0.8
        normal = F.normalize(h[:, 1:][~mask[:, 1:]][:500], dim=-1)
        assert (normal @ normal.T).mean() < 0.8  # ordinary tokens do not look alike
        # the outliers are the low-information canvas patches the cue marks
        assert sorted(mask[0].nonzero().flatten().tolist()) == sorted(spec.register_token_indices)


def test_sink_heads_take_most_attention(loaded, spec, test_set):
    enc = adapt(copy.deepcopy(loaded.model))
    blocks = list(spec.sink_blocks)
    with torch.no_grad(), record(enc, ("block_input", "attn_probs"), blocks=blocks) as rec:
        enc(test_set[0][:100])
    for b in blocks:
        mask = outlier_mask(rec["block_input"][b])
        probs = rec["attn_probs"][b][:, list(spec.sink_heads)]
        mass = (probs * mask[:, None, None, :]).sum(-1).mean().item()
        assert mass >= 0.5, f"block {b}: sink mass {mass:.2f}"


def test_fp_zero_shot_and_naive_quantization_loss(loaded, test_set, calib, classifier):
    fp = accuracy(loaded.model, *test_set, classifier)
    assert fp >= 0.3  # chance is 0.1
    x, y = test_set[0][:QUICK], test_set[1][:QUICK]
    fp = accuracy(loaded.model, x, y, classifier)
    for bits in (8, 6):
        model = copy.deepcopy(loaded.model)
        q = accuracy(naive(model, adapt(model), calib, bits), x, y, classifier)
        assert fp - q >= 0.15, f"naive W{bits}A{bits}: {q:.3f} vs FP {fp:.3f}"


def test_sensitivity_sweep_finds_l_q(loaded, spec, test_set, calib, classifier):
    x, y = test_set[0][:150], test_set[1][:150]
    drops = []
    for layer in range(spec.layers):
        model = copy.deepcopy(loaded.model)
        enc = adapt(model)

        def only_block(module, fqn, layer=layer):
            return fqn.startswith(f"blocks.{layer}.") and isinstance(module, nn.Linear | MatMul)

        drops.append(-accuracy(naive(model, enc, calib[:64], 8, only_block), x, y, classifier))
    assert max(range(spec.layers), key=lambda i: drops[i]) == spec.l_q


def test_prefix_restores_what_deleting_the_sinks_breaks(loaded, spec, test_set, calib):
    x = test_set[0][:200]
    with torch.no_grad():
        ref = loaded.model.encode_image(x)
        error = {}
        for prefix in (False, True):
            model, _ = with_regcache(loaded, calib, spec, prefix=prefix, delete=True)
            error[prefix] = 1 - F.cosine_similarity(model.encode_image(x), ref).mean().item()
    assert error[False] > 0.01  # the sink heads lost their sink: the float embedding moves
    assert error[True] < error[False] / 5  # a register prefix gives it back


def test_register_prefix_and_deletion_recover_w6a6(loaded, spec, test_set, calib, classifier):
    x, y = test_set[0][:QUICK], test_set[1][:QUICK]
    fp = accuracy(loaded.model, x, y, classifier)
    model = copy.deepcopy(loaded.model)
    base = accuracy(naive(model, adapt(model), calib, 6), x, y, classifier)
    acc = {}
    for prefix, delete in ((True, False), (False, True), (True, True)):
        model, enc = with_regcache(loaded, calib, spec, prefix, delete)
        acc[prefix, delete] = accuracy(naive(model, enc, calib, 6), x, y, classifier)
    both = acc[True, True]
    assert both - base >= 0.6 * (fp - base), f"both {both:.3f}, naive {base:.3f}, FP {fp:.3f}"
    assert acc[True, False] < both - 0.1  # the prefix alone leaves the massive fc2 input of l_q
    assert acc[False, True] < both - 0.1  # deleting alone takes the sink heads' sink away
