"""Several named CLIP_benchmark datasets in one validation run, plus the calibration / reference sources."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from datamodules.webdataset_shards import WebDatasetDataModule
from regcache._lightning import pl
from regcache.eval.clip_benchmark import benchmark_dataset_name
from regcache.threads import configure_threads


class ValidationSuite(pl.LightningDataModule):
    """Named datasets under one root; each is reported under its name.

    Args:
        root: directory (or URL prefix) holding the datasets; one override moves them all.
            ``builtin`` is the sample data shipped with regcache (``cifar10_sample``,
            ``imagenet1k_sample_small``).
        datasets: ``{name: options}`` where options are :class:`WebDatasetDataModule` arguments
            plus ``path`` (relative to ``root``; default: the name) and ``clip_benchmark_name``, the
            dataset's name in the CLIP_benchmark result files (default: ``wds/<x>`` for a ``wds_<x>``
            folder, ``wds/vtab/flowers`` for ``wds_vtab-flowers``, else ``wds/<name>``).
        calibration: name of the dataset whose ``calib_split`` feeds calibration.
        reference: name of the dataset whose ``ref_split`` feeds the register search / k-NN bank.
        batch_size, num_workers, seed, decode_on_gpu, prefetch_depth: shared loader settings (a
            dataset's own options win); ``decode_on_gpu`` decodes the evaluation JPEGs with nvJPEG on
            the device, ``prefetch_depth`` batches ahead in a background thread (see
            :class:`~datamodules.webdataset_shards.WebDatasetDataModule`). ``prefetch_depth=None``
            picks by model (:meth:`set_model_kind`): 2 for a quantized model, 0 for a float-only one,
            whose model is fast enough that the decode thread costs more than it hides
            (BENCHMARKS.md §4).
        tolerate_shard_errors: shared default of every dataset's option (a dataset's own wins):
            false fails the run on a shard that cannot be read to its end, naming it; true
            evaluates without the rest of it and records it (``shard_errors`` in metrics.json).
    """

    def __init__(
        self,
        root: str = "data",
        datasets: dict[str, dict[str, Any]] | None = None,
        calibration: str | None = None,
        reference: str | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        seed: int = 0,
        decode_on_gpu: bool = False,
        prefetch_depth: int | None = None,
        tolerate_shard_errors: bool = False,
    ) -> None:
        super().__init__()
        if not datasets:
            raise ValueError("ValidationSuite needs at least one dataset: datasets={name: {path: ..., ...}}")
        for role, name in (("calibration", calibration), ("reference", reference)):
            if name is not None and name not in datasets:
                raise ValueError(f"{role}={name!r} is not one of the datasets {sorted(datasets)}")
        if root == "builtin":
            from regcache.testbed.data import DATA_DIR

            root = str(DATA_DIR)
        self.root = root
        self.seed = seed  # the default draw seed of every dataset (a dataset's own wins; each selection has its own)
        self.calibration = calibration
        self.reference = reference
        self.modules: dict[str, WebDatasetDataModule] = {}
        self.benchmark_names: dict[str, str] = {}
        self._auto_prefetch: list[str] = []  # datasets whose prefetch depth set_model_kind decides
        for name, options in datasets.items():
            options = dict(options)
            path = options.pop("path", name)
            self.benchmark_names[name] = options.pop("clip_benchmark_name", None) or benchmark_dataset_name(name, path)
            location = path if "://" in path or path.startswith(("/", "pipe:")) else os.path.join(root, path)
            options.setdefault("batch_size", batch_size)
            options.setdefault("num_workers", num_workers)
            options.setdefault("seed", seed)
            options.setdefault("decode_on_gpu", decode_on_gpu)
            options.setdefault("tolerate_shard_errors", tolerate_shard_errors)
            if "prefetch_depth" not in options and prefetch_depth is None:
                self._auto_prefetch.append(name)
            options.setdefault("prefetch_depth", 2 if prefetch_depth is None else prefetch_depth)
            self.modules[name] = WebDatasetDataModule(location, **options)

    @property
    def names(self) -> list[str]:
        """Dataset names in dataloader order."""
        return list(self.modules)

    def _module(self, idx_or_name: int | str) -> WebDatasetDataModule:
        return self.modules[idx_or_name if isinstance(idx_or_name, str) else self.names[idx_or_name]]

    def set_transform(self, transform: Callable) -> None:
        """Use the encoder's preprocessing for every dataset."""
        for m in self.modules.values():
            m.transform = transform

    def set_model_kind(self, quantized: bool) -> None:
        """Resolve ``prefetch_depth=None``: decode ahead for a quantized model only."""
        for name in self._auto_prefetch:
            self.modules[name].prefetch_depth = 2 if quantized else 0

    def dataset_task(self, idx: int) -> str:
        """``classification`` or ``retrieval``."""
        return self._module(idx).task

    def benchmark_name(self, idx: int) -> str:
        """The dataset's name in CLIP_benchmark's result files (``wds/imagenet1k``, ``wds/mscoco_captions``)."""
        return self.benchmark_names[self.names[idx]]

    def classnames(self, idx: int) -> list[str]:
        """Class names of a classification dataset."""
        return self._module(idx).classnames

    def templates(self, idx: int) -> list[str]:
        """Zero-shot templates of a classification dataset."""
        return self._module(idx).templates

    def zeroshot_texts(self, idx: int) -> tuple[list[str], list[str]]:
        """Class names and templates of a classification dataset, checked for a zero-shot head."""
        return self._module(idx).zeroshot_texts()

    def setup(self, stage: str | None = None) -> None:
        """Resolve every dataset's shards, metadata and drawn calibration / reference subsets.

        On a CPU trainer it also sets torch's threads from the idle cores and the loader workers
        (:func:`regcache.threads.configure_threads`; ``OMP_NUM_THREADS`` wins).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.strategy.root_device.type == "cpu":
            workers = max(m.num_workers for m in self.modules.values())
            configure_threads(workers, processes=trainer.num_devices)
        for m in self.modules.values():
            m.setup(stage)

    def val_dataloader(self) -> list[torch.utils.data.DataLoader]:
        """One evaluation loader per dataset, in :attr:`names` order, each told the trainer for its prefetch device."""
        for m in self.modules.values():  # the trainer's device is where decode_on_gpu prefetches
            m.trainer = self.trainer
        return [m.val_dataloader() for m in self.modules.values()]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Decode the evaluation images on the device for datasets with ``decode_on_gpu``."""
        return self._module(dataloader_idx).decode_batch(batch)

    def calib_dataloader(self) -> Iterable[dict]:
        """Calibration images (rank-local, all of them)."""
        if self.calibration is None:
            raise RuntimeError("no calibration dataset: set data.calibration to a dataset with calib_split")
        return self.modules[self.calibration].calib_dataloader()

    def reference_dataloader(self, split_by_rank: bool = True) -> Iterable[dict]:
        """Reference images for the register search (every rank sees all of them with ``split_by_rank=False``)."""
        if self.reference is None:
            raise RuntimeError("no reference dataset: set data.reference to a dataset with ref_split")
        module = self.modules[self.reference]
        saved, module.ref_split_by_rank = module.ref_split_by_rank, split_by_rank
        try:
            return module.reference_dataloader()
        finally:
            module.ref_split_by_rank = saved

    def calib_selection(self) -> dict[str, Any] | None:
        """The calibration images' selection (dataset, split, shards, size, seed, draw): for artifact keys."""
        if self.calibration is None:
            return None
        return {"dataset": self.calibration, **(self.modules[self.calibration].selection("calib") or {})}

    def reference_selection(self) -> dict[str, Any] | None:
        """The reference images' selection (dataset, split, shards, size, seed, draw): for artifact keys."""
        if self.reference is None:
            return None
        return {"dataset": self.reference, **(self.modules[self.reference].selection("ref") or {})}

    def selections(self) -> dict[str, Any]:
        """Every split the run reads (``<name>/eval``, ``<name>/calib``, ``<name>/ref``), for the run record."""
        out = {}
        for name, module in self.modules.items():
            for stage in ("eval", "calib", "ref"):
                sel = module.selection(stage)
                if sel is not None:
                    out[f"{name}/{stage}"] = sel
        return out

    def reference_info(self) -> tuple[list[str], list[str]]:
        """Class names and templates of the reference dataset (for the ``acc_ref`` objective)."""
        return self.modules[self.reference].zeroshot_texts()

    def bank_dataloader(self, idx: int) -> Iterable[dict]:
        """Labelled k-NN bank of a dataset: its reference split."""
        return self._module(idx).dataloader("ref", ordered=False)  # order-free: streams, nothing collected

    def skipped_samples(self, device: torch.device | None = None) -> dict[str, int]:
        """Unreadable samples skipped during evaluation, per dataset, summed over ranks (collective)."""
        dev = device if device is not None and device.type == "cuda" else None
        return {n: m.reduced_skip_counts("eval", device=dev)["skipped_samples"] for n, m in self.modules.items()}

    def shard_errors(self) -> dict[str, dict[str, Any]]:
        """Failed (tolerated) shard reads of every dataset, gathered over ranks (collective: call it on every rank).

        Keyed by dataset name (evaluation), plus ``<name>/calib`` / ``<name>/ref`` where those had any.
        """
        out = {}
        for name, module in self.modules.items():
            for stage in ("eval", "calib", "ref"):
                report = module.shard_errors(stage)
                if stage == "eval" or report["shards"]:
                    out[name if stage == "eval" else f"{name}/{stage}"] = report
        return out
