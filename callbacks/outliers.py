"""Per-block outlier profile of the residual stream, before (plain float model) and after (as evaluated)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from regcache._lightning import pl
from regcache.eval import OutlierStats
from regcache.eval.outliers import plot_profile
from regcache.registers import plain_float
from regcache.utils import write_json


class OutlierReport(pl.Callback):
    """Token-norm statistics at every block input during validation, reduced across ranks.

    ``after``: the model as evaluated (quantized, with registers and deletion if installed).
    ``before``: the plain float model: the module's fidelity pass on every batch, or (without one)
    an extra float pass on the first ``before_batches`` batches of each rank.
    Writes ``outliers.json`` and ``outliers.png`` into the run directory; the summary goes into
    metrics.json under ``outliers``.
    """

    def __init__(self, before_batches: int = 8, rel_thresholds: tuple[float, ...] = (5.0, 10.0)) -> None:
        self.before_batches = before_batches
        self.rel_thresholds = rel_thresholds
        self._handles: list[Any] = []

    def _hook(self, encoder, index: int):
        def hook(_module, _inputs, output):
            # the plain float passes (fidelity, or ours below) feed "before", the evaluated model "after"
            (self.before if getattr(encoder, "in_plain_float", False) else self.after).update(index, output)

        return hook

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start fresh before / after statistics and hook every block's input tap to feed them."""
        encoder = pl_module.encoder
        skip = encoder.num_prefix_tokens
        self.after = OutlierStats(rel_thresholds=self.rel_thresholds, skip_tokens=skip)
        self.before = OutlierStats(rel_thresholds=self.rel_thresholds, skip_tokens=skip)
        self.seen_before = 0
        # a deployed run's float passes run on its float copy (integer modules have no float mode): hook both
        float_copy = getattr(pl_module, "_float_encoder", None)
        encoders = [encoder] if float_copy is None else [encoder, float_copy]
        self._handles = [
            b.tap_input.register_forward_hook(self._hook(enc, i)) for enc in encoders for i, b in enumerate(enc.blocks)
        ]

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Mapping[str, Any],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Without a fidelity pass, run the plain float model on the first batches to feed the "before" profile."""
        if "float_features" in outputs or self.seen_before >= self.before_batches:
            return  # the module's fidelity pass already fed "before"
        float_encoder = getattr(pl_module, "float_encoder", None)  # QuantizedEncoder's (a deployed run's copy)
        context = float_encoder() if float_encoder is not None else plain_float(pl_module.encoder)
        with context as encoder, torch.no_grad():
            encoder(batch["image"].to(pl_module.device))
        self.seen_before += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the hooks, reduce both profiles over ranks, summarise them in the results, write JSON and plot."""
        for h in self._handles:
            h.remove()
        self._handles = []
        device = pl_module.device if pl_module.device.type == "cuda" else None
        profiles = {"before": self.before.compute(device=device), "after": self.after.compute(device=device)}
        summary = {
            "max_l2_before": max((b["max_l2"] for b in profiles["before"].values()), default=None),
            "max_l2_after": max((b["max_l2"] for b in profiles["after"].values()), default=None),
            "json": str(pl_module.run_dir / "outliers.json"),
            "plot": str(pl_module.run_dir / "outliers.png"),
        }
        rc = pl_module.results.get("regcache") or {}
        if rc.get("l_q") is not None:
            lq = str(rc["l_q"])
            summary["max_l2_at_lq_before"] = profiles["before"].get(lq, {}).get("max_l2")
            summary["max_l2_at_lq_after"] = profiles["after"].get(lq, {}).get("max_l2")
        pl_module.results["outliers"] = summary
        if trainer.is_global_zero:
            write_json(pl_module.run_dir / "outliers.json", json.loads(json.dumps(profiles)))
            plot_profile(profiles, pl_module.run_dir / "outliers.png", title=pl_module.hparams.model)
