"""LightningDataModules of regcache."""

from .webdataset_shards import ClassificationDataModule, RetrievalDataModule, WebDatasetDataModule

__all__ = ["ClassificationDataModule", "RetrievalDataModule", "WebDatasetDataModule"]
