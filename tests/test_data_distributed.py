"""2-process gloo run == 1-process run: same metrics, same sample-id set (0 and 2 workers per rank).

cifar10 test shard 0: 1 shard < readers -> sample-level split; retrieval (3 shards): shard-level with
0 workers per rank, sample-level with 2.
"""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms as T

SMALL = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])


def _image_features(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    pooled = F.adaptive_avg_pool2d(images, 4).flatten(1)  # (B, 48)
    proj = torch.randn(48, 16, generator=torch.Generator().manual_seed(seed))
    return pooled @ proj


def _text_features(captions: list[str]) -> torch.Tensor:
    rows = [torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(c.encode()))) for c in captions]
    return torch.stack(rows)


class _FakeText(torch.nn.Module):
    def encode_text(self, tokens):
        return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(t))) for t in tokens])


def _tok(texts):
    return torch.tensor([zlib.crc32(t.encode()) for t in texts])


def _worker(rank, world, workers, cifar_root, coco_root, port, out_dir):
    from datamodules import WebDatasetDataModule
    from regcache.eval import (
        FeatureFidelity,
        KNNAccuracy,
        OutlierStats,
        RetrievalRecallAtK,
        ZeroShotAccuracy,
        all_gather_uneven,
        build_zeroshot_classifier,
        gather_by_id,
        zeroshot_logits,
    )

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dm = WebDatasetDataModule(
            cifar_root, SMALL, eval_shards=str(Path(cifar_root) / "test" / "0.tar"),
            batch_size=300, num_workers=workers, multiprocessing_context="fork",
        )  # fmt: skip
        classes = dm.classnames
        W = build_zeroshot_classifier(_FakeText(), _tok, classes, dm.templates[:3], "cpu", batch_size=7)
        g = torch.Generator().manual_seed(3)
        bank, bank_labels = torch.randn(300, 16, generator=g), torch.randint(0, 10, (300,), generator=g)
        zs, knn, fid = ZeroShotAccuracy(num_classes=10), KNNAccuracy(bank, bank_labels, 10), FeatureFidelity()
        outl = OutlierStats(abs_thresholds=(0.9,), rel_thresholds=(1.5,))
        ids = []
        for b in dm.val_dataloader():
            f = _image_features(b["image"])
            zs.update(zeroshot_logits(f, W), b["label"], b["sample_id"])
            knn.update(f, b["label"], b["sample_id"])
            fid.update(f, b["sample_id"], reference=_image_features(b["image"], seed=1) + f)
            outl.update(0, F.avg_pool2d(b["image"], 4).flatten(2).transpose(1, 2))  # (B, 64 tokens, 3)
            ids.append(b["sample_id"])
        local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        all_ids = torch.cat(all_gather_uneven(local_ids))
        uniq = gather_by_id(local_ids)[0]

        rdm = WebDatasetDataModule(coco_root, SMALL, batch_size=5, num_workers=workers, multiprocessing_context="fork")
        rr = RetrievalRecallAtK()
        n_ret = 0
        for b in rdm.val_dataloader():
            caps = [c for cs in b["captions"] for c in cs]
            owner = torch.cat([b["sample_id"][i].repeat(len(cs)) for i, cs in enumerate(b["captions"])])
            rr.update(_image_features(b["image"]), b["sample_id"], _text_features(caps), owner)
            n_ret += len(b["key"])
        res = {
            "zs": {k: v.item() for k, v in zs.compute().items()},
            "knn": {k: v.item() for k, v in knn.compute().items()},
            "fid": {k: v.item() for k, v in fid.compute().items()},
            "ret": {k: v.item() for k, v in rr.compute().items()},
            "outliers": outl.compute(),
            "skips": dm.reduced_skip_counts(),
            "ids": all_ids.tolist(),
            "uniq": uniq.tolist(),
            "W": W,
            "local_n": local_ids.numel(),
            "local_ret": n_ret,
        }
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    import json

    from PIL import Image

    from regcache.data.make_shards import write_coco_shards

    d = tmp_path_factory.mktemp("coco")
    images, anns = [], []
    for i in range(23):
        Image.new("RGB", (8, 8), (i * 11 % 256, i * 37 % 256, 90)).save(d / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        anns += [{"image_id": i, "caption": f"picture {i} number {j}"} for j in range(5)]
    (d / "c.json").write_text(json.dumps({"images": images, "annotations": anns}))
    write_coco_shards(d, d / "c.json", d / "root", shard_size=8)  # 3 shards < 4 readers at 2x2
    return d / "root"


def test_two_process_gloo_equals_one_process(tmp_path, shared_data, coco_root):
    import warnings

    import torch.multiprocessing as tmp

    cifar = str(shared_data / "cifar10")
    single = tmp_path / "single"
    single.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _worker(0, 1, 0, cifar, str(coco_root), 0, str(single))
    ref = torch.load(single / "rank0.pt", weights_only=False)
    assert ref["zs"]["num_samples"] == 2500 and len(ref["ids"]) == 2500 and ref["ret"]["num_images"] == 23
    assert ref["ret"]["num_texts"] == 115

    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        # fork (not spawn) the two ranks: re-importing torch/lightning per process is slow on small CI boxes
        args = (2, workers, cifar, str(coco_root), _free_port(), str(out))
        tmp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="fork")
        r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2))
        # every sample exactly once over the two ranks: no duplicates, nothing missing
        assert sorted(r0["ids"]) == sorted(ref["ids"]) and len(r0["ids"]) == 2500
        assert r0["uniq"] == sorted(ref["ids"]) == r1["uniq"]
        assert r0["local_n"] + r1["local_n"] == 2500 and min(r0["local_n"], r1["local_n"]) > 0
        assert r0["local_ret"] + r1["local_ret"] == 23
        for r in (r0, r1):
            assert torch.equal(r["W"], ref["W"])  # head encoded by both ranks (every other text batch) == 1 process
            for key in ("zs", "knn", "fid", "ret"):
                assert r[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-6), (workers, key)
            assert r["outliers"]["0"]["tokens"] == ref["outliers"]["0"]["tokens"]
            for key in ("mean_l2", "max_l2", "max_linf", "frac_l2_above_abs", "frac_l2_above_rel_median"):
                assert r["outliers"]["0"][key] == pytest.approx(ref["outliers"]["0"][key], rel=1e-9)
            assert r["skips"] == {"skipped_samples": 0, "shard_errors": 0}
