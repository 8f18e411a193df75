"""torch.distributed helpers: uneven all-gather, dedupe by id, broadcast. No-ops without a group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_uneven", "dedupe_by_id", "first_occurrence", "gather_by_id", "is_dist", "world_size"]


def is_dist() -> bool:
    """Whether a torch.distributed process group is initialised, i.e. collectives are needed at all."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (the default group if None); 1 without an initialised process group."""
    return dist.get_world_size(group) if is_dist() else 1


def all_gather_uneven(
    t: Tensor | None, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None
) -> list[Tensor]:
    """All-gather tensors whose first dim differs per rank; ``None`` (or empty) ranks are allowed.

    Trailing shape and dtype are taken from the first rank that has data. Returns the per-rank list
    (just ``[t]`` without an initialised process group; ``[]`` when every rank is empty).
    Collective: every rank of ``group`` must call it.
    """
    if not is_dist() or world_size(group) == 1:
        return [] if t is None else [t]
    meta = None if t is None else (tuple(t.shape), str(t.dtype).removeprefix("torch."))
    metas: list = [None] * world_size(group)
    dist.all_gather_object(metas, meta, group=group)
    ref = next((m for m in metas if m is not None), None)
    if ref is None:
        return []
    trailing, dtype = ref[0][1:], getattr(torch, ref[1])
    if device is None:
        device = t.device if t is not None else _default_device(group)
    if t is None:
        t = torch.zeros((0, *trailing), dtype=dtype, device=device)
    t = t.to(device).contiguous()
    sizes = [m[0][0] if m is not None else 0 for m in metas]
    n_max = max(sizes)
    padded = torch.zeros((n_max, *trailing), dtype=dtype, device=device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [o[:n] for o, n in zip(out, sizes, strict=False)]


def _default_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_occurrence(keys: Tensor) -> Tensor:
    """Indices of the first occurrence of each distinct key (rows if 2-D), ordered by key."""
    if keys.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=keys.device)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    pos = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((uniq.shape[0],), keys.shape[0], dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin")


def dedupe_by_id(ids: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first occurrence of every id; outputs sorted by id. Returns ``(ids, *tensors)``."""
    idx = first_occurrence(ids)
    return (ids[idx], *(t[idx] for t in tensors))


def gather_by_id(ids: Tensor, *tensors: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, ...]:
    """All-gather ``ids`` and per-sample ``tensors`` from every rank, keep the first occurrence of each
    id, sort by id: returns ``(ids, *tensors)``. E.g. a k-NN feature bank every rank holds in full,
    or float-model reference features. Collective when a process group is initialised."""
    if not is_dist() or world_size(group) == 1:
        return dedupe_by_id(ids, *tensors)
    dev = tensors[0].device if tensors else ids.device
    ids_all = torch.cat(all_gather_uneven(ids, group, device=dev))
    others = [torch.cat(all_gather_uneven(t, group, device=dev)) for t in tensors]
    return dedupe_by_id(ids_all, *others)
