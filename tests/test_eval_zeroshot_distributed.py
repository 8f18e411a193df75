"""The zero-shot head under 2 gloo ranks (text batches split, gathered as tensors) == the 1-process head."""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from regcache.eval import build_zeroshot_classifier

CLASSES = ["cat", "dog", "tiny ship", "red car", "oak"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c}"]


class _TextTower(torch.nn.Module):
    """Token id -> a fixed random 6-d embedding (the same in every process)."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(6, generator=torch.Generator().manual_seed(int(t))) for t in tokens])


def _tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([zlib.crc32(t.encode()) for t in texts])


def _reference(batch_size: int) -> torch.Tensor:
    """The head computed by hand: per class, the mean of its normalised template embeddings, renormalised."""
    tower = _TextTower()
    rows = []
    for c in CLASSES:
        e = F.normalize(tower.encode_text(_tokenize([t.replace("{c}", c) for t in TEMPLATES])), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows).T


def _worker(rank: int, world: int, port: int, batch_size: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        W = build_zeroshot_classifier(_TextTower(), _tokenize, CLASSES, TEMPLATES, "cpu", batch_size=batch_size)
        torch.save(W, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("batch_size", [4, 15, 100])  # 4 batches (last short), 1 batch, 1 batch < 2 ranks
def test_two_ranks_equal_one_process(tmp_path, batch_size):
    import torch.multiprocessing as mp

    ref = _reference(batch_size)
    single = build_zeroshot_classifier(_TextTower(), _tokenize, CLASSES, TEMPLATES, "cpu", batch_size=batch_size)
    assert single.shape == (6, len(CLASSES)) and torch.allclose(single, ref, atol=1e-6)
    mp.start_processes(
        _worker, args=(2, _free_port(), batch_size, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), single)
