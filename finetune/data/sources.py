"""Where labelled images come from, split into train/val(/test).

A source returns :class:`DataSplits`: class names plus, per split, items (decoded
uint8 RGB arrays, or image file paths read lazily) and integer labels. Splits are
stratified and seeded, so every run of a sweep sees the same images.
"""

from __future__ import annotations

import csv
import gzip
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

from finetune.data.images import is_image_file
from finetune.data.photos import photo_crops
from finetune.errors import FineTuneError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "SOURCES",
    "DataSplits",
    "Split",
    "build_source",
    "csv_source",
    "digits",
    "fashion_mnist",
    "folder",
    "photos",
    "read_idx",
    "stratified_split",
    "torchvision_source",
]


@dataclass
class Split:
    """Items (arrays or paths) and their integer labels."""

    items: list[Any]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split([self.items[i] for i in idx], self.labels[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class DataSplits:
    """Class names, splits by name (``train``, ``val``, optional ``test``) and notes for the summary."""

    name: str
    classes: list[str]
    splits: dict[str, Split]
    notes: list[str] = field(default_factory=list)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, split off) with ``fraction`` of each class split off."""
    idx = np.arange(len(labels))
    if fraction <= 0:
        return idx, idx[:0]
    counts = np.bincount(labels)
    if (counts[counts > 0] < 2).any():
        raise FineTuneError(f"cannot split off a {what} set: some class has only 1 image (need at least 2 per class)")
    try:
        kept, split = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:
        raise FineTuneError(f"cannot split off a {what} set of fraction {fraction}: {e}") from None
    return np.sort(kept), np.sort(split)


def digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are 0..16 ink intensity; scale to 8-bit and repeat into RGB.
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    splits = _train_val_test(_rgb_split(gray, bunch.target.astype(np.int64)), val_fraction, test_fraction, seed)
    return DataSplits("digits", [str(i) for i in range(10)], splits)


def _train_val_test(everything: Split, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Split]:
    """Stratified test, then val, split off one pool; fractions are of the whole pool."""
    rest, test = stratified_split(everything.labels, test_fraction, seed, "test")
    rest_split = everything.subset(rest)
    train, val = stratified_split(rest_split.labels, val_fraction / (1 - test_fraction), seed, "validation")
    splits = {"train": rest_split.subset(train), "val": rest_split.subset(val)}
    if len(test):
        splits["test"] = everything.subset(test)
    return splits


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not, as a uint8 array.

    The header is two zero bytes, the type code ``0x08`` (unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise FineTuneError(f"cannot read IDX file '{path}': {e}") from None
    magic = raw[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise FineTuneError(
            f"'{path}' is not an IDX file of {ndim}-d unsigned bytes (magic {magic.hex() or 'missing'}, "
            f"expected 000008{ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FineTuneError(f"IDX file '{path}' is truncated in its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    if len(raw) - header != int(np.prod(shape)):
        raise FineTuneError(
            f"IDX file '{path}' holds {len(raw) - header} bytes of data; its header {shape} says {int(np.prod(shape))}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _idx_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FineTuneError(f"Fashion-MNIST file '{name}.gz' (or '{name}') is missing from '{root}'")


def _fashion_part(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"), 3)
    labels_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(labels_path, 1)
    if len(labels) != len(images):
        raise FineTuneError(f"'{labels_path}' has {len(labels)} labels for {len(images)} images")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise FineTuneError(f"'{labels_path}' has label {labels.max()}; Fashion-MNIST labels are 0..9")
    return images, labels.astype(np.int64)


def _rgb_split(gray: np.ndarray, labels: np.ndarray) -> Split:
    # One contiguous block, items are views into it: 70k separate arrays would be slower to build.
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    return Split(list(rgb), labels)


def fashion_mnist(
    path: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    train_per_class: int | None = None,
) -> DataSplits:
    """Zalando's Fashion-MNIST (28x28 grayscale clothes, 10 classes) from its IDX files.

    ``test`` is the official 10,000-image test set; ``val`` is a stratified, seeded
    ``val_fraction`` of the 60,000 training images. ``train_per_class`` then keeps a seeded
    random ``N`` of each class in ``train`` (val and test stay whole, so runs with different
    ``N`` are scored on the same images; a smaller ``N`` picks a subset of a larger one).
    """
    root = Path(path).expanduser() if path not in (None, "") else FASHION_MNIST_DIR
    if not root.is_dir():
        if root == FASHION_MNIST_DIR:
            raise FineTuneError(
                f"Fashion-MNIST folder '{root}' does not exist; install it with "
                "`apt-get install dataset-fashion-mnist` or pass data.path=DIR"
            )
        raise FineTuneError(f"Fashion-MNIST folder '{root}' does not exist (data.path)")
    if train_per_class is not None and train_per_class < 1:
        raise FineTuneError(f"train_per_class must be at least 1 (or null for all), got {train_per_class}")
    train_gray, train_labels = _fashion_part(root, "train")
    test_gray, test_labels = _fashion_part(root, "t10k")

    kept, val = stratified_split(train_labels, val_fraction, seed, "validation")
    notes: list[str] = []
    if train_per_class is not None:
        order = kept[np.random.default_rng(seed).permutation(len(kept))]
        per_class = [order[train_labels[order] == c][:train_per_class] for c in range(len(FASHION_MNIST_CLASSES))]
        kept = np.sort(np.concatenate(per_class))
        notes.append(f"train: {train_per_class} image(s) per class kept (train_per_class)")
    splits = {
        "train": _rgb_split(train_gray[kept], train_labels[kept]),
        "val": _rgb_split(train_gray[val], train_labels[val]),
        "test": _rgb_split(test_gray, test_labels),
    }
    return DataSplits(f"fashion_mnist:{root}", list(FASHION_MNIST_CLASSES), splits, notes)


def photos(
    per_class: int = 60,
    size: int = 224,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    photos: Sequence[str] | None = None,
) -> DataSplits:
    """Seeded random crops of scikit-image's bundled colour photographs, one class per photo.

    See :func:`finetune.data.photos.photo_crops` for how crops are drawn.
    """
    names, items, labels = photo_crops(per_class=per_class, size=size, seed=seed, photos=photos)
    splits = _train_val_test(Split(items, labels), val_fraction, test_fraction, seed)
    return DataSplits("photos", names, splits)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, classes: list[str], notes: list[str], what: str) -> Split:
    items: list[Path] = []
    labels: list[int] = []
    index = {c: i for i, c in enumerate(classes)}
    ignored = 0
    for d in _class_dirs(root):
        if d.name not in index:
            raise FineTuneError(f"class folder '{d}' in {what} is not among the training classes {classes}")
        files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if is_image_file(p)]
        ignored += len(files) - len(images)
        if not images:
            raise FineTuneError(f"class folder '{d}' holds no images")
        items += images
        labels += [index[d.name]] * len(images)
    if ignored:
        notes.append(f"{what}: ignored {ignored} file(s) without an image extension")
    return Split(items, np.asarray(labels, dtype=np.int64))


def folder(root: str | Path | None, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """An image folder: ``root/<class>/*`` or ``root/train/<class>``, ``root/val/<class>``, ``root/test/<class>``.

    In the first layout a stratified, seeded ``val_fraction`` of each class is held out.
    """
    if root is None or str(root) == "":
        raise FineTuneError("data.root is not set; pass data.root=DIR")
    root = Path(root).expanduser()
    if not root.exists():
        raise FineTuneError(f"data root '{root}' does not exist")
    if not root.is_dir():
        raise FineTuneError(f"data root '{root}' is not a directory")
    notes: list[str] = []
    split_layout = (root / "train").is_dir()
    train_root = root / "train" if split_layout else root
    classes = [d.name for d in _class_dirs(train_root)]
    if len(classes) < 2:
        raise FineTuneError(
            f"data root '{train_root}' has {len(classes)} class folder(s); need at least 2 (one folder per class)"
        )
    train = _scan(train_root, classes, notes, "train")
    splits: dict[str, Split] = {}
    if split_layout and (root / "val").is_dir():
        splits = {"train": train, "val": _scan(root / "val", classes, notes, "val")}
    else:
        kept, held = stratified_split(train.labels, val_fraction, seed, "validation")
        splits = {"train": train.subset(kept), "val": train.subset(held)}
    if split_layout and (root / "test").is_dir():
        splits["test"] = _scan(root / "test", classes, notes, "test")
    return DataSplits(f"folder:{root}", classes, splits, notes)


CSV_SPLITS = ("train", "val", "test")


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(row number, row)`` pairs; rows are numbered as a spreadsheet shows them (header = 1)."""
    try:
        # utf-8-sig: spreadsheets often save a byte-order mark, which would otherwise stick to 'path'.
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, skipinitialspace=True)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = []
            for row in reader:
                if any((v or "").strip() for k, v in row.items() if k is not None):  # skip blank lines
                    rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FineTuneError(f"cannot read CSV '{path}': {e}") from None
    return header, rows


def csv_source(path: str | Path | None, val_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """Images listed in a CSV with columns ``path,label`` and optional ``split`` (train/val/test).

    Relative paths are relative to the CSV's folder. Without a ``split`` column (or without
    ``val`` rows) a stratified, seeded ``val_fraction`` of the training rows is held out.
    """
    if path is None or str(path) == "":
        raise FineTuneError("data.path is not set; pass data.path=FILE.csv")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FineTuneError(f"CSV file '{path}' does not exist (data.path)")
    header, rows = _read_csv_rows(path)
    if not header:
        raise FineTuneError(f"CSV file '{path}' is empty; it needs a header row path,label[,split]")
    missing_cols = [c for c in ("path", "label") if c not in header]
    if missing_cols:
        raise FineTuneError(
            f"CSV file '{path}' lacks column(s) {', '.join(missing_cols)} (has: {', '.join(header)}); "
            "it needs path,label and optionally split"
        )
    if not rows:
        raise FineTuneError(f"CSV file '{path}' has a header but no rows")
    has_split = "split" in header
    by_split: dict[str, list[tuple[int, Path, str]]] = {s: [] for s in CSV_SPLITS}
    missing: list[tuple[int, Path]] = []
    for n, row in rows:
        split = row.get("split", "") if has_split else "train"
        if split not in by_split:
            raise FineTuneError(f"CSV file '{path}' row {n}: split '{split}' is not one of train, val, test")
        if not row["path"] or not row["label"]:
            raise FineTuneError(f"CSV file '{path}' row {n}: empty {'path' if not row['path'] else 'label'}")
        file = Path(row["path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            missing.append((n, file))
        by_split[split].append((n, file, row["label"]))
    if missing:
        n, file = missing[0]
        raise FineTuneError(
            f"CSV file '{path}' row {n}: image '{file}' does not exist "
            f"({len(missing)} of {len(rows)} listed images are missing)"
        )
    if not by_split["train"]:
        raise FineTuneError(f"CSV file '{path}' has no rows with split 'train'")
    classes = sorted({label for _, _, label in by_split["train"]})
    if len(classes) < 2:
        raise FineTuneError(f"CSV file '{path}' has {len(classes)} training class(es); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    for split in ("val", "test"):
        for n, _, label in by_split[split]:
            if label not in index:
                raise FineTuneError(
                    f"CSV file '{path}' row {n}: {split} label '{label}' is not among the training classes"
                )

    def to_split(entries: list[tuple[int, Path, str]]) -> Split:
        return Split([f for _, f, _ in entries], np.asarray([index[lbl] for _, _, lbl in entries], dtype=np.int64))

    train = to_split(by_split["train"])
    notes: list[str] = []
    if by_split["val"]:
        splits = {"train": train, "val": to_split(by_split["val"])}
    else:
        kept, held = stratified_split(train.labels, val_fraction, seed, "validation")
        splits = {"train": train.subset(kept), "val": train.subset(held)}
        if has_split:
            notes.append(f"no val rows in the CSV: held out val_fraction {val_fraction} of train")
    if by_split["test"]:
        splits["test"] = to_split(by_split["test"])
    # A file in two splits is usually a listing mistake, and it inflates val/test scores; but a
    # deliberate sanity check does it too, so it is reported rather than refused.
    seen: dict[Path, set[str]] = {}
    for split, entries in by_split.items():
        for _, file, _ in entries:
            seen.setdefault(file.resolve(), set()).add(split)
    shared = sum(len(s) > 1 for s in seen.values())
    if shared:
        notes.append(f"warning: {shared} file(s) appear in more than one split; val/test scores on them are optimistic")
    return DataSplits(f"csv:{path}", classes, splits, notes)


def _torchvision_class(name: str | None) -> type:
    import torchvision.datasets

    if not name:
        raise FineTuneError("data.name is not set; pass a torchvision.datasets class, e.g. data.name=CIFAR10")
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torchvision.datasets.VisionDataset)):
        import difflib

        names = [n for n in dir(torchvision.datasets) if isinstance(getattr(torchvision.datasets, n), type)]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FineTuneError(f"torchvision.datasets has no dataset class '{name}' (data.name){hint}")
    return cls


def _open_torchvision(cls: type, root: Path, part: str, download: bool) -> Any:
    """``cls``'s train or test part, for both constructor conventions (``train=bool``, ``split=str``)."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        kwargs: dict[str, Any] = {"train": part == "train"}
    elif "split" in params:
        kwargs = {"split": part}
    else:
        raise FineTuneError(
            f"torchvision dataset {cls.__name__} takes neither train= nor split=; use data=folder or data=csv instead"
        )
    try:
        return cls(root=str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        if download:
            raise FineTuneError(
                f"torchvision dataset {cls.__name__} ({part}) could not be downloaded into '{root}': {e}"
            ) from None
        raise FineTuneError(
            f"torchvision dataset {cls.__name__} ({part}): its files are not under '{root}' (data.root); "
            f"data.download=true fetches them"
        ) from None
    except ValueError as e:  # e.g. a split name the class does not know
        raise FineTuneError(f"torchvision dataset {cls.__name__} has no {part} split: {e}") from None


def _as_rgb(images: np.ndarray) -> np.ndarray | None:
    """A uint8 ``(N, H, W, 3)`` block from gray ``(N, H, W)``, HWC or CHW arrays; None for other layouts."""
    if images.dtype != np.uint8:
        return None
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4:
        return None
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):  # SVHN, STL10 store CHW
        images = images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images if images.shape[-1] == 3 else None


def _torchvision_split(dataset: Any) -> Split:
    import torch

    data = getattr(dataset, "data", None)
    targets = getattr(dataset, "targets", getattr(dataset, "labels", None))
    if isinstance(data, torch.Tensor):  # MNIST and its kin keep tensors
        data = data.numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.numpy()
    rgb = _as_rgb(data) if isinstance(data, np.ndarray) else None
    if rgb is not None and targets is not None and len(rgb) == len(targets) == len(dataset):
        # One contiguous block (views, as for Fashion-MNIST): no per-image PIL round trip.
        return Split(list(np.ascontiguousarray(rgb)), np.asarray(targets, dtype=np.int64))
    items: list[np.ndarray] = []
    labels: list[int] = []
    for i in range(len(dataset)):
        image, label = dataset[i]
        items.append(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8))
        labels.append(int(label))
    return Split(items, np.asarray(labels, dtype=np.int64))


def torchvision_source(
    name: str | None,
    root: str | Path | None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """A ``torchvision.datasets`` class by name (CIFAR10, MNIST, SVHN, ...) from files under ``root``.

    ``test`` is the dataset's test part; ``val`` is a stratified, seeded ``val_fraction`` of
    its train part. Nothing is downloaded unless ``download`` is true.
    """
    cls = _torchvision_class(name)
    if root is None or str(root) == "":
        raise FineTuneError("data.root is not set; pass data.root=DIR (where the dataset's files are)")
    root = Path(root).expanduser()
    if download:
        root.mkdir(parents=True, exist_ok=True)
    train_set = _open_torchvision(cls, root, "train", download)
    test_set = _open_torchvision(cls, root, "test", download)
    train_all, test = _torchvision_split(train_set), _torchvision_split(test_set)
    for part, split in (("train", train_all), ("test", test)):
        if len(split) and split.labels.min() < 0:
            raise FineTuneError(f"torchvision dataset {cls.__name__} ({part}) has unlabelled images (label < 0)")
    num_classes = int(max(train_all.labels.max(initial=-1), test.labels.max(initial=-1))) + 1
    names = getattr(train_set, "classes", None)
    classes = [str(c) for c in names] if names and len(names) >= num_classes else [str(i) for i in range(num_classes)]
    kept, val = stratified_split(train_all.labels, val_fraction, seed, "validation")
    splits = {"train": train_all.subset(kept), "val": train_all.subset(val), "test": test}
    return DataSplits(f"torchvision:{cls.__name__}:{root}", classes, splits)


SOURCES: dict[str, Callable[..., DataSplits]] = {
    "csv": csv_source,
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "folder": folder,
    "photos": photos,
    "torchvision": torchvision_source,
}


def build_source(name: str, /, **kwargs: Any) -> DataSplits:
    """Build a source by name with its own keyword arguments."""
    if name not in SOURCES:
        raise FineTuneError(f"unknown data source '{name}'; choose one of {', '.join(SOURCES)}")
    return SOURCES[name](**kwargs)
