"""Every shipped model config (train_configs/models/) runs `regcache validate` with a method + RegCache.

Random weights at a small image size; tokenizers resolve locally (SigLIP's Hugging Face tokenizer is
not to be had offline, so a tiny one built here is passed as ``model.tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from regcache.data.make_shards import write_imagefolder_shards
from regcache.lightning_cli import main as validate_main
from regcache.loading import WeightsUnavailableError, load_model, resolve_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "train_configs" / "models"
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "green", "blue", "square"]


def build_tiny_hf_tokenizer(folder: Path) -> Path:
    """A word-level Hugging Face tokenizer over the test's few words, saved as a tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for split in ("test", "train"):
        for c, rgb in COLORS.items():
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                noise = np.random.default_rng(hash((split, c, i)) % 2**32).integers(-25, 25, (24, 24, 3))
                image = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / c / f"{i}.png")
        write_imagefolder_shards(root / split, root / "colors", split=split, shard_size=4, templates=["a {c} square."])
    return root


def _piece(tmp_path: Path, data_root: Path, image_size: int, objective: str, tokenizer: Path | None) -> Path:
    search = {"objective": objective, "search_images": 6, "sweep_images": 6, "num_candidates": 2}
    search |= {"taus": [1, 2], "delete_ks": [0, 1]}
    model = {"pretrained": None, "image_size": image_size, "method": "naive", "w_bits": 8, "a_bits": 8}
    model |= {"run_dir": str(tmp_path / "run")} | ({"tokenizer": str(tokenizer)} if tokenizer else {})
    piece = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "callbacks.register_search.RegisterSearch", "init_args": search}],
        },
        "model": model,
        "data": {
            "root": str(data_root),
            "datasets": {"colors": {"calib_split": "train", "calib_size": 6, "ref_split": "train", "ref_size": 6}},
            "calibration": "colors",
            "reference": "colors",
            "batch_size": 6,
            "num_workers": 0,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(piece))
    return path


@pytest.mark.parametrize("shipped", sorted(p.name for p in MODELS.glob("*.yaml")))
def test_shipped_model_config_validates_with_regcache(shipped, tmp_path, colors, single_thread):
    spec = yaml.safe_load((MODELS / shipped).read_text())["model"]
    image_only = spec["model"].startswith("timm:")
    tokenizer = build_tiny_hf_tokenizer(tmp_path / "tokenizer") if "SigLIP" in spec["model"] else None
    size = 28 if image_only else 32  # two patches a side (patch 14 for DINOv2, 16 otherwise)
    piece = _piece(tmp_path, colors, size, "cosine" if image_only else "acc_ref", tokenizer)
    assert validate_main(["--config", str(MODELS / shipped), "--config", str(piece)]) == 0
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (result["model"], result["pretrained"], result["method"]) == (spec["model"], None, "naive")
    assert result["num_samples"] == {"colors": 6}
    installed = result["regcache"]
    assert installed is not None and 0 <= installed["l_q"] < 12 and installed["mode"] in ("prefix", "both")
    metric = "colors/knn_top1" if image_only else "colors/zeroshot_top1"
    assert 0.0 <= result["metrics"][metric] <= 1.0
    assert 0.0 < result["metrics"]["colors/feature_cosine_to_float"] <= 1.0 + 1e-6


def test_siglip_tokenizer_offline_and_uncached_fails_fast_naming_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match=r"tokenizer of ViT-B-16-SigLIP2 .*model\.tokenizer"):
        load_model("ViT-B-16-SigLIP2", image_size=32)
    with pytest.raises(FileNotFoundError, match="holds none of"):
        load_model("ViT-B-16-SigLIP", image_size=32, tokenizer=str(tmp_path))


def test_siglip_tokenizer_resolves_from_a_local_checkpoint_folder_and_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from regcache.eval.zeroshot import classifier_cache_spec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text_cfg = {"hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "context_length": 6}
    # the Hugging Face cache's layout: refs/main names the snapshot holding the files
    repo = tmp_path / "cache" / "models--timm--ViT-B-16-SigLIP"
    build_tiny_hf_tokenizer(repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    cached = resolve_tokenizer("ViT-B-16-SigLIP", text_cfg)
    assert cached(["a red square"]).tolist() == [[3, 4, 7, 0, 0, 0]]
    # a local checkpoint's folder with tokenizer files wins over the cache
    local = build_tiny_hf_tokenizer(tmp_path / "ckpt")
    beside = resolve_tokenizer("ViT-B-16-SigLIP", text_cfg, local_dirs=(tmp_path / "nothing", local))
    assert beside.tokenizer.name_or_path == str(local)
    # zero-shot heads built with different tokenizers of one model name are cached apart
    model = load_model("regcache-tiny-vit").model
    specs = [classifier_cache_spec(model, t, ["red"], ["a {c} square."], "m") for t in (cached, beside)]
    assert specs[0]["tokenizer"] == specs[1]["tokenizer"] and specs[0] != specs[1]
