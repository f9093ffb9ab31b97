"""Data sources (a registry, one module each), augmentation presets, albumentations pipelines and the ImageDataModule.

The names load on first use (PEP 562): the config reads the presets and the sources' registry, and
``--help`` composes the config, so it must not wait for Lightning (the data modules) to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.lazy import lazy_exports

# name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(["AUGMENT_PRESETS", "AugmentConfig"], "finetune.data.augment"),
    **dict.fromkeys(["ImageDataModule", "ImageDataset", "backbone_data_config"], "finetune.data.datamodule"),
    **dict.fromkeys(["SOURCES", "DataSplits", "Source", "Split", "build_source", "register"], "finetune.data.sources"),
    "StreamingDataModule": "finetune.data.streaming",
}

__all__ = [
    "AUGMENT_PRESETS", "SOURCES", "AugmentConfig", "DataSplits", "ImageDataModule", "ImageDataset", "Source", "Split",
    "StreamingDataModule", "backbone_data_config", "build_source", "register",
]

if TYPE_CHECKING:
    from finetune.data.augment import AUGMENT_PRESETS, AugmentConfig
    from finetune.data.datamodule import ImageDataModule, ImageDataset, backbone_data_config
    from finetune.data.sources import SOURCES, DataSplits, Source, Split, build_source, register
    from finetune.data.streaming import StreamingDataModule


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
