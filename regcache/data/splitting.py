"""Split shards (or samples) across distributed ranks x dataloader workers, exactly once.

A *consumer* is one (rank, dataloader worker) pair; there are ``C = world_size * max(num_workers, 1)``
consumers, numbered ``c = rank * W + worker``.

* ``num_shards >= C``: shard ``i`` goes to consumer ``i % C`` whole (shard-level round robin).
* ``num_shards < C``: a :class:`UserWarning` is emitted and the split becomes sample-level: consumer
  ``c`` reads shard ``s = c % num_shards`` and keeps the samples whose position ``p`` in that shard
  satisfies ``p % k == j``, where the consumers sharing shard ``s`` are ``[s, s + S, s + 2S, ...]``,
  ``k`` is their count and ``j`` the index of ``c`` among them.

Both rules partition the samples: every sample is read by exactly one consumer, for any world size,
worker count and uneven shard sizes, without padding. Ranks may therefore receive different numbers
of samples/batches: reduce metrics only at epoch end (no per-step collectives).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Assignment", "ShardPart", "assign_work", "current_consumer", "dist_rank_world"]


@dataclass(frozen=True)
class ShardPart:
    """Read shard ``shard`` and keep samples with ``position % modulo == residue``."""

    shard: int
    modulo: int = 1
    residue: int = 0

    def keeps(self, position: int) -> bool:
        """Whether the sample at ``position`` in the shard belongs to this consumer's share of it."""
        return self.modulo == 1 or position % self.modulo == self.residue


@dataclass(frozen=True)
class Assignment:
    parts: tuple[ShardPart, ...]
    sample_level: bool


def assign_work(
    num_shards: int, rank: int, world_size: int, worker: int, num_workers: int, warn: bool = True
) -> Assignment:
    """Parts of the shard list that consumer (rank, worker) reads. ``num_workers`` 0 means 1."""
    nw = max(int(num_workers), 1)
    if not (0 <= rank < world_size) or not (0 <= worker < nw):
        raise ValueError(f"bad consumer rank={rank}/{world_size} worker={worker}/{nw}")
    consumers = world_size * nw
    c = rank * nw + worker
    if num_shards <= 0:
        return Assignment((), False)
    if num_shards >= consumers:
        return Assignment(tuple(ShardPart(i) for i in range(c, num_shards, consumers)), False)
    if warn:
        warnings.warn(
            f"{num_shards} shard(s) for {consumers} readers ({world_size} rank(s) x {nw} worker(s)): "
            "splitting at sample granularity inside shards (each reader scans a whole shard). "
            "Use more shards (make-shards --shard-size) or fewer workers for efficient loading.",
            UserWarning,
            stacklevel=2,
        )
    s = c % num_shards
    sharing = list(range(s, consumers, num_shards))
    return Assignment((ShardPart(s, len(sharing), sharing.index(c)),), True)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else RANK/WORLD_SIZE env, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def current_consumer(split_by_rank: bool = True) -> tuple[int, int, int, int]:
    """(rank, world_size, worker, num_workers) for the calling process / dataloader worker."""
    rank, world = dist_rank_world() if split_by_rank else (0, 1)
    info = torch.utils.data.get_worker_info()
    worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, nw
