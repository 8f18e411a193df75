"""Evaluation metrics, zero-shot classifier builder and outlier statistics (plain torch/torchmetrics)."""

from .clip_benchmark import benchmark_dataset_name, clip_benchmark_results, write_clip_benchmark_results
from .distributed import all_gather_uneven, dedupe_by_id, first_occurrence, gather_by_id
from .metrics import (
    FeatureFidelity,
    KNNAccuracy,
    RetrievalRecallAtK,
    ZeroShotAccuracy,
    feature_cosine_by_id,
    knn_votes,
    retrieval_recall_at_k,
    topk_accuracy,
)
from .outliers import OutlierStats
from .zeroshot import (
    build_zeroshot_classifier,
    classifier_cache_key,
    classifier_cache_spec,
    fill_template,
    zeroshot_logits,
)

__all__ = [
    "FeatureFidelity",
    "KNNAccuracy",
    "OutlierStats",
    "RetrievalRecallAtK",
    "ZeroShotAccuracy",
    "all_gather_uneven",
    "benchmark_dataset_name",
    "build_zeroshot_classifier",
    "classifier_cache_key",
    "classifier_cache_spec",
    "clip_benchmark_results",
    "dedupe_by_id",
    "feature_cosine_by_id",
    "fill_template",
    "first_occurrence",
    "gather_by_id",
    "knn_votes",
    "retrieval_recall_at_k",
    "topk_accuracy",
    "write_clip_benchmark_results",
    "zeroshot_logits",
]
