"""The CSV and torchvision sources, classes.json, and the class-imbalance knobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_image
from finetune.config import compose
from finetune.data import ImageDataModule
from finetune.data.sources import DataSplits, Split, csv_source, torchvision_source
from finetune.errors import FineTuneError
from finetune.builders import build_datamodule, build_module
from finetune.train import train

TINY = ["backbone.name=test_resnet", "backbone.pretrained=false", "data.image_size=32"]


def _images(root: Path, per_class: dict[str, int]) -> dict[str, list[Path]]:
    """``root/<label>/<i>.png`` for each label; colors differ by class so they are learnable."""
    rng = np.random.default_rng(0)
    return {
        label: [write_image(root / label / f"{i}.png", rng, size=16, color=c) for i in range(n)]
        for c, (label, n) in enumerate(per_class.items())
    }


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _listing(tmp_path: Path, per_class: dict[str, int] | None = None) -> Path:
    """A CSV without a split column, next to its images, with paths relative to it."""
    files = _images(tmp_path / "imgs", per_class or {"cat": 8, "ant": 8})
    rows = [f"imgs/{label}/{p.name},{label}" for label, paths in files.items() for p in paths]
    return _write_csv(tmp_path / "list.csv", "path,label", rows)


# -- csv -----------------------------------------------------------------------------------


def test_csv_without_split_column_holds_out_val(tmp_path: Path) -> None:
    data = csv_source(_listing(tmp_path), val_fraction=0.25, seed=0)
    assert data.classes == ["ant", "cat"]  # sorted, not in order of appearance
    assert np.bincount(data.splits["val"].labels).tolist() == [2, 2]
    assert len(data.splits["train"]) == 12 and "test" not in data.splits
    assert not set(data.splits["train"].items) & set(data.splits["val"].items)
    assert all(p.is_file() for p in data.splits["train"].items)  # resolved against the CSV's folder
    assert csv_source(tmp_path / "list.csv", val_fraction=0.25, seed=0).splits["val"].items == data.splits["val"].items


def test_csv_split_column(tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs", {"b": 6, "a": 6})
    rows = []
    for label, paths in files.items():
        for i, p in enumerate(paths):
            rows.append(f"../imgs/{label}/{p.name},{label},{['train', 'train', 'train', 'train', 'val', 'test'][i]}")
    rows.append(f"{files['a'][0]},a,train")  # absolute paths are kept as they are
    data = csv_source(_write_csv(tmp_path / "lists" / "all.csv", "path,label,split", rows))
    assert data.classes == ["a", "b"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9, "val": 2, "test": 2}
    assert data.splits["test"].labels.tolist() == [1, 0]
    assert not any("more than one split" in n for n in data.notes)  # listed twice, but in one split


def test_csv_files_in_two_splits_is_a_warning(tmp_path: Path) -> None:
    files = _images(tmp_path, {"x": 3, "y": 3})
    rows = [f"{label}/{p.name},{label},train" for label, ps in files.items() for p in ps]
    rows += ["x/0.png,x,val", "y/0.png,y,val", "y/1.png,y,test"]
    data = csv_source(_write_csv(tmp_path / "l.csv", "path,label,split", rows))
    assert [n for n in data.notes if "more than one split" in n] == [
        "warning: 3 file(s) appear in more than one split; val/test scores on them are optimistic"
    ]


def test_csv_errors(tmp_path: Path) -> None:
    _images(tmp_path, {"x": 2, "y": 2})
    with pytest.raises(FineTuneError, match=r"CSV file '.*nope.csv' does not exist"):
        csv_source(tmp_path / "nope.csv")
    with pytest.raises(FineTuneError, match="data.path is not set"):
        csv_source(None)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FineTuneError, match="is empty"):
        csv_source(tmp_path / "empty.csv")
    with pytest.raises(FineTuneError, match="header but no rows"):
        csv_source(_write_csv(tmp_path / "h.csv", "path,label", []))
    with pytest.raises(FineTuneError, match=r"lacks column\(s\) label \(has: path, class\)"):
        csv_source(_write_csv(tmp_path / "c.csv", "path,class", ["x/0.png,x"]))
    with pytest.raises(FineTuneError, match=r"row 5: val label 'z' is not among the training classes"):
        csv_source(_write_csv(tmp_path / "v.csv", "path,label,split",
                              ["x/0.png,x,train", "y/0.png,y,train", "x/1.png,x,val", "y/1.png,z,val"]))
    with pytest.raises(FineTuneError, match=r"row 3: image '.*x/7.png' does not exist \(2 of 4 listed"):
        csv_source(_write_csv(tmp_path / "m.csv", "path,label", ["x/0.png,x", "x/7.png,x", "y/0.png,y", "y/9.png,y"]))
    with pytest.raises(FineTuneError, match=r"row 2: split 'dev' is not one of train, val, test"):
        csv_source(_write_csv(tmp_path / "s.csv", "path,label,split", ["x/0.png,x,dev"]))


def test_csv_datamodule_batches(tmp_path: Path) -> None:
    dm = ImageDataModule("csv", path=_listing(tmp_path), image_size=32, batch_size=4, val_fraction=0.25)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and dm.classes == ["ant", "cat"]


def test_train_writes_classes_json(tmp_path: Path) -> None:
    cfg = compose([*TINY, "data=csv", f"data.path={_listing(tmp_path)}", "data.num_workers=0", "data.batch_size=8",
                   "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "freeze=head_only"])
    train(cfg, tmp_path / "run")
    classes = json.loads((tmp_path / "run" / "classes.json").read_text())
    assert classes == {"classes": ["ant", "cat"], "class_to_idx": {"ant": 0, "cat": 1}}


# -- torchvision -----------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def _fake_mnist(root: Path, train: int = 60, test: int = 20) -> Path:
    """MNIST's raw IDX files under ``root/MNIST/raw``: torchvision only checks that they exist.

    (CIFAR10 verifies the md5 of each pickle, so it cannot be faked with small files.)
    """
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n) % 10))
    return root


def test_torchvision_fake_mnist_loads(tmp_path: Path) -> None:
    root = _fake_mnist(tmp_path / "tv")
    data = torchvision_source("MNIST", root, val_fraction=0.5, seed=0)
    assert data.classes[0] == "0 - zero" and len(data.classes) == 10
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 30, "val": 30, "test": 20}
    img = data.splits["train"].items[0]
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert np.bincount(data.splits["val"].labels).tolist() == [3] * 10
    dm = ImageDataModule("torchvision", root=root, name="MNIST", image_size=32, batch_size=5, val_fraction=0.5)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]


def test_torchvision_missing_files_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(FineTuneError, match=r"CIFAR10 \(train\): its files are not under '.*'.*data.download=true"):
        torchvision_source("CIFAR10", tmp_path)
    with pytest.raises(FineTuneError, match="no dataset class 'CIFAR11'.*did you mean CIFAR10"):
        torchvision_source("CIFAR11", tmp_path)
    with pytest.raises(FineTuneError, match="data.name is not set"):
        torchvision_source(None, tmp_path)
    with pytest.raises(FineTuneError, match="data.root is not set"):
        torchvision_source("MNIST", None)
    assert not any(tmp_path.iterdir())  # download=False wrote nothing


# -- class imbalance ----------------------------------------------------------------------------


def test_balanced_class_weights_from_an_imbalanced_folder(tmp_path: Path) -> None:
    _images(tmp_path / "imb", {"many": 12, "few": 4, "some": 8})
    cfg = compose([*TINY, "data=folder", f"data.root={tmp_path / 'imb'}", "data.val_fraction=0.25",
                   "loss.class_weights=balanced"])
    dm = build_datamodule(cfg)
    counts = dm.class_counts()["train"]
    assert dm.classes == ["few", "many", "some"] and counts == [3, 9, 6]
    model = build_module(cfg, dm)
    expected = [18 / (3 * 3), 18 / (3 * 9), 18 / (3 * 6)]
    assert model.criterion.weight.tolist() == pytest.approx(expected)
    assert model.hparams["class_weights"] == pytest.approx(expected)

    listed = compose([*TINY, "loss.class_weights=[1.0,2.0,3.0]"])
    assert build_module(listed, dm).criterion.weight.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(FineTuneError, match="2 value"):
        build_module(compose([*TINY, "loss.class_weights=[1.0,2.0]"]), dm)
    assert build_module(compose(TINY), dm).criterion.weight is None


def test_weighted_sampler_evens_out_classes() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    train = Split(list(np.zeros((1000, 4, 4, 3), np.uint8)), labels)
    data = DataSplits("imbalanced", ["common", "rare"], {"train": train, "val": train.subset(np.arange(10))})

    def draws(seed: int) -> list[int]:
        dm = ImageDataModule(data, image_size=8, sampler="weighted", seed=seed, augment="none")
        return list(dm.train_dataloader().sampler)

    drawn = draws(0)
    assert len(drawn) == 1000
    assert 0.4 < labels[drawn].mean() < 0.6  # the rare class is drawn about half the time, not 10%
    assert drawn == draws(0) and drawn != draws(1)
    dm = ImageDataModule(data, image_size=8, sampler="weighted", augment="none")
    assert isinstance(dm.val_dataloader().sampler, torch.utils.data.SequentialSampler)
    with pytest.raises(FineTuneError, match="unknown sampler 'uniform'"):
        ImageDataModule(data, sampler="uniform")
