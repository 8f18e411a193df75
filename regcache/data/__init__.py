"""Data loading without Lightning: shard discovery, rank x worker splitting, decoding, sampling."""

from .reader import (
    IMAGE_EXTS,
    CanonicalBatches,
    EncodedImages,
    ShardDataset,
    ShardReadError,
    SkipCounter,
    collate,
    default_transform,
    iter_tar_samples,
    make_sample_id,
    shard_error_report,
    split_sample_id,
)
from .sampling import IndexEntry, OverlapError, assert_disjoint, class_balanced_sample, scan_index
from .shards import (
    DatasetInfo,
    DatasetLayoutError,
    ShardSourceError,
    expand_pattern,
    read_dataset_info,
    resolve_split_shards,
)
from .splitting import Assignment, ShardPart, assign_work, current_consumer, dist_rank_world

__all__ = [
    "IMAGE_EXTS",
    "Assignment",
    "CanonicalBatches",
    "DatasetInfo",
    "DatasetLayoutError",
    "EncodedImages",
    "IndexEntry",
    "OverlapError",
    "ShardDataset",
    "ShardPart",
    "ShardReadError",
    "ShardSourceError",
    "SkipCounter",
    "assert_disjoint",
    "assign_work",
    "class_balanced_sample",
    "collate",
    "current_consumer",
    "default_transform",
    "dist_rank_world",
    "expand_pattern",
    "iter_tar_samples",
    "make_sample_id",
    "read_dataset_info",
    "resolve_split_shards",
    "scan_index",
    "shard_error_report",
    "split_sample_id",
]
