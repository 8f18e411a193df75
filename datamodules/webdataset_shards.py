"""LightningDataModule over CLIP_benchmark webdataset shards (classification and retrieval).

Splits:

* **evaluation** (``val_dataloader`` / ``test_dataloader`` / ``predict_dataloader``): every sample of
  ``eval_split`` exactly once over all ranks x workers (see :mod:`regcache.data.splitting`).
* **calibration** (``calib_dataloader``, also ``train_dataloader``) and **reference**
  (``reference_dataloader``, e.g. a k-NN feature bank): a whole split, or ``*_size`` samples drawn
  seeded and class-balanced from it. If drawn from the evaluation shards, the drawn samples are
  excluded from evaluation (identity = real shard path + key), so they never overlap.
  Calibration is replicated on every rank by default (identical statistics without collectives);
  the reference set is split across ranks by default (gather it, e.g. with
  :func:`regcache.eval.gather_by_id`).

Ranks may receive different numbers of evaluation batches: log metrics at epoch end only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from regcache._lightning import pl
from regcache.data.reader import (
    IMAGE_EXTS,
    CanonicalBatches,
    ShardDataset,
    SkipCounter,
    collate,
    shard_error_report,
)
from regcache.data.sampling import IndexEntry, OverlapError, class_balanced_sample, scan_index
from regcache.data.shards import DatasetInfo, is_remote, read_dataset_info, resolve_split_shards
from regcache.data.splitting import dist_rank_world

if TYPE_CHECKING:
    from regcache.data.gpu_decode import DecodePrefetcher, TensorPreprocess

__all__ = ["ClassificationDataModule", "RetrievalDataModule", "WebDatasetDataModule"]

log = logging.getLogger(__name__)

STAGES = ("eval", "calib", "ref")


def _identity(url: str) -> str:
    return url if is_remote(url) else os.path.realpath(url.removeprefix("file://"))


def _shard_record(url: str, root: str | None) -> dict[str, Any]:
    """A shard's name under ``root`` (the URL where remote) and its size in bytes (None where unknown)."""
    if is_remote(url):
        return {"name": url, "bytes": None}
    path = url.removeprefix("file://")
    name = os.path.relpath(path, root) if root is not None and not is_remote(root) else os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return {"name": name, "bytes": size}


class WebDatasetDataModule(pl.LightningDataModule):
    """Evaluation / calibration / reference loaders over ``<root>/<split>/{0..N-1}.tar``.

    Args:
        root: dataset root (local dir or URL); holds classnames / templates / dataset_type files.
        transform: the encoder's preprocessing, ``PIL.Image -> (3,H,W) tensor``.
        task: ``"classification"`` / ``"retrieval"``; default from ``dataset_type.txt``.
        eval_split, calib_split, ref_split: split names (``None`` disables calib / ref).
        eval_shards, calib_shards, ref_shards: explicit shard patterns overriding discovery
            (brace patterns, ``pipe:`` / http URLs).
        calib_size, ref_size: draw this many samples (seeded, class-balanced); ``None`` = whole split.
        seed: sampling seed.
        calib_split_by_rank, ref_split_by_rank: split that set across ranks (else replicated).
        batch_size, num_workers, pin_memory: DataLoader settings (``eval_batch_size`` overrides).
        multiprocessing_context: DataLoader worker start method (``"fork"`` avoids re-importing
            everything in each worker when the rank process itself was spawned).
        decode_on_gpu: evaluation workers only read shards and pass the encoded images on; they
            are decoded + preprocessed on the device (nvJPEG,
            :class:`regcache.data.gpu_decode.TensorPreprocess` read off ``transform``). With CUDA
            (the trainer's device, else the current one) and ``prefetch_depth > 0`` the evaluation
            loaders decode ahead in a background thread on their own stream
            (:class:`~regcache.data.gpu_decode.DecodePrefetcher`: batches carry ``image_pending``);
            otherwise batches carry ``image_bytes`` and are decoded when used. Either way
            :meth:`on_after_batch_transfer` (:meth:`decode_batch`) turns them into ``image``.
            Without CUDA the decode runs on the CPU. Calibration / reference loaders decode on
            the CPU in the workers.
        prefetch_depth: decoded evaluation batches the background thread may hold ready
            (``decode_on_gpu`` on CUDA only); 0 decodes each batch when it is used.
        tolerate_shard_errors: a shard that cannot be read to its end (truncated, corrupt tar)
            fails the run with :class:`~regcache.data.ShardReadError` naming it (default); ``True``
            evaluates without the rest of that shard and records it (:meth:`shard_errors`).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        transform: Callable | None = None,
        *,
        task: str | None = None,
        eval_split: str = "test",
        eval_shards: str | list[str] | None = None,
        calib_split: str | None = None,
        calib_shards: str | list[str] | None = None,
        calib_size: int | None = None,
        ref_split: str | None = None,
        ref_shards: str | list[str] | None = None,
        ref_size: int | None = None,
        seed: int = 0,
        calib_split_by_rank: bool = False,
        ref_split_by_rank: bool = True,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        image_exts: tuple[str, ...] = IMAGE_EXTS,
        decode_on_gpu: bool = False,
        prefetch_depth: int = 2,
        tolerate_shard_errors: bool = False,
    ) -> None:
        super().__init__()
        self.tolerate_shard_errors = tolerate_shard_errors
        self.decode_on_gpu = decode_on_gpu
        self.prefetch_depth = prefetch_depth
        self.root = None if root is None else str(root)
        self.transform = transform
        self._task = task
        self.eval_split, self.eval_shards = eval_split, eval_shards
        self.calib_split, self.calib_shards, self.calib_size = calib_split, calib_shards, calib_size
        self.ref_split, self.ref_shards, self.ref_size = ref_split, ref_shards, ref_size
        self.seed = seed
        self.calib_split_by_rank = calib_split_by_rank
        self.ref_split_by_rank = ref_split_by_rank
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.multiprocessing_context = multiprocessing_context
        self.image_exts = tuple(image_exts)
        self.counters = {s: SkipCounter() for s in STAGES}
        self.info: DatasetInfo | None = None
        self.urls: dict[str, list[str]] = {}
        self.selected: dict[str, list[IndexEntry] | None] = {}
        self.eval_exclude: set[tuple[int, str]] = set()
        self._is_setup = False

    # ------------------------------------------------------------------ metadata
    @property
    def task(self) -> str:
        """``classification`` or ``retrieval``: as configured, else from the root's ``dataset_type.txt``."""
        self._ensure_setup()
        return self._task  # type: ignore[return-value]

    @property
    def classnames(self) -> list[str]:
        """Class names from the root's ``classnames.txt`` (a copy; empty when the file is missing)."""
        self._ensure_setup()
        return list(self.info.classnames)

    @property
    def templates(self) -> list[str]:
        """Zero-shot templates from the root's templates file (a copy; empty when the file is missing)."""
        self._ensure_setup()
        return list(self.info.templates)

    @property
    def num_classes(self) -> int:
        """Number of class names (0 without a ``classnames.txt``, as for retrieval datasets)."""
        return len(self.classnames)

    def zeroshot_texts(self) -> tuple[list[str], list[str]]:
        """Class names and templates for a zero-shot head (an error naming the root's file where one is missing)."""
        self._ensure_setup()
        return self.info.zeroshot_texts()

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:  # nothing to download
        """No-op: shards are read in place (local or streamed), nothing is downloaded or prepared."""

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards and metadata and draw calibration / reference subsets (once, whatever the stage)."""
        self._ensure_setup()

    def _ensure_setup(self) -> None:
        if self._is_setup:
            return
        self.info = read_dataset_info(self.root)
        if self._task is None:
            self._task = self.info.dataset_type
        if self._task == "classification" and self.root is not None and not self.info.classnames:
            log.warning("no classnames.txt under %r: zero-shot classification needs class names", self.root)
        self.urls["eval"] = resolve_split_shards(self.root, self.eval_split, self.eval_shards)
        eval_ids = {_identity(u): i for i, u in enumerate(self.urls["eval"])}
        for stage, split, shards, size in (
            ("calib", self.calib_split, self.calib_shards, self.calib_size),
            ("ref", self.ref_split, self.ref_shards, self.ref_size),
        ):
            if split is None and shards is None:
                self.selected[stage] = None
                continue
            urls = resolve_split_shards(self.root, split or "", shards)
            self.urls[stage] = urls
            shared = [u for u in urls if _identity(u) in eval_ids]
            if size is None:
                if shared:
                    raise OverlapError(
                        f"{stage} split {split!r} uses {len(shared)} evaluation shard(s) (e.g. {shared[0]!r}) "
                        f"in full: set {stage}_size to draw a subset (excluded from evaluation) or use a "
                        "different split."
                    )
                self.selected[stage] = None
                continue
            entries = scan_index(urls, with_labels=self._task == "classification")
            picked = class_balanced_sample(entries, size, seed=self.seed)
            self.selected[stage] = picked
            if len(picked) < size:
                warnings.warn(f"{stage}: only {len(picked)} samples available (< {size})", stacklevel=2)
            n_excl = 0
            for e in picked:
                j = eval_ids.get(_identity(urls[e.shard]))
                if j is not None:
                    self.eval_exclude.add((j, e.key))
                    n_excl += 1
            if n_excl:
                warnings.warn(
                    f"{n_excl} {stage} sample(s) drawn from the evaluation shards are excluded from "
                    "evaluation (calibration/reference never overlap evaluation)",
                    stacklevel=2,
                )
        self._is_setup = True
        self.check_disjoint()

    def identities(self, stage: str) -> set[tuple[str, str]] | None:
        """(real shard path, key) of a drawn calib/ref subset (None when it is a whole split)."""
        self._ensure_setup()
        sel = self.selected.get(stage)
        if sel is None:
            return None
        return {(_identity(self.urls[stage][e.shard]), e.key) for e in sel}

    def selection(self, stage: str) -> dict[str, Any] | None:
        """What ``stage`` reads, for artifact keys and the run record (None: no such split).

        Split, shards (names under the root with their byte sizes: the data, not where it lies), the
        drawn size, seed and draw (class-balanced), the number drawn and the batch size; no absolute paths.
        """
        self._ensure_setup()
        if stage != "eval" and stage not in self.urls:
            return None
        split = {"eval": self.eval_split, "calib": self.calib_split, "ref": self.ref_split}[stage]
        size = {"eval": None, "calib": self.calib_size, "ref": self.ref_size}[stage]
        sel = None if stage == "eval" else self.selected.get(stage)
        info = self.info
        return {
            "split": split,
            "shards": [_shard_record(u, self.root) for u in self.urls[stage]],
            "size": size,
            "seed": self.seed if size is not None else None,
            "draw": "class_balanced" if size is not None else "whole_split",
            "drawn": None if sel is None else len(sel),
            "batch_size": self.eval_batch_size if stage == "eval" else self.batch_size,
            "classes_sha256": None
            if info is None
            else hashlib.sha256(json.dumps([info.classnames, info.templates]).encode()).hexdigest()[:16],
        }

    def check_disjoint(self) -> None:
        """Raise :class:`OverlapError` if calibration/reference can overlap the evaluation samples."""
        eval_ids = [_identity(u) for u in self.urls["eval"]]
        excluded = {(eval_ids[j], k) for j, k in self.eval_exclude}
        for stage in ("calib", "ref"):
            if stage not in self.urls:
                continue
            ids = self.identities(stage)
            if ids is None:  # whole split: must not share any shard with eval
                shared = {_identity(u) for u in self.urls[stage]} & set(eval_ids)
                if shared:
                    raise OverlapError(f"{stage} shares evaluation shards {sorted(shared)[:3]}")
                continue
            leaked = {i for i in ids if i[0] in set(eval_ids)} - excluded
            if leaked:
                raise OverlapError(f"{stage} samples present in evaluation: {sorted(leaked)[:3]}")

    # ------------------------------------------------------------------ datasets / loaders
    def dataset(self, stage: str = "eval") -> ShardDataset:
        """A fresh :class:`ShardDataset` for ``stage`` in ``("eval", "calib", "ref")``."""
        self._ensure_setup()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        if stage != "eval" and stage not in self.urls:
            raise RuntimeError(f"no {stage} split configured (set {stage}_split / {stage}_shards)")
        split_by_rank = {"eval": True, "calib": self.calib_split_by_rank, "ref": self.ref_split_by_rank}[stage]
        rank, world = dist_rank_world()  # fixed now: spawn-started workers do not see the process group
        sel = None if stage == "eval" else self.selected.get(stage)
        return ShardDataset(
            self.urls[stage],
            transform=self.transform,
            task=self._task,
            select=None if sel is None else [(e.shard, e.key) for e in sel],
            exclude=self.eval_exclude if stage == "eval" else None,
            split_by_rank=split_by_rank,
            rank=rank,
            world_size=world,
            image_exts=self.image_exts,
            counter=self.counters[stage],
            raw_images=self.decode_on_gpu and stage == "eval",
            tolerate_shard_errors=self.tolerate_shard_errors,
        )

    def dataloader(
        self, stage: str = "eval", batch_size: int | None = None, ordered: bool | None = None
    ) -> torch.utils.data.DataLoader | DecodePrefetcher | CanonicalBatches:
        """The loader of ``stage``; evaluation with ``decode_on_gpu`` on CUDA is wrapped in a DecodePrefetcher.

        Calibration and reference batches come as :class:`CanonicalBatches`: full batches, and for
        ``ordered`` (default: when the stage is a drawn subset) in ``sample_id`` order, the same for any
        ``num_workers``; ordering collects the subset in memory, so consumers that do not depend on
        order (the k-NN bank) pass ``ordered=False`` and stream.
        """
        bs = batch_size or (self.eval_batch_size if stage == "eval" else self.batch_size)
        loader = torch.utils.data.DataLoader(
            self.dataset(stage),
            batch_size=bs,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
        )
        if stage == "eval" and self.decode_on_gpu and self.prefetch_depth > 0:
            device = self.prefetch_device()
            if device is not None:
                from regcache.data.gpu_decode import DecodePrefetcher

                return DecodePrefetcher(loader, self.tensor_preprocess(), device, self.prefetch_depth)
        if stage != "eval":
            drawn = self.selected.get(stage) is not None
            return CanonicalBatches(loader, bs, ordered=drawn if ordered is None else ordered and drawn)
        return loader

    def prefetch_device(self) -> torch.device | None:
        """Where evaluation batches are decoded ahead: the trainer's CUDA device, else the current one; None without."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            device = trainer.strategy.root_device
            return device if device.type == "cuda" else None
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def val_dataloader(self) -> torch.utils.data.DataLoader | DecodePrefetcher:
        """The evaluation loader (a DecodePrefetcher when decoding on the GPU)."""
        return self.dataloader("eval")

    # ------------------------------------------------------------------ decoding on the device
    def tensor_preprocess(self) -> TensorPreprocess:
        """The batched tensor version of ``transform`` (see :mod:`regcache.data.gpu_decode`)."""
        from regcache.data.gpu_decode import TensorPreprocess

        if getattr(self, "_tensor_preprocess_of", None) is not self.transform:
            self._tensor_preprocess = TensorPreprocess.from_transform(self.transform)
            self._tensor_preprocess_of = self.transform
        return self._tensor_preprocess

    def decode_batch(self, batch: dict, device: torch.device | str | None = None) -> dict:
        """Turn ``image_pending`` (prefetched) or ``image_bytes`` into ``image`` (on ``device``, default: the batch's).

        A prefetched batch is only waited for, on the current stream (no host sync); encoded bytes
        are decoded here. Batches that already carry ``image`` pass through: nothing decodes twice.
        """
        if not isinstance(batch, dict):
            return batch
        if "image_pending" in batch:
            images = batch.pop("image_pending").wait()
            batch["image"] = images if device is None else images.to(device, non_blocking=True)
        elif "image_bytes" in batch:
            device = batch["sample_id"].device if device is None else device
            batch["image"] = self.tensor_preprocess()(batch.pop("image_bytes"), device)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Decode encoded or prefetched images once the batch is on the device (other batches pass through)."""
        return self.decode_batch(batch)

    def test_dataloader(self) -> torch.utils.data.DataLoader | DecodePrefetcher:
        """The evaluation loader, so ``trainer.test`` runs on the same data as validation."""
        return self.dataloader("eval")

    def predict_dataloader(self) -> torch.utils.data.DataLoader | DecodePrefetcher:
        """The evaluation loader, so ``trainer.predict`` embeds the evaluation split."""
        return self.dataloader("eval")

    def calib_dataloader(self) -> CanonicalBatches:
        """Calibration batches: full, and in ``sample_id`` order for a drawn subset, whatever ``num_workers``."""
        return self.dataloader("calib")

    def train_dataloader(self) -> CanonicalBatches:
        """The calibration loader (for Lightning-driven calibration)."""
        return self.dataloader("calib")

    def reference_dataloader(self) -> CanonicalBatches:
        """Reference batches (register search, k-NN bank): full, and in ``sample_id`` order for a drawn subset."""
        return self.dataloader("ref")

    # ------------------------------------------------------------------ skipped-sample accounting
    def skip_counts(self, stage: str = "eval") -> dict[str, int]:
        """Skipped samples / shard read errors seen by this process (its workers included)."""
        return self.counters[stage].as_dict()

    def reduced_skip_counts(self, stage: str = "eval", device: torch.device | str | None = None) -> dict[str, int]:
        """:meth:`skip_counts` summed over ranks. A collective when torch.distributed is initialised:
        call it on every rank (e.g. in ``on_validation_epoch_end``). For NCCL pass the CUDA device."""
        c = self.counters[stage]
        t = torch.tensor([c.skipped, c.shard_errors], dtype=torch.long, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return {"skipped_samples": int(t[0]), "shard_errors": int(t[1])}

    def shard_errors(self, stage: str = "eval", reduce: bool = True) -> dict[str, Any]:
        """The failed shard reads of ``stage`` by shard (:func:`regcache.data.shard_error_report`).

        With ``reduce`` the records of every rank are gathered: a collective when torch.distributed
        is initialised, so call it on every rank.
        """
        records = self.counters[stage].shard_error_records()
        if reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return shard_error_report(records, self.urls.get(stage, []))

    def reset_skip_counts(self) -> None:
        """Zero the skipped-sample and shard-error counts of every stage."""
        for c in self.counters.values():
            c.reset()


class ClassificationDataModule(WebDatasetDataModule):
    """:class:`WebDatasetDataModule` with ``task="classification"``."""

    def __init__(self, root=None, transform=None, **kwargs) -> None:
        kwargs.setdefault("task", "classification")
        super().__init__(root, transform, **kwargs)


class RetrievalDataModule(WebDatasetDataModule):
    """:class:`WebDatasetDataModule` with ``task="retrieval"`` (batches carry ``captions``)."""

    def __init__(self, root=None, transform=None, **kwargs) -> None:
        kwargs.setdefault("task", "retrieval")
        super().__init__(root, transform, **kwargs)
