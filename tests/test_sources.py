"""The offline sources: Fashion-MNIST from Debian's IDX files, and crops of scikit-image's photos."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from finetune.config import compose
from finetune.data import ImageDataModule
from finetune.data import sources
from finetune.data.photos import DEFAULT_PHOTOS, write_photo_folder
from finetune.data.sources import fashion as fashion_source
from finetune.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist, folder, photos, read_idx
from finetune.errors import FineTuneError
from finetune.train import train

# Only these tests need the real files; a machine without the package skips them (CI installs it).
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_fake_fashion(root: Path, train: int = 200, test: int = 30, gz: bool = True) -> Path:
    """Tiny IDX files with Fashion-MNIST's names; train gzipped (or not), test always plain."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, zipped in (("train", train, gz), ("t10k", test, False)):
        parts = {"images-idx3": rng.integers(0, 256, (n, 28, 28)), "labels-idx1": np.arange(n) % 10}
        for kind, array in parts.items():
            data = _idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if zipped:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def fashion() -> sources.DataSplits:
    return fashion_mnist(seed=0)


@needs_fashion_mnist
def test_fashion_mnist_loads_official_splits(fashion: sources.DataSplits) -> None:
    sizes = {k: len(v) for k, v in fashion.splits.items()}
    assert sizes == {"train": 54000, "val": 6000, "test": 10000}
    assert fashion.classes == FASHION_MNIST_CLASSES and fashion.classes[0] == "T-shirt/top"
    for split in fashion.splits.values():
        img = split.items[0]
        assert img.shape == (28, 28, 3) and img.dtype == np.uint8
        assert np.array_equal(img[..., 0], img[..., 2])  # gray repeated into RGB
    assert fashion.splits["val"].class_counts(10) == [600] * 10  # stratified
    assert fashion.splits["test"].class_counts(10) == [1000] * 10
    assert max(int(np.max(i)) for i in fashion.splits["test"].items[:50]) == 255


@needs_fashion_mnist
def test_fashion_mnist_train_per_class_keeps_val_and_test(fashion: sources.DataSplits) -> None:
    small = fashion_mnist(seed=0, train_per_class=20)
    assert small.splits["train"].class_counts(10) == [20] * 10
    assert np.array_equal(small.splits["val"].labels, fashion.splits["val"].labels)
    assert len(small.splits["test"]) == 10000
    val_images = {img.tobytes() for img in fashion.splits["val"].items[:6000]}
    assert not any(img.tobytes() in val_images for img in small.splits["train"].items)
    again = fashion_mnist(seed=0, train_per_class=20)
    assert all(np.array_equal(a, b) for a, b in zip(small.splits["train"].items, again.splits["train"].items))
    with pytest.raises(FineTuneError, match="train_per_class must be at least 1"):
        fashion_mnist(train_per_class=0)


def test_fashion_mnist_reads_plain_and_gzipped_idx(tmp_path: Path) -> None:
    root = _write_fake_fashion(tmp_path / "fm", gz=True)
    data = fashion_mnist(path=root, val_fraction=0.1, seed=1)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 180, "val": 20, "test": 30}
    assert data.splits["val"].class_counts(10) == [2] * 10
    plain = _write_fake_fashion(tmp_path / "plain", gz=False)
    assert len(fashion_mnist(path=plain).splits["test"]) == 30


def test_fashion_mnist_missing_folder_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fashion_source, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(FineTuneError, match="apt-get install dataset-fashion-mnist") as e:
        fashion_mnist()
    assert "\n" not in str(e.value) and "not-installed" in str(e.value)
    with pytest.raises(FineTuneError, match="'.*/elsewhere' does not exist") as e:
        fashion_mnist(path=tmp_path / "elsewhere")
    assert "\n" not in str(e.value)
    root = _write_fake_fashion(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FineTuneError, match="'t10k-labels-idx1-ubyte.gz' .*is missing"):
        fashion_mnist(path=root)


def test_corrupt_idx_files_are_named(tmp_path: Path) -> None:
    root = _write_fake_fashion(tmp_path / "fm", gz=False)
    bad = root / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + bad.read_bytes()[4:])  # labels' magic on an image file
    with pytest.raises(FineTuneError, match=f"'{bad}' is not an IDX file.*magic 00000801") as e:
        fashion_mnist(path=root)
    assert "\n" not in str(e.value)
    truncated = root / "t10k-labels-idx1-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(FineTuneError, match="t10k-labels-idx1-ubyte' holds 27 bytes"):
        read_idx(truncated, 1)
    not_gzip = tmp_path / "train-images-idx3-ubyte.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(FineTuneError, match=f"cannot read IDX file '{not_gzip}'"):
        read_idx(not_gzip, 3)


def test_photos_sizes_labels_and_determinism() -> None:
    data = photos(per_class=8, size=48, seed=0, val_fraction=0.25, test_fraction=0.25)
    assert data.classes == list(DEFAULT_PHOTOS) == ["astronaut", "chelsea", "coffee", "motorcycle_left", "rocket"]
    assert {k: s.class_counts(5) for k, s in data.splits.items()} == {
        "train": [4] * 5, "val": [2] * 5, "test": [2] * 5
    }
    img = data.splits["train"].items[0]
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and img.std() > 5
    same = photos(per_class=8, size=48, seed=0)
    for name, split in data.splits.items():
        assert np.array_equal(split.labels, same.splits[name].labels)
        assert all(np.array_equal(a, b) for a, b in zip(split.items, same.splits[name].items))
    other = photos(per_class=8, size=48, seed=1)
    assert not np.array_equal(np.stack(data.splits["train"].items), np.stack(other.splits["train"].items))
    two = photos(per_class=4, size=16, photos=["rocket", "coffee"], val_fraction=0.25, test_fraction=0.25)
    assert two.classes == ["rocket", "coffee"] and sum(len(s) for s in two.splits.values()) == 8


def test_photos_bad_input() -> None:
    with pytest.raises(FineTuneError, match="unknown photo 'eagle'"):
        photos(per_class=4, size=16, photos=["astronaut", "eagle"])
    with pytest.raises(FineTuneError, match="at least 2 photos"):
        photos(per_class=4, size=16, photos=["astronaut"])


def test_write_photo_folder_reads_back_with_folder(tmp_path: Path) -> None:
    root = write_photo_folder(tmp_path / "photos", per_class=5, size=32, seed=0)
    assert sorted(p.name for p in root.iterdir()) == sorted(DEFAULT_PHOTOS)
    assert sorted(p.name for p in (root / "rocket").iterdir()) == [f"{i:04d}.png" for i in range(5)]
    data = folder(root, val_fraction=0.2, seed=0)
    assert data.classes == sorted(DEFAULT_PHOTOS)
    assert data.splits["val"].class_counts(5) == [1] * 5 and data.splits["train"].class_counts(5) == [4] * 5
    # PNG is lossless: the files are the in-memory crops.
    from finetune.data.images import load_image
    from finetune.data.photos import photo_crops

    names, items, _ = photo_crops(per_class=5, size=32, seed=0)
    assert np.array_equal(load_image(root / names[1] / "0003.png"), items[5 + 3])


def test_datamodule_passes_photos_arguments() -> None:
    dm = ImageDataModule("photos", image_size=40, per_class=4, photos=["chelsea", "coffee"],
                         val_fraction=0.25, test_fraction=0.25, batch_size=2)
    assert dm.classes == ["chelsea", "coffee"] and dm.class_counts()["train"] == [2, 2]
    assert dm.data.splits["train"].items[0].shape == (40, 40, 3)
    x, _ = next(iter(dm.train_dataloader()))
    assert tuple(x.shape) == (2, 3, 40, 40)


@needs_fashion_mnist
def test_train_on_fashion_mnist_subset(tmp_path: Path) -> None:
    cfg = compose(["backbone.name=test_resnet", "backbone.pretrained=false", "data=fashion_mnist",
                   "data.train_per_class=20", "data.image_size=32", "data.batch_size=16", "trainer.max_epochs=5",
                   "trainer.enable_progress_bar=false",
                   # Scoring all 16k val+test images takes ~35 s on 2 CPU cores; 64 val and 128 test images
                   # tell a model that learned from one at chance.
                   "+trainer.limit_val_batches=4", "+trainer.limit_test_batches=8"])
    m = train(cfg, tmp_path)
    assert m["split_sizes"] == {"train": 200, "val": 6000, "test": 10000}
    assert m["epochs"] == 5 and m["num_classes"] == 10 and m["data"].startswith("fashion_mnist:")
    # Chance is 0.1. The same run on 28 px digits written as Fashion-MNIST IDX files scores 0.70-0.73
    # (seeds 1-4, 42); images and labels out of step, or a broken split, would score about 0.1.
    assert m["test_acc"] > 0.3
