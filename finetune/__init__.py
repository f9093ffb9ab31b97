"""finetune: fine-tune ImageNet-pretrained timm backbones on your labelled images."""

from finetune.backbones import create_backbone
from finetune.data import ImageDataModule
from finetune.errors import FineTuneError
from finetune.features import FeatureDataModule
from finetune.freezing import FreezeSpec
from finetune.module import FineTuneModule

__version__ = "0.1.0"

__all__ = ["FeatureDataModule", "FineTuneError", "FineTuneModule", "FreezeSpec", "ImageDataModule", "create_backbone", "__version__"]
