"""finetune: fine-tune ImageNet-pretrained timm backbones on your labelled images.

The names below load on first use (PEP 562), so ``import finetune`` stays quick: importing
Lightning and timm takes seconds, and a command or submodule that needs neither should not wait
for them (``python -m finetune.shard --help``: 0.2 s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.lazy import lazy_exports

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "create_backbone": "finetune.backbones",
    "FreezeSchedule": "finetune.callbacks",
    "RunRecorder": "finetune.callbacks",
    "ImageDataModule": "finetune.data",
    "FineTuneError": "finetune.errors",
    "FeatureDataModule": "finetune.features",
    "FineTuneModule": "finetune.module",
    "FreezeStrategy": "finetune.strategies",
    "get_strategy": "finetune.strategies",
}

__all__ = [
    "FeatureDataModule", "FineTuneError", "FineTuneModule", "FreezeSchedule", "FreezeStrategy", "ImageDataModule",
    "RunRecorder", "create_backbone", "get_strategy", "__version__",
]

if TYPE_CHECKING:
    from finetune.backbones import create_backbone
    from finetune.callbacks import FreezeSchedule, RunRecorder
    from finetune.data import ImageDataModule
    from finetune.errors import FineTuneError
    from finetune.features import FeatureDataModule
    from finetune.module import FineTuneModule
    from finetune.strategies import FreezeStrategy, get_strategy


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
