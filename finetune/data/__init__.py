"""Data sources (a registry, one module each), augmentation presets, albumentations pipelines and the ImageDataModule."""

from finetune.data.augment import AUGMENT_PRESETS, AugmentConfig
from finetune.data.datamodule import ImageDataModule, ImageDataset, backbone_data_config
from finetune.data.sources import SOURCES, DataSplits, Source, Split, build_source, register
from finetune.data.streaming import StreamingDataModule

__all__ = [
    "AUGMENT_PRESETS", "SOURCES", "AugmentConfig", "DataSplits", "ImageDataModule", "ImageDataset", "Source", "Split",
    "StreamingDataModule", "backbone_data_config", "build_source", "register",
]
