"""Decoding on the device (nvJPEG path) run on the CPU: preprocessing read off the transform, datamodule hook."""

from __future__ import annotations

import io
import itertools

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


# ---------------------------------------------------------------- resize grouped by decoded size
def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


# duplicates (grouped), portrait / landscape / square, one already at the output size (no resize)
MIXED = [(60, 80), (80, 60), (60, 80), (45, 45), (60, 80), (33, 90), (80, 60), (32, 43), (100, 75)]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size, crop", [(32, (32, 32)), (32, (28, 30)), ((20, 30), (32, 32))])
def test_grouped_resize_equals_the_per_image_resize_bit_for_bit(interpolation, size, crop):
    p = TensorPreprocess(size=size, crop=crop, interpolation=interpolation)
    images = _images(MIXED)
    per_image = torch.stack([p.resize_crop(img) for img in images])
    grouped = p.resize_crop_batch(images)
    assert grouped.shape == (len(MIXED), 3, *crop) and grouped.is_contiguous()
    assert torch.equal(grouped, per_image)
    assert torch.equal(p.resize_crop_batch(images[:1]), per_image[:1])  # one image
    same = [images[0], images[2], images[4]]  # one size only
    assert torch.equal(p.resize_crop_batch(same), per_image[[0, 2, 4]])


def _by_hand(image: torch.Tensor, short: int, crop: int, mode: str) -> torch.Tensor:
    """Shorter side → ``short`` (longer side truncated, as torchvision does), then a center crop; no torchvision."""
    h, w = image.shape[-2:]
    if h <= w:
        new_h, new_w = short, int(short * w / h)
    else:
        new_h, new_w = int(short * h / w), short
    x = image.float()[None]
    if (new_h, new_w) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
    top, left = round((new_h - crop) / 2), round((new_w - crop) / 2)
    return x[0, :, top : top + crop, left : left + crop]


def test_grouped_resize_matches_an_independent_resize_and_crop():
    p = TensorPreprocess(size=32, crop=32, interpolation="bicubic")
    images = _images(MIXED, seed=1)
    want = torch.stack([_by_hand(img, 32, 32, "bicubic") for img in images])
    assert torch.equal(p.resize_crop_batch(images), want)


def test_full_call_grouped_equals_per_image_on_jpegs_and_pngs():
    data = [smooth_jpeg(300, 200), smooth_jpeg(180, 260), smooth_jpeg(300, 200, "PNG"), smooth_jpeg(300, 200)]
    p = TensorPreprocess.from_transform(OPENCLIP)
    assert torch.equal(p(data, device="cpu"), p(data, device="cpu", per_image=True))
    with pytest.raises(ValueError):
        p([], device="cpu")


def test_grouped_resize_on_the_sample_images_equals_per_image():
    from regcache.data.reader import ShardDataset

    urls = [str(u) for u in sorted((DATA_DIR / "imagenet1k_sample_small" / "test").glob("*.tar"))]
    raw = [d["image_bytes"] for d in itertools.islice(ShardDataset(urls, raw_images=True), 64)]
    p = TensorPreprocess.from_transform(OPENCLIP)
    decoded = p.decode(raw, "cpu")
    assert len({tuple(d.shape) for d in decoded}) < len(decoded)  # some sizes repeat: groups of several
    assert torch.equal(p.resize_crop_batch(decoded), torch.stack([p.resize_crop(d) for d in decoded]))


# ---------------------------------------------------------------- batches and Lightning
def test_encoded_images_are_left_alone_by_lightnings_batch_walk():
    import pickle

    from lightning_utilities.core.apply_func import apply_to_collection

    from regcache._lightning import pl  # noqa: F401  (the fabric helpers below ship with it)
    from regcache.data.reader import EncodedImages, collate

    batch = collate([{"sample_id": i, "key": f"k{i}", "image_bytes": smooth_jpeg(40, 30)} for i in range(3)])
    encoded = batch["image_bytes"]
    assert isinstance(encoded, EncodedImages) and len(encoded) == 3 and isinstance(encoded[0], bytes)
    moved = apply_to_collection(batch, torch.Tensor, lambda t: t.to("cpu"))
    assert moved["image_bytes"] is encoded  # not rebuilt byte by byte
    assert list(pickle.loads(pickle.dumps(encoded))) == list(encoded)  # crosses worker processes


# ---------------------------------------------------------------- the prefetcher (its threading, on the CPU)
def _raw_batches(n: int, size: int = 2, log: list | None = None):
    try:
        for b in range(n):
            if log is not None:
                log.append(b)
            images = [smooth_jpeg(40 + b, 30) for _ in range(size)]
            yield {"sample_id": torch.arange(b * size, (b + 1) * size), "image_bytes": images}
    finally:
        if log is not None:
            log.append("closed")


def test_prefetcher_yields_every_batch_in_order_decoded_like_the_sync_path():
    from regcache.data.gpu_decode import DecodePrefetcher, PendingImages

    p = TensorPreprocess(size=16, crop=16)
    seen = []
    for batch, raw in zip(DecodePrefetcher(list(_raw_batches(5)), p, "cpu"), _raw_batches(5), strict=True):
        assert "image_bytes" not in batch and isinstance(batch["image_pending"], PendingImages)
        assert torch.equal(batch["image_pending"].wait(), p(raw["image_bytes"], "cpu"))
        seen += batch["sample_id"].tolist()
    assert seen == list(range(10))


def test_prefetcher_raises_the_loaders_error_in_the_consumer():
    from regcache.data.gpu_decode import DecodePrefetcher

    def failing():
        yield from _raw_batches(2)
        raise OSError("shard unreadable")

    it = iter(DecodePrefetcher(failing(), TensorPreprocess(size=16, crop=16), "cpu"))
    assert len([next(it), next(it)]) == 2
    with pytest.raises(OSError, match="shard unreadable"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_prefetcher_stays_depth_batches_ahead_and_stops_when_dropped():
    import gc
    import time

    from regcache.data.gpu_decode import DecodePrefetcher

    log: list = []
    it = iter(DecodePrefetcher(_raw_batches(100, log=log), TensorPreprocess(size=16, crop=16), "cpu", depth=2))
    next(it)
    _wait_for(lambda: len(log) >= 4)
    time.sleep(0.3)
    assert log == [0, 1, 2, 3]  # 1 consumed + 2 queued + 1 waiting in the thread; no further reads
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive() and log[-1] == "closed"  # the loader's iterator is released (workers end)


def test_prefetcher_passes_its_loaders_length_through():
    from regcache.data.gpu_decode import DecodePrefetcher

    p = TensorPreprocess(size=16, crop=16)
    assert len(DecodePrefetcher([{}, {}, {}], p, "cpu")) == 3
    with pytest.raises(TypeError):
        len(DecodePrefetcher(_raw_batches(1), p, "cpu"))  # Lightning treats this as "no length"
    with pytest.raises(ValueError):
        DecodePrefetcher([], p, "cpu", depth=0)


@pytest.fixture
def prefetch_on_cpu(monkeypatch):
    """The datamodule prefetches on CUDA only; point it at the CPU to run the same wiring here."""
    monkeypatch.setattr(WebDatasetDataModule, "prefetch_device", lambda self: torch.device("cpu"))


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = TensorPreprocess.decode

    def counting(self, images, device):
        calls.append(len(images))
        return original(self, images, device)

    monkeypatch.setattr(TensorPreprocess, "decode", counting)
    return calls


def test_datamodule_prefetches_and_decodes_each_batch_once(prefetch_on_cpu, monkeypatch):
    from regcache.data.gpu_decode import DecodePrefetcher

    root = DATA_DIR / "imagenet1k_sample_small"
    cpu = WebDatasetDataModule(root, SMALL, batch_size=8, num_workers=0)
    dm = WebDatasetDataModule(root, SMALL, batch_size=8, num_workers=0, decode_on_gpu=True)
    loader = dm.val_dataloader()
    assert isinstance(loader, DecodePrefetcher)
    calls = _count_decodes(monkeypatch)
    n = 0
    for a, b in zip(cpu.val_dataloader(), loader, strict=True):
        assert "image_pending" in b and "image_bytes" not in b
        b = dm.on_after_batch_transfer(b, 0)
        assert dm.decode_batch(b, None) is b and "image_pending" not in b  # a second call changes nothing
        assert torch.equal(a["sample_id"], b["sample_id"]) and (b["image"] - a["image"]).abs().mean() < 0.03
        n += 1
    assert n > 0 and len(calls) == n
    no_prefetch = WebDatasetDataModule(root, SMALL, batch_size=8, num_workers=0, decode_on_gpu=True, prefetch_depth=0)
    assert isinstance(no_prefetch.val_dataloader(), torch.utils.data.DataLoader)


def test_without_cuda_the_evaluation_loader_decodes_on_the_cpu_when_used():
    dm = WebDatasetDataModule(DATA_DIR / "imagenet1k_sample_small", SMALL, batch_size=8, num_workers=0)
    dm.decode_on_gpu = True
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    assert dm.prefetch_device() is None and isinstance(dm.val_dataloader(), torch.utils.data.DataLoader)


def _recording_module(events: list):
    from regcache._lightning import pl

    class Recording(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.seen = 0

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            assert "image_pending" not in batch and "image_bytes" not in batch
            events.append(("step", batch_idx))
            self.proj(batch["image"].mean((2, 3)))
            self.seen += len(batch["key"])

    return Recording()


def _trainer(tmp_path):
    from regcache._lightning import pl

    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def test_trainer_validate_waits_for_each_prefetched_batch_only_when_it_is_used(prefetch_on_cpu, monkeypatch, tmp_path):
    from regcache.data.gpu_decode import PendingImages

    events: list = []
    original = PendingImages.wait
    monkeypatch.setattr(PendingImages, "wait", lambda self: (events.append(("wait",)), original(self))[1])
    calls = _count_decodes(monkeypatch)
    dm = WebDatasetDataModule(DATA_DIR / "imagenet1k_sample_small", SMALL, batch_size=4, num_workers=1)
    dm.decode_on_gpu = True
    module = _recording_module(events)
    _trainer(tmp_path).validate(module, datamodule=dm, verbose=False)
    steps = sum(e[0] == "step" for e in events)
    assert steps > 2 and len(calls) == steps and module.seen == sum(calls)
    # Lightning fetches a batch ahead; the wait still comes right before that batch's step
    assert events == [e for i in range(steps) for e in (("wait",), ("step", i))]


def test_trainer_validate_on_the_suite_without_cuda_decodes_encoded_batches(tmp_path):
    events: list = []
    suite = ValidationSuite(
        str(DATA_DIR), {"imagenet1k_sample_small": {}}, batch_size=4, num_workers=1, decode_on_gpu=True
    )
    suite.set_transform(SMALL)
    module = _recording_module(events)
    _trainer(tmp_path).validate(module, datamodule=suite, verbose=False)
    assert module.seen > 0 and suite.modules["imagenet1k_sample_small"].trainer is not None


def test_suite_prefetches_for_quantized_models_only_unless_told():
    datasets = {"imagenet1k_sample_small": {}, "cifar10_sample": {"prefetch_depth": 3}}
    auto = ValidationSuite(str(DATA_DIR), datasets, decode_on_gpu=True)
    depths = lambda suite: {n: m.prefetch_depth for n, m in suite.modules.items()}  # noqa: E731
    assert depths(auto) == {"imagenet1k_sample_small": 2, "cifar10_sample": 3}  # before the model is known
    auto.set_model_kind(quantized=False)
    assert depths(auto) == {"imagenet1k_sample_small": 0, "cifar10_sample": 3}  # a dataset's own option wins
    auto.set_model_kind(quantized=True)
    assert depths(auto) == {"imagenet1k_sample_small": 2, "cifar10_sample": 3}
    fixed = ValidationSuite(str(DATA_DIR), datasets, decode_on_gpu=True, prefetch_depth=1)
    fixed.set_model_kind(quantized=False)
    assert depths(fixed) == {"imagenet1k_sample_small": 1, "cifar10_sample": 3}
