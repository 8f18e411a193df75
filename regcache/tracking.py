"""A validate run's results for experiment trackers (Lightning loggers: CSV, TensorBoard, W&B, MLflow, ...).

The per-dataset metrics reach the loggers through ``LightningModule.log`` (callbacks.validation); this adds what
metrics.json holds beside them: the RegCache result, the calibration, ``timings_s`` and the plots. Numbers go
to ``log_metrics``, everything else to ``log_hyperparams``; plots go to the loggers that take images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["log_image", "log_run_summary", "summary_metrics", "summary_params"]

REGCACHE_NUMBERS = ("l_q", "l_start", "tau", "k_delete", "register", "objective_score", "base_score", "gain_over_base")
REGCACHE_PARAMS = ("l_q", "l_start", "tau", "k_delete", "register", "mode", "modes", "objective", "warning")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summary_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a run's results besides its metrics: ``timings_s/*``, ``regcache/*``, ``outliers/*``,
    ``num_samples/*`` (as metrics.json names them)."""
    out: dict[str, float] = {}
    for phase, seconds in (results.get("timings_s") or {}).items():
        out[f"timings_s/{phase}"] = float(seconds)
    rc = results.get("regcache") or {}
    out |= {f"regcache/{k}": float(rc[k]) for k in REGCACHE_NUMBERS if _number(rc.get(k))}
    outliers = results.get("outliers") or {}
    out |= {f"outliers/{k}": float(v) for k, v in outliers.items() if _number(v)}
    for name, n in (results.get("num_samples") or {}).items():
        out[f"num_samples/{name}"] = float(n)
    return out


def summary_params(describe: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The run's identity, RegCache configuration (l_q, register, τ, k̃, objective, ...) and calibration as
    hyper-parameters (JSON-able values)."""
    rc = results.get("regcache")
    params = {
        "method": describe.get("method"),
        "w_bits": describe.get("w_bits"),
        "a_bits": describe.get("a_bits"),
        "regcache": None if rc is None else {k: rc[k] for k in REGCACHE_PARAMS if k in rc},
        "calibration": results.get("calibration"),
    }
    return json.loads(json.dumps(params, default=str))


def log_image(logger: Any, key: str, path: str | Path) -> bool:
    """Log a PNG to ``logger`` where it takes images (W&B and loggers with ``log_image``, TensorBoard, MLflow);
    False where it does not (CSV: the file stays in the run directory)."""
    if callable(getattr(logger, "log_image", None)):  # WandbLogger's interface
        logger.log_image(key=key, images=[str(path)])
        return True
    experiment = getattr(logger, "experiment", None)
    if callable(getattr(experiment, "add_image", None)):  # TensorBoard's SummaryWriter (or tensorboardX)
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            experiment.add_image(key, np.asarray(image.convert("RGB")), dataformats="HWC")
        return True
    run_id = getattr(logger, "run_id", None)
    if run_id is not None and callable(getattr(experiment, "log_artifact", None)):  # MLflow's client
        experiment.log_artifact(run_id, str(path), artifact_path="plots")
        return True
    return False


def log_run_summary(
    loggers: Iterable[Any],
    describe: Mapping[str, Any],
    results: Mapping[str, Any],
    images: Mapping[str, str | Path] | None = None,
    step: int = 0,
) -> dict[str, list[str]]:
    """Send :func:`summary_params`, :func:`summary_metrics` and the existing ``images`` to every logger;
    returns, per logger class, the image keys it took."""
    params, metrics = summary_params(describe, results), summary_metrics(results)
    taken: dict[str, list[str]] = {}
    for logger in loggers:
        logger.log_hyperparams(params)
        if metrics:
            logger.log_metrics(metrics, step=step)
        keys = [k for k, p in (images or {}).items() if Path(p).is_file() and log_image(logger, k, p)]
        taken[type(logger).__name__] = keys
    return taken
