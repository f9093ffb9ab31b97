"""finetune: fine-tune ImageNet-pretrained timm backbones on your labelled images."""

from finetune.backbones import create_backbone
from finetune.callbacks import FreezeSchedule, RunRecorder
from finetune.data import ImageDataModule
from finetune.errors import FineTuneError
from finetune.features import FeatureDataModule
from finetune.module import FineTuneModule
from finetune.strategies import FreezeStrategy, get_strategy

__version__ = "0.1.0"

__all__ = [
    "FeatureDataModule", "FineTuneError", "FineTuneModule", "FreezeSchedule", "FreezeStrategy", "ImageDataModule",
    "RunRecorder", "create_backbone", "get_strategy", "__version__",
]
