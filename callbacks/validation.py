"""Metric wiring: each callback turns the module's per-batch embeddings into one family of metrics.

All metrics keep global sample ids and are computed once per epoch (distributed-safe), then stored
in ``pl_module.results["metrics"]`` under ``<dataset>/<metric>`` as fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from regcache._lightning import pl
from regcache.eval import (
    FeatureFidelity,
    KNNAccuracy,
    RetrievalRecallAtK,
    ZeroShotAccuracy,
    build_zeroshot_classifier,
    zeroshot_logits,
)
from regcache.eval.patch_tokens import PatchTokenFidelity


def _datamodule(trainer: pl.Trainer):
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "dataset_task"):
        raise RuntimeError("validation callbacks need the regcache ValidationSuite datamodule")
    return dm


def _store(pl_module: pl.LightningModule, name: str, values: dict[str, float]) -> None:
    for key, value in values.items():
        pl_module.results["metrics"][f"{name}/{key}"] = float(value)
        # every rank holds the global value (metrics gather by sample id): sync_dist only tells Lightning so, which
        # silences its advice to sync; with rank_zero_only it runs no collective
        pl_module.log(f"{name}/{key}", float(value), sync_dist=True, rank_zero_only=True, add_dataloader_idx=False)


class _PerDataset(pl.Callback):
    """Keeps one metric object per validation dataloader of the task this callback handles."""

    task: str = ""

    def __init__(self) -> None:
        self.metrics: dict[int, Any] = {}

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Whether this callback measures dataloader ``idx``."""
        return _datamodule(trainer).dataset_task(idx) == self.task

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> Any:
        raise NotImplementedError

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        raise NotImplementedError

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Mapping[str, Any],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Update the metric of this batch's dataloader, if this callback measures it."""
        if dataloader_idx in self.metrics:
            self.update(self.metrics[dataloader_idx], pl_module, outputs, batch, dataloader_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics = {}
        for idx in range(len(_datamodule(trainer).names)):
            if self.applies(trainer, pl_module, idx):
                self.metrics[idx] = self.make_metric(trainer, pl_module, idx).to(pl_module.device)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for idx, metric in self.metrics.items():
            _store(pl_module, pl_module.dataset_name(idx), self.results(metric.compute()))
            metric.reset()


class ZeroShotValidation(_PerDataset):
    """Zero-shot top-1 / top-5 (micro) and mean per-class recall (CLIP_benchmark protocol)."""

    task = "classification"

    def __init__(self, cache_dir: str | None = None, text_batch_size: int = 256) -> None:
        super().__init__()
        self.cache_dir = cache_dir
        self.text_batch_size = text_batch_size
        self.classifiers: dict[int, torch.Tensor] = {}

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Only classification datasets, and only for models with a text tower."""
        return pl_module.has_text_tower and super().applies(trainer, pl_module, idx)

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> ZeroShotAccuracy:
        """Build (or load from cache) this dataset's zero-shot classifier and a fresh accuracy metric."""
        dm = _datamodule(trainer)
        classnames, templates = dm.zeroshot_texts(idx)
        with pl_module.timed("zeroshot_classifiers"), torch.inference_mode(False), torch.no_grad():
            self.classifiers[idx] = build_zeroshot_classifier(
                pl_module.net,
                pl_module.tokenizer,
                classnames,
                templates,
                device=pl_module.device,
                batch_size=self.text_batch_size,
                cache_dir=self.cache_dir or str(pl_module.run_dir / "cache"),
                model_id=pl_module.loaded.identity,
                progress=trainer.progress_bar_callback is not None,
            )
        return ZeroShotAccuracy(num_classes=len(classnames))

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        """Score this batch's features against the dataset's zero-shot classifier and update its accuracy."""
        logits = zeroshot_logits(outputs["features"], self.classifiers[idx])
        metric.update(logits, batch["label"].to(logits.device), batch["sample_id"])

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """Zero-shot top-1 / top-5 and mean per-class recall under their reported names."""
        return {
            "zeroshot_top1": computed["top1"],
            "zeroshot_top5": computed["top5"],
            "mean_per_class_recall": computed["mean_per_class_recall"],
        }


class RetrievalValidation(_PerDataset):
    """Image→text and text→image Recall@{1,5,10}, any-positive-hit convention (CLIP_benchmark keys)."""

    task = "retrieval"

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Only retrieval datasets, and only for models with a text tower."""
        return pl_module.has_text_tower and super().applies(trainer, pl_module, idx)

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> RetrievalRecallAtK:
        """A fresh Recall@{1,5,10} metric for this dataset."""
        return RetrievalRecallAtK(ks=(1, 5, 10))

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        """Embed the batch's captions and add them, with the image features and their owners, to the recall metric."""
        captions = [c for caps in batch["captions"] for c in caps]
        ids = batch["sample_id"].tolist()  # one host copy per batch (int() per sample syncs once each)
        owners = torch.tensor([i for caps, i in zip(batch["captions"], ids, strict=True) for _ in caps])
        text = F.normalize(pl_module.encode_text(captions).float(), dim=-1)
        image = F.normalize(outputs["features"].float(), dim=-1)
        metric.update(image, batch["sample_id"], text, owners.to(text.device))

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """Recall@k renamed to CLIP_benchmark's keys (image retrieval = text query, text retrieval = image query)."""
        out = {}
        for k in (1, 5, 10):
            out[f"image_retrieval_recall@{k}"] = computed[f"text_to_image_R@{k}"]  # text query → images
            out[f"text_retrieval_recall@{k}"] = computed[f"image_to_text_R@{k}"]  # image query → captions
        return out


class KNNValidation(_PerDataset):
    """k-NN top-1 (cosine, k=20, T=0.07) against a labelled bank from the dataset's reference split.

    Measures classification datasets of encoders without a text tower (DINOv2), or all of them
    with ``always=True``. The bank is embedded by the model under evaluation.
    """

    task = "classification"

    def __init__(self, k: int = 20, temperature: float = 0.07, always: bool = False) -> None:
        super().__init__()
        self.k, self.temperature, self.always = k, temperature, always

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Classification datasets of models without a text tower, or all of them with ``always``."""
        return (self.always or not pl_module.has_text_tower) and super().applies(trainer, pl_module, idx)

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> KNNAccuracy:
        """Embed the reference split with the evaluated model, gather it across ranks as the k-NN bank."""
        dm = _datamodule(trainer)
        feats, labels = [], []
        with torch.inference_mode(False), torch.no_grad():
            for batch in dm.bank_dataloader(idx):
                feats.append(pl_module.encoder(batch["image"].to(pl_module.device)).float())
                labels.append(batch["label"].to(pl_module.device))
        bank_f, bank_l = torch.cat(feats), torch.cat(labels)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from regcache.eval import all_gather_uneven

            bank_f = torch.cat(all_gather_uneven(bank_f))
            bank_l = torch.cat(all_gather_uneven(bank_l))
        return KNNAccuracy(bank_f, bank_l, num_classes=len(dm.classnames(idx)), k=self.k, temperature=self.temperature)

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        """Classify this batch's features by k-NN against the bank and update the accuracy."""
        feats = outputs["features"].float()
        metric.update(feats, batch["label"].to(feats.device), batch["sample_id"])

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """k-NN top-1 / top-5 under their reported names."""
        return {"knn_top1": computed["top1"], "knn_top5": computed["top5"]}


class FidelityValidation(_PerDataset):
    """Mean cosine between the quantized model's embeddings and the float model's (every dataset)."""

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Every dataset, whenever the module runs its float fidelity pass."""
        return pl_module.fidelity

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> FeatureFidelity:
        """A fresh feature-cosine metric (the reference comes with each batch's outputs)."""
        return FeatureFidelity()

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        """Add the cosine between this batch's evaluated and float features."""
        metric.update(outputs["features"], batch["sample_id"], reference=outputs["float_features"])

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """The mean cosine to the float model's features under its reported name."""
        return {"feature_cosine_to_float": computed["mean_cosine"]}


class PatchTokenFidelityValidation(_PerDataset):
    """Cosine of the quantized model's patch tokens to the float model's, per token and pooled (every dataset).

    What a vision-language model or a dense head consumes: each output patch token against the
    float model's token at its grid position (``regcache.eval.patch_tokens``). The module then
    returns the patch tokens with each batch's embeddings (one forward for both).
    """

    def applies(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> bool:
        """Every dataset, whenever the module runs its float fidelity pass."""
        return pl_module.fidelity

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Ask the module for patch tokens (where fidelity runs), then build the metrics."""
        pl_module.patch_token_outputs = bool(pl_module.fidelity)
        super().on_validation_start(trainer, pl_module)

    def make_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int) -> PatchTokenFidelity:
        """A fresh patch-token metric (the float tokens come with each batch's outputs)."""
        return PatchTokenFidelity()

    def update(
        self, metric: Any, pl_module: pl.LightningModule, outputs: Mapping[str, Any], batch: dict[str, Any], idx: int
    ) -> None:
        """Add this batch's token cosines to the float model's tokens."""
        metric.update(
            outputs["patch_tokens"],
            batch["sample_id"],
            reference=outputs["float_patch_tokens"],
            positions=outputs.get("patch_positions"),
        )

    def results(self, computed: dict[str, torch.Tensor]) -> dict[str, float]:
        """The patch-token cosines to the float model under their reported names."""
        return {
            "patch_token_cosine_to_float": computed["mean_token_cosine"],
            "patch_token_min_cosine_to_float": computed["min_token_cosine"],
            "patch_pooled_cosine_to_float": computed["pooled_cosine"],
            "patch_token_coverage": computed["coverage"],
        }
