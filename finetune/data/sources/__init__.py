"""Where labelled images come from: one module per source, found by name in :data:`SOURCES` (``data=NAME``).

Each source is a dataclass (its fields are its config, see :mod:`finetune.data.sources.base`)
with ``load(seed) -> DataSplits``. Importing this package registers every source below; the
lower-case functions (``folder(root, seed=0, **fields)``, ...) build and load one in a call.
"""

from finetune.data.sources import (  # noqa: F401  (register)
    csv_listing,
    fashion,
    image_folder,
    sharded,
    skimage_photos,
    sklearn_digits,
    torchvision_datasets,
)
from finetune.data.sources.base import (
    SOURCES,
    DataSplits,
    Source,
    Split,
    build_source,
    hold_out,
    register,
    stratified_split,
    train_val_test,
)
from finetune.data.sources.csv_listing import CsvListing, csv_source
from finetune.data.sources.fashion import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST, fashion_mnist
from finetune.data.sources.idx import read_idx
from finetune.data.sources.image_folder import Folder, folder
from finetune.data.sources.sharded import WebDataset
from finetune.data.sources.skimage_photos import Photos, photos
from finetune.data.sources.sklearn_digits import Digits, digits
from finetune.data.sources.torchvision_datasets import TorchvisionDataset, torchvision_source

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "SOURCES",
    "CsvListing",
    "DataSplits",
    "Digits",
    "FashionMNIST",
    "Folder",
    "Photos",
    "Source",
    "Split",
    "TorchvisionDataset",
    "WebDataset",
    "build_source",
    "csv_source",
    "digits",
    "fashion_mnist",
    "folder",
    "hold_out",
    "photos",
    "read_idx",
    "register",
    "stratified_split",
    "torchvision_source",
    "train_val_test",
]
