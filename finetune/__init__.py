"""finetune: fine-tune ImageNet-pretrained timm backbones on your labelled images.

The names below load on first use (PEP 562), so ``import finetune`` stays quick: importing
Lightning and timm takes seconds, and a command or submodule that needs neither should not wait
for them (``python -m finetune.shard --help``: 0.2 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
