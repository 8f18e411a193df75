"""Every sample exactly once over ranks x dataloader workers (splitter and real DataLoaders)."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

from regcache.data import ShardDataset, assign_work, collate, make_sample_id, split_sample_id
from regcache.data.make_shards import ShardWriter


def _png(v: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (v % 256, (3 * v) % 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _write_uneven_shards(d, sizes):
    """Shards with the given sample counts (0 allowed), global keys s%07d."""
    d.mkdir(parents=True, exist_ok=True)
    n = 0
    urls = []
    for i, size in enumerate(sizes):
        w = ShardWriter(d / f"part{i}", shard_size=max(size, 1))
        for _ in range(size):
            w.write(f"s{n:07d}", {"png": _png(n), "cls": f"{n % 3}".encode()})
            n += 1
        w.close()
        if size == 0:  # an empty (valid) tar
            import tarfile

            tarfile.open(d / f"part{i}" / "0.tar", "w").close()
        urls.append(str(d / f"part{i}" / "0.tar"))
    return urls, n


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 5, 7, 13])
def test_assign_work_partitions_every_sample_once(num_shards):
    sizes = [(7 * i + 3) % 11 for i in range(num_shards)]  # uneven, includes small shards
    everything = Counter((s, p) for s in range(num_shards) for p in range(sizes[s]))
    for world in (1, 2, 3):
        for nw in (0, 1, 2, 3):
            seen = Counter()
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                for rank in range(world):
                    for worker in range(max(nw, 1)):
                        for part in assign_work(num_shards, rank, world, worker, nw).parts:
                            seen.update((part.shard, p) for p in range(sizes[part.shard]) if part.keeps(p))
            assert seen == everything, (world, nw)
            consumers = world * max(nw, 1)
            assert bool(rec) == (num_shards < consumers)


def test_sample_id_roundtrip():
    assert split_sample_id(make_sample_id(5, "s0001234", 9)) == (5, 1234)
    a = make_sample_id(0, "abc", 3)
    b = make_sample_id(0, "s0000003", 3)
    assert a != b and split_sample_id(a)[0] == 0
    assert make_sample_id(1, "s0000003", 0) != make_sample_id(0, "s0000003", 0)


def _collect(ds, num_workers):
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate)
    ids, keys = [], []
    for b in dl:
        ids += b["sample_id"].tolist()
        keys += b["key"]
        assert b["image"].shape[1:] == (3, 4, 4) and b["label"].dtype == torch.long
    return ids, keys


@pytest.mark.parametrize("sizes", [[9, 0, 4, 13, 1], [23]], ids=["5-uneven-shards", "1-shard"])
def test_shard_dataset_exactly_once_any_world_and_workers(tmp_path, sizes):
    import torchvision.transforms as T

    urls, n = _write_uneven_shards(tmp_path, sizes)
    expected = sorted(make_sample_id(s, f"s{k:07d}", 0) for s, k in _shard_keys(sizes))
    for world in (1, 2, 3):
        for nw in (0, 1, 2, 3):
            all_ids = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for rank in range(world):
                    ds = ShardDataset(urls, T.ToTensor(), rank=rank, world_size=world)
                    ids, _ = _collect(ds, nw)
                    all_ids += ids
            assert sorted(all_ids) == expected, (world, nw)
            assert len(all_ids) == n


def _shard_keys(sizes):
    n = 0
    for s, size in enumerate(sizes):
        for _ in range(size):
            yield s, n
            n += 1


def test_select_and_exclude(tmp_path):
    import torchvision.transforms as T

    urls, _ = _write_uneven_shards(tmp_path, [5, 5])
    sel = [(0, "s0000001"), (1, "s0000007"), (1, "s0000009")]
    got = []
    for rank in range(2):
        ds = ShardDataset(urls, T.ToTensor(), select=sel, split_by_rank=True, rank=rank, world_size=2)
        got += _collect(ds, 2)[1]
    assert sorted(got) == ["s0000001", "s0000007", "s0000009"]
    ds = ShardDataset(urls, T.ToTensor(), exclude=sel)
    keys = _collect(ds, 0)[1]
    assert len(keys) == 7 and not set(keys) & {"s0000001", "s0000007", "s0000009"}
    # replicated (split_by_rank=False): each rank sees the full selection
    ds = ShardDataset(urls, T.ToTensor(), select=sel, split_by_rank=False, rank=1, world_size=2)
    assert len(_collect(ds, 2)[1]) == 3
