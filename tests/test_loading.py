"""Model loading: local checkpoints, name validation, and a fast clear failure when offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import make_model

from regcache.loading import WeightsUnavailableError, hub_reachable, load_model


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache and a hub endpoint that refuses connections (a closed loopback port)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("name", "pretrained"),
    [
        ("ViT-B-16-quickgelu", "openai"),
        ("ViT-B-16-SigLIP2", "webli"),
        ("hf-hub:timm/ViT-B-16-SigLIP2", None),
        ("timm:vit_small_patch14_dinov2.lvd142m", None),
    ],
)
def test_offline_pretrained_request_fails_fast_with_local_file_hint(offline_hub, name, pretrained):
    assert not hub_reachable()
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="pass its local path"):
        load_model(name, pretrained)
    assert time.monotonic() - start < 15


def test_openai_weights_need_quickgelu_name():
    with pytest.raises(ValueError, match="ViT-B-16-quickgelu"):
        load_model("ViT-B-16", "openai")


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_model("ViT-Nope")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        load_model("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="unknown timm model"):
        load_model("timm:not_a_model")
    with pytest.raises(FileNotFoundError):
        load_model("regcache-tiny-openclip", "/nonexistent/dir/model.safetensors")


def test_open_clip_local_checkpoint_roundtrip(tmp_path):
    source = make_model("openclip", seed=3)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = load_model("regcache-tiny-openclip", str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert loaded.tokenizer is not None and loaded.has_text_tower
    img = loaded.preprocess(__import__("PIL.Image").Image.new("RGB", (50, 40)))
    assert img.shape == (3, 32, 32)


def test_timm_local_checkpoint_and_image_size(tmp_path):
    source = load_model("timm:vit_regcache_tiny_siglip").model
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = load_model("timm:vit_regcache_tiny_siglip", str(path))
    assert torch.equal(loaded.model.pos_embed, source.pos_embed)
    assert loaded.tokenizer is None and not loaded.has_text_tower
    assert load_model("timm:vit_regcache_tiny_siglip", image_size=48).model.patch_embed.img_size == (48, 48)


def test_dinov2_config_preprocessing_follows_the_image_size_override():
    import yaml
    from PIL import Image

    from regcache.encoders import adapt

    shipped = yaml.safe_load((Path(__file__).parents[1] / "train_configs/models/dinov2_b14.yaml").read_text())
    args = {**shipped["model"], "pretrained": None, "image_size": 56}  # random weights, 4 x 4 patches of 14
    loaded = load_model(args["model"], args["pretrained"], image_size=args["image_size"])
    assert loaded.model.patch_embed.img_size == (56, 56)
    batch = torch.stack([loaded.preprocess(Image.new("RGB", size, "gray")) for size in ((90, 70), (60, 120))])
    assert batch.shape == (2, 3, 56, 56)
    with torch.no_grad():
        expected = loaded.model(batch)  # the timm model's own forward, before adaptation moves its blocks
        features = adapt(loaded.model)(batch)
    assert features.shape == (2, 768) and torch.isfinite(features).all()
    assert torch.allclose(features, expected, atol=1e-4)
