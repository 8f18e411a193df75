"""WebDatasetDataModule against the real shared shards and hand-made broken shards."""

from __future__ import annotations

import io
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from datamodules import WebDatasetDataModule
from regcache.data import OverlapError, ShardDataset, ShardReadError, ShardSourceError, split_sample_id

SMALL = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])


def _run(dl):
    ids, labels, keys = [], [], []
    for b in dl:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 32, 32)
        ids += b["sample_id"].tolist()
        labels += b["label"].tolist()
        keys += b["key"]
    return ids, labels, keys


def test_imagenet_sample_counts_labels_metadata(shared_data):
    dm = WebDatasetDataModule(shared_data / "imagenet1k_sample", SMALL, batch_size=128, num_workers=2)
    dm.setup("validate")
    assert dm.task == "classification" and dm.num_classes == 1000 and len(dm.templates) == 80
    assert all("{c}" in t for t in dm.templates) and dm.classnames[0]
    ids, labels, _ = _run(dm.val_dataloader())
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert sorted(labels) == list(range(1000))  # one image per class
    assert dm.skip_counts() == {"skipped_samples": 0, "shard_errors": 0}


def test_cifar_one_shard_ids_follow_keys(shared_data):
    root = shared_data / "cifar10"
    dm = WebDatasetDataModule(root, SMALL, eval_shards=str(root / "test" / "{0..0}.tar"), num_workers=0)
    assert dm.classnames[:2] == ["airplane", "automobile"] and len(dm.templates) > 1
    ids, labels, keys = _run(dm.val_dataloader())
    assert len(ids) == 2500 and set(labels) == set(range(10))
    assert [split_sample_id(i) for i in ids] == [(0, int(k[1:])) for k in keys]


def test_calibration_drawn_from_eval_split_is_balanced_and_disjoint(shared_data):
    root = shared_data / "cifar10"
    pattern = str(root / "test" / "{0..1}.tar")

    def make(seed):
        return WebDatasetDataModule(
            root, SMALL, eval_shards=pattern, calib_shards=pattern, calib_size=50, seed=seed,
            ref_split="train", ref_size=30, batch_size=256, num_workers=2,
        )  # fmt: skip

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        dm = make(0)
        dm.setup()
    assert any("excluded from evaluation" in str(w.message) for w in rec)
    c_ids, c_labels, _ = _run(dm.calib_dataloader())
    assert Counter(c_labels) == {c: 5 for c in range(10)}  # class-balanced
    e_ids, _, _ = _run(dm.val_dataloader())
    assert len(e_ids) == 5000 - 50 and not set(e_ids) & set(c_ids)
    r_ids, r_labels, _ = _run(dm.reference_dataloader())
    assert len(r_ids) == 30 and Counter(r_labels) == {c: 3 for c in range(10)}
    dm.check_disjoint()
    # seeded: same seed same set, other seed other set
    assert dm.identities("calib") == make(0).identities("calib") != make(1).identities("calib")
    # a whole evaluation split used for calibration is refused
    with pytest.raises(OverlapError):
        WebDatasetDataModule(root, SMALL, eval_shards=pattern, calib_shards=pattern).setup()


def _jpeg(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (v, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s["members"].items():
                ti = tarfile.TarInfo(f"{s['key']}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def _broken_root(tmp_path: Path) -> Path:
    """Shard 0: a garbage image and a sample without label; shard 1: 6 samples, cut in half."""
    root = tmp_path / "ds"
    _tar(
        root / "test" / "0.tar",
        [
            {"key": "s0000000", "members": {"jpg": _jpeg(1), "cls": b"0"}},
            {"key": "s0000001", "members": {"jpg": b"this is not a jpeg", "cls": b"1"}},  # garbage image
            {"key": "s0000002", "members": {"jpg": _jpeg(3)}},  # no label
            {"key": "s0000003", "members": {"jpg": _jpeg(4), "cls": b"1"}},
        ],
    )
    _tar(
        root / "test" / "1.tar",
        [{"key": f"s00001{i:02d}", "members": {"jpg": _jpeg(i), "cls": b"0"}} for i in range(6)],
    )
    data = (root / "test" / "1.tar").read_bytes()
    (root / "test" / "1.tar").write_bytes(data[: len(data) // 2])  # truncated shard
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_fails_by_default_naming_shard_and_option(tmp_path, num_workers):
    root = _broken_root(tmp_path)
    dm = WebDatasetDataModule(root, SMALL, num_workers=num_workers, batch_size=2)
    with pytest.raises(ShardReadError, match=r"shard '[^']*test/1\.tar' could not be read.*tolerate_shard_errors"):
        _run(dm.val_dataloader())


def test_corrupt_samples_and_tolerated_truncated_shard_are_skipped_and_recorded(tmp_path):
    root = _broken_root(tmp_path)
    dm = WebDatasetDataModule(root, SMALL, num_workers=2, batch_size=2, tolerate_shard_errors=True)
    _ids, _labels, keys = _run(dm.val_dataloader())
    assert {"s0000000", "s0000003"} <= set(keys) and "s0000001" not in keys and "s0000002" not in keys
    from_cut = [k for k in keys if k.startswith("s00001")]
    assert 0 < len(from_cut) < 6  # the cut shard gave its complete samples, not all six
    counts = dm.skip_counts()
    assert counts["skipped_samples"] == 2 and counts["shard_errors"] == 1  # bad samples vs. a bad shard
    assert dm.reduced_skip_counts() == counts  # no process group: identity
    report = dm.shard_errors()
    assert report["shards"] == 1 and report["samples_lost"] is None  # a whole shard's length is unknown
    ((name, row),) = report["by_shard"].items()
    assert name == str(root / "test" / "1.tar")
    assert row == {"errors": 1, "samples_read": len(from_cut), "samples_lost": None}


def test_tolerated_truncated_shard_of_a_drawn_subset_knows_the_samples_lost(tmp_path):
    root = _broken_root(tmp_path)
    urls = [str(root / "test" / "0.tar"), str(root / "test" / "1.tar")]
    wanted = [(1, f"s00001{i:02d}") for i in range(6)] + [(0, "s0000000")]
    dataset = ShardDataset(urls, SMALL, select=wanted, tolerate_shard_errors=True)
    keys = [s["key"] for s in dataset]
    read = [k for k in keys if k.startswith("s00001")]
    assert "s0000000" in keys and 0 < len(read) < 6
    report = dataset.shard_error_report()
    assert report["shards"] == 1 and report["samples_lost"] == 6 - len(read)
    assert report["by_shard"][urls[1]] == {"errors": 1, "samples_read": len(read), "samples_lost": 6 - len(read)}
    assert dataset.counter.skipped == 0  # lost with the shard, not counted again as skipped samples
    with pytest.raises(ShardReadError, match=r"1\.tar.*\d+ selected sample\(s\) lost"):
        list(ShardDataset(urls, SMALL, select=wanted))


def test_missing_path_and_empty_split_errors(tmp_path):
    with pytest.raises(ShardSourceError, match=r"does not exist.*test/\{0\.\.N-1\}\.tar.*make-shards"):
        WebDatasetDataModule(tmp_path / "nope", SMALL).setup()
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ShardSourceError, match=r"has no test/\*.tar shards"):
        WebDatasetDataModule(tmp_path / "empty", SMALL).setup()
    with pytest.raises(ShardSourceError, match=r"do not exist.*first: .*/x/3\.tar"):
        WebDatasetDataModule(None, SMALL, eval_shards=str(tmp_path / "x" / "{3..4}.tar")).setup()


def test_pipe_source_through_webdataset(shared_data):
    url = f"pipe:cat {shared_data / 'cifar10' / 'test' / '3.tar'}"
    dm = WebDatasetDataModule(shared_data / "cifar10", SMALL, eval_shards=url, num_workers=0, batch_size=500)
    ids, _labels, keys = _run(dm.val_dataloader())
    assert len(ids) == 2500 and keys[0] == "s0007500"


def test_lightning_validate_smoke(tmp_path, shared_data):
    from regcache._lightning import pl
    from regcache.eval import ZeroShotAccuracy

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 10)
            self.acc = ZeroShotAccuracy(num_classes=10)

        def validation_step(self, batch, _):
            logits = self.proj(batch["image"].mean((2, 3)))
            self.acc.update(logits, batch["label"], batch["sample_id"])

        def on_validation_epoch_end(self):
            out = self.acc.compute()
            self.log("top1", out["top1"])
            self.log("n", out["num_samples"].float())
            self.acc.reset()

    root = shared_data / "cifar10"
    dm = WebDatasetDataModule(root, SMALL, eval_shards=str(root / "test" / "0.tar"), batch_size=500, num_workers=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    res = trainer.validate(Tiny(), datamodule=dm, verbose=False)
    assert res[0]["n"] == 2500


def _calib_root(tmp_path: Path, shards: int = 3, per_shard: int = 7) -> Path:
    root = tmp_path / "ds"
    for j in range(shards):
        samples = [
            {"key": f"s{j * 100 + i:07d}", "members": {"jpg": _jpeg(10 * j + i), "cls": str(i % 2).encode()}}
            for i in range(per_shard)
        ]
        _tar(root / "train" / f"{j}.tar", samples)
        _tar(root / "test" / f"{j}.tar", [{"key": f"t{j:07d}", "members": {"jpg": _jpeg(j), "cls": b"0"}}])
    return root


@pytest.mark.parametrize("size", [12, None])
def test_calibration_batches_are_full_and_do_not_depend_on_num_workers(tmp_path, size):
    """Each worker batches its own shards: 12 images over 3 workers at batch size 5 would come as 3 partial
    batches (4 + 4 + 4) in worker order. Calibration sees full batches (5, 5, 2) in sample_id order instead,
    the same for 0 and 3 workers; a whole split (no calib_size) is re-batched to full batches only."""
    root = _calib_root(tmp_path)

    def batches(workers):
        dm = WebDatasetDataModule(root, SMALL, calib_split="train", calib_size=size, batch_size=5, num_workers=workers)
        return list(dm.calib_dataloader())

    serial, parallel = batches(0), batches(3)
    n = 12 if size else 21
    assert [len(b["key"]) for b in parallel] == [5] * (n // 5) + [n % 5]
    if size is None:
        return
    dm = WebDatasetDataModule(root, SMALL, calib_split="train", calib_size=size, batch_size=5, num_workers=3)
    streamed = list(dm.dataloader("calib", ordered=False))  # order-free consumers: full batches, nothing collected
    assert [len(b["key"]) for b in streamed] == [5, 5, 2]
    assert sorted(torch.cat([b["sample_id"] for b in streamed]).tolist()) == sorted(
        torch.cat([b["sample_id"] for b in parallel]).tolist()
    )
    assert [len(b["key"]) for b in serial] == [5, 5, 2]
    ids = torch.cat([b["sample_id"] for b in parallel]).tolist()
    assert ids == sorted(ids) == torch.cat([b["sample_id"] for b in serial]).tolist()
    for a, b in zip(serial, parallel, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
