"""Seeded, class-balanced subset drawing and overlap checks (identity = (shard url, key))."""

from __future__ import annotations

import random
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .reader import iter_tar_samples
from .shards import _local_path, is_remote, open_stream

__all__ = ["IndexEntry", "OverlapError", "assert_disjoint", "class_balanced_sample", "scan_index"]


@dataclass(frozen=True)
class IndexEntry:
    shard: int  # index into the split's shard list
    key: str
    label: int | None


class OverlapError(RuntimeError):
    """Calibration / reference samples overlap the evaluation samples."""


def _scan_local(path: str, shard: int, with_labels: bool) -> list[IndexEntry]:
    out: dict[str, int | None] = {}
    with tarfile.open(path, mode="r:*") as tf:  # random access: headers only, data skipped by seek
        for m in tf:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base or base.startswith("__"):
                continue
            prefix = m.name[: len(m.name) - len(base)]
            key = prefix + base[: base.find(".")]
            ext = base[base.find(".") + 1 :].lower()
            if key not in out:
                out[key] = None
            if with_labels and ext == "cls":
                out[key] = int(tf.extractfile(m).read().decode("utf-8").strip())
    return [IndexEntry(shard, k, v) for k, v in out.items()]


def scan_index(urls: Sequence[str], with_labels: bool = True) -> list[IndexEntry]:
    """(shard, key, label) of every sample in ``urls``. Local tars only read headers + ``.cls``."""
    entries: list[IndexEntry] = []
    for i, url in enumerate(urls):
        if not is_remote(url):
            entries.extend(_scan_local(_local_path(url), i, with_labels))
            continue
        with open_stream(url) as f:
            for raw in iter_tar_samples(f):
                lab = int(raw["cls"].decode().strip()) if with_labels and "cls" in raw else None
                entries.append(IndexEntry(i, raw["__key__"], lab))
    return entries


def class_balanced_sample(entries: Sequence[IndexEntry], n: int, seed: int = 0) -> list[IndexEntry]:
    """Draw ``n`` entries, seeded, as class-balanced as possible.

    Classes are visited round-robin in a seeded random order, taking one seeded-random sample per
    class per round, so per-class counts differ by at most one unless a class runs out (its share
    then goes to the others). Entries without label form a single pool (uniform sampling). The
    result is sorted by (shard, key); ``n >= len(entries)`` returns everything.
    """
    if n <= 0:
        return []
    if n >= len(entries):
        return sorted(entries, key=lambda e: (e.shard, e.key))
    rng = random.Random(seed)
    groups: dict[int | None, list[IndexEntry]] = {}
    for e in sorted(entries, key=lambda e: (e.shard, e.key)):
        groups.setdefault(e.label, []).append(e)
    labels = sorted(groups, key=lambda x: (x is None, x if x is not None else 0))
    for lab in labels:
        rng.shuffle(groups[lab])
    rng.shuffle(labels)
    picked: list[IndexEntry] = []
    depth = 0
    while len(picked) < n:
        for lab in labels:
            g = groups[lab]
            if depth < len(g):
                picked.append(g[depth])
                if len(picked) == n:
                    break
        depth += 1
    return sorted(picked, key=lambda e: (e.shard, e.key))


def assert_disjoint(
    a: Iterable[tuple[str, str]], b: Iterable[tuple[str, str]], what: str = "calibration/evaluation"
) -> None:
    """Raise :class:`OverlapError` if two sets of (shard url, key) share a sample."""
    inter = set(a) & set(b)
    if inter:
        ex = sorted(inter)[:3]
        raise OverlapError(f"{what} overlap in {len(inter)} sample(s), e.g. {ex}")
