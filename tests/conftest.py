"""Tiny models of every adapter family, built in the tests (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer
from torch import nn

IMAGE_SIZE = 32


@register_model
def vit_regcache_tiny_siglip(pretrained: bool = False, **kwargs) -> nn.Module:
    """A SigLIP-shaped timm ViT (no CLS token, MAP head) at toy size."""
    args = {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4}
    args.update(class_token=False, global_pool="map", act_layer="gelu_tanh")
    return _create_vision_transformer("vit_regcache_tiny_siglip", pretrained=pretrained, **{**args, **kwargs})


def _tiny_configs() -> dict[str, dict]:
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vit = {"image_size": IMAGE_SIZE, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16}
    return {
        "regcache-tiny-clip-quickgelu": {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": vit,
            "text_cfg": text,
        },
        "regcache-tiny-openclip": {"embed_dim": 32, "vision_cfg": vit, "text_cfg": text},
        "regcache-tiny-siglip": {
            "embed_dim": 64,
            "init_logit_bias": -10,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "timm_model_name": "vit_regcache_tiny_siglip",
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": dict(text, width=64, heads=4),
        },
    }


@pytest.fixture(scope="session", autouse=True)
def tiny_open_clip_configs(tmp_path_factory) -> list[str]:
    """Register the tiny open_clip configs from JSON files, as a user would add their own."""
    d = tmp_path_factory.mktemp("model_configs")
    for name, cfg in _tiny_configs().items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return list(_tiny_configs())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real shards of ../shared/data (CI has them beside the clone); skipped where absent."""
    env = os.environ.get("REGCACHE_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (p / "cifar10" / "test" / "0.tar").is_file():
        pytest.skip(f"shared shards not found at {p} (set REGCACHE_SHARED_DATA to <shared>/data)")
    return p


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norms, layer scales and biases non-trivial values so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "ls1.gamma", "ls2.gamma")) or (
                p.ndim == 1 and "norm" in name and "weight" in name
            ):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make_model(family: str, seed: int = 0) -> nn.Module:
    """A tiny random model of the given adapter family, in eval mode."""
    torch.manual_seed(seed)
    if family == "clip":
        model = open_clip.create_model("regcache-tiny-clip-quickgelu")
    elif family == "openclip":
        model = open_clip.create_model("regcache-tiny-openclip")
    elif family == "siglip":
        model = open_clip.create_model("regcache-tiny-siglip")
    elif family == "dinov2":
        model = timm.create_model(
            "vit_small_patch14_reg4_dinov2",
            img_size=28,
            patch_size=14,
            embed_dim=64,
            depth=3,
            num_heads=4,
            num_classes=0,
        )
    else:
        raise ValueError(family)
    return randomize_(model, seed).eval()


FAMILIES = ["clip", "openclip", "siglip", "dinov2"]


def image_size(family: str) -> int:
    """Input resolution of the tiny model."""
    return 28 if family == "dinov2" else IMAGE_SIZE


def images(family: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    """Random images for a family's tiny model."""
    s = image_size(family)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final image embedding of an open_clip model or a bare tower."""
    return model.encode_image(x) if hasattr(model, "encode_image") else model(x)


def quantized_cosine(family: str, config, batches: list[torch.Tensor], x: torch.Tensor, prepare=None) -> float:
    """Mean cosine between a calibrated tiny model's embeddings and its own float embeddings.

    ``prepare(encoder)`` edits the adapted float model in place first (e.g. injects an outlier).
    """
    from torch.nn import functional as F

    from regcache.encoders import adapt
    from regcache.quant import calibrate_, quantize_

    encoder = adapt(make_model(family))
    if prepare is not None:
        prepare(encoder)
    with torch.no_grad():
        reference = encoder(x)
    quantize_(encoder, config)
    calibrate_(encoder, batches, progress=False)
    with torch.no_grad():
        return F.cosine_similarity(encoder(x), reference, dim=-1).mean().item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


def install_random_prefix(encoder, entries: int = 2, seed: int = 0) -> None:
    """A random register prefix on blocks >= 1 (multiplicities 1 and 3), as RegCache would install."""
    from regcache.encoders import AttentionPrefix

    g = torch.Generator().manual_seed(seed)
    for block in encoder.blocks[1:]:
        a = block.attn
        shape = (1, a.num_heads, entries, a.head_dim)
        taus = (1, 3)[:entries]
        lm = torch.log(torch.tensor([float(t) for t in taus])).view(1, 1, 1, entries)
        a.prefix = AttentionPrefix(torch.randn(shape, generator=g), torch.randn(shape, generator=g), lm, taus)


def reloaded(encoder, family: str, path, with_prefix: bool = False):
    """Save ``encoder``'s calibrated state to ``path`` and load it into a fresh adapted model of ``family``."""
    from regcache.encoders import adapt
    from regcache.quant import load_quant_state, save_quant_state

    fresh = adapt(make_model(family))
    if with_prefix:
        install_random_prefix(fresh)
    load_quant_state(fresh, save_quant_state(encoder, path))
    return fresh


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one thread avoids OpenMP contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def calib_batches(family: str, n: int = 2) -> list[torch.Tensor]:
    """n calibration batches of 8 random images (seeds 100, 101, ...) for a family's tiny model."""
    return [images(family, n=8, seed=100 + i) for i in range(n)]


# regcache validate on the demo config at CPU-seconds size: a 2 x 2 x 2 grid, one evaluation batch, no float pass
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "train_configs" / "demo.yaml"
DEMO_SMALL = [
    "--trainer.callbacks.init_args.taus=[1,3]",
    "--trainer.callbacks.init_args.delete_ks=[0,3]",
    "--trainer.callbacks.init_args.num_candidates=2",
    "--trainer.limit_val_batches=1",
    "--model.fidelity=false",
]


def demo_validate(run_dir: Path, *extra: str) -> dict:
    """``regcache validate`` on the small demo config into ``run_dir``; its metrics.json."""
    from regcache.lightning_cli import main as validate_main

    assert validate_main(["--config", str(DEMO_CONFIG), f"--model.run_dir={run_dir}", *DEMO_SMALL, *extra]) == 0
    return json.loads((run_dir / "metrics.json").read_text())
