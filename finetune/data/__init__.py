"""Data sources, albumentations pipelines and the ImageDataModule."""

from finetune.data.datamodule import ImageDataModule, ImageDataset, backbone_data_config
from finetune.data.sources import SOURCES, DataSplits, Split, build_source

__all__ = ["SOURCES", "DataSplits", "ImageDataModule", "ImageDataset", "Split", "backbone_data_config", "build_source"]
