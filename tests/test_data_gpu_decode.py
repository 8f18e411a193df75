"""Decoding on the device (nvJPEG path) run on the CPU: preprocessing read off the transform, datamodule hook."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from datamodules import WebDatasetDataModule
from datamodules.suite import ValidationSuite
from regcache.data.gpu_decode import TensorPreprocess
from regcache.testbed.data import DATA_DIR

OPENCLIP = open_clip.image_transform(
    224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
)
SMALL = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor()])


def smooth_jpeg(w: int = 300, h: int = 200, fmt: str = "JPEG") -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 64], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def test_preprocessing_is_read_off_the_open_clip_transform():
    p = TensorPreprocess.from_transform(OPENCLIP)
    assert (p.size, p.crop, p.interpolation) == (224, (224, 224), "bicubic")
    assert p.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and p.std == tuple(open_clip.OPENAI_DATASET_STD)
    with pytest.raises(ValueError):
        TensorPreprocess.from_transform(T.Compose([T.RandomHorizontalFlip(), T.ToTensor()]))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_tensor_preprocessing_matches_the_pil_pipeline(fmt):
    data = [smooth_jpeg(300, 200, fmt), smooth_jpeg(180, 260, fmt)]
    got = TensorPreprocess.from_transform(OPENCLIP)(data, device="cpu")
    want = torch.stack([OPENCLIP(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
    assert got.shape == want.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    assert (got - want).abs().mean() < 0.01 and (got - want).abs().max() < 0.1  # resampling kernels differ slightly


def test_datamodule_decode_on_gpu_yields_bytes_then_decodes_like_the_cpu_path():
    root = DATA_DIR / "imagenet1k_sample_small"
    options = {"batch_size": 8, "num_workers": 0, "calib_split": "test", "calib_size": 4}
    cpu = WebDatasetDataModule(root, SMALL, **options)
    raw = WebDatasetDataModule(root, SMALL, decode_on_gpu=True, **options)
    n = 0
    for a, b in zip(cpu.val_dataloader(), raw.val_dataloader(), strict=True):
        assert "image" not in b and all(isinstance(x, bytes) for x in b["image_bytes"])
        b = raw.on_after_batch_transfer(b, 0)
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["label"], b["label"])
        assert b["image"].shape == a["image"].shape and (b["image"] - a["image"]).abs().mean() < 0.03
        n += len(b["key"])
    assert n > 0
    calib = next(iter(raw.calib_dataloader()))  # calibration / reference loaders still decode on the CPU
    assert "image_bytes" not in calib and calib["image"].shape == (4, 3, 32, 32)


def test_suite_passes_decode_on_gpu_and_decodes_per_dataloader():
    suite = ValidationSuite(
        str(DATA_DIR), {"imagenet1k_sample_small": {}}, batch_size=4, num_workers=0, decode_on_gpu=True
    )
    suite.set_transform(SMALL)
    suite.setup("validate")
    batch = next(iter(suite.val_dataloader()[0]))
    assert "image_bytes" in batch
    batch = suite.on_after_batch_transfer(batch, 0)
    assert batch["image"].shape == (4, 3, 32, 32)


def test_benchmark_shards_are_reencoded_at_the_requested_resolution(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_synthetic_shards import write_shards

    n, shards = write_shards(
        DATA_DIR / "imagenet1k_sample_small", tmp_path, copies=3, shard_size=4, short_side=48, limit=10
    )
    assert (n, shards) == (10, 3) and (tmp_path / "test" / "nshards.txt").read_text() == "3\n"
    dm = WebDatasetDataModule(tmp_path, T.Compose([T.ToTensor()]), task="classification", batch_size=1, num_workers=0)
    images = [b["image"] for b in dm.val_dataloader()]
    assert len(images) == 10 and all(min(x.shape[2:]) == 48 for x in images)
