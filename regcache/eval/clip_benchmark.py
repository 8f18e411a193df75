"""Results in CLIP_benchmark's format: one result JSON per (dataset, task), as ``clip_benchmark eval`` writes them.

``clip_benchmark build DIR`` aggregates such files into its CSV. The keys are CLIP_benchmark's (``dataset``,
``model``, ``pretrained``, ``task``, ``metrics``, ``language``); the quantized variant (method, bits,
RegCache configuration) is the extra field ``quantization``, which ``build`` carries into a column of its own.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TASKS", "benchmark_dataset_name", "clip_benchmark_results", "write_clip_benchmark_results"]

# regcache task -> (CLIP_benchmark task, {CLIP_benchmark metric: regcache metric})
TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "classification": (
        "zeroshot_classification",
        {"acc1": "zeroshot_top1", "acc5": "zeroshot_top5", "mean_per_class_recall": "mean_per_class_recall"},
    ),
    "retrieval": (
        "zeroshot_retrieval",
        {f"{d}_retrieval_recall@{k}": f"{d}_retrieval_recall@{k}" for k in (1, 5, 10) for d in ("image", "text")},
    ),
}

# CLIP_benchmark names datasets with a "/" (vtab/flowers) and stores them in folders with a "-" (wds_vtab-flowers)
_SLASHED_PREFIXES = ("vtab", "tfds")


def benchmark_dataset_name(name: str, path: str | None = None) -> str:
    """CLIP_benchmark's name of a webdataset dataset: ``wds/<x>`` for a ``wds_<x>`` folder, else ``wds/<name>``.

    ``wds_vtab-flowers`` is ``wds/vtab/flowers``, CLIP_benchmark's folder naming (``--dataset_root
    .../wds_{dataset_cleaned}``) reversed; a folder not named ``wds_*`` keeps the suite's dataset name.
    """
    base = os.path.basename(str(path).rstrip("/")) if path else ""
    if not base.startswith("wds_"):
        return f"wds/{name}"
    rest = base[len("wds_") :]
    head, sep, tail = rest.partition("-")
    if sep and head in _SLASHED_PREFIXES:
        rest = f"{head}/{tail}"
    return f"wds/{rest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", text)


def clip_benchmark_results(
    describe: Mapping[str, Any],
    metrics: Mapping[str, float],
    datasets: Mapping[str, Mapping[str, Any]],
    quantization: Mapping[str, Any] | None = None,
    language: str = "en",
) -> dict[str, dict[str, Any]]:
    """``{file name: CLIP_benchmark result}`` for every dataset whose task CLIP_benchmark has and that was measured.

    ``describe``: ``model`` and ``pretrained`` (None is written as ``""``: ``build`` joins them as strings);
    ``metrics``: metrics.json's ``<dataset>/<metric>``; ``datasets``: ``{name: {"task": "classification" |
    "retrieval", "benchmark_name": ...}}``. A top-k or recall@k above the number of classes / candidates is NaN,
    as CLIP_benchmark writes top-5 of a dataset with fewer than 5 classes. File names follow
    ``clip_benchmark eval``'s ``{dataset}_{pretrained}_{model}_{language}_{task}.json``.
    """
    model = str(describe["model"])
    pretrained = "" if describe.get("pretrained") is None else str(describe["pretrained"])
    pretrained_slug = os.path.basename(pretrained) if os.path.isfile(pretrained) else pretrained
    out: dict[str, dict[str, Any]] = {}
    for name, info in datasets.items():
        if info["task"] not in TASKS:
            continue
        task, keys = TASKS[info["task"]]
        if not all(f"{name}/{ours}" in metrics for ours in keys.values()):
            continue  # not measured (no text tower: k-NN instead, which CLIP_benchmark does not have)
        dataset = info["benchmark_name"]
        result = {
            "dataset": dataset,
            "model": model,
            "pretrained": pretrained,
            "task": task,
            "metrics": {theirs: float(metrics[f"{name}/{ours}"]) for theirs, ours in keys.items()},
            "language": language,
        }
        if quantization is not None:
            extra = dict(quantization)
            cosine = metrics.get(f"{name}/feature_cosine_to_float")
            if cosine is not None:
                extra["feature_cosine_to_float"] = float(cosine)
            result["quantization"] = extra
        slug = _slug(dataset.replace("wds/", "", 1).replace("/", "_"))
        out[f"{slug}_{_slug(pretrained_slug)}_{_slug(model)}_{language}_{task}.json"] = result
    return out


def write_clip_benchmark_results(directory: str | os.PathLike, results: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Write :func:`clip_benchmark_results` into ``directory`` (one JSON each; NaN as CLIP_benchmark writes it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name, result in results.items():
        path = directory / file_name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths
