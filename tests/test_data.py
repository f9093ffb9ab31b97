"""Sources, splits, image decoding and albumentations pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import ImageDataModule
from finetune.data.images import load_image
from finetune.data.sources import digits, folder
from finetune.data.transforms import eval_transform, train_transform
from finetune.errors import FineTuneError


def _ids(split) -> set[int]:
    return {id(x) for x in split.items}


def test_digits_split_is_stratified_disjoint_and_seeded() -> None:
    a, b = digits(seed=3), digits(seed=3)
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sum(sizes.values()) == 1797 and set(sizes) == {"train", "val", "test"}
    assert abs(sizes["test"] - 0.2 * 1797) <= 1 and abs(sizes["val"] - 0.1 * 1797) <= 2
    total = sum((np.bincount(s.labels, minlength=10) for s in a.splits.values()), np.zeros(10, dtype=int))
    for name, fraction in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert np.array_equal(a.splits[name].labels, b.splits[name].labels)
        counts = np.bincount(a.splits[name].labels, minlength=10)
        assert np.abs(counts - fraction * total).max() <= 2, (name, counts)  # stratified
    ids = [_ids(s) for s in a.splits.values()]
    assert sum(len(i) for i in ids) == len(set().union(*ids)) == 1797  # no image in two splits
    other = digits(seed=4)
    assert not np.array_equal(a.splits["test"].labels, other.splits["test"].labels)


def test_digits_images_are_rgb_uint8() -> None:
    img = digits().splits["train"].items[0]
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and img.max() > 200


def test_folder_flat_layout_splits_validation(make_folder) -> None:
    root = make_folder(classes=3, per_class=10)
    data = folder(root, val_fraction=0.2, seed=0)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert np.bincount(data.splits["val"].labels).tolist() == [2, 2, 2]
    assert not set(data.splits["val"].items) & set(data.splits["train"].items)
    assert "test" not in data.splits


def test_folder_split_layout(make_folder) -> None:
    root = make_folder(classes=2, per_class=4, splits=("train", "val", "test"))
    data = folder(root)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 8, "test": 8}


def test_folder_counts_ignored_files(make_folder) -> None:
    root = make_folder(classes=2, per_class=4)
    (root / "class_0" / "notes.txt").write_text("not an image")
    data = folder(root, val_fraction=0.25)
    assert any("ignored 1 file" in n for n in data.notes)


def test_folder_bad_input(tmp_path: Path, make_folder) -> None:
    with pytest.raises(FineTuneError, match="does not exist"):
        folder(tmp_path / "nope")
    with pytest.raises(FineTuneError, match="not set"):
        folder(None)
    one = make_folder(classes=1, per_class=4, name="one")
    with pytest.raises(FineTuneError, match="1 class folder.*need at least 2"):
        folder(one)
    root = make_folder(classes=2, per_class=4, name="empty")
    (root / "class_9").mkdir()
    with pytest.raises(FineTuneError, match="holds no images"):
        folder(root)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16", "RGB"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "I;16":
        Image.fromarray((np.arange(100, dtype=np.uint16).reshape(10, 10) * 600)).save(path)
    else:
        Image.new("RGB", (10, 6), (200, 30, 30)).convert(mode).save(path)
    arr = load_image(path)
    assert arr.shape[2] == 3 and arr.dtype == np.uint8
    if mode == "I;16":
        assert arr.max() > 200  # 16-bit range scaled down, not clipped


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).shape[:2] == (20, 10)


def test_transforms_shape_normalization_and_determinism() -> None:
    img = np.full((8, 8, 3), 255, dtype=np.uint8)
    ev = eval_transform(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = ev(image=img)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)  # (1 - 0.5) / 0.5
    rng_img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert torch.equal(ev(image=rng_img)["image"], ev(image=rng_img)["image"])
    tr = train_transform(32, (0.5,) * 3, (0.5,) * 3, hflip=0.5)
    assert tr(image=rng_img)["image"].shape == (3, 32, 32)


def test_datamodule_uses_backbone_preprocessing(make_folder) -> None:
    root = make_folder(classes=2, per_class=5)
    dm = ImageDataModule("folder", root, backbone="test_efficientnet", val_fraction=0.2, batch_size=4)
    assert dm.image_size == 160 and dm.mean == (0.485, 0.456, 0.406)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 160, 160) and y.dtype == torch.int64
    assert dm.class_counts() == {"train": [4, 4], "val": [1, 1]}
    dm2 = ImageDataModule("folder", root, backbone="test_efficientnet", image_size=48)
    assert dm2.image_size == 48


def test_augment_presets_build_and_none_trains_on_the_eval_pipeline() -> None:
    import albumentations as A

    from finetune.errors import FineTuneError

    for preset, ops in (("light", set()), ("medium", {"ColorJitter", "Affine"}),
                        ("heavy", {"ColorJitter", "Affine", "GaussianBlur", "CoarseDropout"})):
        dm = ImageDataModule("digits", image_size=32, augment=preset)
        dm.setup()
        names = {type(t).__name__ for t in dm.datasets["train"].transform.transforms}
        assert ops <= names and "RandomResizedCrop" in names, preset
    dm = ImageDataModule("digits", image_size=32, augment="none")
    dm.setup()
    assert dm.train_is_deterministic
    a, b = dm.datasets["train"][0][0], dm.datasets["train"][0][0]
    assert torch.equal(a, b) and torch.equal(a, dm.eval_dataset("train")[0][0])
    custom = {"name": "mine", "ops": {"flip": {"_target_": "albumentations.VerticalFlip", "p": 1.0}, "off": None}}
    dm = ImageDataModule("digits", image_size=32, augment=custom)
    dm.setup()
    assert any(isinstance(t, A.VerticalFlip) for t in dm.datasets["train"].transform.transforms)
    with pytest.raises(FineTuneError, match="unknown augment preset 'wild'"):
        ImageDataModule("digits", augment="wild")
    with pytest.raises(FineTuneError, match="augment.ops.bad"):
        ImageDataModule("digits", augment={"name": "x", "ops": {"bad": {"_target_": "albumentations.NoSuchOp"}}})


def test_augment_ops_are_overridable_from_the_command_line() -> None:
    from finetune.config import compose
    from finetune.train import build_datamodule

    cfg = compose(["augment=medium", "augment.ops.affine.p=0.25", "~augment.ops.color_jitter", "data.image_size=32"])
    dm = build_datamodule(cfg)
    dm.setup()
    ops = {type(t).__name__: t for t in dm.datasets["train"].transform.transforms}
    assert "ColorJitter" not in ops and ops["Affine"].p == 0.25


def test_augmentations_are_seeded_by_the_datamodule_seed() -> None:
    def crops(seed: int) -> torch.Tensor:
        dm = ImageDataModule("digits", image_size=32, seed=seed, augment="heavy")
        dm.setup()
        return torch.stack([dm.datasets["train"][i][0] for i in range(8)])

    assert torch.equal(crops(1), crops(1))
    assert not torch.equal(crops(1), crops(2))
